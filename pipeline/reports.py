"""What a person looks at after a run: its artifacts in ML Metadata, and figures."""

from __future__ import annotations

import glob
import os
from typing import Dict, Iterator, List

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tensorflow as tf  # noqa: E402
from ml_metadata import metadata_store  # noqa: E402
from ml_metadata.proto import metadata_store_pb2  # noqa: E402

from components import contract  # noqa: E402
from components.defects import DEFECT_CLASSES  # noqa: E402


def open_store(metadata_path: str) -> metadata_store.MetadataStore:
    if not os.path.exists(metadata_path):
        raise FileNotFoundError(f"no ML Metadata database at {metadata_path}: has the pipeline run?")
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return metadata_store.MetadataStore(config)


def pipeline_runs(store: metadata_store.MetadataStore) -> List[metadata_store_pb2.Context]:
    """The pipeline's run contexts, oldest first."""
    return sorted(store.get_contexts_by_type("pipeline_run"), key=lambda c: c.create_time_since_epoch)


def component_names(store: metadata_store.MetadataStore) -> Dict[int, str]:
    """{execution id: component id} from the node contexts."""
    names = {}
    for node in store.get_contexts_by_type("node"):
        for execution in store.get_executions_by_context(node.id):
            names[execution.id] = node.name.split(".")[-1]
    return names


def run_outputs(store: metadata_store.MetadataStore,
                run_index: int = -1) -> Dict[str, metadata_store_pb2.Artifact]:
    """{'Component.output': artifact} of one run (default the newest), cached outputs included."""
    run = pipeline_runs(store)[run_index]
    executions = store.get_executions_by_context(run.id)
    names = component_names(store)
    events = store.get_events_by_execution_ids([e.id for e in executions])
    outputs = {
        event.artifact_id: f"{names[event.execution_id]}.{event.path.steps[0].key}"
        for event in events if event.type == metadata_store_pb2.Event.OUTPUT
    }
    return {outputs[a.id]: a for a in store.get_artifacts_by_id(list(outputs))}


def read_split(examples_uri: str, split: str) -> Iterator[contract.Micrograph]:
    files = sorted(glob.glob(os.path.join(examples_uri, f"Split-{split}", "*")))
    if not files:
        raise FileNotFoundError(f"no files for split {split!r} under {examples_uri}")
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        yield contract.from_example(record.numpy())


def pick_one_per_class(micrographs: Iterator[contract.Micrograph]) -> List[contract.Micrograph]:
    """The first micrograph of each (material, label), sorted for a stable sheet."""
    chosen: Dict[tuple, contract.Micrograph] = {}
    for micrograph in micrographs:
        chosen.setdefault((micrograph.material, micrograph.label), micrograph)
    return [chosen[key] for key in sorted(chosen)]


def write_example_sheet(micrographs: List[contract.Micrograph], path: str) -> str:
    """One row per material and class: the image, then the image with its mask outlined."""
    rows = len(micrographs)
    fig, axes = plt.subplots(rows, 2, figsize=(6.4, 3.0 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for row, micrograph in enumerate(micrographs):
        image = micrograph.image
        field_nm = image.shape[1] * micrograph.pixel_size_pm / 1000
        dose = f", {micrograph.dose:.0f} e/Å²" if micrograph.dose else ""
        axes[row, 0].imshow(image, cmap="gray")
        axes[row, 0].set_title(f"{micrograph.material}: {micrograph.label}\n"
                               f"{field_nm:.1f} nm field{dose}", fontsize=9)
        axes[row, 1].imshow(image, cmap="gray")
        handles = []
        if micrograph.mask_true is not None:
            for channel, name in enumerate(DEFECT_CLASSES):
                if micrograph.mask_true[channel].any():
                    colour = colours(channel)
                    axes[row, 1].contour(micrograph.mask_true[channel], levels=[0.5], colors=[colour],
                                         linewidths=1.5)
                    handles.append(plt.Line2D([], [], color=colour, label=name))
        axes[row, 1].set_title("ground-truth mask" if handles else "no defect", fontsize=9)
        if handles:
            axes[row, 1].legend(handles=handles, loc="lower right", fontsize=7)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def anomalies_summary(anomalies_uri: str) -> List[str]:
    """One line per split: 'no anomalies' or the anomalous features and their reasons."""
    from components.schema_gate.executor import read_anomalies

    found = read_anomalies(anomalies_uri)
    lines = []
    for split_dir in sorted(glob.glob(os.path.join(anomalies_uri, "Split-*"))):
        split = os.path.basename(split_dir)[len("Split-"):]
        in_split = [a for a in found if a.split == split]
        if not in_split:
            lines.append(f"{split}: no anomalies")
        lines += [f"{split}: {a.feature}: {a.short_description} ({a.description})" for a in in_split]
    return lines


def schema_gate_summary(verdict_uri: str) -> List[str]:
    """The gate passed (a failed gate publishes no verdict); anomalies it let through."""
    import json

    from components.schema_gate.executor import VERDICT_FILE

    with open(os.path.join(verdict_uri, VERDICT_FILE)) as handle:
        verdict = json.load(handle)
    return ["passed: training went ahead"] + [
        f"let through ({a['severity']}): {a['split']}: {a['feature']}: {a['description']}"
        for a in verdict["let_through"]]


def quarantine_summary(quarantine_uri: str) -> List[str]:
    """Files used and set aside, with every set-aside file and its reason."""
    import json

    from components.micrographs.executor import QUARANTINE_JSON

    with open(os.path.join(quarantine_uri, QUARANTINE_JSON)) as handle:
        report = json.load(handle)
    companions = (f", {report['files_companion']} TIA .emi read through their .ser"
                  if report.get("files_companion") else "")
    lines = [f"{report['files_used']} of {report['files']} files used{companions}, "
             f"{report['files_quarantined']} set aside"]
    return lines + [f"{row['relative_path']}: {row['reason']} ({row['detail']})"
                    for row in report["quarantined"]]


def pseudo_label_summary(report_uri: str) -> List[str]:
    """Examples with a lattice found, then the pseudo-masks' pixel scores against ground truth."""
    import json

    from components.pseudo_labels.executor import REPORT_FILE

    with open(os.path.join(report_uri, REPORT_FILE)) as handle:
        overall = json.load(handle)["overall"]
    lines = [f"{overall['ok']} of {overall['examples']} images had a lattice to compare with"]
    if overall["ground_truth"] == "absent":
        return lines + ["no ground truth: pseudo-labels not scored"]
    for name, scores in overall["per_class"].items():
        if scores["iou"] is not None:
            lines.append(f"{name}: IoU {scores['iou']:.2f}, precision {scores['precision'] or 0:.2f}, "
                         f"recall {scores['recall'] or 0:.2f} against the simulator's masks")
    return lines


def segmentation_summary(evaluation_uri: str) -> List[str]:
    """Per class: the U-Net's IoU against the ground truth beside its teacher's, and against the
    pseudo-labels it learned from; then the gate's verdict."""
    import json

    from components.segmentation.executor import EVALUATION_FILE

    with open(os.path.join(evaluation_uri, EVALUATION_FILE)) as handle:
        report = json.load(handle)

    def iou(comparison, cls):
        scores = report[comparison]
        value = scores[cls]["iou"] if isinstance(scores, dict) else None
        return "  -  " if value is None else f"{value:.2f}"

    lines = [f"IoU on {report['images']} {report['split']} images: student vs truth "
             f"(teacher vs truth), student vs pseudo-labels"]
    for cls in DEFECT_CLASSES:
        lines.append(f"{cls}: {iou('student_vs_truth', cls)} ({iou('teacher_vs_truth', cls)}), "
                     f"{iou('student_vs_pseudo', cls)}")
    verdict = "passed (blessed)" if report["blessed"] else "FAILED: " + "; ".join(report["failures"])
    return lines + [f"gate (IoU >= {report['min_iou']} against the pseudo-labels): {verdict}"]


def clustering_summary(clusters_uri: str) -> List[str]:
    """The chosen k and its silhouette, agreement with the known classes, and each cluster's
    size and commonest labels."""
    import json

    from components.clustering.executor import REPORT_FILE

    with open(os.path.join(clusters_uri, REPORT_FILE)) as handle:
        report = json.load(handle)
    best = report["silhouette"][report["k_values"].index(report["chosen_k"])]
    lines = [f"k = {report['chosen_k']} of {report['k_values'][0]}..{report['k_values'][-1]} "
             f"(silhouette {best:.2f}) over {report['examples']} images"]
    agreement = report["agreement_with_labels"]
    lines.append(agreement if isinstance(agreement, str) else
                 f"against the true classes: ARI {agreement['ari']:.2f}, NMI {agreement['nmi']:.2f}")
    for cluster, members in report["clusters"].items():
        commonest = ", ".join(f"{label} {count}" for label, count in list(members["labels"].items())[:3])
        lines.append(f"cluster {cluster}: {members['size']} images ({commonest})")
    return lines


def load_candidate_result(evaluation_uri: str):
    """The TFMA result of the evaluated model (not of its baseline, when there was one)."""
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.writers import eval_config_writer

    specs = eval_config_writer.load_eval_run(evaluation_uri)[0].model_specs
    candidate = next(spec.name for spec in specs if not spec.is_baseline)
    return tfma.load_eval_result(evaluation_uri, model_name=candidate if len(specs) > 1 else None)


def _slice_name(slice_key) -> str:
    return ", ".join(f"{k}={v}" for k, v in slice_key) or "overall"


def accuracy_summary(evaluation_uri: str) -> List[str]:
    """Test accuracy per slice, then the gate's verdict with the failing slices."""
    import tensorflow_model_analysis as tfma

    lines = []
    for slice_key, metrics in sorted(load_candidate_result(evaluation_uri).slicing_metrics,
                                     key=lambda item: _slice_name(item[0]) != "overall"):
        values = metrics[""][""]
        lines.append(f"{_slice_name(slice_key)}: accuracy {values['sparse_categorical_accuracy']['doubleValue']:.3f} "
                     f"on {values['example_count']['doubleValue']:.0f} test images")
    validation = tfma.load_validation_result(evaluation_uri)
    if validation.validation_ok:
        lines.append("gate: passed (blessed)")
    for failure in validation.metric_validations_per_slice:
        slice_name = ", ".join(f"{c.column}={c.bytes_value.decode()}"
                               for c in failure.slice_key.single_slice_keys) or "overall"
        for metric in failure.failures:
            value = metric.metric_value.double_value.value
            if metric.metric_key.is_diff:
                allowed = metric.metric_threshold.change_threshold.absolute.value
                lines.append(f"gate: FAILED on {slice_name}: {metric.metric_key.name} changed by "
                             f"{value:+.3f} against the last blessed model (allowed {allowed:+.3f})")
            else:
                bound = metric.metric_threshold.value_threshold.lower_bound.value
                lines.append(f"gate: FAILED on {slice_name}: {metric.metric_key.name} {value:.3f} < {bound}")
    return lines


def label_vocabulary(transform_graph_uri: str) -> List[str]:
    """The classifier's class names, in the order of its class ids."""
    import tensorflow_transform as tft

    from modules.transform import LABEL_VOCABULARY

    names = tft.TFTransformOutput(transform_graph_uri).vocabulary_by_name(LABEL_VOCABULARY)
    return [name.decode() if isinstance(name, bytes) else name for name in names]


def confusion_matrices(evaluation_uri: str) -> Dict[str, np.ndarray]:
    """{slice name: counts[actual class id, predicted class id]} of the evaluated model."""
    matrices = {}
    for slice_key, plots in load_candidate_result(evaluation_uri).plots:
        entries = plots[""][""]["multiClassConfusionMatrixAtThresholds"]["matrices"][0]["entries"]
        size = 1 + max(max(e.get("actualClassId", 0), e.get("predictedClassId", 0)) for e in entries)
        counts = np.zeros((size, size))
        for entry in entries:  # proto JSON leaves out zeros
            counts[entry.get("actualClassId", 0), entry.get("predictedClassId", 0)] += \
                entry.get("numWeightedExamples", 0.0)
        matrices[_slice_name(slice_key)] = counts
    return matrices


def write_confusion_matrices(matrices: Dict[str, np.ndarray], class_names: List[str],
                             path: str) -> str:
    """One panel per slice: test images per true and predicted class, rows summing to 1 in colour."""
    names = sorted(matrices)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.4), squeeze=False)
    for axis, name in zip(axes[0], names):
        counts = matrices[name]
        n = len(class_names)
        counts = np.pad(counts, ((0, n - len(counts)), (0, n - len(counts))))
        shown = [i for i in range(n) if counts[i].sum() or counts[:, i].sum()]
        counts = counts[np.ix_(shown, shown)]
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(counts):
            if value:
                axis.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                          color="white" if rates[i, j] > 0.6 else "black")
        labels = [class_names[i] for i in shown]
        axis.set_xticks(range(len(shown)), labels, rotation=60, ha="right", fontsize=8)
        axis.set_yticks(range(len(shown)), labels, fontsize=8)
        accuracy = np.trace(counts) / max(counts.sum(), 1)
        axis.set_title(f"{name}: accuracy {accuracy:.2f}", fontsize=9)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
