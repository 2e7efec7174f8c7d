"""The segmentation evaluator's scoring and gate, with a stand-in model (no TFX, no training)."""

import numpy as np
import pytest

from components import contract
from components.defects import DEFECT_CLASSES, class_index
from components.segmentation import executor


def micrograph(index, with_truth=True):
    truth = np.zeros((len(DEFECT_CLASSES), 32, 32), np.uint8)
    truth[class_index("vacancy"), 10:14, 10:14] = 1
    pseudo = np.zeros_like(truth)
    pseudo[class_index("vacancy"), 10:14, 12:16] = 1  # half right
    return contract.Micrograph(
        image=np.random.default_rng(index).normal(size=(32, 32)).astype(np.float32),
        material="SrTiO3", label="vacancy", pixel_size_pm=20.0, source=f"test:{index}",
        mask_true=truth if with_truth else None, mask_pseudo=pseudo)


def test_a_student_that_copies_the_truth_beats_its_teacher(tmp_path):
    report = executor.score([micrograph(i) for i in range(3)], lambda m: m.mask_true.astype(float),
                            0.5, str(tmp_path), heatmap_count=1)
    vacancy = "vacancy"
    assert report["images"] == report["images_with_ground_truth"] == 3
    assert report["student_vs_truth"][vacancy]["iou"] == pytest.approx(1.0)
    assert report["teacher_vs_truth"][vacancy]["iou"] == pytest.approx(8 / 24)
    assert report["student_vs_pseudo"][vacancy]["f1"] == pytest.approx(0.5)
    assert report["student_vs_truth"]["twin_boundary"]["iou"] is None  # nothing to measure
    assert len(list(tmp_path.glob("*.png"))) == 2  # Figures 2 and 3 of the first image


def test_without_ground_truth_only_the_pseudo_labels_are_scored(tmp_path):
    report = executor.score([micrograph(0, with_truth=False)], lambda m: m.mask_pseudo.astype(float),
                            0.5, str(tmp_path), heatmap_count=0)
    assert report["student_vs_truth"].startswith("no ground truth")
    assert report["student_vs_pseudo"]["vacancy"]["iou"] == pytest.approx(1.0)


def test_gate_names_each_class_below_the_bound_and_ignores_unmarked_classes(tmp_path):
    silent = executor.score([micrograph(0)], lambda m: np.zeros(m.mask_pseudo.shape), 0.5,
                            str(tmp_path), heatmap_count=0)
    assert executor.gate(silent, 0.3) == ["vacancy: IoU 0.000 against the pseudo-labels < 0.3"]
    copy = executor.score([micrograph(0)], lambda m: m.mask_pseudo.astype(float), 0.5,
                          str(tmp_path), heatmap_count=0)
    assert executor.gate(copy, 0.99) == []
