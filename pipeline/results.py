"""The README's results section, filled from one run's own output files (never typed by hand).

    python -m pipeline.results [--profile paper] [--output-dir DIR] [--run -1] \
        [--readme README.md] [--figures docs/results]

Everything is read back from ML Metadata (the run's executions: state and time) and from the
artifacts' files: the Evaluator's TFMA result (accuracy per material, test images), the
SegmentationEvaluator's `segmentation_evaluation.json` (IoU per class of the U-Net and of its
teacher against the ground truth), the DefectClusterer's `clusters.json` (k, silhouette, ARI,
NMI) and the StatisticsGen's split sizes (images per stage). The figures are copied from the
artifacts into `--figures`, beside `results.json` (the collected numbers, with the files they
came from), and the section replaces what lies between `<!-- results:begin -->` and
`<!-- results:end -->` in the README; nothing outside the markers is touched.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import subprocess
from typing import Any, Dict, List, Optional

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from ml_metadata.proto import metadata_store_pb2  # noqa: E402

from components.defects import DEFECT_CLASSES  # noqa: E402
from pipeline import reports  # noqa: E402

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
RESULTS_JSON = "results.json"
# Test accuracy the paper reports per material (Sathish, Sosa Espada and Karagiannis).
PAPER_ACCURACY = {"SrTiO3": 0.94, "CdTe": 0.993}
SPLITS = ("train", "eval", "test")
Execution = metadata_store_pb2.Execution
STATES = {Execution.COMPLETE: "complete", Execution.CACHED: "cached", Execution.FAILED: "failed",
          Execution.RUNNING: "running", Execution.NEW: "new", Execution.CANCELED: "canceled"}


# ---------------------------------------------------------------------------------------
# Collecting


def _property(execution, name: str):
    if name not in execution.custom_properties:
        return None
    value = execution.custom_properties[name]
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _json_property(execution, name: str) -> Optional[Any]:
    text = _property(execution, name)
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _iso(milliseconds: int) -> str:
    return datetime.datetime.fromtimestamp(milliseconds / 1000, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def split_sizes(outputs: Dict[str, metadata_store_pb2.Artifact]) -> Dict[str, int]:
    """Examples per split: TFDV's num_examples from the statistics, else records counted."""
    sizes: Dict[str, int] = {}
    if "StatisticsGen.statistics" in outputs:
        import tensorflow_data_validation as tfdv

        uri = outputs["StatisticsGen.statistics"].uri
        for path in sorted(glob.glob(os.path.join(uri, "Split-*", "FeatureStats.pb"))):
            split = os.path.basename(os.path.dirname(path))[len("Split-"):]
            sizes[split] = int(tfdv.load_stats_binary(path).datasets[0].num_examples)
    if sizes:
        return sizes
    if "PseudoLabeler.pseudo_labelled_examples" in outputs:
        import tensorflow as tf

        uri = outputs["PseudoLabeler.pseudo_labelled_examples"].uri
        for folder in sorted(glob.glob(os.path.join(uri, "Split-*"))):
            files = sorted(glob.glob(os.path.join(folder, "*")))
            sizes[os.path.basename(folder)[len("Split-"):]] = sum(
                1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))
    return sizes


def _classifier(outputs, executions, materials_run=()) -> Optional[Dict[str, Any]]:
    """Accuracy and test images overall and per material from the Evaluator's TFMA output."""
    if "Evaluator.evaluation" not in outputs:
        return None
    uri = outputs["Evaluator.evaluation"].uri
    slices: Dict[str, Dict[str, Any]] = {}
    for slice_key, metrics in reports.load_candidate_result(uri).slicing_metrics:
        values = metrics[""][""]
        accuracy = float(values["sparse_categorical_accuracy"]["doubleValue"])
        images = int(round(values["example_count"]["doubleValue"]))
        name = dict(slice_key).get("material", "overall") if slice_key else "overall"
        slices[name] = {"accuracy": accuracy, "images": images, "correct": int(round(accuracy * images))}
    thresholds = {}
    evaluator = executions.get("Evaluator")
    eval_config = _json_property(evaluator, "eval_config") if evaluator is not None else None
    for spec in (eval_config or {}).get("metrics_specs", []):
        for metric in spec.get("metrics", []):
            for per_slice in metric.get("per_slice_thresholds", []):
                bound = per_slice.get("threshold", {}).get("value_threshold", {}).get("lower_bound")
                for slicing in per_slice.get("slicing_specs", []):
                    material = slicing.get("feature_values", {}).get("material")
                    if material is not None and bound is not None:
                        thresholds[material] = float(bound)
    order = list(materials_run) + sorted(set(slices) - set(materials_run))
    materials = {name: dict(slices[name], paper=PAPER_ACCURACY.get(name), gate=thresholds.get(name))
                 for name in order if name in slices and name != "overall"}
    blessing = outputs.get("Evaluator.blessing")
    pushed = outputs.get("Pusher.pushed_model")
    return {
        "overall": slices.get("overall"),
        "materials": materials,
        "blessed": bool(blessing.custom_properties["blessed"].int_value) if blessing else None,
        "pushed": bool(pushed.custom_properties["pushed"].int_value) if pushed else None,
        "pushed_to": (pushed.custom_properties["pushed_destination"].string_value
                      if pushed and pushed.custom_properties["pushed"].int_value else None),
        "gate": reports.accuracy_summary(uri)[len(slices):],
        "source": uri,
    }


def _artifact_json(outputs, output: str, file_name: str):
    """(path, parsed JSON) of a file in one of the run's output artifacts; (None, None) when
    the run made no such artifact."""
    if output not in outputs:
        return None, None
    path = os.path.join(outputs[output].uri, file_name)
    with open(path) as handle:
        return path, json.load(handle)


def _segmentation(outputs) -> Optional[Dict[str, Any]]:
    """Per class IoU of the U-Net (student) and its teacher against the ground truth."""
    from components.segmentation.executor import COMPARISONS, EVALUATION_FILE

    path, report = _artifact_json(outputs, "SegmentationEvaluator.evaluation", EVALUATION_FILE)
    if report is None:
        return None
    classes = {}
    for cls in DEFECT_CLASSES:
        classes[cls] = {comparison: (report[comparison][cls]["iou"]
                                     if isinstance(report[comparison], dict) else None)
                        for comparison in COMPARISONS}
    unscored = {c: report[c] for c in COMPARISONS if not isinstance(report[c], dict)}
    pushed = outputs.get("SegmenterPusher.pushed_model")
    return {"split": report["split"], "images": report["images"],
            "images_with_ground_truth": report["images_with_ground_truth"],
            "threshold": report["threshold"], "min_iou": report["min_iou"],
            "classes": classes, "not_scored": unscored,
            "blessed": bool(report["blessed"]), "failures": report["failures"],
            "pushed": bool(pushed.custom_properties["pushed"].int_value) if pushed else None,
            "source": path}


def _clustering(outputs) -> Optional[Dict[str, Any]]:
    from components.clustering.executor import REPORT_FILE

    path, report = _artifact_json(outputs, "DefectClusterer.clusters", REPORT_FILE)
    if report is None:
        return None
    k_values, silhouettes = report["k_values"], report["silhouette"]
    agreement = report["agreement_with_labels"]
    return {"chosen_k": report["chosen_k"],
            "silhouette": silhouettes[k_values.index(report["chosen_k"])],
            "silhouette_per_k": dict(zip(map(str, k_values), silhouettes)),
            "ari": agreement["ari"] if isinstance(agreement, dict) else None,
            "nmi": agreement["nmi"] if isinstance(agreement, dict) else None,
            "agreement_note": None if isinstance(agreement, dict) else agreement,
            "examples": report["examples"], "splits": report["splits"],
            "cluster_sizes": {name: c["size"] for name, c in report["clusters"].items()},
            "model_blessed": report.get("model_blessed"), "method": report.get("method", {}).get("algorithm"),
            "config": report.get("config"), "source": path}


def _stage_images(component: str, execution, sizes: Dict[str, int], profile: Dict[str, Any],
                  results: Dict[str, Any]):
    """(images the stage handled, what they are), or (None, None) where no count applies."""
    total = sum(sizes.values()) if sizes else None
    if component in ("SyntheticStemGen", "MicrographExampleGen", "PseudoLabeler", "StatisticsGen",
                     "Transform"):
        return total, "all splits"
    if component in ("Trainer", "SegmenterTrainer"):
        settings = profile.get("classifier" if component == "Trainer" else "segmenter") or {}
        epochs = settings.get("epochs")
        if "train" in sizes and epochs:
            return sizes["train"] * int(epochs), f"{sizes['train']} train x {_count(epochs, 'epoch')}"
        return None, None
    if component == "Evaluator":
        splits = _json_property(execution, "example_splits") or ["test"]
        if all(s in sizes for s in splits):
            return sum(sizes[s] for s in splits), "+".join(splits) + " split"
        return None, None
    if component == "SegmentationEvaluator" and results.get("segmentation"):
        return results["segmentation"]["images"], f"{results['segmentation']['split']} split"
    if component == "DefectClusterer" and results.get("clustering"):
        return results["clustering"]["examples"], "+".join(results["clustering"]["splits"])
    return None, None


def _profile(executions, outputs) -> Dict[str, Any]:
    """What the run was asked to do, from its executions' parameters (and where the
    classifier started, from the Trainer's history.json)."""
    profile: Dict[str, Any] = {}

    def history(model_run: str) -> Dict[str, Any]:
        """A Trainer's history.json ({} when the run has none)."""
        path = os.path.join(outputs[model_run].uri, "history.json") if model_run in outputs else ""
        if not os.path.isfile(path):
            return {}
        with open(path) as handle:
            return json.load(handle)

    def without_fingerprint(options):
        return {k: v for k, v in (options or {}).items() if k != "code_fingerprint"}

    if "SyntheticStemGen" in executions:
        execution = executions["SyntheticStemGen"]
        profile["data"] = dict(source="synthetic", num_images=_property(execution, "num_images"),
                               seed=_property(execution, "seed"),
                               **without_fingerprint(_json_property(execution, "synthesis_config")))
    elif "MicrographExampleGen" in executions:
        profile["data"] = dict(source="micrographs", **without_fingerprint(
            _json_property(executions["MicrographExampleGen"], "micrograph_config")))
    if "Trainer" in executions:
        profile["classifier"] = without_fingerprint(_json_property(executions["Trainer"], "custom_config"))
        started_from = history("Trainer.model_run").get("started_from")
        if started_from:
            profile["classifier"]["started_from"] = started_from[0]
    segmenter_history = history("SegmenterTrainer.model_run")
    if segmenter_history.get("config"):
        from modules.segmenter import SERVED_BEFORE_OPTIONS

        # what the run trained and served with, an option it predates as it was then served
        profile["segmenter"] = dict(SERVED_BEFORE_OPTIONS, **segmenter_history["config"][0])
    elif "SegmenterTrainer" in executions:
        overrides = without_fingerprint(_json_property(executions["SegmenterTrainer"], "custom_config"))
        try:
            import dataclasses

            from modules.segmenter import SegmenterConfig

            profile["segmenter"] = dataclasses.asdict(SegmenterConfig.from_custom_config(overrides))
        except Exception:  # an older run's options: show what it was given
            profile["segmenter"] = overrides
    if "SegmentationEvaluator" in executions:
        profile["segmentation_evaluation"] = without_fingerprint(
            _json_property(executions["SegmentationEvaluator"], "evaluation_config"))
    return profile


def _code(executions) -> Dict[str, Any]:
    """The checkout's commit, and whether the run's code fingerprints match this checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code: Dict[str, Any] = {"commit": None, "uncommitted_changes": None, "fingerprints_differ": None}
    try:
        code["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                        text=True, check=True, timeout=30).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True, timeout=30).stdout
        code["uncommitted_changes"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from pipeline import graph
    except Exception:  # the graph cannot be imported: fingerprints not compared
        return code
    differ, compared = [], 0
    for component, execution in sorted(executions.items()):
        paths = graph.CODE_OF_STEP.get(component)
        if paths is None:
            continue
        recorded = [options.get("code_fingerprint") for options in
                    (_json_property(execution, name) for name in execution.custom_properties)
                    if isinstance(options, dict) and options.get("code_fingerprint")]
        if not recorded:
            continue
        compared += 1
        if recorded[0] != graph.code_fingerprint(paths):
            differ.append(component)
    if compared:
        code["fingerprints_differ"] = differ
    return code


def _figures(outputs) -> List[Dict[str, str]]:
    """The run's figures that exist: target file name, source, caption, group."""
    figures = []

    def add(group, name, source, caption, **draw):
        if draw or os.path.isfile(source):
            figures.append({"group": group, "name": name, "source": source, "caption": caption, **draw})

    if "Trainer.model_run" in outputs:
        add("classifier", "classifier_training_curves.png",
            os.path.join(outputs["Trainer.model_run"].uri, "training_curves.png"),
            "classifier: loss and accuracy per epoch (training and validation)")
    if "Evaluator.evaluation" in outputs and "Transform.transform_graph" in outputs:
        add("classifier", "classifier_confusion_matrices.png", outputs["Evaluator.evaluation"].uri,
            "classifier: confusion matrix per material (test split)", draw="confusion_matrices",
            transform_graph=outputs["Transform.transform_graph"].uri)
    if "SegmenterTrainer.model_run" in outputs:
        add("segmentation", "segmenter_training_curves.png",
            os.path.join(outputs["SegmenterTrainer.model_run"].uri, "training_curves.png"),
            "U-Net: training curves")
    if "SegmentationEvaluator.evaluation" in outputs:
        folder = os.path.join(outputs["SegmentationEvaluator.evaluation"].uri, "heatmaps")
        for path in sorted(glob.glob(os.path.join(folder, "*.png"))):
            stem = os.path.basename(path)[:-len(".png")]
            kind = ("combined defect probability (Figure 2 style)" if stem.endswith("_combined")
                    else "one map per class (Figure 3 style)")
            image = stem.rsplit("_combined", 1)[0] if stem.endswith("_combined") \
                else stem.rsplit("_per_class", 1)[0]
            add("heatmaps", f"heatmap_{stem}.png", path, f"{image.replace('_', ' ', 2)}: {kind}")
    if "DefectClusterer.clusters" in outputs:
        from components.clustering import executor as clustering

        where = outputs["DefectClusterer.clusters"].uri
        for file, caption in ((clustering.SILHOUETTE_FIGURE, "silhouette (and inertia) per k"),
                              (clustering.TSNE_FIGURE, "t-SNE of the descriptors, by cluster and by true class"),
                              (clustering.GALLERY_FIGURE, "images nearest each cluster centre")):
            add("clustering", f"clustering_{file}", os.path.join(where, file), f"clustering: {caption}")
    return figures


def collect(metadata_path: str, run_index: int = -1) -> Dict[str, Any]:
    """Every number of the results section of one run (default the newest), with its source."""
    store = reports.open_store(metadata_path)
    runs = reports.pipeline_runs(store)
    if not runs:
        raise LookupError(f"no pipeline run in {metadata_path}")
    index = run_index % len(runs)
    run = runs[index]
    outputs = reports.run_outputs(store, index)
    names = reports.component_names(store)
    executions = sorted(store.get_executions_by_context(run.id), key=lambda e: e.create_time_since_epoch)
    by_component = {names[e.id]: e for e in executions}
    pipelines = store.get_contexts_by_type("pipeline")
    pipeline_name = next((p.name for p in pipelines
                          if any(a.id == run.id for a in store.get_children_contexts_by_context(p.id))),
                         pipelines[0].name if len(pipelines) == 1 else None)

    sizes = split_sizes(outputs)
    profile = _profile(by_component, outputs)
    profile["split_sizes"] = sizes
    results: Dict[str, Any] = {
        "run": {"pipeline": pipeline_name, "run_id": run.name, "index": index, "runs": len(runs),
                "started": _iso(run.create_time_since_epoch), "metadata_path": os.path.abspath(metadata_path)},
        "code": _code(by_component),
        "profile": profile,
        "classifier": _classifier(outputs, by_component, (profile.get("data") or {}).get("materials") or ()),
        "segmentation": _segmentation(outputs),
        "clustering": _clustering(outputs),
    }
    if results["clustering"]:
        profile["clustering"] = results["clustering"].pop("config")

    stages = []
    for execution in executions:
        component = names[execution.id]
        state = STATES.get(execution.last_known_state, "unknown")
        stage = {"component": component, "state": state, "seconds": None, "images": None,
                 "images_note": None, "images_per_second": None}
        if state == "complete":
            stage["seconds"] = (execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000
            images, note = _stage_images(component, execution, sizes, profile, results)
            if images:
                stage.update(images=images, images_note=note)
                if stage["seconds"] > 0:
                    stage["images_per_second"] = images / stage["seconds"]
        stages.append(stage)
    results["stages"] = stages
    ran = [e for e in executions if e.last_known_state == Execution.COMPLETE]
    if executions:
        results["run"]["finished"] = _iso(max(e.last_update_time_since_epoch for e in executions))
        results["run"]["wall_seconds"] = (
            (max(e.last_update_time_since_epoch for e in ran) - min(e.create_time_since_epoch for e in ran))
            / 1000 if ran else None)
    results["figures"] = _figures(outputs)
    return results


# ---------------------------------------------------------------------------------------
# Figures and Markdown


def copy_figures(results: Dict[str, Any], figures_dir: str) -> List[str]:
    """Copy (or draw) the run's figures into `figures_dir`; remove the ones an earlier
    regeneration wrote there (named in its results.json) that this run lacks. Returns paths."""
    os.makedirs(figures_dir, exist_ok=True)
    previous = os.path.join(figures_dir, RESULTS_JSON)
    if os.path.isfile(previous):
        try:
            with open(previous) as handle:
                stale = {f["name"] for f in json.load(handle).get("figures", [])}
        except (ValueError, KeyError, TypeError):
            stale = set()
        for name in stale - {f["name"] for f in results["figures"]}:
            path = os.path.join(figures_dir, os.path.basename(name))
            if os.path.isfile(path):
                os.remove(path)
    written = []
    for figure in results["figures"]:
        target = os.path.join(figures_dir, figure["name"])
        if figure.get("draw") == "confusion_matrices":
            reports.write_confusion_matrices(reports.confusion_matrices(figure["source"]),
                                             reports.label_vocabulary(figure["transform_graph"]), target)
        else:
            shutil.copyfile(figure["source"], target)
        written.append(target)
    return written


def _number(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _yes(value) -> str:
    return {True: "yes", False: "no", None: "–"}[value]


def regenerate_command(results: Dict[str, Any], profile: Optional[str] = None,
                       output_dir: Optional[str] = None) -> str:
    parts = [".venv/bin/python -m pipeline.results"]
    if profile:
        parts.append(f"--profile {profile}")
    if output_dir:
        parts.append(f"--output-dir {output_dir}")
    parts.append(f"--run {results['run']['index']}")
    return " ".join(parts)


def _data_line(profile: Dict[str, Any]) -> str:
    data = profile.get("data") or {}
    sizes = profile.get("split_sizes") or {}
    split = " / ".join(f"{sizes[s]} {s}" for s in SPLITS if s in sizes)
    if data.get("source") == "synthetic":
        what = (f"{data.get('num_images')} synthetic images of {', '.join(data.get('materials') or [])}"
                f" ({data.get('size')} px, pixel size {_range(data.get('pixel_size_pm'))} pm, dose "
                f"{_range(data.get('dose'))} e/Å², seed {data.get('seed')})")
    elif data:
        what = f"micrographs of {data.get('material')} from `{data.get('root')}`"
    else:
        what = "images"
    return f"{what}; split {split}" if split else what


def _count(number, noun: str) -> str:
    if number is None:
        return f"? {noun}s"
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _start(settings: Dict[str, Any]) -> str:
    """Where the classifier's backbone started (the Trainer's history.json says)."""
    start = settings.get("started_from", settings.get("weights_path", "?"))
    if start in (None, "scratch"):
        return "from scratch"
    if start == "imagenet":
        return "from ImageNet weights"
    if start == settings.get("weights_path"):
        return f"from `{os.path.basename(start)}`"
    return f"warm-started from the earlier blessed model `{os.path.dirname(start)}`"


def _range(pair) -> str:
    if not pair:
        return "?"
    return "–".join(f"{v:g}" for v in pair)


def markdown(results: Dict[str, Any], figures_rel_dir: str, command: Optional[str] = None) -> str:
    """The results section (Markdown) for the README; figures linked under `figures_rel_dir`."""
    run, code, profile = results["run"], results["code"], results["profile"]
    rel = figures_rel_dir.rstrip("/")
    figures = {f["name"]: f for f in results.get("figures", [])}
    command = command or results.get("command") or regenerate_command(results)

    commit = "The run records no commit"
    if code.get("commit"):
        commit += (f"; this was generated at commit `{code['commit'][:10]}`"
                   + (" (with uncommitted changes)" if code.get("uncommitted_changes") else ""))
        differ = code.get("fingerprints_differ")
        if differ == []:
            commit += ", whose code fingerprints match the run's"
        elif differ:
            commit += f", whose code differs from the run's for {', '.join(differ)}"
    lines = [
        f"Generated by `{command}` from run {run['index']} of the pipeline `{run['pipeline']}` "
        f"(run id `{run['run_id']}`, started {run['started']}); do not edit by hand. "
        f"{commit}. The numbers, with the files they were read from, are in `{rel}/{RESULTS_JSON}`.",
        "",
        f"Data: {_data_line(profile)}.",
        "",
    ]

    def image(name):
        figure = figures.get(name)
        return f"![{figure['caption']}]({rel}/{name})" if figure else None

    classifier = results.get("classifier")
    if classifier:
        settings = profile.get("classifier") or {}
        lines += ["### Classifier (MobileNetV2): test accuracy per material", "",
                  f"Trained {_count(settings.get('epochs'), 'epoch')}, batch {settings.get('batch_size', '?')}, "
                  f"{_start(settings)}; "
                  f"blessed: {_yes(classifier['blessed'])}, pushed: {_yes(classifier['pushed'])}.", "",
                  "| material | test accuracy | paper | difference | gate | test images |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for material, values in classifier["materials"].items():
            difference = (None if values["paper"] is None else values["accuracy"] - values["paper"])
            lines.append(f"| {material} | {values['accuracy']:.3f} ({values['correct']}/{values['images']}) "
                         f"| {_number(values['paper'], 3)} | "
                         f"{'–' if difference is None else f'{difference:+.3f}'} | "
                         f"{_number(values['gate'], 3)} | {values['images']} |")
        overall = classifier["overall"]
        if overall:
            lines.append(f"| all | {overall['accuracy']:.3f} ({overall['correct']}/{overall['images']}) "
                         f"| | | | {overall['images']} |")
        lines += [""] + [f"- {line}" for line in classifier["gate"]] + [""]
        for name in ("classifier_training_curves.png", "classifier_confusion_matrices.png"):
            if image(name):
                lines += [image(name), ""]

    segmentation = results.get("segmentation")
    if segmentation:
        unet = profile.get("segmenter") or {}
        lines += ["### U-Net: IoU per class against the ground truth, student vs teacher", "",
                  f"U-Net ({unet.get('base_filters', '?')} base filters, depth {unet.get('depth', '?')}, "
                  f"{_count(unet.get('epochs'), 'epoch')}) trained on the pseudo-labels only"
                  + (f", its answer the mean over {unet['test_time_views']} turned and mirrored views of "
                     f"each image" if unet.get("test_time_views", 1) > 1 else "")
                  + (f", planar marks narrower than {unet['planar_min_width']} pixels removed"
                     if unet.get("planar_min_width", 0) > 1 else "")
                  + "; scored on "
                  f"{segmentation['images']} {segmentation['split']} images "
                  f"({segmentation['images_with_ground_truth']} with ground truth), pixels pooled, "
                  f"threshold {segmentation['threshold']}; gate IoU >= {segmentation['min_iou']} against "
                  f"the pseudo-labels: {'passed (blessed)' if segmentation['blessed'] else 'refused'}"
                  f", pushed: {_yes(segmentation['pushed'])}.", "",
                  "| class | U-Net vs ground truth | pseudo-labels (teacher) vs ground truth "
                  "| U-Net vs pseudo-labels |",
                  "| --- | --- | --- | --- |"]
        for cls, scores in segmentation["classes"].items():
            lines.append(f"| {cls} | {_number(scores['student_vs_truth'], 2)} | "
                         f"{_number(scores['teacher_vs_truth'], 2)} | "
                         f"{_number(scores['student_vs_pseudo'], 2)} |")
        lines += [""] + [f"- {name}: {why}" for name, why in segmentation["not_scored"].items()]
        if segmentation["failures"]:
            lines += ["Refused for: " + "; ".join(segmentation["failures"]) + ".", ""]
        if image("segmenter_training_curves.png"):
            lines += [image("segmenter_training_curves.png"), ""]
        heatmaps = [f for f in results.get("figures", []) if f["group"] == "heatmaps"]
        stems = sorted({f["name"].rsplit("_combined.png", 1)[0].rsplit("_per_class.png", 1)[0]
                        for f in heatmaps})
        if stems:
            lines += ["Heat maps of the first test images: combined defect probability (as the "
                      "paper's Figure 2) and one map per class (Figure 3).", "",
                      "| test image | combined | per class |", "| --- | --- | --- |"]
            for stem in stems:
                cells = [image(f"{stem}{suffix}") or "–" for suffix in ("_combined.png", "_per_class.png")]
                label = stem[len("heatmap_"):].replace("_", " ", 2)
                lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
            lines.append("")

    clustering = results.get("clustering")
    if clustering:
        agreement = (f"ARI {_number(clustering['ari'], 3)}, NMI {_number(clustering['nmi'], 3)} against "
                     f"the true classes" if clustering["ari"] is not None
                     else str(clustering["agreement_note"]))
        k_values = list(clustering["silhouette_per_k"])
        sizes = ", ".join(str(size) for size in clustering["cluster_sizes"].values())
        lines += ["### Defect clusters", "",
                  f"{clustering['examples']} images ({'+'.join(clustering['splits'])}), "
                  f"k-means over k = {k_values[0]}..{k_values[-1]}: chosen k = {clustering['chosen_k']}, "
                  f"silhouette {_number(clustering['silhouette'], 3)}; {agreement}; cluster sizes {sizes}; "
                  f"U-Net blessed: {_yes(clustering['model_blessed'])}.", "",
                  "| k | " + " | ".join(k_values) + " |",
                  "| --- |" + " --- |" * len(k_values),
                  "| silhouette | " + " | ".join(_number(v, 3) for v in clustering["silhouette_per_k"].values())
                  + " |", ""]
        for name in ("clustering_silhouette.png", "clustering_tsne.png", "clustering_gallery.png"):
            if image(name):
                lines += [image(name), ""]

    stages = results.get("stages") or []
    if stages:
        wall = run.get("wall_seconds")
        lines += ["### Throughput per stage", "",
                  f"Wall time of each execution in ML Metadata (start to end, on the machine that ran "
                  f"it); a cached step did no work in this run."
                  + (f" Steps that ran: {wall:.1f} s from first start to last end." if wall else ""), "",
                  "| stage | state | seconds | images | images/s |", "| --- | --- | --- | --- | --- |"]
        for stage in stages:
            if stage["state"] != "complete":
                lines.append(f"| {stage['component']} | {stage['state']} | {stage['state']} | | |")
                continue
            images = f"{stage['images']} ({stage['images_note']})" if stage["images"] else ""
            lines.append(f"| {stage['component']} | complete | {stage['seconds']:.1f} | {images} | "
                         f"{_number(stage['images_per_second'], 1) if stage['images'] else ''} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------
# The README


def _marker_span(text: str, readme_path: str):
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < 0:
        missing = " and ".join(m for m, at in ((BEGIN, begin), (END, end)) if at < 0)
        raise ValueError(f"{readme_path} has no {missing} marker: add a line `{BEGIN}` and a line "
                         f"`{END}` where the results section belongs")
    if text.count(BEGIN) > 1 or text.count(END) > 1 or end < begin:
        raise ValueError(f"{readme_path} must hold exactly one {BEGIN} followed by one {END}")
    return begin + len(BEGIN), end


def check_readme(readme_path: str) -> None:
    """Refuse (ValueError naming the file) a README without a well-formed pair of markers."""
    with open(readme_path, encoding="utf-8", newline="") as handle:
        _marker_span(handle.read(), readme_path)


def update_readme(readme_path: str, section_markdown: str) -> None:
    """Replace what lies between the results markers (kept); nothing else in the file changes."""
    with open(readme_path, encoding="utf-8", newline="") as handle:
        text = handle.read()
    start, stop = _marker_span(text, readme_path)
    body = "\n" + section_markdown.strip("\n") + "\n"
    updated = text[:start] + body + text[stop:]
    if updated != text:
        with open(readme_path, "w", encoding="utf-8", newline="") as handle:
            handle.write(updated)


def write_json(results: Dict[str, Any], figures_dir: str) -> str:
    path = os.path.join(figures_dir, RESULTS_JSON)
    os.makedirs(figures_dir, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1, sort_keys=False)
        handle.write("\n")
    return path


def main(argv=None) -> None:
    from pipeline.config import PROJECT_ROOT, load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="config profile (default: $STEM_PROFILE or demo)")
    parser.add_argument("--output-dir", help="the run's output folder (default: $STEM_OUTPUT_DIR or output/)")
    parser.add_argument("--run", type=int, default=-1, help="run index (0 = first, -1 = newest)")
    parser.add_argument("--readme", default=os.path.join(PROJECT_ROOT, "README.md"))
    parser.add_argument("--figures", default=os.path.join(PROJECT_ROOT, "docs", "results"),
                        help="folder for the figures and results.json")
    args = parser.parse_args(argv)
    config = load_config(args.profile, output_dir=args.output_dir)
    check_readme(args.readme)  # before anything is written
    results = collect(config.metadata_path, args.run)
    readme_dir = os.path.dirname(os.path.abspath(args.readme))
    figures_dir = os.path.abspath(args.figures)
    relative = os.path.relpath(figures_dir, readme_dir).replace(os.sep, "/")
    results["command"] = regenerate_command(results, args.profile, args.output_dir)
    written = copy_figures(results, figures_dir)
    update_readme(args.readme, markdown(results, relative))
    print(f"{args.readme}: results of run {results['run']['index']} ({results['run']['run_id']})")
    print(f"{write_json(results, figures_dir)} and {len(written)} figures in {figures_dir}")


if __name__ == "__main__":
    main()
