"""The classifier benchmark runs both parts end to end on tiny data and writes its JSON."""

import importlib
import json
import os
import sys

import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks")


@pytest.fixture(scope="module")
def bench():
    # Imported by name from a path on sys.path: build_corpus's spawned workers inherit
    # sys.path and must be able to import the module that started them.
    sys.path.insert(0, os.path.abspath(BENCHMARKS))
    try:
        yield importlib.import_module("classifier_transfer")
    finally:
        sys.path.remove(os.path.abspath(BENCHMARKS))


def test_benchmark_writes_both_parts_and_their_tables(bench, tmp_path, capsys):
    from modules import classifier

    # a backbone "pretrained" on the fly for 32 px inputs (the shipped one is for 128 px)
    weights = str(tmp_path / "backbone_32.h5")
    source = classifier.build_model(7, classifier.TrainingConfig(input_size=32))
    classifier.backbone_of(source).save_weights(weights)

    out = str(tmp_path / "classifier_transfer.json")
    bench.main(["--images", "60", "--transfer-images", "60", "--size", "96",
                "--input-size", "32", "--epochs", "1", "--weights", weights, "--workers", "2",
                "--seed", "5", "--transfer-seed", "6", "--fit-verbose", "0", "--run-eagerly",
                "--out", out, "--quiet"])
    with open(out) as handle:
        saved = json.load(handle)  # strict JSON: no NaN

    assert saved["settings"]["seed"] == 5 and saved["settings"]["transfer_seed"] == 6
    assert saved["settings"]["teacher_features"] is True
    assert saved["settings"]["learning_rate"] == 1e-3
    assert saved["settings"]["tensorflow"]
    assert saved["calibration_before"]["fixed_numpy_workload_s"] > 0
    assert len(saved["calibration_before"]["loadavg_1_5_15"]) == 3

    default = saved["default"]
    # 60 images = 5 per (material, label) pair: 3 train, 1 eval, 1 test each
    assert default["data"]["split_counts"] == {
        "train": {"SrTiO3": 15, "CdTe": 21}, "eval": {"SrTiO3": 5, "CdTe": 7},
        "test": {"SrTiO3": 5, "CdTe": 7}}
    assert default["vocabulary"] == sorted(default["vocabulary"])
    assert len(default["vocabulary"]) == 7
    assert default["training"]["train_images"] == 36 and default["training"]["eval_images"] == 12
    assert default["training"]["train_images_per_s"] > 0
    assert default["training"]["trainable_backbone_layers"] == 40
    assert default["training_config"]["teacher_features"] is True
    assert default["inference"]["images_per_s"] > 0 and default["inference"]["images"] == 12
    test = default["test"]
    assert test["overall"]["images"] == 12 and len(test["predictions"]) == 12
    assert len({p["index"] for p in test["predictions"]}) == 12
    for material, images, classes in (("SrTiO3", 5, 5), ("CdTe", 7, 7)):
        entry = test["by_material"][material]
        assert entry["images"] == images and 0.0 <= entry["accuracy"] <= 1.0
        lo, hi = entry["wilson_95"]
        assert 0.0 <= lo <= entry["accuracy"] <= hi <= 1.0
        confusion = entry["confusion"]
        assert len(confusion["rows_true"]) == classes and len(confusion["matrix"]) == classes
        assert confusion["columns_predicted"] == default["vocabulary"]
        assert sum(map(sum, confusion["matrix"])) == images
        assert sum(row[confusion["columns_predicted"].index(t)]
                   for t, row in zip(confusion["rows_true"], confusion["matrix"])) \
            == entry["correct"]
        assert len(entry["by_dose"]) == 3 and sum(b["images"] for b in entry["by_dose"]) == images
    # the teacher's rule, scored on the same test images
    rule = default["teacher_rule_test"]
    assert [p["index"] for p in rule["predictions"]] == [p["index"] for p in test["predictions"]]
    assert {m: e["images"] for m, e in rule["by_material"].items()} == {"SrTiO3": 5, "CdTe": 7}
    assert all(p["confidence"] == 1.0 for p in rule["predictions"])
    assert 2e3 <= min(p["dose"] for p in test["predictions"])
    assert max(p["dose"] for p in test["predictions"]) <= 2e4

    transfer = saved["transfer"]
    assert transfer["pretraining"]["dose_overlaps"] is False
    assert transfer["pretraining"]["pixel_size_overlaps"] is False
    assert transfer["data"]["pixel_size_pm_drawn"][0] >= 29.0
    assert set(transfer["runs"]) == {"scratch", "synthetic_pretrained"}
    scratch = transfer["runs"]["scratch"]["training"]
    assert scratch["trainable_backbone_layers"] == scratch["backbone_layers"]
    assert transfer["runs"]["synthetic_pretrained"]["training"]["trainable_backbone_layers"] == 40
    for run in transfer["runs"].values():
        assert run["test"]["overall"]["images"] == 12
        assert set(run["test"]["by_material"]) == {"SrTiO3", "CdTe"}
    assert saved["wall_s"] >= default["wall_s"] > 0 and transfer["wall_s"] > 0

    # the README tables are generated from the file
    capsys.readouterr()
    bench.main(["--table-only", out])
    table = capsys.readouterr().out
    assert "| material | test accuracy | teacher rule | paper | images |" in table
    assert "mask_pseudo areas beside the pooled features" in table
    assert "| SrTiO3 |" in table and "| 0.940 |" in table and "| 0.993 |" in table
    assert "| material | scratch | synthetic-pretrained |" in table


def test_transfer_ranges_the_simulator_refuses_are_reported(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--parts", "transfer", "--transfer-pixel-size-pm", "29", "90"])
    assert "probe_sigma_pm" in capsys.readouterr().err


def test_model_rows_follow_the_configuration(bench):
    from modules import classifier
    from modules.transform import IMAGE_XF, TEACHER_SIZE, TEACHER_XF

    data = {"inputs": {IMAGE_XF: np.ones((4, 8, 8, 3), np.float16),
                       TEACHER_XF: np.arange(4 * TEACHER_SIZE, dtype=np.float32).reshape(4, -1)}}
    rows = np.array([True, False, True, False])
    on = bench.model_rows(data, rows, classifier.TrainingConfig(teacher_features=True))
    assert set(on) == {IMAGE_XF, TEACHER_XF} and on[IMAGE_XF].dtype == np.float32
    np.testing.assert_array_equal(on[TEACHER_XF], data["inputs"][TEACHER_XF][[0, 2]])
    off = bench.model_rows(data, rows, classifier.TrainingConfig(teacher_features=False))
    assert set(off) == {IMAGE_XF} and off[IMAGE_XF].shape == (2, 8, 8, 3)


def test_teacher_rule_takes_the_largest_area_and_bulk_when_nothing_is_marked(bench):
    from components.defects import DEFECT_CLASSES

    n = len(DEFECT_CLASSES)
    teacher = np.zeros((3, 2 * n), np.float32)
    teacher[1, DEFECT_CLASSES.index("vacancy")] = 0.2
    teacher[1, DEFECT_CLASSES.index("twin_boundary")] = 0.9
    teacher[2, DEFECT_CLASSES.index("substitution")] = 0.1
    teacher[:, n:] = teacher[:, :n] > 0
    assert list(bench.teacher_rule(teacher)) == ["bulk", "twin_boundary", "substitution"]

