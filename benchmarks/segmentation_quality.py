"""Does the U-Net student beat its teacher? Per-class IoU against the ground truth, and speed.

    nice -n 19 .venv/bin/python benchmarks/segmentation_quality.py [--seed 5151]
        [--train-per-class 28] [--eval-per-class 8] [--test-per-class 20] [--size 256]
        [--dose-bins 3] [--segmenter '{"epochs": 12}'] [--frame-size 4096] [--out PATH]
    .venv/bin/python benchmarks/segmentation_quality.py --table-only [PATH]

Data: the simulator's default SimulationConfig (every material, every label it declares,
bulk included, in plan_dataset's balanced order), pseudo-labelled by the teacher
(components.pseudo_labels.lattice.pseudo_labels, from the image alone: its masks and its
deviation map, as the PseudoLabeler writes them). The training and
validation images come from seed_for(seed, i) (the first --train-per-class images of each
(material, label) pair train, the next --eval-per-class validate, as the pipeline's split
does), the held-out test images from seed_for(seed + 1, i). The default seed is used by no
pipeline profile nor other benchmark.

Training: modules.segmenter.run_fn, the Trainer's own entry point, on the pseudo-masks only,
with the demo profile's segmenter options (pipeline/config.py) unless --segmenter gives
others; the SavedModel it exports is what is scored and timed.

Scores, on the held-out images: pixels pooled over images (tp, fp, fn summed), per class:
precision, recall, IoU and F1 of the student (its `serving_images` signature on the whole
image, probabilities above 0.5, as the SegmentationEvaluator does) against `mask_true`, of
the teacher's `mask_pseudo` against `mask_true`, and of the student against the teacher;
overall, per material and per dose bin (log-spaced over the dose range).

Speed: one --frame-size square frame, a mosaic of 512-pixel CdTe images of every label
simulated with the same settings (the simulator itself fails at 1024 pixels and more), goes
through the sliding-window predictor (pipeline.segment_folder.load_predictor, i.e.
`serving_standardised`, and components.segmentation.tiling.predict_tiled: 256-pixel tiles,
64 overlap, batches of 8) in a fresh subprocess with TensorFlow held to --threads threads.
For a U-Net that reads the teacher's deviation map (the default), the frame's map is
computed first (components.segmentation.tiling.deviation_map: the pseudo-labeller's map on
512-pixel blocks, --threads blocks at a time; the mosaic's pieces have lattices of their
own, so blocks that straddle two of them fit worse than a real frame's would, which does not
change their cost). Reported: the seconds
of both together and of the teacher alone, megapixels of the frame per second, and the peak
resident memory of that whole process (VmHWM, machine.peak_rss_mib: Python, TensorFlow, the
model, the frame and the maps together; an upper bound on what the prediction needs; not
ru_maxrss, which Linux carries over exec from the parent that trained the model). Also the
throughput of whole --size images through `serving_images` in the main process. The
machine's state is recorded as in the other benchmarks: compare numbers from one machine.

A heat map of one held-out stacking-fault image (the paper's Figure 3: the student's
probability per class) is written beside the JSON.
"""

import argparse
import dataclasses
import json
import os
import subprocess
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

from components import contract  # noqa: E402
from components.materials import substitution_contrast  # noqa: E402
from components.defects import DEFECT_CLASSES  # noqa: E402
from components.pseudo_labels.lattice import PseudoLabelConfig, pseudo_labels  # noqa: E402
from components.synthesis.simulator import (  # noqa: E402
    SimulationConfig,
    applicable_labels,
    plan_dataset,
    seed_for,
    simulate_image,
)
from machine import (calibration, dose_bin, dose_edges, fmt, git_commit,  # noqa: E402  (benchmarks/machine.py)
                     peak_rss_mib, print_tables, write_report)

RESULTS = os.path.join(HERE, "results", "segmentation_quality.json")
MATERIALS = ("SrTiO3", "CdTe")
DEFAULT_SEED = 5151  # no pipeline profile (20261125) nor other benchmark (4242) uses it
THRESHOLD = 0.5
TILE, OVERLAP, BATCH = 256, 64, 8  # pipeline.segment_folder's defaults
MOSAIC_PIECE = 512
COMPARISONS = ("student_vs_truth", "teacher_vs_truth", "student_vs_teacher")


@dataclasses.dataclass
class Labelled:
    """One simulated, pseudo-labelled image."""

    micrograph: contract.Micrograph
    index: int
    occurrence: int
    dose: float


def labelled_set(seed: int, per_class: int, config: SimulationConfig,
                 materials=MATERIALS) -> list:
    """per_class images of every (material, label) pair, each with the teacher's mask."""
    teacher = PseudoLabelConfig()
    plan = plan_dataset(per_class * sum(len(applicable_labels(m)) for m in materials), materials,
                        seed)
    out = []
    for index, material, label, occurrence in plan:
        sim = simulate_image(material, label, seed_for(seed, index), config)
        try:
            # the image only, and the contrast the material's substituents give (as the pipeline)
            labels = pseudo_labels(sim.image, teacher, substitution_contrast(material))
            teacher_output = dict(mask_pseudo=labels.mask, deviation=labels.deviation,
                                  deviation_z=labels.z, noise_sigma=float(labels.noise),
                                  pseudo_label_status="ok")
        except ValueError as error:  # no lattice: empty maps that mean "unknown"
            empty = np.zeros_like(sim.image)
            teacher_output = dict(mask_pseudo=np.zeros_like(sim.mask), deviation=empty,
                                  deviation_z=empty, noise_sigma=1.0,
                                  pseudo_label_status=f"no_lattice: {error}")
        micrograph = contract.Micrograph(
            image=sim.image, material=material, label=label, pixel_size_pm=sim.pixel_size_pm,
            source=f"simulated seed [{seed}, {index}]", defect_classes=sim.defect_classes,
            mask_true=sim.mask, dose=sim.dose, **teacher_output)
        out.append(Labelled(micrograph, index, occurrence, sim.dose))
    return out


def write_records(path: str, items) -> str:
    import tensorflow as tf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for item in items:
            writer.write(contract.to_example(item.micrograph).SerializeToString())
    return path


def train(train_items, eval_items, segmenter_options: dict, work_dir: str) -> dict:
    """modules.segmenter.run_fn on the pseudo-labels; the SavedModel's folder and timings."""
    import types

    from modules import segmenter

    fn_args = types.SimpleNamespace(
        train_files=[write_records(os.path.join(work_dir, "Split-train", "data.gz"), train_items)],
        eval_files=[write_records(os.path.join(work_dir, "Split-eval", "data.gz"), eval_items)],
        serving_model_dir=os.path.join(work_dir, "serving_model"),
        model_run_dir=os.path.join(work_dir, "model_run"),
        custom_config=dict(segmenter_options))
    started, cpu = time.perf_counter(), time.process_time()
    segmenter.run_fn(fn_args)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    with open(os.path.join(fn_args.model_run_dir, "history.json")) as handle:
        history = json.load(handle)
    return {"model_dir": fn_args.serving_model_dir, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "config": history["config"][0], "loss": history["loss"],
            "val_loss": history.get("val_loss"),
            "attempts": history.get("attempts", [None])[0],
            "train_images": len(train_items), "eval_images": len(eval_items)}


def _counts(predicted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(3, C) tp, fp, fn of boolean (C, H, W) arrays."""
    return np.array([(predicted & mask).sum(axis=(1, 2)), (predicted & ~mask).sum(axis=(1, 2)),
                     (~predicted & mask).sum(axis=(1, 2))], dtype=np.int64)


def scores(counts: np.ndarray) -> dict:
    """Per class precision, recall, IoU, F1 from pooled (3, C) counts; None where undefined."""
    out = {}
    for c, name in enumerate(DEFECT_CLASSES):
        tp, fp, fn = (int(v) for v in counts[:, c])
        precision = tp / (tp + fp) if tp + fp else None
        recall = tp / (tp + fn) if tp + fn else None
        f1 = (2 * precision * recall / (precision + recall)
              if precision is not None and recall is not None and precision + recall else
              (0.0 if precision == 0 or recall == 0 else None))
        out[name] = {"precision": precision, "recall": recall,
                     "iou": tp / (tp + fp + fn) if tp + fp + fn else None, "f1": f1,
                     "tp": tp, "fp": fp, "fn": fn}
    return out


def predict_whole(model_dir: str, items, batch: int = 8):
    """(C, H, W) probabilities of each image through `serving_images` (with the teacher's
    deviation map when the model reads it), and megapixels/s."""
    import tensorflow as tf

    from components.segmentation.serving import signature_arguments

    serve = tf.saved_model.load(model_dir).signatures["serving_images"]
    images = [item.micrograph.image for item in items]
    deviations = [item.micrograph.deviation_z for item in items]
    serve(**signature_arguments(serve, images[:1], deviations[:1]))  # trace once, not timed
    out, seconds = [], 0.0
    for start in range(0, len(images), batch):
        arguments = signature_arguments(serve, np.stack(images[start:start + batch]),
                                        np.stack(deviations[start:start + batch]))
        began = time.perf_counter()
        answer = serve(**arguments)["probabilities"].numpy()
        seconds += time.perf_counter() - began
        out += list(np.moveaxis(answer, -1, 1))
    pixels = sum(image.size for image in images)
    return out, pixels / 1e6 / max(seconds, 1e-9)


def score_held_out(items, probabilities, edges: np.ndarray) -> tuple:
    """Per-image counts of each comparison, then the pooled scores overall, per material and
    per dose bin."""
    records = []
    for item, answer in zip(items, probabilities):
        student = answer > THRESHOLD
        truth = item.micrograph.mask_true.astype(bool)
        teacher = item.micrograph.mask_pseudo.astype(bool)
        records.append({
            "index": item.index, "material": item.micrograph.material,
            "label": item.micrograph.label, "dose": round(item.dose, 1),
            "dose_bin": dose_bin(item.dose, edges),
            "pseudo_label_status": item.micrograph.pseudo_label_status,
            "counts": {"student_vs_truth": _counts(student, truth),
                       "teacher_vs_truth": _counts(teacher, truth),
                       "student_vs_teacher": _counts(student, teacher)}})

    def summary(subset):
        if not subset:
            return {"images": 0}
        return {"images": len(subset),
                **{name: scores(sum(r["counts"][name] for r in subset)) for name in COMPARISONS}}

    materials = sorted({r["material"] for r in records})
    report = {
        "overall": summary(records),
        "by_material": {m: summary([r for r in records if r["material"] == m]) for m in materials},
        "by_dose": [{"dose_range": [float(edges[b]), float(edges[b + 1])],
                     **summary([r for r in records if r["dose_bin"] == b])}
                    for b in range(len(edges) - 1)],
    }
    images = [{k: v for k, v in r.items() if k != "counts"} for r in records]
    return report, images


# ---------------------------------------------------------------------------------------
# One large frame through the sliding-window predictor, in a process of its own


def time_frame(model_dir: str, frame_path: str, threads: int) -> dict:
    """In this (fresh) process: load the model, predict the frame tile by tile (after the
    teacher's deviation map of it, for a model that reads one); seconds and this process's
    peak resident memory."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from components.segmentation.tiling import deviation_map, predict_tiled
    from pipeline.segment_folder import load_predictor

    began = time.perf_counter()
    predictor = load_predictor(model_dir)
    load_s = time.perf_counter() - began
    frame = np.load(frame_path, mmap_mode="r")
    empty = np.zeros((1, TILE, TILE), np.float32)
    predictor(*([empty, empty] if predictor.needs_deviation else [empty]))  # trace, not timed
    before = peak_rss_mib() * 2**20
    began = time.perf_counter()
    deviation = deviation_map(frame, workers=threads) if predictor.needs_deviation else None
    teacher_s = time.perf_counter() - began
    maps = predict_tiled(frame, predictor, tile=TILE, overlap=OVERLAP, batch_size=BATCH,
                         num_classes=len(DEFECT_CLASSES), deviation=deviation)
    seconds = time.perf_counter() - began
    peak = peak_rss_mib() * 2**20
    return {"height": int(frame.shape[0]), "width": int(frame.shape[1]), "seconds": seconds,
            "teacher_seconds": teacher_s if predictor.needs_deviation else None,
            "model_load_s": load_s, "megapixels_per_s": frame.size / 1e6 / seconds,
            "peak_rss_bytes": peak, "peak_rss_gib": peak / 2**30,
            "peak_rss_before_predict_gib": before / 2**30, "threads": threads,
            "tile": TILE, "overlap": OVERLAP, "batch_size": BATCH,
            "fraction_above_threshold": [float((m > THRESHOLD).mean()) for m in maps],
            "memory_measure": "VmHWM of the subprocess (machine.peak_rss_mib: Python + "
                              "TensorFlow + model + frame + maps; not ru_maxrss, which "
                              "carries the parent's peak over exec)"}


def mosaic_frame(size: int, seed: int) -> np.ndarray:
    """A size x size frame of CdTe images of every label, MOSAIC_PIECE pixels square each
    (the simulator overflows at 1024 pixels and more); image i from seed_for(seed, i)."""
    piece = min(MOSAIC_PIECE, size)
    count = -(-size // piece)
    labels = applicable_labels("CdTe")
    frame = np.empty((size, size), np.float32)
    for i in range(count * count):
        row, column = (piece * k for k in divmod(i, count))
        sim = simulate_image("CdTe", labels[i % len(labels)], seed_for(seed, i),
                             SimulationConfig(size=piece))
        frame[row:row + piece, column:column + piece] = sim.image[:size - row, :size - column]
    return frame


def frame_timing(model_dir: str, size: int, seed: int, threads: int, work_dir: str) -> dict:
    """Simulate one size x size frame (`mosaic_frame`) and time it in a subprocess
    (`--frame-timing`)."""
    began = time.perf_counter()
    frame_path = os.path.join(work_dir, "frame.npy")
    np.save(frame_path, mosaic_frame(size, seed + 2))
    simulate_s = time.perf_counter() - began
    command = [sys.executable, os.path.abspath(__file__), "--frame-timing", model_dir, frame_path,
               str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise RuntimeError(f"frame timing failed:\n{result.stderr[-4000:]}")
    timing = json.loads(result.stdout.strip().splitlines()[-1])
    timing["simulate_s"] = simulate_s
    return timing


# ---------------------------------------------------------------------------------------


def heat_map(items, probabilities, path: str) -> str:
    """The paper's Figure 3 for the first held-out stacking-fault image (the first image
    if there is none): the student's probability per class."""
    from components.segmentation import heatmaps

    chosen = next((n for n, item in enumerate(items)
                   if item.micrograph.label == "stacking_fault"), 0)
    micrograph = items[chosen].micrograph
    truth = ", ".join(c for c, m in zip(DEFECT_CLASSES, micrograph.mask_true) if m.any()) or "none"
    heatmaps.per_class_figure(micrograph.image, probabilities[chosen], path,
                              title=f"student, held-out {micrograph.material} image, dose "
                                    f"{items[chosen].dose:.0f} e/A^2 (truth: {truth})")
    return path


def demo_segmenter_options() -> dict:
    from pipeline.config import load_config

    return dict(load_config("demo").segmenter)


def build_report(seed: int, train_per_class: int, eval_per_class: int, test_per_class: int,
                 size: int, bins: int, segmenter_options: dict, frame_size: int, threads: int,
                 heatmap_path, progress: bool = True) -> dict:
    config = SimulationConfig(size=size)
    edges = dose_edges(config, bins)
    started = time.perf_counter()
    before = calibration()

    def say(text):
        if progress:
            print(f"[{time.perf_counter() - started:6.0f} s] {text}", flush=True)

    began = time.perf_counter()
    learning = labelled_set(seed, train_per_class + eval_per_class, config)
    held_out = labelled_set(seed + 1, test_per_class, config)
    data_s = time.perf_counter() - began
    say(f"{len(learning)} training/validation and {len(held_out)} held-out images labelled")
    train_items = [i for i in learning if i.occurrence < train_per_class]
    eval_items = [i for i in learning if i.occurrence >= train_per_class]
    with tempfile.TemporaryDirectory(prefix="segmentation_quality_") as work_dir:
        training = train(train_items, eval_items, segmenter_options, work_dir)
        say(f"trained in {training['seconds']:.0f} s")
        probabilities, whole_mp_s = predict_whole(training["model_dir"], held_out)
        report, images = score_held_out(held_out, probabilities, edges)
        if heatmap_path:
            heat_map(held_out, probabilities, heatmap_path)
        del probabilities
        say("held-out images scored")
        frame = frame_timing(training["model_dir"], frame_size, seed, threads, work_dir)
        say(f"{frame_size} x {frame_size} frame in {frame['seconds']:.1f} s")
    del training["model_dir"]  # a temporary folder, gone
    return {
        "description": "U-Net student vs lattice teacher, both against the simulator's ground "
                       "truth, on held-out synthetic images; inference speed and memory",
        "settings": {
            "seed": seed,
            "image_seeds": "train/eval: SeedSequence([seed, i]); held-out: SeedSequence([seed + 1, i])",
            "train_per_class": train_per_class, "eval_per_class": eval_per_class,
            "test_per_class": test_per_class, "materials": list(MATERIALS), "size": size,
            "threshold": THRESHOLD, "dose_bin_edges": [float(e) for e in edges],
            "simulation_config": dataclasses.asdict(config),
            "pseudo_label_config": dataclasses.asdict(PseudoLabelConfig()),
            "segmenter_options": segmenter_options,
            "heatmap": os.path.basename(heatmap_path) if heatmap_path else None,
            **git_commit(),
        },
        "calibration_before": before,
        "training": training,
        **report,
        "speed": {"whole_images_megapixels_per_s": whole_mp_s, "frame": frame,
                  "data_seconds": data_s},
        "calibration_after": calibration(),
        "wall_s": time.perf_counter() - started,
        "images": images,
    }


def tables(report: dict) -> str:
    """Markdown: student vs teacher per class, IoU per dose bin, speed."""
    s, overall = report["settings"], report["overall"]
    t = report["training"]
    lines = [
        f"U-Net student vs lattice teacher against the ground truth: {overall['images']} "
        f"held-out images ({s['test_per_class']} per material and label, {s['size']} x "
        f"{s['size']}, seed {s['seed']}); student trained on {t['train_images']} images' "
        f"pseudo-labels in {t['seconds']:.0f} s ({json.dumps(s['segmenter_options'])}); "
        f"pixels pooled, threshold {s['threshold']}.",
        "",
        "| class | student IoU | teacher IoU | student F1 | teacher F1 | student P / R "
        "| teacher P / R | student vs teacher IoU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in DEFECT_CLASSES:
        st, te = overall["student_vs_truth"][name], overall["teacher_vs_truth"][name]
        lines.append(f"| {name} | {fmt(st['iou'])} | {fmt(te['iou'])} | {fmt(st['f1'])} "
                     f"| {fmt(te['f1'])} | {fmt(st['precision'])} / {fmt(st['recall'])} "
                     f"| {fmt(te['precision'])} / {fmt(te['recall'])} "
                     f"| {fmt(overall['student_vs_teacher'][name]['iou'])} |")
    lines += ["", "IoU against the ground truth, student / teacher, by material and dose (e/Å²):",
              "", "| subset | images | " + " | ".join(DEFECT_CLASSES) + " |",
              "| --- | --- | " + " | ".join("---" for _ in DEFECT_CLASSES) + " |"]
    subsets = list(report["by_material"].items())
    subsets += [(f"dose {lo:.0f}–{hi:.0f}", part) for part in report["by_dose"]
                for lo, hi in [part["dose_range"]]]
    for title, part in subsets:
        if not part.get("images"):
            lines.append(f"| {title} | 0 | " + " | ".join("–" for _ in DEFECT_CLASSES) + " |")
            continue
        cells = [f"{fmt(part['student_vs_truth'][n]['iou'])} / {fmt(part['teacher_vs_truth'][n]['iou'])}"
                 for n in DEFECT_CLASSES]
        lines.append(f"| {title} | {part['images']} | " + " | ".join(cells) + " |")
    speed, frame = report["speed"], report["speed"]["frame"]
    calib = report["calibration_before"]
    teacher = (f", of which {frame['teacher_seconds']:.1f} s for the teacher's deviation map "
               f"the model reads" if frame.get("teacher_seconds") is not None else "")
    lines += ["", f"Inference: {frame['height']} x {frame['width']} frame through the sliding "
              f"window ({frame['tile']} px tiles, {frame['overlap']} overlap) in "
              f"{frame['seconds']:.1f} s{teacher} ({frame['megapixels_per_s']:.2f} MP/s, "
              f"{frame['threads']} threads), peak memory {frame['peak_rss_gib']:.2f} GiB "
              f"(VmHWM of the whole process; {frame['peak_rss_before_predict_gib']:.2f} GiB "
              f"with the model loaded, before the frame); whole {s['size']} x {s['size']} images "
              f"{speed['whole_images_megapixels_per_s']:.2f} MP/s; load average "
              f"{calib['loadavg_1_5_15'][0]:.2f} on {calib['cpu_count']} cores."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--train-per-class", type=int, default=28,
                        help="training images per (material, label) pair (the demo's 336 in all)")
    parser.add_argument("--eval-per-class", type=int, default=8)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--dose-bins", type=int, default=3,
                        help="log-spaced bins over the simulator's dose range")
    parser.add_argument("--segmenter", type=json.loads, default=None,
                        help="SegmenterConfig options as JSON (default: the demo profile's)")
    parser.add_argument("--frame-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2,
                        help="TensorFlow threads for the large frame")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--no-heatmap", action="store_true")
    parser.add_argument("--table-only", nargs="?", const=RESULTS, default=None, metavar="PATH")
    parser.add_argument("--frame-timing", nargs=3, metavar=("MODEL", "FRAME", "THREADS"),
                        help=argparse.SUPPRESS)  # the subprocess of frame_timing
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if args.frame_timing:
        model_dir, frame_path, threads = args.frame_timing
        print(json.dumps(time_frame(model_dir, frame_path, int(threads))))
        return {}
    if args.table_only is not None:
        return print_tables(args.table_only, tables)
    if min(args.train_per_class, args.eval_per_class, args.test_per_class, args.dose_bins) < 1:
        parser.error("--*-per-class and --dose-bins must be >= 1")
    options = demo_segmenter_options() if args.segmenter is None else args.segmenter
    heatmap_path = None if args.no_heatmap else os.path.splitext(args.out)[0] + "_heatmap.png"
    report = build_report(args.seed, args.train_per_class, args.eval_per_class,
                          args.test_per_class, args.size, args.dose_bins, options,
                          args.frame_size, args.threads, heatmap_path, progress=not args.quiet)
    write_report(report, args.out)
    if not args.quiet:
        print(tables(report))
        print(f"\nwall time {report['wall_s']:.1f} s; results in {args.out}")
    return report


if __name__ == "__main__":
    main()
