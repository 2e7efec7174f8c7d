"""The segmentation benchmark runs end to end on a few tiny images and writes its JSON."""

import json

import pytest

from components.defects import DEFECT_CLASSES
from tests import benchmark_script

TINY_UNET = {"tile_size": 32, "base_filters": 4, "depth": 2, "batch_size": 4, "epochs": 1,
             "input_stride": 2, "tiles_per_image": 2, "defect_tile_fraction": 0.5}


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_script.load("segmentation_quality")


def test_scores_pool_counts_and_say_none_where_undefined(bench):
    import numpy as np

    counts = np.zeros((3, len(DEFECT_CLASSES)), np.int64)
    counts[:, 0] = (6, 2, 4)  # tp, fp, fn
    counts[:, 1] = (0, 3, 0)  # predicted, never true
    scores = bench.scores(counts)
    vacancy = scores["vacancy"]
    assert vacancy["iou"] == pytest.approx(0.5) and vacancy["precision"] == pytest.approx(0.75)
    assert vacancy["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert scores["substitution"]["precision"] == 0 and scores["substitution"]["recall"] is None
    assert scores["substitution"]["f1"] == 0.0 and scores["substitution"]["iou"] == 0.0
    assert scores["interstitial"]["iou"] is None and scores["interstitial"]["f1"] is None


def test_benchmark_writes_the_report_its_heat_map_and_its_table(bench, tmp_path, capsys):
    out = str(tmp_path / "segmentation.json")
    report = bench.main(["--train-per-class", "1", "--eval-per-class", "1",
                         "--test-per-class", "1", "--size", "96", "--dose-bins", "2",
                         "--frame-size", "300", "--seed", "7", "--segmenter",
                         json.dumps(TINY_UNET), "--out", out, "--quiet"])
    with open(out) as handle:
        saved = json.load(handle)  # strict JSON: no NaN
    pairs = 12  # SrTiO3: bulk + 4 defect classes; CdTe: bulk + 6
    assert saved["settings"]["seed"] == 7 and saved["overall"]["images"] == pairs
    assert saved["training"]["train_images"] == pairs and saved["training"]["eval_images"] == pairs
    assert saved["training"]["config"]["input_stride"] == 2 and len(saved["training"]["loss"]) == 1
    assert len(saved["images"]) == pairs == len(report["images"])
    for name in bench.COMPARISONS:
        assert set(saved["overall"][name]) == set(DEFECT_CLASSES)
        for metrics in saved["overall"][name].values():
            assert set(metrics) == {"precision", "recall", "iou", "f1", "tp", "fp", "fn"}
            for key in ("precision", "recall", "iou", "f1"):
                assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0
    # the teacher's scores are those of its own masks against the truth, pixel for pixel
    truth_pixels = sum(m["tp"] + m["fn"] for m in saved["overall"]["teacher_vs_truth"].values())
    assert truth_pixels == sum(m["tp"] + m["fn"]
                               for m in saved["overall"]["student_vs_truth"].values()) > 0
    assert len(saved["by_dose"]) == 2 and sum(b["images"] for b in saved["by_dose"]) == pairs
    assert set(saved["by_material"]) == {"SrTiO3", "CdTe"}
    frame = saved["speed"]["frame"]
    assert (frame["height"], frame["width"]) == (300, 300)
    assert frame["seconds"] > frame["teacher_seconds"] > 0  # the default U-Net reads the deviation
    assert saved["training"]["config"]["inputs"] == ["image", "deviation_z"]
    assert frame["megapixels_per_s"] > 0
    assert 2**20 < frame["peak_rss_bytes"] < 64 * 2**30  # a real process's resident memory
    assert 0 < frame["peak_rss_before_predict_gib"] <= frame["peak_rss_gib"]
    assert len(frame["fraction_above_threshold"]) == len(DEFECT_CLASSES)
    assert saved["speed"]["whole_images_megapixels_per_s"] > 0
    heatmap = tmp_path / saved["settings"]["heatmap"]
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the README table is generated from the file
    capsys.readouterr()
    bench.main(["--table-only", out])
    table = capsys.readouterr().out
    assert "| class | student IoU | teacher IoU |" in table
    assert all(f"| {name} |" in table for name in DEFECT_CLASSES)
    assert "300 x 300 frame" in table and "for the teacher's deviation map" in table
