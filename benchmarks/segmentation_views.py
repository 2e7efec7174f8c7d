"""What do test-time views buy? One trained U-Net scored with 1, 4 and 8 views of each image.

    .venv/bin/python benchmarks/segmentation_views.py [--model DIR] [--history FILE]
        [--examples GLOB] [--views 1 4 8] [--planar-min-width W] [--frame-size 4096] [--out PATH]
    .venv/bin/python benchmarks/segmentation_views.py --table-only [PATH]

Model: a SavedModel written by `modules.segmenter.run_fn`, loaded as Keras, with the
SegmenterConfig its Trainer recorded in `history.json`. Defaults: the paper profile's newest
pushed U-Net and its newest Trainer run (`make paper`). Its answers come from
`modules.segmenter.served_probabilities`, the code the export serves, with each view count
and the recorded `planar_min_width` (0 for a run from before it; --planar-min-width serves
the model with another), on whole images (the teacher's deviation map from the examples, as
the SegmentationEvaluator gives it).

Examples: GZIP TFRecords written by the PseudoLabeler, with `mask_true` (default: the paper
run's test split). Scores as the SegmentationEvaluator's (`components.segmentation.executor
.score`: pixels pooled over images, probabilities above 0.5): the student against the ground
truth and against the pseudo-labels, overall and per material, beside the teacher's
pseudo-labels against the ground truth. The network's seconds per image are recorded for
each view count, and (unless --frame-size 0) the seconds and peak memory of one
--frame-size square frame through the sliding-window predictor, the model exported again
with each view count (`segmentation_quality.frame_timing`: a fresh subprocess, the
teacher's deviation map of the frame included). Compare times only between files from the
same machine.
"""

import argparse
import dataclasses
import glob
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a file: the project's packages live one folder up
    sys.path.insert(0, ROOT)

from components.defects import DEFECT_CLASSES  # noqa: E402
from machine import calibration, fmt, git_commit, print_tables, write_report  # noqa: E402  (benchmarks/machine.py)

RESULTS = os.path.join(HERE, "results", "segmentation_views.json")
PAPER_ROOT = os.path.join(ROOT, "output", "pipeline_root", "stem-defects-paper")
THRESHOLD = 0.5


def newest(pattern: str) -> str:
    """The match of `pattern` whose last numbered folder is the largest (TFX's execution ids
    and the Pusher's version folders)."""
    def number(path):
        digits = [part for part in path.split(os.sep) if part.isdigit()]
        return int(digits[-1]) if digits else -1
    matches = glob.glob(pattern)
    if not matches:
        raise FileNotFoundError(f"nothing matches {pattern}: run `make paper` first, or give "
                                f"the path")
    return max(matches, key=number)


def load_model(model_dir: str, history_path: str):
    """(Keras U-Net, SegmenterConfig) of a run_fn export and its Trainer's history.json."""
    import tensorflow as tf

    from modules import segmenter

    with open(history_path) as handle:  # an option the run predates: as it was then served
        recorded = dict(segmenter.SERVED_BEFORE_OPTIONS, **json.load(handle)["config"][0])
    known = {field.name for field in dataclasses.fields(segmenter.SegmenterConfig)}
    config = segmenter.SegmenterConfig(**{k: v for k, v in recorded.items() if k in known})
    model = tf.keras.models.load_model(model_dir, compile=False,
                                       custom_objects={"JoinContrasts": segmenter.JoinContrasts})
    return model, config


def measure(model, config, micrographs, views: int):
    """(report of executor.score overall and per material, network seconds per image)."""
    import tensorflow as tf

    from components.segmentation.executor import score
    from modules import segmenter

    served = dataclasses.replace(config, test_time_views=views)

    @tf.function(reduce_retracing=True)
    def answer(x):
        return segmenter.served_probabilities(model, x, served)

    inputs = [segmenter.network_input(micrograph.image[np.newaxis],
                                      None if micrograph.deviation_z is None
                                      else micrograph.deviation_z[np.newaxis], config.inputs)
              for micrograph in micrographs]
    answer(inputs[0])  # traced once, not timed
    answers, seconds = [], 0.0
    for x in inputs:
        began = time.perf_counter()
        probabilities = answer(x).numpy()
        seconds += time.perf_counter() - began
        answers.append(np.moveaxis(probabilities[0], -1, 0))

    def scored(subset):
        chosen = iter([answers[i] for i in subset])  # score asks in the order it is given
        report, _ = score([micrographs[i] for i in subset], lambda _: next(chosen), THRESHOLD)
        return report

    overall = scored(range(len(micrographs)))
    materials = sorted({m.material for m in micrographs})
    per_material = {material: scored([i for i, m in enumerate(micrographs)
                                      if m.material == material]) for material in materials}
    return overall, per_material, seconds / max(len(micrographs), 1)


def ious(comparison) -> dict:
    if isinstance(comparison, str):  # "no ground truth in these examples: not scored"
        return {cls: None for cls in DEFECT_CLASSES}
    return {cls: comparison[cls]["iou"] for cls in DEFECT_CLASSES}


def frame_seconds(model, config, views: int, size: int, work_dir: str) -> dict:
    """The frame timing of segmentation_quality for this model exported with `views`."""
    from segmentation_quality import frame_timing  # benchmarks/segmentation_quality.py

    from modules import segmenter

    export = os.path.join(work_dir, f"views_{views}")
    served = dataclasses.replace(config, test_time_views=views)
    model.save(export, save_format="tf", signatures=segmenter._signatures(model, served))
    return frame_timing(export, size, seed=0, threads=2, work_dir=work_dir)


def build_report(model_dir: str, history_path: str, examples: str, view_counts,
                 frame_size: int, planar_min_width=None) -> dict:
    import tensorflow as tf

    from components import contract

    began = time.perf_counter()
    files = sorted(glob.glob(examples))
    if not files:
        raise FileNotFoundError(f"no examples match {examples}")
    micrographs = [contract.from_example(record.numpy())
                   for record in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    model, config = load_model(model_dir, history_path)
    if planar_min_width is not None:
        config = dataclasses.replace(config, planar_min_width=planar_min_width)
    rows, teacher = [], None
    for views in view_counts:
        overall, per_material, seconds = measure(model, config, micrographs, views)
        teacher = {"overall": ious(overall["teacher_vs_truth"]),
                   **{m: ious(r["teacher_vs_truth"]) for m, r in per_material.items()}}
        frame = None
        if frame_size:
            with tempfile.TemporaryDirectory() as work_dir:
                frame = frame_seconds(model, config, views, frame_size, work_dir)
        rows.append({"views": views, "network_seconds_per_image": seconds, "frame": frame,
                     "student_vs_truth": ious(overall["student_vs_truth"]),
                     "student_vs_pseudo": ious(overall["student_vs_pseudo"]),
                     "student_vs_truth_per_material": {
                         m: ious(r["student_vs_truth"]) for m, r in per_material.items()}})
    return {"benchmark": "segmentation_views", "model": os.path.abspath(model_dir),
            "history": os.path.abspath(history_path), "examples": examples,
            "images": len(micrographs), "threshold": THRESHOLD,
            "segmenter": dataclasses.asdict(config), "teacher_vs_truth": teacher, "rows": rows,
            "wall_s": time.perf_counter() - began, "machine": calibration(), **git_commit()}


def tables(report: dict) -> str:
    head = "| IoU | " + " | ".join(f"{row['views']} view{'s' * (row['views'] > 1)}"
                                    for row in report["rows"]) + " | teacher |"
    lines = [head, "| --- " * (len(report["rows"]) + 2) + "|"]
    materials = [m for m in report["teacher_vs_truth"] if m != "overall"]
    for cls in DEFECT_CLASSES:
        cells = [fmt(row["student_vs_truth"][cls]) for row in report["rows"]]
        lines.append(f"| {cls} vs truth | " + " | ".join(cells)
                     + f" | {fmt(report['teacher_vs_truth']['overall'][cls])} |")
        if cls == "substitution" and len(materials) > 1:
            cells = [" / ".join(fmt(row["student_vs_truth_per_material"][m][cls])
                                for m in materials) for row in report["rows"]]
            teacher = " / ".join(fmt(report["teacher_vs_truth"][m][cls]) for m in materials)
            lines.append(f"| ({' / '.join(materials)}) | " + " | ".join(cells) + f" | {teacher} |")
    lines.append("| network ms per image | " + " | ".join(
        f"{1000 * row['network_seconds_per_image']:.0f}" for row in report["rows"]) + " | |")
    if all(row["frame"] for row in report["rows"]):
        size = report["rows"][0]["frame"]["height"]
        lines.append(f"| {size} x {size} frame: s (teacher s), peak GiB | " + " | ".join(
            f"{row['frame']['seconds']:.1f} ({row['frame']['teacher_seconds'] or 0:.1f}), "
            f"{row['frame']['peak_rss_gib']:.2f}" for row in report["rows"]) + " | |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="SavedModel directory (default: the paper profile's newest pushed U-Net)")
    parser.add_argument("--history", default=None,
                        help="its Trainer's history.json (default: the paper run's newest)")
    parser.add_argument("--examples", default=None,
                        help="glob of PseudoLabeler TFRecords (default: the paper run's test split)")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--planar-min-width", type=int, default=None,
                        help="serve with this planar_min_width (default: the recorded one)")
    parser.add_argument("--frame-size", type=int, default=4096,
                        help="side of the frame timed per view count; 0: no frame")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--table-only", nargs="?", const=RESULTS, default=None, metavar="PATH")
    args = parser.parse_args(argv)
    if args.table_only is not None:
        return print_tables(args.table_only, tables)
    from modules.segmenter import VIEW_COUNTS

    if any(views not in VIEW_COUNTS for views in args.views):
        parser.error(f"--views must be among {VIEW_COUNTS}, got {args.views}")
    model_dir = args.model or newest(os.path.join(ROOT, "output", "serving_model",
                                                  "stem-defects-paper-segmenter", "*"))
    history = args.history or newest(os.path.join(PAPER_ROOT, "SegmenterTrainer", "model_run",
                                                  "*", "history.json"))
    examples = args.examples or os.path.join(
        newest(os.path.join(PAPER_ROOT, "PseudoLabeler", "pseudo_labelled_examples", "*")),
        "Split-test", "*.gz")
    report = build_report(model_dir, history, examples, args.views, args.frame_size,
                          args.planar_min_width)
    write_report(report, args.out)
    print(tables(report))
    return report


if __name__ == "__main__":
    main()
