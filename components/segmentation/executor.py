"""Executor of SegmentationEvaluator: score the U-Net per class, draw heat maps, bless or not.

The student (the U-Net) is scored against the teacher's pseudo-masks it was trained on and,
where the examples carry it, against the ground truth `mask_true`; the teacher's own masks
are scored against the ground truth on the same images, so the two can be compared. The
blessing is a ModelBlessing with the `blessed` property the Pusher reads, and deliberately
without the `current_model_id` that LatestBlessedModelStrategy looks for: the classifier's
resolver must never take a U-Net for its baseline.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Dict, Iterable, List, Tuple

import numpy as np
import tensorflow as tf
from tfx import types
from tfx.dsl.components.base import base_executor
from tfx.types import artifact_utils
from tfx.utils import path_utils

from components import contract, progress
from components.defects import DEFECT_CLASSES
from components.segmentation import heatmaps, serving

EVALUATION_FILE = "segmentation_evaluation.json"
COMPARISONS = ("student_vs_pseudo", "student_vs_truth", "teacher_vs_truth")


def _pooled(tp: int, fp: int, fn: int) -> Dict[str, Any]:
    def ratio(a, b):
        return a / b if b else None

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall else None)
    return {"precision": precision, "recall": recall, "iou": ratio(tp, tp + fp + fn), "f1": f1,
            "tp": tp, "fp": fp, "fn": fn}


def _counts(predicted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(3, C) tp, fp, fn of boolean (C, H, W) arrays."""
    return np.array([(predicted & mask).sum(axis=(1, 2)), (predicted & ~mask).sum(axis=(1, 2)),
                     (~predicted & mask).sum(axis=(1, 2))], dtype=np.int64)


def score(micrographs: Iterable[contract.Micrograph],
          predict: Callable[[contract.Micrograph], np.ndarray],
          threshold: float) -> Tuple[Dict[str, Any], List[str]]:
    """Pooled per-class pixel scores of student and teacher, and the sources scored.

    `predict` maps a micrograph to probabilities (C, H, W).
    """
    totals = {name: np.zeros((3, len(DEFECT_CLASSES)), np.int64) for name in COMPARISONS}
    sources = []
    with_truth = 0
    for micrograph in micrographs:
        predicted = predict(micrograph) > threshold
        totals["student_vs_pseudo"] += _counts(predicted, micrograph.mask_pseudo.astype(bool))
        if micrograph.mask_true is not None:
            truth = micrograph.mask_true.astype(bool)
            totals["student_vs_truth"] += _counts(predicted, truth)
            totals["teacher_vs_truth"] += _counts(micrograph.mask_pseudo.astype(bool), truth)
            with_truth += 1
        sources.append(micrograph.source)
    report = {"images": len(sources), "images_with_ground_truth": with_truth,
              "threshold": threshold}
    for name in COMPARISONS:
        if name != "student_vs_pseudo" and not with_truth:
            report[name] = "no ground truth in these examples: not scored"
            continue
        report[name] = {cls: _pooled(*map(int, totals[name][:, c]))
                        for c, cls in enumerate(DEFECT_CLASSES)}
    return report, sources


def draw_heatmaps(micrographs: Iterable[contract.Micrograph],
                  predict: Callable[[contract.Micrograph], np.ndarray],
                  sources: Iterable[str], count: int, heatmap_dir: str) -> List[str]:
    """Heat maps (the paper's Figures 2 and 3) of the `count` micrographs whose sources sort
    first: the same sample in every run over the same data, whatever order the records
    were written in. Returns the sources drawn."""
    chosen = set(sorted(set(sources))[:count])
    sample = sorted((m for m in micrographs if m.source in chosen), key=lambda m: m.source)[:count]
    for rank, micrograph in enumerate(sample):
        probabilities = predict(micrograph)
        stem = os.path.join(heatmap_dir, f"{rank:02d}_{micrograph.material}_{micrograph.label}")
        title = f"{micrograph.material}, {micrograph.label} ({micrograph.source})"
        heatmaps.combined_figure(micrograph.image, probabilities, stem + "_combined.png", title)
        heatmaps.per_class_figure(micrograph.image, probabilities, stem + "_per_class.png",
                                  title=title)
    return [m.source for m in sample]


def gate(report: Dict[str, Any], min_iou: float) -> List[str]:
    """Why the model is refused: every class the teacher marked needs IoU >= min_iou against
    the pseudo-masks. Empty: blessed."""
    failures = []
    for cls, scores in report["student_vs_pseudo"].items():
        if scores["tp"] + scores["fn"] and (scores["iou"] or 0.0) < min_iou:
            failures.append(f"{cls}: IoU {scores['iou'] or 0.0:.3f} against the pseudo-labels "
                            f"< {min_iou}")
    return failures


def read_split(examples: types.Artifact, split: str) -> Iterable[contract.Micrograph]:
    files = sorted(glob.glob(os.path.join(artifact_utils.get_split_uri([examples], split), "*.gz")))
    if not files:
        raise FileNotFoundError(f"no examples of split {split!r} in {examples.uri}")
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        yield contract.from_example(record.numpy())


class Executor(base_executor.BaseExecutor):

    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        options = json.loads(exec_properties["evaluation_config"])
        model = artifact_utils.get_single_instance(input_dict["model"])
        examples = artifact_utils.get_single_instance(input_dict["examples"])
        evaluation = artifact_utils.get_single_instance(output_dict["evaluation"])
        blessing = artifact_utils.get_single_instance(output_dict["blessing"])

        exported = tf.saved_model.load(
            path_utils.serving_model_path(model.uri, path_utils.is_old_model_artifact(model)))
        predict_images = exported.signatures[serving.IMAGES_SIGNATURE]
        split_files = os.path.join(artifact_utils.get_split_uri([examples], options["split"]), "*.gz")
        predicted = progress.Progress("SegmentationEvaluator", progress.count_records(split_files),
                                      "images")

        def predict(micrograph):
            deviation = None if micrograph.deviation_z is None else micrograph.deviation_z[np.newaxis]
            probabilities = predict_images(**serving.signature_arguments(
                predict_images, micrograph.image[np.newaxis], deviation, source=micrograph.source))
            return np.moveaxis(probabilities[serving.PROBABILITIES].numpy()[0], -1, 0)

        def predict_counted(micrograph):
            probabilities = predict(micrograph)
            predicted.advance()
            return probabilities

        report, sources = score(read_split(examples, options["split"]), predict_counted,
                                options["threshold"])
        heatmap_dir = os.path.join(evaluation.uri, "heatmaps")
        os.makedirs(heatmap_dir, exist_ok=True)
        report["heatmap_sources"] = draw_heatmaps(read_split(examples, options["split"]), predict,
                                                  sources, options["heatmap_images"], heatmap_dir)
        failures = gate(report, options["min_iou"])
        report.update(split=options["split"], min_iou=options["min_iou"],
                      blessed=not failures, failures=failures)
        with open(os.path.join(evaluation.uri, EVALUATION_FILE), "w") as handle:
            json.dump(report, handle, indent=1)
        blessing.set_int_custom_property("blessed", int(not failures))
        open(os.path.join(blessing.uri, "BLESSED" if not failures else "NOT_BLESSED"), "w").close()
