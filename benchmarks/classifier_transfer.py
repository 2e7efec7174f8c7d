"""Classifier accuracy on a held-out test split, and what the synthetic-pretrained backbone buys.

    nice -n 10 .venv/bin/python benchmarks/classifier_transfer.py [--images 480]
        [--transfer-images 400] [--parts default transfer] [--no-teacher-features]
        [--learning-rate 1e-3] [--out PATH]
    .venv/bin/python benchmarks/classifier_transfer.py --table-only [PATH]

Both parts prepare their images with modules.pretrain.build_corpus, which runs the
simulator, the lattice pseudo-labeller and Transform's own model_input exactly as the
pipeline does (with --teacher-features, the default, also Transform's teacher_vector of each
image's mask_pseudo, which the classifier reads beside the backbone's pooled features), and
split them as the pipeline's SyntheticStemGen does: 70:20:10 by each (material, label) pair's
occurrence (executor.split_pattern / split_of). Training follows modules/classifier.py's
run_fn: classifier.build_model on the sorted label vocabulary of the data, batch 32, 25
epochs, constant learning rate (--learning-rate), the orientation augmentation on the
orientation-free labels, the eval split as validation data. No model selection: the model
after the last epoch is scored once on the test split, which neither training nor
validation saw.

(A) `default`: the demo profile's data. SimulationConfig() defaults (dose 2e3 to 2e4 e/Å²,
    pixel size 18 to 22 pm, 256 x 256), both materials, every label each has, --images
    images (480 like the demo) from --seed (the pipeline's 20261125); fine-tuned from the
    shipped synthetic-pretrained backbone (last 40 layers). Reports test accuracy per
    material and overall (with a 95 % Wilson interval), confusion matrices, the teacher's own
    rule on the same test images (the class whose mask_pseudo marks the largest area, bulk
    when it marks nothing; no training), accuracy per material by dose tercile (log-spaced
    thirds of the dose range), training images/s
    (train images x epochs / seconds in fit, validation included) and inference images/s
    (model.predict on the test split, batch 32, after a warm-up call).
(B) `transfer`: a small labelled set (--transfer-images, 400) drawn from dose and pixel-size
    ranges the backbone never saw in pretraining (modules.pretrain.PRETRAIN_DOSE and
    PRETRAIN_PIXEL_SIZE_PM; by default pixel size 29 to 33 pm, dose 1e5 to 3e5 e/Å²) from its
    own seed; trained (i) from scratch (every layer) and (ii) from the synthetic-pretrained
    backbone (last 40 layers), same epochs, batch and augmentation; test accuracy per
    material for both.

BLAS and TensorFlow keep their default thread counts (every core); the corpus is built with
--workers processes (default: every core). The machine's state (load, a fixed NumPy
workload) is recorded as in the other benchmarks: compare numbers from the same machine
only. Training is seeded (keras.utils.set_random_seed) but TensorFlow's multi-threaded
kernels are not bitwise deterministic, so a rerun may differ by an image or two.

--table-only prints the Markdown tables (for the README) from an existing JSON file.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2, before TensorFlow is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Nothing heavier than NumPy at module level: build_corpus's spawned workers import this
# file again as __mp_main__ when it runs as a script. TensorFlow is imported in functions.
import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from components.synthesis import simulator  # noqa: E402
from machine import calibration, git_commit, print_tables  # noqa: E402  (benchmarks/machine.py)
from modules import pretrain  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT_ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "classifier_transfer.json")
SHIPPED_BACKBONE = os.path.join(PROJECT_ROOT, "modules", "weights",
                                "mobilenetv2_0.35_128_synthetic.h5")
MATERIALS = ("SrTiO3", "CdTe")
DEFAULT_SEED = 20261125  # the pipeline's profiles
TRANSFER_SEED = 271828  # used by nothing else (pretraining: 31415, 31416; pseudo-labels: 4242)
SPLIT_TENTHS = (7, 2, 1)
SPLITS = ("train", "eval", "test")
# Sathish, Sosa Espada and Karagiannis: test accuracy of their MobileNet classifier.
PAPER_ACCURACY = {"SrTiO3": 0.94, "CdTe": 0.993}
DOSE_BINS = 3






def wilson(correct: int, n: int, z: float = 1.96):
    """95 % Wilson score interval of a proportion; None for no trials."""
    if n == 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _overlap(a, b) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


# --- data ---------------------------------------------------------------------------------

def build_set(num_images: int, seed: int, config: simulator.SimulationConfig, materials,
              channels, input_size: int, workers: int) -> dict:
    """The pipeline's transformed inputs for a planned set ({IMAGE_XF: …, TEACHER_XF: …}), its
    split by occurrence, and each image's drawing conditions (dose, pixel size, thickness)."""
    from components.synthesis.executor import split_of, split_pattern

    plan = simulator.plan_dataset(num_images, materials, seed)
    started = time.perf_counter()
    inputs, class_ids = pretrain.build_corpus(num_images, seed, config, materials, channels,
                                              input_size, workers)
    corpus_s = time.perf_counter() - started
    # build_corpus returns the inputs only; the conditions of image i come from simulating it
    # again (same seed and config: the same draw). Simulation alone is cheap next to the
    # pseudo-labeller.
    started = time.perf_counter()
    conditions = []
    for index, material, label, _ in plan:
        sim = simulator.simulate_image(material, label, simulator.seed_for(seed, index), config)
        conditions.append((sim.dose, sim.pixel_size_pm, sim.thickness_nm))
    conditions_s = time.perf_counter() - started
    pattern = split_pattern(SPLIT_TENTHS)
    from components.defects import IMAGE_CLASSES
    labels = [label for _, _, label, _ in plan]
    assert labels == [IMAGE_CLASSES[i] for i in class_ids]  # build_corpus follows the plan
    return {
        "plan": plan,
        "inputs": inputs,
        "labels": np.array(labels),
        "materials": np.array([material for _, material, _, _ in plan]),
        "split": np.array([split_of(occurrence, pattern) for *_, occurrence in plan]),
        "dose": np.array([c[0] for c in conditions]),
        "pixel_size_pm": np.array([c[1] for c in conditions]),
        "thickness_nm": np.array([c[2] for c in conditions]),
        "corpus_s": corpus_s,
        "conditions_s": conditions_s,
    }


def split_counts(data: dict, materials) -> dict:
    return {name: {m: int(np.sum((data["split"] == s) & (data["materials"] == m)))
                   for m in materials}
            for s, name in enumerate(SPLITS)}


# --- training and scoring -------------------------------------------------------------------

def _epoch_timer():
    """A Keras callback that keeps the wall seconds of each epoch (validation included)."""
    import tf_keras as keras

    class EpochTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds, self.first_epoch_begin, self.last_epoch_end = [], None, None

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self.first_epoch_begin = self.first_epoch_begin or self._start

        def on_epoch_end(self, epoch, logs=None):
            self.last_epoch_end = time.perf_counter()
            self.seconds.append(self.last_epoch_end - self._start)

    return EpochTimer()


def model_rows(data: dict, rows: np.ndarray, config) -> dict:
    """The model's inputs ({name: float32 array}) for the selected rows of a set."""
    from modules import classifier

    return {name: data["inputs"][name][rows].astype(np.float32)
            for name in classifier.model_inputs(config)}


def train(data: dict, vocabulary, config, seed: int, verbose: int = 2,
          run_eagerly: bool = False):
    """run_fn's training on the train split, the eval split as validation data."""
    import tensorflow as tf
    import tf_keras as keras

    from modules import classifier

    ids = {label: i for i, label in enumerate(vocabulary)}
    y = np.array([ids[label] for label in data["labels"]], np.int64)
    train_mask, eval_mask = data["split"] == 0, data["split"] == 1
    train_x, train_y = model_rows(data, train_mask, config), y[train_mask]
    eval_x, eval_y = model_rows(data, eval_mask, config), y[eval_mask]

    keras.utils.set_random_seed(seed)
    model = classifier.build_model(len(vocabulary), config)
    model.run_eagerly = run_eagerly  # tests only: tracing takes longer than a tiny fit
    augment = classifier.orientation_augmenter(
        [i for i, label in enumerate(vocabulary) if label in config.augment_labels])
    dataset = (tf.data.Dataset.from_tensor_slices((train_x, train_y))
               .shuffle(len(train_y), seed=seed, reshuffle_each_iteration=True)
               .map(augment)  # sequential, as in classifier.train: seeded draws in order
               .batch(config.batch_size).prefetch(tf.data.AUTOTUNE))
    timer = _epoch_timer()
    started = time.perf_counter()
    history = model.fit(dataset, validation_data=(eval_x, eval_y),
                        validation_batch_size=config.batch_size, epochs=config.epochs,
                        verbose=verbose, callbacks=[timer])
    fit_s = time.perf_counter() - started
    steady = float(np.median(timer.seconds[1:])) if len(timer.seconds) > 1 else None
    record = {
        "start": config.weights_path or "scratch",
        "trainable_backbone_layers": sum(layer.trainable
                                         for layer in classifier.backbone_of(model).layers),
        "backbone_layers": len(classifier.backbone_of(model).layers),
        "train_images": int(len(train_y)),
        "eval_images": int(len(eval_y)),
        "fit_s": fit_s,
        # fit's own set-up before the first epoch (data adapter, and in the first fit of
        # a process TensorFlow's one-off initialisation), and its tail after the last
        "fit_before_first_epoch_s": timer.first_epoch_begin - started,
        "fit_after_last_epoch_s": started + fit_s - timer.last_epoch_end,
        # the first epoch includes tracing the train and test steps into graphs
        "epoch_s": timer.seconds,
        "train_images_per_s": len(train_y) * config.epochs / fit_s,
        "train_images_per_s_after_first_epoch": (len(train_y) / steady) if steady else None,
        "history": {k: [float(v) for v in values] for k, values in history.history.items()},
        "final_eval_accuracy": float(history.history["val_accuracy"][-1]),
    }
    return model, record


def inference_speed(model, x: dict, batch_size: int, repeats: int = 5) -> dict:
    """model.predict on x ({name: array}), after one warm-up call: median over `repeats`
    timed calls."""
    model.predict(x, batch_size=batch_size, verbose=0)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(x, batch_size=batch_size, verbose=0)
        seconds.append(time.perf_counter() - started)
    images = len(next(iter(x.values())))
    return {"images": int(images), "batch_size": batch_size, "seconds": seconds,
            "images_per_s": images / float(np.median(seconds))}


def _accuracy(correct: np.ndarray) -> dict:
    n, k = int(correct.size), int(np.sum(correct))
    return {"images": n, "correct": k, "accuracy": (k / n) if n else None,
            "wilson_95": wilson(k, n)}


def teacher_rule(teacher: np.ndarray) -> np.ndarray:
    """The teacher's own image class from its vectors: the defect class whose mask marks the
    largest area, bulk where none marks anything."""
    from components.defects import BULK_LABEL, DEFECT_CLASSES

    area = teacher[:, :len(DEFECT_CLASSES)]
    return np.where(area.max(axis=1) > 0, np.array(DEFECT_CLASSES)[np.argmax(area, axis=1)],
                    BULK_LABEL)


def score(model, data: dict, vocabulary, materials, dose_range, batch_size: int,
          config) -> dict:
    """Test-split accuracy overall, per material (confusion matrix, dose terciles), and the
    per-image predictions; `model` None: the teacher's rule instead of a model."""
    from modules.transform import TEACHER_XF

    test = np.flatnonzero(data["split"] == 2)
    if model is None:
        predicted = teacher_rule(data["inputs"][TEACHER_XF][test])
        vocabulary = sorted(set(vocabulary) | set(predicted))
        probabilities = (predicted[:, None] == np.array(vocabulary)).astype(np.float32)
    else:
        probabilities = model.predict(model_rows(data, test, config), batch_size=batch_size,
                                      verbose=0)
        predicted = np.array(vocabulary)[np.argmax(probabilities, axis=-1)]
    truth, material = data["labels"][test], data["materials"][test]
    dose = data["dose"][test]
    correct = predicted == truth
    edges = np.geomspace(dose_range[0], dose_range[1], DOSE_BINS + 1)
    bins = np.clip(np.searchsorted(edges, dose, side="right") - 1, 0, DOSE_BINS - 1)
    out = {"overall": _accuracy(correct), "by_material": {}}
    for m in materials:
        own = material == m
        classes = sorted(set(data["labels"][data["materials"] == m]))
        matrix = [[int(np.sum(own & (truth == t) & (predicted == p))) for p in vocabulary]
                  for t in classes]
        out["by_material"][m] = {
            **_accuracy(correct[own]),
            "per_class": {t: _accuracy(correct[own & (truth == t)]) for t in classes},
            "confusion": {"rows_true": classes, "columns_predicted": list(vocabulary),
                          "matrix": matrix},
            "by_dose": [{"dose_range": [float(edges[b]), float(edges[b + 1])],
                         **_accuracy(correct[own & (bins == b)])} for b in range(DOSE_BINS)],
        }
    out["predictions"] = [
        {"index": int(data["plan"][i][0]), "material": str(data["materials"][i]),
         "label": str(data["labels"][i]), "predicted": str(p),
         "confidence": round(float(np.max(prob)), 4), "dose": round(float(data["dose"][i]), 1),
         "pixel_size_pm": round(float(data["pixel_size_pm"][i]), 2)}
        for i, p, prob in zip(test, predicted, probabilities)]
    return out


def _set_record(data: dict, sim: simulator.SimulationConfig, seed: int, materials) -> dict:
    return {
        "seed": seed,
        "image_seeds": "numpy SeedSequence([seed, index])",
        "images": int(len(data["plan"])),
        "simulation_config": dataclasses.asdict(sim),
        "split_counts": split_counts(data, materials),
        "corpus_s": data["corpus_s"],
        "corpus_images_per_s": len(data["plan"]) / data["corpus_s"],
        "conditions_s": data["conditions_s"],
        "dose_drawn": [float(data["dose"].min()), float(data["dose"].max())],
        "pixel_size_pm_drawn": [float(data["pixel_size_pm"].min()),
                                float(data["pixel_size_pm"].max())],
    }


def run_default(args, weights: str) -> dict:
    from modules import classifier

    started = time.perf_counter()
    sim = simulator.SimulationConfig(size=args.size)
    data = build_set(args.images, args.seed, sim, args.materials, args.channels,
                     args.input_size, args.workers)
    vocabulary = sorted(set(data["labels"]))
    config = classifier.TrainingConfig(epochs=args.epochs, batch_size=args.batch_size,
                                       input_size=args.input_size, weights_path=weights,
                                       learning_rate=args.learning_rate,
                                       teacher_features=args.teacher_features)
    print(f"[default] {len(data['plan'])} images in {data['corpus_s']:.0f} s; training from "
          f"{weights}", flush=True)
    model, training = train(data, vocabulary, config, args.train_seed, args.fit_verbose,
                            args.run_eagerly)
    test_x = model_rows(data, data["split"] == 2, config)
    result = {
        "data": _set_record(data, sim, args.seed, args.materials),
        "vocabulary": vocabulary,
        "training_config": {k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in dataclasses.asdict(config).items()},
        "train_seed": args.train_seed,
        "training": training,
        "test": score(model, data, vocabulary, args.materials, sim.dose, args.batch_size, config),
        "teacher_rule_test": score(None, data, vocabulary, args.materials, sim.dose,
                                   args.batch_size, config),
        "inference": inference_speed(model, test_x, args.batch_size),
    }
    result["wall_s"] = time.perf_counter() - started
    return result


def run_transfer(args, weights: str) -> dict:
    from modules import classifier

    started = time.perf_counter()
    sim = transfer_config(args)
    data = build_set(args.transfer_images, args.transfer_seed, sim, args.materials,
                     args.channels, args.input_size, args.workers)
    vocabulary = sorted(set(data["labels"]))
    print(f"[transfer] {len(data['plan'])} images in {data['corpus_s']:.0f} s", flush=True)
    result = {
        "data": _set_record(data, sim, args.transfer_seed, args.materials),
        "pretraining": {"dose": list(pretrain.PRETRAIN_DOSE),
                        "pixel_size_pm": list(pretrain.PRETRAIN_PIXEL_SIZE_PM),
                        "dose_overlaps": _overlap(sim.dose, pretrain.PRETRAIN_DOSE),
                        "pixel_size_overlaps": _overlap(sim.pixel_size_pm,
                                                        pretrain.PRETRAIN_PIXEL_SIZE_PM)},
        "vocabulary": vocabulary,
        "train_seed": args.train_seed,
        "runs": {},
    }
    for name, start in (("scratch", None), ("synthetic_pretrained", weights)):
        config = classifier.TrainingConfig(epochs=args.epochs, batch_size=args.batch_size,
                                           input_size=args.input_size, weights_path=start,
                                           learning_rate=args.learning_rate,
                                           teacher_features=args.teacher_features)
        print(f"[transfer] training {name}", flush=True)
        model, training = train(data, vocabulary, config, args.train_seed, args.fit_verbose,
                                args.run_eagerly)
        result["runs"][name] = {
            "training_config": {k: (list(v) if isinstance(v, tuple) else v)
                                for k, v in dataclasses.asdict(config).items()},
            "training": training,
            "test": score(model, data, vocabulary, args.materials, sim.dose, args.batch_size,
                          config),
        }
    result["wall_s"] = time.perf_counter() - started
    return result


def transfer_config(args) -> simulator.SimulationConfig:
    return simulator.SimulationConfig(size=args.size, dose=tuple(args.transfer_dose),
                                      pixel_size_pm=tuple(args.transfer_pixel_size_pm))


# --- output -----------------------------------------------------------------------------------

def write_report(report: dict, path: str) -> None:
    """Indented JSON, one line per predicted test image (strict JSON: no NaN)."""
    records = []

    def placeholders(node):
        if isinstance(node, dict):
            return {k: ([_placeholder(records, v) for v in value] if k == "predictions"
                        else placeholders(value)) for k, value in node.items()}
        return node

    text = json.dumps(placeholders(report), indent=1, allow_nan=False)
    for n, record in enumerate(records):
        text = text.replace(f'"@record{n}@"', json.dumps(record, allow_nan=False), 1)
    json.loads(text)  # still valid JSON
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text + "\n")


def _placeholder(records: list, record: dict) -> str:
    records.append(record)
    return f"@record{len(records) - 1}@"


def _f(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def _acc_cell(entry: dict) -> str:
    if not entry or not entry.get("images"):
        return "–"
    lo, hi = entry["wilson_95"]
    return (f"{_f(entry['accuracy'])} ({entry['correct']}/{entry['images']}; "
            f"95 % CI {lo:.2f}–{hi:.2f})")


def tables(report: dict) -> str:
    lines = []
    load = report["calibration_before"]["loadavg_1_5_15"]
    cores = report["calibration_before"]["cpu_count"]
    part = report.get("default")
    if part:
        data, test, training = part["data"], part["test"], part["training"]
        sim, config = data["simulation_config"], part["training_config"]
        start = os.path.basename(config["weights_path"] or "scratch")
        rule = part.get("teacher_rule_test")
        inputs = ("the teacher's mask_pseudo areas beside the pooled features"
                  if config.get("teacher_features") else "images only")
        lines += [
            f"Default profile: {data['images']} images (seed {data['seed']}, dose "
            f"{sim['dose'][0]:.0f}–{sim['dose'][1]:.0f} e/Å², pixel size "
            f"{sim['pixel_size_pm'][0]:g}–{sim['pixel_size_pm'][1]:g} pm, {sim['size']} px), "
            f"split 70:20:10 by occurrence; {training['train_images']} train, "
            f"{training['eval_images']} eval (validation), {test['overall']['images']} test; "
            f"fine-tuned from {start}, {config['epochs']} epochs, batch {config['batch_size']}, "
            f"learning rate {config['learning_rate']:g}; {inputs}. Teacher rule: the class "
            f"whose mask_pseudo marks the largest area (bulk when none), no training.",
            "",
            "| material | test accuracy | teacher rule | paper | images |",
            "| --- | --- | --- | --- | --- |",
        ]
        for m, entry in test["by_material"].items():
            paper = PAPER_ACCURACY.get(m)
            own = _acc_cell(rule["by_material"][m]) if rule else "–"
            lines.append(f"| {m} | {_acc_cell(entry)} | {own} | {_f(paper)} | "
                         f"{entry['images']} |")
        own = _acc_cell(rule["overall"]) if rule else "–"
        lines.append(f"| all | {_acc_cell(test['overall'])} | {own} | | "
                     f"{test['overall']['images']} |")
        materials = list(test["by_material"])
        classes = sorted({c for e in test["by_material"].values() for c in e["per_class"]})
        lines += ["", "Test accuracy by class:", "",
                  "| class | " + " | ".join(materials) + " |",
                  "| --- | " + " | ".join("---" for _ in materials) + " |"]
        for c in classes:
            cells = []
            for m in materials:
                entry = test["by_material"][m]["per_class"].get(c)
                cells.append(f"{_f(entry['accuracy'], 2)} ({entry['correct']}/{entry['images']})"
                             if entry and entry["images"] else "–")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        edges = [b["dose_range"] for b in next(iter(test["by_material"].values()))["by_dose"]]
        lines += ["", "Test accuracy by dose tercile (e/Å², log-spaced thirds of the range):", "",
                  "| material | " + " | ".join(f"{lo:.0f}–{hi:.0f}" for lo, hi in edges) + " |",
                  "| --- | " + " | ".join("---" for _ in edges) + " |"]
        for m, entry in test["by_material"].items():
            cells = [f"{_f(b['accuracy'], 2)} ({b['correct']}/{b['images']})" if b["images"]
                     else "–" for b in entry["by_dose"]]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", f"Training {training['train_images_per_s']:.1f} images/s "
                  f"({training['train_images']} images x {config['epochs']} "
                  f"epochs in {training['fit_s']:.0f} s, validation, graph tracing and "
                  f"set-up included; {_f(training['train_images_per_s_after_first_epoch'], 0)} "
                  f"images/s in the epochs after the first), inference "
                  f"{part['inference']['images_per_s']:.0f} images/s (model.predict, batch "
                  f"{part['inference']['batch_size']}); corpus {data['corpus_images_per_s']:.1f} "
                  f"images/s; load average {load[0]:.2f} on {cores} cores."]
    part = report.get("transfer")
    if part:
        data, pre = part["data"], part["pretraining"]
        sim = data["simulation_config"]
        runs = part["runs"]
        first = next(iter(runs.values()))
        lines += [
            *([""] if lines else []),
            f"Transfer: {data['images']} images (seed {data['seed']}, dose "
            f"{sim['dose'][0]:.0f}–{sim['dose'][1]:.0f} e/Å², pixel size "
            f"{sim['pixel_size_pm'][0]:g}–{sim['pixel_size_pm'][1]:g} pm; pretraining covered "
            f"{pre['dose'][0]:.0f}–{pre['dose'][1]:.0f} e/Å² and "
            f"{pre['pixel_size_pm'][0]:g}–{pre['pixel_size_pm'][1]:g} pm); "
            f"{first['training']['train_images']} train, {first['training']['eval_images']} eval, "
            f"{first['test']['overall']['images']} test.",
            "",
            "| material | scratch | synthetic-pretrained |",
            "| --- | --- | --- |",
        ]
        names = ("scratch", "synthetic_pretrained")
        for m in first["test"]["by_material"]:
            lines.append(f"| {m} | " + " | ".join(
                _acc_cell(runs[n]["test"]["by_material"][m]) if n in runs else "–"
                for n in names) + " |")
        lines.append("| all | " + " | ".join(
            _acc_cell(runs[n]["test"]["overall"]) if n in runs else "–" for n in names) + " |")
    lines += ["", f"Wall time: " + ", ".join(
        f"{name} {report[name]['wall_s']:.0f} s" for name in ("default", "transfer")
        if report.get(name)) + f"; total {report['wall_s']:.0f} s."]
    return "\n".join(lines)


def confusions(report: dict) -> str:
    """Off-diagonal confusion-matrix entries, for the console."""
    lines = []
    default = report.get("default") or {}
    for part_name, runs in (("default", {"": default.get("test"),
                                         "teacher rule": default.get("teacher_rule_test")}),
                            ("transfer", {name: run["test"] for name, run in
                                          (report.get("transfer") or {}).get("runs", {}).items()})):
        for run_name, test in runs.items():
            if not test:
                continue
            for m, entry in test["by_material"].items():
                c = entry["confusion"]
                errors = [f"{t} -> {p} x{c['matrix'][i][j]}"
                          for i, t in enumerate(c["rows_true"])
                          for j, p in enumerate(c["columns_predicted"])
                          if t != p and c["matrix"][i][j]]
                lines.append(f"{part_name}{' ' + run_name if run_name else ''} {m}: "
                             + (", ".join(errors) or "no errors"))
    return "\n".join(lines)


def main(argv=None) -> dict:
    from modules import classifier
    from modules.transform import DEFAULT_CHANNELS, DEFAULT_INPUT_SIZE, DEFAULT_TEACHER_FEATURES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("default", "transfer"),
                        default=["default", "transfer"])
    parser.add_argument("--images", type=int, default=480, help="part A: images (demo: 480)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="part A: data seed")
    parser.add_argument("--transfer-images", type=int, default=400)
    parser.add_argument("--transfer-seed", type=int, default=TRANSFER_SEED)
    parser.add_argument("--transfer-dose", type=float, nargs=2, default=[1e5, 3e5],
                        metavar=("LOW", "HIGH"), help="part B: e/Å², log-uniform")
    parser.add_argument("--transfer-pixel-size-pm", type=float, nargs=2, default=[29.0, 33.0],
                        metavar=("LOW", "HIGH"))
    parser.add_argument("--train-seed", type=int, default=0,
                        help="keras.utils.set_random_seed before each training")
    parser.add_argument("--size", type=int, default=256, help="simulated image side, pixels")
    parser.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE)
    parser.add_argument("--channels", nargs=3, default=list(DEFAULT_CHANNELS))
    parser.add_argument("--materials", nargs="+", default=list(MATERIALS))
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float,
                        default=classifier.TrainingConfig.learning_rate, help="Adam, constant")
    parser.add_argument("--teacher-features", action=argparse.BooleanOptionalAction,
                        default=DEFAULT_TEACHER_FEATURES,
                        help="the teacher's mask_pseudo areas beside the pooled features")
    parser.add_argument("--weights", default=SHIPPED_BACKBONE,
                        help="synthetic-pretrained backbone (.h5) for the input size")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--fit-verbose", type=int, default=2)
    parser.add_argument("--run-eagerly", action="store_true",
                        help="for quick tests: no graph tracing (it takes longer than a fit "
                             "on tiny data); never for the numbers")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--table-only", nargs="?", const=RESULTS, default=None, metavar="PATH",
                        help="print the Markdown tables from an existing JSON and exit")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if args.table_only is not None:
        return print_tables(args.table_only, tables)
    if "transfer" in args.parts:
        try:
            transfer_config(args)
        except ValueError as error:
            parser.error(f"transfer ranges: {error}")
    if not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights} does not exist")

    import tensorflow as tf

    started = time.perf_counter()
    report = {
        "description": "MobileNetV2 classifier test accuracy (default profile) and synthetic "
                       "pretraining vs scratch on a small set outside the pretraining ranges",
        "settings": {**{k: v for k, v in vars(args).items()
                        if k not in ("table_only", "out", "quiet", "fit_verbose")},
                     "split_tenths": list(SPLIT_TENTHS),
                     "paper_accuracy": PAPER_ACCURACY,
                     "tensorflow": tf.__version__,
                     "tf_use_legacy_keras": os.environ.get("TF_USE_LEGACY_KERAS"),
                     "blas_threads": {v: os.environ.get(v) for v in
                                      ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
                     **git_commit()},
        "calibration_before": calibration(),
    }
    if "default" in args.parts:
        report["default"] = run_default(args, args.weights)
    if "transfer" in args.parts:
        report["transfer"] = run_transfer(args, args.weights)
    report["calibration_after"] = calibration()
    report["wall_s"] = time.perf_counter() - started
    write_report(report, args.out)
    if not args.quiet:
        print(tables(report))
        print()
        print(confusions(report))
        print(f"\nresults in {args.out}")
    return report


if __name__ == "__main__":
    main()
