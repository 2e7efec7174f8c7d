import os
import pickle
import re

import pytest

from components import progress
from components.progress import Counted, Progress, beam_worker_count, format_duration, format_rate


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_progress(total, every_s=10.0, worker=None):
    clock, lines = FakeClock(), []
    return Progress("SyntheticStemGen", total, "images", every_s=every_s, clock=clock,
                    log=lines.append, worker=worker), clock, lines


@pytest.mark.parametrize("seconds, text", [
    (0.3, "under 1 s"), (12.4, "12 s"), (59.6, "1 min 00 s"), (185, "3 min 05 s"),
    (3599.7, "1 h 00 min"), (3720, "1 h 02 min"), (3 * 3600 + 59 * 60 + 50, "4 h 00 min"),
])
def test_durations_read_as_a_person_says_them(seconds, text):
    assert format_duration(seconds) == text


def test_slow_rates_are_given_per_minute_or_hour():
    assert format_rate(3.125, "images") == "3.1 images/s"
    assert format_rate(0.05, "images") == "3.0 images/min"
    assert format_rate(0.0005, "images") == "1.8 images/h"


def test_lines_give_rate_and_time_left_at_most_every_interval_and_once_at_the_end():
    steps, clock, lines = fake_progress(480)
    for now, n in ((5, 10), (39, 110), (45, 10), (160, 350), (161, 5)):
        clock.now = now
        steps.advance(n)
    assert lines == [
        "SyntheticStemGen: 120/480 images (25 %), 3.1 images/s, about 1 min 57 s left",
        "SyntheticStemGen: 480/480 images (100 %), 3.0 images/s, took 2 min 40 s",
    ]
    assert steps.done == 485


def test_the_final_line_comes_even_inside_the_interval():
    steps, clock, lines = fake_progress(3)
    for now in (1, 2, 3):
        clock.now = now
        steps.advance()
    assert lines == ["SyntheticStemGen: 3/3 images (100 %), 1.0 images/s, took 3 s"]


def test_a_worker_counts_against_its_share_and_says_when_an_uneven_split_carries_it_past():
    steps, clock, lines = fake_progress(120, worker="worker 42")
    clock.now = 20
    steps.advance(60)
    clock.now = 40
    steps.advance(60)
    clock.now = 50
    steps.advance(10)
    assert lines == [
        "SyntheticStemGen: worker 42: 60/120 images of this worker's share (50 %), 3.0 images/s, "
        "about 20 s left",
        "SyntheticStemGen: worker 42: 120/120 images of this worker's share (100 %), 3.0 images/s, "
        "took 40 s",
        "SyntheticStemGen: worker 42: 130/120 images of this worker's share (108 %), 2.6 images/s, "
        "50 s so far",
    ]


@pytest.mark.parametrize("args, workers", [
    (None, 1),
    ([], 1),
    (["--direct_running_mode=in_memory", "--direct_num_workers=4"], 1),
    (["--direct_num_workers=4"], 1),  # in_memory is the DirectRunner's default
    (["--direct_running_mode=multi_processing", "--direct_num_workers=2"], 2),
    (["--runner=DirectRunner", "--direct_running_mode", "multi_processing",
      "--direct_num_workers", "3"], 3),
    (["--direct_running_mode=multi_processing", "--direct_num_workers=0"], 7),  # every core
    (["--direct_running_mode=multi_processing"], 1),
])
def test_worker_count_from_beam_pipeline_args(args, workers, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert beam_worker_count(args) == workers


def test_progress_lines_reach_stderr_once_whatever_absl_verbosity(capsys):
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        progress.log_line("SyntheticStemGen: 1/2 images (50 %)")
    finally:
        absl_logging.set_verbosity(verbosity)
    assert re.fullmatch(r"\d\d:\d\d:\d\d SyntheticStemGen: 1/2 images \(50 %\)\n",
                        capsys.readouterr().err)


def test_counted_calls_pickle_return_the_result_and_count_against_the_worker_share(capsys):
    absolute = pickle.loads(pickle.dumps(Counted(abs, "PseudoLabeler [train]", 5, "images", 2)))
    assert [absolute(-n) for n in range(3)] == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(rf"\d\d:\d\d:\d\d PseudoLabeler \[train\]: worker {os.getpid()}: "
                        r"3/3 images of this worker's share \(100 %\), (.*, )?took under 1 s",
                        lines[0])


def test_one_worker_counts_against_the_whole_total(capsys):
    counted = Counted(abs, "SyntheticStemGen", 2, "images", 1)
    counted(1)
    counted(2)
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d SyntheticStemGen: 2/2 images \(100 %\), (.*, )?took under 1 s\n",
        capsys.readouterr().err)


def test_count_records_counts_every_gzipped_record_the_pattern_matches(tmp_path):
    import tensorflow as tf

    for name, records in (("a.gz", 3), ("b.gz", 2)):
        with tf.io.TFRecordWriter(str(tmp_path / name), options="GZIP") as writer:
            for n in range(records):
                writer.write(b"x" * n)
    assert progress.count_records(str(tmp_path / "*.gz")) == 5
    assert progress.count_records(str(tmp_path / "none-*.gz")) == 0


def test_epoch_lines_give_metrics_pace_and_time_left():
    import numpy as np
    import tf_keras as keras

    from modules.progress_callback import EpochProgress

    # zero weights and zero targets: loss exactly 0 whatever the optimiser does
    model = keras.Sequential([keras.layers.Dense(1, kernel_initializer="zeros", input_shape=(2,))])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((4, 2), np.float32), np.zeros((4, 1), np.float32)
    ticks, lines = iter([0.0, 10.0, 20.0]), []
    model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0,
              callbacks=[EpochProgress("Trainer", clock=lambda: next(ticks), log=lines.append)])
    assert lines == [
        "Trainer: epoch 1/2, loss 0, val_loss 0, 10 s/epoch, about 10 s left",
        "Trainer: epoch 2/2, loss 0, val_loss 0, 10 s/epoch, took 20 s",
    ]
