"""How the cost of each stage grows with the dataset: time and peak memory at several sizes.

    nice .venv/bin/python -m benchmarks.cost_growth [--sizes 1000 4000 16000] [--profile demo]
        [--stages ...] [--max-stage-seconds 900] [--out PATH]
    .venv/bin/python -m benchmarks.cost_growth --table-only [PATH]

Five stages, each the project's own science code at the settings of a pipeline profile
(default `demo`, the default one), without TFX or Beam around it:

- synthesis: simulator.simulate_image of N planned images (plan_dataset), no tf.Example encoding;
- pseudo_labelling: lattice.pseudo_labels of N simulated images (their simulation not timed);
- classifier_epoch: one training epoch (no validation pass) of classifier.build_model (the
  configured backbone weights, the last layers trainable) over N inputs, orientation-augmented
  and batched as the Trainer does; the inputs are random arrays of the model's input shape,
  cycled from a bank of at most INPUT_BANK and streamed through tf.data as the Trainer streams
  its TFRecords (a CNN's arithmetic does not depend on the pixel values);
- unet_inference: segmenter.predict of an untrained build_unet (the profile's size) on
  N images of the synthesis size, in batches of the clustering component's batch size;
- clustering: grouping.cluster (k-means per k, silhouette on a fixed sample) and grouping.embed
  (t-SNE of a sample) with the clustering component's settings, on N synthetic descriptor
  vectors of the real dimension (benchmarks/clustering_scale.py's generator).

Each (stage, N) runs in a fresh process, so its peak resident memory is its own (VmHWM, see
machine.peak_rss_mib). `seconds` (wall) and `cpu_s` (CPU, all threads) are the work that depends on
N; imports, model building and the first (tracing) call are outside them, in `overhead_s`,
and `peak_mib_after_setup` is the memory before that work. Each row also records the
machine's state: machine.calibration's fixed workload just before it, the load just after.

A stage whose work is per image and independent between images (every stage but clustering)
is extrapolated from its largest measured size where the measured rate predicts more than
--max-stage-seconds at N: seconds = seconds per image x N, and the peak memory of the measured
run (the work streams one image or batch at a time). Such rows say "extrapolated". Clustering
holds every row in memory and is always measured. The growth exponents b of seconds ~ N^b
are fitted on measured rows only (an extrapolated row is linear by construction), for CPU
and for wall time; the sentence calls a step faster or slower than linear only where both
agree (see verdict): on a shared machine other jobs move either one alone.

--table-only prints the Markdown table and the growth sentences from an existing JSON file.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

try:  # run as `python -m benchmarks.cost_growth`
    from benchmarks.machine import (calibration, fmt, git_commit, peak_rss_mib, print_tables,
                                    write_report)
except ImportError:  # run as a file: benchmarks/ is on the path
    from machine import calibration, fmt, git_commit, peak_rss_mib, print_tables, write_report

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT_ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "cost_growth.json")
STAGES = ("synthesis", "pseudo_labelling", "classifier_epoch", "unet_inference", "clustering")
PER_IMAGE_STAGES = ("synthesis", "pseudo_labelling", "classifier_epoch", "unet_inference")
INPUT_BANK = 256  # distinct classifier inputs cycled through an epoch
LINEAR_BAND = (0.85, 1.15)  # growth exponents counted as linear (timing noise on a shared machine)
CHILD_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


class Clock:
    """Wall and CPU seconds (all threads of this process) of the timed work, summed over the
    stretches timed with `with clock:`. Wall time is what a run waits; CPU time is not
    stretched by waiting for a core, though threads that spin while they wait add to it."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu

    def times(self) -> dict:
        return {"seconds": self.wall, "cpu_s": self.cpu}


# ------------------------------------------------------------------ settings (parent process)


def pipeline_settings(profile: str, image_size=None, input_size=None) -> dict:
    """What each stage needs from the pipeline profile, as JSON for the measuring processes
    (which then need not import TFX to read the config)."""
    import dataclasses

    from components.clustering.executor import ClusteringConfig
    from pipeline.config import load_config

    config = load_config(profile)
    if image_size:
        config = config.replace(image_size=image_size)
    if input_size:
        config = config.replace(input_size=input_size)
    return {
        "profile": profile,
        "seed": config.seed,
        "materials": list(config.materials),
        "labels": None if config.labels is None else list(config.labels),
        "image_size": config.image_size,
        "pixel_size_pm": list(config.pixel_size_pm),
        "dose": list(config.dose),
        "pseudo_labels": dict(config.pseudo_labels),
        "classes": sorted(set().union(*config.material_labels().values())),
        # what pipeline/graph.py gives the Trainer
        "classifier": dict(batch_size=config.batch_size,
                           fine_tune_layers=config.fine_tune_layers,
                           learning_rate=config.learning_rate, input_size=config.input_size,
                           input_channels=list(config.input_channels),
                           teacher_features=config.teacher_features,
                           weights_path=config.weights_path,
                           augment_labels=list(config.augment_labels)),
        "segmenter": dict(config.segmenter),
        "clustering": {key: list(value) if isinstance(value, tuple) else value for key, value in
                       dataclasses.asdict(ClusteringConfig.from_options(config.clustering)).items()},
    }


# ------------------------------------------------------------------ stages (measuring process)


def _simulation(settings: dict):
    """(SimulationConfig, plan function) as the synthesis component builds them."""
    from components.synthesis import simulator

    config = simulator.SimulationConfig(size=settings["image_size"],
                                        pixel_size_pm=tuple(settings["pixel_size_pm"]),
                                        dose=tuple(settings["dose"]))

    def plan(images):
        return simulator.plan_dataset(images, settings["materials"], settings["seed"],
                                      settings["labels"])

    def simulate(item, seed):
        index, material, label, _ = item
        return simulator.simulate_image(material, label, simulator.seed_for(seed, index), config)

    return plan, simulate


def measure_synthesis(images: int, settings: dict) -> dict:
    plan, simulate = _simulation(settings)
    items = plan(images)
    simulate(items[0], settings["seed"] + 1)  # lazy imports and caches, on an image not counted
    ready, clock = peak_rss_mib(), Clock()
    with clock:
        for item in items:
            simulate(item, settings["seed"])
    return {**clock.times(), "peak_mib_after_setup": ready}


def measure_pseudo_labelling(images: int, settings: dict) -> dict:
    from components.pseudo_labels.lattice import PseudoLabelConfig, pseudo_labels

    plan, simulate = _simulation(settings)
    teacher = PseudoLabelConfig(**settings["pseudo_labels"])

    def label(image) -> bool:
        """False where no lattice is found (the component keeps such an image, unlabelled)."""
        try:
            pseudo_labels(image, teacher)
            return True
        except ValueError:
            return False

    items = plan(images)
    label(simulate(items[0], settings["seed"] + 1).image)
    ready, clock, no_lattice = peak_rss_mib(), Clock(), 0
    for item in items:
        image = simulate(item, settings["seed"]).image
        with clock:
            no_lattice += not label(image)
    return {**clock.times(), "peak_mib_after_setup": ready,
            "notes": {"images_without_lattice": no_lattice}}


def measure_classifier_epoch(images: int, settings: dict) -> dict:
    import tensorflow as tf

    from modules import classifier
    from modules.transform import IMAGE_XF, TEACHER_SIZE, TEACHER_XF

    config = classifier.TrainingConfig.from_custom_config(settings["classifier"])
    classes = settings["classes"]
    model = classifier.build_model(len(classes), config)
    rng = np.random.default_rng(settings["seed"])
    bank = min(images, INPUT_BANK)
    size = config.input_size
    inputs = {IMAGE_XF: rng.standard_normal((bank, size, size, 3), dtype=np.float32)}
    if config.teacher_features:
        inputs[TEACHER_XF] = rng.random((bank, TEACHER_SIZE), dtype=np.float32)
    labels = rng.integers(0, len(classes), bank)
    augmented = [i for i, name in enumerate(classes) if name in config.augment_labels]

    def epoch(count):
        return (tf.data.Dataset.from_tensor_slices((inputs, labels)).repeat().take(count)
                .map(classifier.orientation_augmenter(augmented),
                     num_parallel_calls=tf.data.AUTOTUNE)
                .batch(config.batch_size).prefetch(tf.data.AUTOTUNE))

    # traces the training step for a full batch, then for any size (a last, partial batch)
    model.fit(epoch(config.batch_size + 1), epochs=1, verbose=0)
    ready, clock = peak_rss_mib(), Clock()
    with clock:
        model.fit(epoch(images), epochs=1, verbose=0)
    return {**clock.times(), "peak_mib_after_setup": ready,
            "notes": {"classes": len(classes), "trainable_weights": len(model.trainable_weights)}}


def measure_unet_inference(images: int, settings: dict) -> dict:
    import tensorflow as tf

    from components.defects import DEFECT_CLASSES
    from modules import segmenter

    config = segmenter.SegmenterConfig.from_custom_config(settings["segmenter"])
    model = segmenter.build_unet(len(DEFECT_CLASSES), config)
    size, batch = settings["image_size"], settings["clustering"]["batch_size"]
    spec = tf.TensorSpec([None, size, size], tf.float32)
    predict = tf.function(
        lambda x, z: segmenter.predict(model, segmenter.network_input(x, z, config.inputs),
                                       config.multiple), input_signature=[spec, spec])
    rng = np.random.default_rng(settings["seed"])
    counts = rng.poisson(50.0, size=(batch, size, size)).astype(np.float32)
    deviation = rng.standard_normal((batch, size, size), dtype=np.float32)
    predict(counts, deviation).numpy()  # traces the graph
    ready, clock, done = peak_rss_mib(), Clock(), 0
    with clock:
        while done < images:
            count = min(batch, images - done)
            predict(counts[:count], deviation[:count]).numpy()
            done += count
    return {**clock.times(), "peak_mib_after_setup": ready,
            "notes": {"batch_size": batch, "base_filters": config.base_filters,
                      "depth": config.depth}}


def measure_clustering(images: int, settings: dict) -> dict:
    from components.clustering import descriptors, grouping
    from components.defects import DEFECT_CLASSES

    try:
        from benchmarks.clustering_scale import synthetic_descriptors
    except ImportError:
        from clustering_scale import synthetic_descriptors

    options = settings["clustering"]
    X, _ = synthetic_descriptors(images, len(descriptors.descriptor_names(DEFECT_CLASSES)),
                                 options["seed"])
    ready, clock, tsne = peak_rss_mib(), Clock(), Clock()
    with clock:
        result = grouping.cluster(X, k_range=(options["k_min"], options["k_max"]),
                                  seed=options["seed"],
                                  silhouette_sample=options["silhouette_sample"],
                                  minibatch_above=options["minibatch_above"])
        with tsne:
            standardised, _, _ = grouping.standardise(X)
            sample, _ = grouping.embed(standardised, seed=options["seed"],
                                       sample=options["tsne_sample"])
    return {**clock.times(), "peak_mib_after_setup": ready,
            "parts": {"kmeans": float(np.sum(result.seconds["fit"])),
                      "silhouette": float(np.sum(result.seconds["silhouette"])),
                      "tsne": tsne.wall},
            "notes": {"algorithm": result.method["algorithm"], "chosen_k": result.chosen_k,
                      "silhouette_rows": result.method["silhouette_sample"],
                      "tsne_rows": int(sample.size)}}


MEASURE = {"synthesis": measure_synthesis, "pseudo_labelling": measure_pseudo_labelling,
           "classifier_epoch": measure_classifier_epoch, "unet_inference": measure_unet_inference,
           "clustering": measure_clustering}


def measure_here(stage: str, images: int, settings_path: str, result_path: str) -> None:
    """The measuring process: one stage at one size, its result and its own peak memory."""
    with open(settings_path) as handle:
        settings = json.load(handle)
    result = MEASURE[stage](images, settings)
    result["peak_mib"] = peak_rss_mib()
    with open(result_path, "w") as handle:
        json.dump(result, handle)


# ------------------------------------------------------------------ orchestration (parent)


def run_child(stage: str, images: int, settings_path: str, workdir: str, timeout_s: float) -> dict:
    """One measurement in a fresh process; an error is recorded with the end of its stderr."""
    result_path = os.path.join(workdir, f"{stage}_{images}.json")
    command = [sys.executable, "-m", "benchmarks.cost_growth", "--measure", stage,
               "--images", str(images), "--settings", settings_path, "--result", result_path]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=PROJECT_ROOT, env=dict(os.environ, **CHILD_ENV),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-3:])}
    with open(result_path) as handle:
        result = json.load(handle)
    result["child_wall_s"] = wall
    result["overhead_s"] = wall - result["seconds"]
    return result


def extrapolation_source(stage: str, images: int, rows: list, max_stage_seconds: float):
    """The measured row of `stage` to scale up to `images`, or None to measure: only for
    per-image work, and only where the largest measured run predicts more than the budget."""
    if stage not in PER_IMAGE_STAGES:
        return None
    measured = [r for r in rows
                if r["stage"] == stage and r["how"] == "measured" and "error" not in r]
    if not measured:
        return None
    largest = max(measured, key=lambda r: r["images"])
    predicted = largest["child_wall_s"] / largest["images"] * images
    return largest if predicted > max_stage_seconds else None


def extrapolated_row(stage: str, images: int, source: dict) -> dict:
    scale = images / source["images"]
    return {"stage": stage, "images": images, "how": "extrapolated",
            "extrapolated_from": source["images"], "seconds": source["seconds"] * scale,
            "cpu_s": source["cpu_s"] * scale, "ms_per_image": source["ms_per_image"],
            "cpu_ms_per_image": source["cpu_ms_per_image"], "peak_mib": source["peak_mib"],
            "peak_mib_after_setup": source["peak_mib_after_setup"]}


def measured_row(stage: str, images: int, result: dict, workload_s: float) -> dict:
    """The child's result, per image, and the machine's state: `workload_s` is
    machine.calibration's fixed workload just before, the load average just after."""
    row = {"stage": stage, "images": images, "how": "measured", **result}
    if "seconds" in result:
        row["ms_per_image"] = 1e3 * result["seconds"] / images
        row["cpu_ms_per_image"] = 1e3 * result["cpu_s"] / images
    row["fixed_numpy_workload_s"] = workload_s
    row["loadavg_1"] = os.getloadavg()[0]
    return row


def pairwise_exponents(sizes, seconds) -> list:
    """[(n0, n1, b)] for consecutive sizes, with seconds ~ N^b between them."""
    points = sorted(zip(sizes, seconds))
    return [(n0, n1, math.log(t1 / t0) / math.log(n1 / n0))
            for (n0, t0), (n1, t1) in zip(points, points[1:]) if t0 > 0 and t1 > 0 and n1 > n0]


def fitted_exponent(sizes, seconds):
    """Least-squares slope of log(seconds) on log(N); None for fewer than two sizes."""
    points = [(n, t) for n, t in zip(sizes, seconds) if n > 0 and t > 0]
    if len({n for n, _ in points}) < 2:
        return None
    logs = np.log(np.asarray(points, dtype=float))
    return float(np.polyfit(logs[:, 0], logs[:, 1], 1)[0])


def verdict(cpu_exponent: float, wall_exponent: float) -> str:
    """Faster or slower than linearly only where CPU and wall time agree: on a shared machine
    other jobs move each of them (wall time: waiting for a core; CPU time: threads spinning
    while they wait), rarely both the same way."""
    low, high = LINEAR_BAND
    if min(cpu_exponent, wall_exponent) > high:
        return "faster than linearly"
    if max(cpu_exponent, wall_exponent) < low:
        return "slower than linearly"
    return "linearly"


def cost_model(stage: str, settings: dict) -> str:
    """What the work of a stage is made of (from the code), beside the measured growth."""
    clustering = settings["clustering"]
    return {
        "synthesis": "each image is simulated alone from its own seed",
        "pseudo_labelling": "each image is labelled alone (its own lattice fit)",
        "classifier_epoch": "an epoch is one pass over the images in fixed batches",
        "unet_inference": "each batch of images is predicted alone",
        "clustering": (f"k-means is linear in N per iteration for each k; the silhouette is "
                       f"quadratic in its sample (every row up to "
                       f"{clustering['silhouette_sample']:,}); t-SNE is n log n in its sample "
                       f"(every row up to {clustering['tsne_sample']:,})"),
    }[stage]


def _shape(cpu_pairs, wall_pairs) -> str:
    """'grows linearly (...)' or, where the verdict changes, each step's own, with the CPU-
    and wall-time exponents of every step."""
    if not cpu_pairs:
        return "has fewer than two measured sizes: no growth exponent"
    steps = [(n0, n1, verdict(c, w), f"CPU {c:.2f}, wall {w:.2f}")
             for (n0, n1, c), (_, _, w) in zip(cpu_pairs, wall_pairs)]
    if len({kind for _, _, kind, _ in steps}) == 1:
        return f"grows {steps[0][2]} (time exponent " + "; ".join(
            f"{exponents} from {n0:,} to {n1:,}" for n0, n1, _, exponents in steps) + ")"
    return "grows " + ", then ".join(
        f"{kind} from {n0:,} to {n1:,} ({exponents})" for n0, n1, kind, exponents in steps)


def growth(rows: list, settings: dict) -> list:
    """Per stage: fitted and pairwise exponents of the measured CPU and wall seconds (and of
    the wall seconds of its parts), and one sentence: the shape of the growth, the memory,
    what the work is made of."""
    out = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage and "seconds" in r]
        if not mine:
            continue
        measured = [r for r in mine if r["how"] == "measured"]
        sizes = [r["images"] for r in measured]
        cpu, wall = [r["cpu_s"] for r in measured], [r["seconds"] for r in measured]
        cpu_pairs, wall_pairs = pairwise_exponents(sizes, cpu), pairwise_exponents(sizes, wall)
        entry = {"stage": stage, "cpu_exponent": fitted_exponent(sizes, cpu),
                 "exponent": fitted_exponent(sizes, wall),
                 "pairwise": [{"from": n0, "to": n1, "cpu_exponent": c, "exponent": w}
                              for (n0, n1, c), (_, _, w) in zip(cpu_pairs, wall_pairs)]}
        clauses = [f"{stage} {_shape(cpu_pairs, wall_pairs)}",
                   f"peak memory {mine[0]['peak_mib']:.0f} MiB at {mine[0]['images']:,} and "
                   f"{mine[-1]['peak_mib']:.0f} MiB at {mine[-1]['images']:,}",
                   cost_model(stage, settings)]
        parts = {name: [{"from": n0, "to": n1, "exponent": b} for n0, n1, b in
                        pairwise_exponents(sizes, [r["parts"][name] for r in measured])]
                 for name in measured[0].get("parts", {})}
        steps = [(name, step) for name, part in parts.items() for step in part]
        if steps:
            entry["parts"] = parts
            name, step = max(steps, key=lambda item: item[1]["exponent"])
            clauses.append(f"fastest-growing part: {name} (wall-time exponent "
                           f"{step['exponent']:.2f} from {step['from']:,} to {step['to']:,})")
        extrapolated = [r for r in mine if r["how"] == "extrapolated"]
        if extrapolated:
            clauses.append(", ".join(f"{r['images']:,}" for r in extrapolated) +
                           f" extrapolated linearly from {extrapolated[0]['extrapolated_from']:,}")
        entry["sentence"] = "; ".join(clauses) + "."
        out.append(entry)
    return out


def table(report: dict) -> str:
    """Markdown: one row per (stage, N), then the growth sentences."""
    lines = ["| stage | images | wall s | CPU s | CPU ms per image | peak MiB | how |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["measurements"]:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['images']:,} | – | – | – | – | "
                         f"failed: {r['error']} |")
            continue
        how = r["how"] if r["how"] == "measured" else f"extrapolated from {r['extrapolated_from']:,}"
        lines.append(f"| {r['stage']} | {r['images']:,} | {fmt(r['seconds'], 1)} | "
                     f"{fmt(r['cpu_s'], 1)} | {fmt(r['cpu_ms_per_image'], 2)} | "
                     f"{fmt(r['peak_mib'], 0)} | {how} |")
    lines.append("")
    lines += [f"- {g['sentence']}" for g in report.get("growth", [])]
    return "\n".join(lines)


def build_report(sizes, stages, settings: dict, max_stage_seconds: float, out: str) -> dict:
    report = {
        "description": "wall and CPU time and peak memory of each stage at several dataset sizes",
        "settings": {"sizes": sizes, "stages": stages, "max_stage_seconds": max_stage_seconds,
                     "input_bank": INPUT_BANK, **settings, **git_commit()},
        "calibration_before": calibration(),
        "measurements": [],
    }
    started = time.perf_counter()
    rows = report["measurements"]
    with tempfile.TemporaryDirectory(prefix="cost_growth_") as workdir:
        settings_path = os.path.join(workdir, "settings.json")
        with open(settings_path, "w") as handle:
            json.dump(settings, handle)
        for stage in stages:
            for images in sizes:
                source = extrapolation_source(stage, images, rows, max_stage_seconds)
                if source is not None:
                    row = extrapolated_row(stage, images, source)
                else:
                    workload_s = calibration()["fixed_numpy_workload_s"]
                    row = measured_row(stage, images, run_child(
                        stage, images, settings_path, workdir, 2 * max_stage_seconds + 600),
                        workload_s)
                rows.append(row)
                print(f"{stage} at {images:,}: " + (
                    row["error"] if "error" in row else
                    f"{row['seconds']:.1f} s, {row['peak_mib']:.0f} MiB, {row['how']}"), flush=True)
                write_report(report, out)  # a long run keeps what it has measured
    report["growth"] = growth(rows, settings)
    report["calibration_after"] = calibration()
    report["wall_s"] = time.perf_counter() - started
    write_report(report, out)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--profile", default="demo", help="pipeline profile whose settings to use")
    parser.add_argument("--image-size", type=int, default=None,
                        help="override the profile's image size (tests: a small one)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="override the classifier's input size (tests: a small one)")
    parser.add_argument("--max-stage-seconds", type=float, default=900.0,
                        help="extrapolate per-image stages predicted to take longer than this")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--table-only", nargs="?", const=RESULTS, default=None, metavar="PATH",
                        help="print the Markdown table from an existing JSON and exit")
    parser.add_argument("--measure", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        measure_here(args.measure, args.images, args.settings, args.result)
        return None
    if args.table_only is not None:
        return print_tables(args.table_only, table)
    sizes = sorted(set(args.sizes))
    if sizes[0] < 3:
        parser.error("--sizes must be at least 3 (clustering needs more rows than k_min)")
    settings = pipeline_settings(args.profile, args.image_size, args.input_size)
    report = build_report(sizes, list(args.stages), settings, args.max_stage_seconds, args.out)
    print(table(report))
    print(f"results in {args.out}")
    return report


if __name__ == "__main__":
    main()
