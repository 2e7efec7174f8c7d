"""Progress lines a person can follow in the terminal: done of total, rate, time left.

Plain Python (no TFX, Beam or TensorFlow at import), so executors, Beam workers, the science
modules and the Keras callback share one format. Lines go to the `stem_defects.progress`
logger, which writes INFO to stderr itself: the pipeline runners leave absl at WARNING (which
keeps TFX's own INFO chatter out of the terminal), and progress must show all the same.

Under the multi-processing DirectRunner each worker process sees only its part of a step's
elements, so a worker's progress counts against an even share of the total and says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Callable, Optional, Sequence

LOGGER_NAME = "stem_defects.progress"


class _CurrentStderr(logging.Handler):
    """Writes to sys.stderr as it is when a line is logged, not when the handler was made:
    pytest swaps it per test, and a stream kept from then may be closed by now."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break the work it reports on
            self.handleError(record)


def _progress_logger() -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # absl's root handler would print it a second time at INFO
    return logger


def log_line(line: str) -> None:
    """Shows one progress line in the terminal, whatever absl's verbosity."""
    _progress_logger().info(line)


def format_duration(seconds: float) -> str:
    """'under 1 s', '12 s', '3 min 05 s', '1 h 02 min': as precise as a person needs."""
    whole = round(seconds)
    if whole < 1:
        return "under 1 s"
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(round(whole / 60), 60)
    return f"{hours} h {minutes:02d} min"


def format_rate(per_second: float, unit: str) -> str:
    """Per second, or per minute or hour when that keeps a slow rate above 1."""
    if per_second >= 1:
        return f"{per_second:.1f} {unit}/s"
    if per_second * 60 >= 1:
        return f"{per_second * 60:.1f} {unit}/min"
    return f"{per_second * 3600:.1f} {unit}/h"


class Progress:
    """Counts the work a step has done and logs where it stands: at most every `every_s`
    seconds, and once when `done` reaches `total`. Time left is the work left at the mean
    rate so far.

    `worker` (e.g. "worker 12345") marks a Beam worker's progress: `total` is then its even
    share of the step, which an uneven split can leave it short of or carry it past.
    """

    def __init__(self, step: str, total: int, unit: str, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] = log_line, worker: Optional[str] = None):
        self.step, self.total, self.unit, self.worker = step, total, unit, worker
        self.done = 0
        self._every_s, self._clock, self._log = every_s, clock, log
        self._started = self._last_line = clock()
        self._completion_logged = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        completes = self.done >= self.total and not self._completion_logged
        if completes or now - self._last_line >= self._every_s:
            self._log(self.line(now))
            self._last_line = now
            self._completion_logged = self._completion_logged or completes

    def line(self, now: float) -> str:
        elapsed = now - self._started
        share = " of this worker's share" if self.worker else ""
        percent = 100 * self.done // self.total if self.total else 100
        parts = [f"{self.done}/{self.total} {self.unit}{share} ({percent} %)"]
        if elapsed > 0:
            rate = self.done / elapsed
            parts.append(format_rate(rate, self.unit))
            if self.done < self.total:
                parts.append(f"about {format_duration((self.total - self.done) / rate)} left")
        if self.done == self.total:
            parts.append(f"took {format_duration(elapsed)}")
        elif self.done > self.total:
            parts.append(f"{format_duration(elapsed)} so far")
        prefix = f"{self.step}: {self.worker}" if self.worker else self.step
        return f"{prefix}: " + ", ".join(parts)


def beam_worker_count(beam_pipeline_args: Optional[Sequence[str]]) -> int:
    """How many parts the DirectRunner splits each step's elements into: `--direct_num_workers`
    (0: every core) unless `--direct_running_mode` is `in_memory`, the default, which runs one."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--direct_num_workers", type=int, default=1)
    parser.add_argument("--direct_running_mode", default="in_memory")
    options, _ = parser.parse_known_args(list(beam_pipeline_args or ()))
    if options.direct_running_mode == "in_memory":
        return 1
    return options.direct_num_workers or os.cpu_count() or 1


class Counted:
    """`fn` for beam.Map that advances its worker's Progress after every call.

    Picklable: the Progress is made on the first call, in the worker, so its clock starts
    where the work runs. With more than one worker it counts against `total / workers`.
    """

    def __init__(self, fn: Callable, step: str, total: int, unit: str, workers: int):
        self._fn, self._workers = fn, workers
        self._step, self._total, self._unit = step, total, unit
        self._progress: Optional[Progress] = None

    def __call__(self, *args, **kwargs):
        if self._progress is None:
            self._progress = self._worker_progress()
        result = self._fn(*args, **kwargs)
        self._progress.advance()
        return result

    def _worker_progress(self) -> Progress:
        if self._workers <= 1:
            return Progress(self._step, self._total, self._unit)
        share = -(-self._total // self._workers)  # ceiling: the larger parts of an even split
        return Progress(self._step, share, self._unit, worker=f"worker {os.getpid()}")


def count_records(file_pattern: str) -> int:
    """Records in the gzipped TFRecord files matching `file_pattern`: the total of a step
    that reads them (a pass over the compressed bytes, well below the cost of the step)."""
    import tensorflow as tf

    files = tf.io.gfile.glob(file_pattern)
    if not files:
        return 0
    records = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return int(records.reduce(0, lambda count, _: count + 1))
