"""benchmarks/compare.py: flattening, which way is better, regression flags and exit status,
on small hand-made result files."""

import json

import pytest

from tests import benchmark_script

MACHINE = {"fixed_numpy_workload_s": 0.20, "loadavg_1_5_15": [1.0, 1.0, 1.0], "cpu_count": 2,
           "machine": "x86_64"}


@pytest.fixture(scope="module")
def compare():
    yield from benchmark_script.load("compare")


def run(accuracy=0.90, seconds=10.0, workload=0.20, seed=1):
    return {"settings": {"seed": seed, "max_stage_seconds": 900},
            "calibration_before": dict(MACHINE, fixed_numpy_workload_s=workload),
            "test": {"accuracy": accuracy, "images": 100},
            "throughput": {"wall_s": seconds, "images_per_s": 100 / seconds}}


def write(path, report):
    path.write_text(json.dumps(report))
    return str(path)


def test_flatten_keeps_numbers_by_dotted_key_and_leaves_out_long_lists(compare):
    numbers, left_out = compare.flatten(
        {"a": {"b": 1, "ok": True, "name": "x", "none": None},
         "curve": [0.5, [2, 3]], "images": [{"seconds": 1.0}] * 4, "files": ["a"] * 4},
        max_list=3)
    assert numbers == {"a.b": 1.0, "curve.0": 0.5, "curve.1.0": 2.0, "curve.1.1": 3.0}
    assert left_out == ["images"]


@pytest.mark.parametrize("key, better, timing", [
    ("overall.pixel.vacancy.iou", "higher", False),
    ("default.training.history.val_accuracy.3", "higher", False),
    ("default.agreement_with_components_excluding_outliers.ari", "higher", False),
    ("overall.bulk_false_alarm_rate", "lower", False),
    ("training.history.val_loss.0", "lower", False),
    ("per_core.wall_s", "lower", True),
    ("default.seconds.silhouette_per_k.3", "lower", True),  # a time, not a silhouette
    ("measurements.2.peak_mib", "lower", True),
    ("throughput.s_per_image_median", "lower", True),
    ("throughput.images_per_s_per_core", "higher", True),  # not a time for its "_s"
    ("beam.speedup_2_vs_1_without_startup", "higher", True),
    ("measurements.2.notes.silhouette_rows", None, False),  # a count
    ("default.clustering.chosen_k", None, False),
])
def test_direction_by_name(compare, key, better, timing):
    assert compare.direction(key) == (better, timing)


def test_regressions_beyond_tolerance_are_flagged_in_the_bad_direction_only(compare):
    old = run(accuracy=0.90, seconds=10.0)
    slower_worse = dict(run(accuracy=0.80, seconds=15.0, seed=2), extra={"f1": 0.5})
    result = compare.compare(old, slower_worse, tolerance=0.05, time_tolerance=0.25,
                             calibration_ratio=1.25)
    rows = {r["key"]: r for r in result["rows"]}
    assert result["timings_comparable"]
    assert sorted(result["regressions"]) == ["test.accuracy", "throughput.images_per_s",
                                             "throughput.wall_s"]
    assert rows["test.accuracy"]["change"] == pytest.approx(-0.1 / 0.9)
    assert rows["settings.seed"]["flag"] == "" and rows["settings.seed"]["better"] is None
    assert rows["extra.f1"]["flag"] == "only in new"
    # improvements and changes within the tolerance are no regressions
    better = run(accuracy=0.87, seconds=12.0)  # -3 % and +20 %: inside 5 % and 25 %
    assert compare.compare(old, better, 0.05, 0.25, 1.25)["regressions"] == []
    assert compare.compare(slower_worse, old, 0.05, 0.25, 1.25)["regressions"] == []


def test_timings_from_machines_of_different_speed_are_shown_but_do_not_count(compare):
    old, new = run(seconds=10.0), run(accuracy=0.5, seconds=20.0, workload=0.40)
    result = compare.compare(old, new, 0.05, 0.25, calibration_ratio=1.25)
    rows = {r["key"]: r for r in result["rows"]}
    assert not result["timings_comparable"]
    assert "0.200 s vs 0.400 s (ratio 2.00)" in result["calibration"]
    assert rows["throughput.wall_s"]["flag"] == "slower, machines differ"
    assert result["regressions"] == ["test.accuracy"]  # scores still count
    no_calibration = {key: value for key, value in old.items() if key != "calibration_before"}
    verdict = compare.compare(no_calibration, new, 0.05, 0.25, 1.25)
    assert not verdict["timings_comparable"] and "old run" in verdict["calibration"]


def test_exit_status_for_files_and_folders(compare, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same = write(tmp_path / "a" / "run.json", run())
    worse = write(tmp_path / "b" / "run.json", run(accuracy=0.5))
    write(tmp_path / "b" / "only_new.json", run())
    assert compare.main([same, same]) == 0
    assert compare.main([same, worse]) == 1
    printed = capsys.readouterr().out
    assert "| test.accuracy | 0.9 | 0.5 | -44.4 % | higher | REGRESSION |" in printed
    assert "1 regression(s) in all" in printed
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "in one folder only: only_new.json" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        compare.main([same, str(tmp_path / "b")])  # a file and a folder
    assert bad.value.code == 2


def test_a_childs_peak_memory_is_its_own_not_its_parents():
    """machine.peak_rss_mib (VmHWM) in a fresh process stays far below the 512 MiB its parent
    holds when it starts it; ru_maxrss there would report the parent's size."""
    import resource
    import subprocess
    import sys

    import numpy as np

    ballast = np.ones(2**26)  # 512 MiB, touched
    child = ("import resource, sys; sys.path.insert(0, sys.argv[1]); from machine import "
             "peak_rss_mib; print(peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF)"
             ".ru_maxrss / 1024)")
    done = subprocess.run([sys.executable, "-c", child, benchmark_script.BENCHMARKS],
                          capture_output=True, text=True, check=True)
    own, inherited = (float(value) for value in done.stdout.split())
    assert ballast.sum() == 2**26
    assert own < 256 < 512 <= inherited <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
