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


def test_a_student_that_copies_the_truth_beats_its_teacher():
    report, sources = executor.score([micrograph(i) for i in range(3)],
                                     lambda m: m.mask_true.astype(float), 0.5)
    vacancy = "vacancy"
    assert report["images"] == report["images_with_ground_truth"] == 3
    assert report["student_vs_truth"][vacancy]["iou"] == pytest.approx(1.0)
    assert report["teacher_vs_truth"][vacancy]["iou"] == pytest.approx(8 / 24)
    assert report["student_vs_pseudo"][vacancy]["f1"] == pytest.approx(0.5)
    assert report["student_vs_truth"]["twin_boundary"]["iou"] is None  # nothing to measure
    assert sources == ["test:0", "test:1", "test:2"]


def test_heat_maps_are_drawn_for_the_same_images_whatever_the_record_order(tmp_path):
    """Beam's workers write records in no fixed order; the sample must not follow it."""
    drawn = []
    for order, folder in (([3, 1, 4, 0, 2], "a"), ([2, 0, 4, 1, 3], "b")):
        images = [micrograph(i) for i in order]
        out = tmp_path / folder
        out.mkdir()
        drawn.append(executor.draw_heatmaps(images, lambda m: m.mask_true.astype(float),
                                            [m.source for m in images], 2, str(out)))
        # Figures 2 and 3 of each drawn image, ranked by source
        assert sorted(p.name for p in out.glob("*.png")) == [
            "00_SrTiO3_vacancy_combined.png", "00_SrTiO3_vacancy_per_class.png",
            "01_SrTiO3_vacancy_combined.png", "01_SrTiO3_vacancy_per_class.png"]
    assert drawn[0] == drawn[1] == ["test:0", "test:1"]


def test_without_ground_truth_only_the_pseudo_labels_are_scored():
    report, _ = executor.score([micrograph(0, with_truth=False)],
                               lambda m: m.mask_pseudo.astype(float), 0.5)
    assert report["student_vs_truth"].startswith("no ground truth")
    assert report["student_vs_pseudo"]["vacancy"]["iou"] == pytest.approx(1.0)


def test_gate_names_each_class_below_the_bound_and_ignores_unmarked_classes():
    silent, _ = executor.score([micrograph(0)], lambda m: np.zeros(m.mask_pseudo.shape), 0.5)
    assert executor.gate(silent, 0.3) == ["vacancy: IoU 0.000 against the pseudo-labels < 0.3"]
    copy, _ = executor.score([micrograph(0)], lambda m: m.mask_pseudo.astype(float), 0.5)
    assert executor.gate(copy, 0.99) == []
