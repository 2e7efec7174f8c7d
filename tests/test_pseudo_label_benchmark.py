"""The pseudo-label quality benchmark runs end to end on a few tiny images and writes its JSON."""

import json

import pytest

from components.defects import DEFECT_CLASSES
from tests import benchmark_script



@pytest.fixture(scope="module")
def bench():
    yield from benchmark_script.load("pseudo_label_quality")


def test_benchmark_writes_the_report_and_its_table(bench, tmp_path, capsys):
    out = str(tmp_path / "quality.json")
    report = bench.main(["--materials", "SrTiO3", "--labels", "bulk", "vacancy", "substitution",
                         "--images-per-class", "1", "--size", "128", "--dose-bins", "2",
                         "--seed", "7", "--out", out, "--quiet"])
    with open(out) as handle:
        saved = json.load(handle)  # strict JSON: no NaN
    assert saved["settings"]["seed"] == 7 and saved["overall"]["images"] == 3
    assert [r["label"] for r in sorted(saved["images"], key=lambda r: r["index"])] \
        == [r["label"] for r in sorted(report["images"], key=lambda r: r["index"])]
    assert sorted(r["label"] for r in saved["images"]) == ["bulk", "substitution", "vacancy"]
    assert set(saved["overall"]["pixel"]) == set(DEFECT_CLASSES)
    for metrics in saved["overall"]["pixel"].values():
        assert set(metrics) == {"precision", "recall", "iou", "tp", "fp", "fn"}
        for key in ("precision", "recall", "iou"):
            assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0
    vacancy = saved["overall"]["per_label"]["vacancy"]
    assert set(vacancy) >= {"detection_rate", "hit_rate", "own_class", "flag_rate"}
    assert 0.0 <= saved["overall"]["bulk_false_alarm_rate"] <= 1.0
    assert len(saved["by_dose"]) == 2 and sum(b["images"] for b in saved["by_dose"]) == 3
    assert set(saved["by_material"]) == {"SrTiO3"}
    throughput = saved["throughput"]
    assert throughput["images"] == 3 and throughput["images_per_s_per_core"] > 0
    assert saved["calibration_before"]["fixed_numpy_workload_s"] > 0
    # the README table is generated from the file
    capsys.readouterr()
    bench.main(["--table-only", out])
    table = capsys.readouterr().out
    assert "| class | precision | recall | IoU | detection rate |" in table
    assert "| vacancy |" in table and "| substitution |" in table
    assert "| interstitial |" not in table  # not simulated
