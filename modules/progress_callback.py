"""Keras callback that logs one progress line per epoch: metrics, pace, time left.

Training is the longest step of the pipeline; this line (through components.progress, so it
shows whatever absl's verbosity) replaces Keras's own per-epoch print and adds the estimate.
"""

from __future__ import annotations

import os
import time
from typing import Callable

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tf_keras as keras  # noqa: E402

from components.progress import format_duration, log_line  # noqa: E402


class EpochProgress(keras.callbacks.Callback):
    """`<step>: epoch 3/25, loss 0.41, val_accuracy 0.83, 42 s/epoch, about 15 min left`,
    the time left from the mean epoch so far."""

    def __init__(self, step: str, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] = log_line):
        super().__init__()
        self._step, self._clock, self._log = step, clock, log
        self._started = None

    def on_train_begin(self, logs=None):
        self._started = self._clock()

    def on_epoch_end(self, epoch, logs=None):
        done, total = epoch + 1, self.params["epochs"]
        elapsed = self._clock() - self._started
        per_epoch = elapsed / done
        parts = [f"epoch {done}/{total}"]
        parts += [f"{name} {float(value):.3g}" for name, value in (logs or {}).items()]
        parts.append(f"{format_duration(per_epoch)}/epoch")
        parts.append(f"about {format_duration(per_epoch * (total - done))} left" if done < total
                     else f"took {format_duration(elapsed)}")
        self._log(f"{self._step}: " + ", ".join(parts))
