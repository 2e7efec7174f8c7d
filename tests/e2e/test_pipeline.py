"""The whole graph on sixty small images with LocalDagRunner, checked in ML Metadata."""

import csv
import glob
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_analysis as tfma
from tfx import v1 as tfx

from components import contract
from components.clustering import executor as clustering
from components.defects import DEFECT_CLASSES, IMAGE_CLASSES
from components.segmentation.executor import COMPARISONS, EVALUATION_FILE
from pipeline import lineage, reports, run_report
from pipeline.graph import create_pipeline
from tests.e2e.mlmd import Execution, executions_by_component, inputs_of_component, outputs_of_run

COMPONENTS = {"SyntheticStemGen", "PseudoLabeler", "StatisticsGen", "ImportSchemaGen",
              "ExampleValidator", "SchemaGate", "Transform", "latest_blessed_model", "Trainer", "Evaluator",
              "Pusher", "SegmenterTrainer", "SegmentationEvaluator", "SegmenterPusher",
              "DefectClusterer"}


def test_every_component_executed(runs):
    states = executions_by_component(runs.metadata_path, run_index=0)
    assert set(states) == COMPONENTS
    assert all(state == Execution.COMPLETE for state in states.values()), states


def test_second_run_is_served_from_cache(runs):
    states = executions_by_component(runs.metadata_path, run_index=1)
    assert set(states) == COMPONENTS
    # ImportSchemaGen and the resolver re-resolve their inputs each run, and the Evaluator
    # (with the Pusher after it) takes the resolver's output, so those run again.
    cached = {name for name, state in states.items() if state == Execution.CACHED}
    assert cached >= COMPONENTS - {"ImportSchemaGen", "latest_blessed_model", "Evaluator", "Pusher"}, states


def test_artifacts_exist_with_all_splits(runs):
    artifacts = outputs_of_run(runs.metadata_path, run_index=0)
    examples = artifacts["SyntheticStemGen.examples"].uri
    counts = {}
    for split in ("train", "eval", "test"):
        assert glob.glob(os.path.join(examples, f"Split-{split}", "*.gz"))
        counts[split] = sum(1 for _ in reports.read_split(examples, split))
    assert sum(counts.values()) == runs.num_images
    # 5 images per (material, label) pair: 3 train, 1 eval, 1 test each.
    pairs = sum(len(labels) for labels in runs.material_labels().values())
    assert runs.num_images == 5 * pairs
    assert counts == {"train": 3 * pairs, "eval": pairs, "test": pairs}
    labelled = artifacts["PseudoLabeler.pseudo_labelled_examples"].uri
    for split, count in counts.items():
        micrographs = list(reports.read_split(labelled, split))
        assert len(micrographs) == count
        assert all(m.deviation_z.shape == m.image.shape for m in micrographs)
    for output in ("StatisticsGen.statistics", "ImportSchemaGen.schema", "ExampleValidator.anomalies"):
        assert os.listdir(artifacts[output].uri), output


def test_synthetic_data_meets_the_schema(runs):
    artifacts = outputs_of_run(runs.metadata_path, run_index=0)
    lines = reports.anomalies_summary(artifacts["ExampleValidator.anomalies"].uri)
    assert lines == [f"{split}: no anomalies" for split in ("eval", "test", "train")]


def test_example_sheet_has_every_material_and_class(runs, tmp_path):
    artifacts = outputs_of_run(runs.metadata_path, run_index=0)
    chosen = reports.pick_one_per_class(reports.read_split(artifacts["SyntheticStemGen.examples"].uri, "train"))
    assert {(m.material, m.label) for m in chosen} == {
        (material, label) for material, labels in runs.material_labels().items() for label in labels}
    path = reports.write_example_sheet(chosen, str(tmp_path / "sheet.png"))
    assert os.path.getsize(path) > 10_000


def test_blessed_model_is_pushed_and_predicts_from_serialized_examples(runs):
    artifacts = outputs_of_run(runs.metadata_path, run_index=0)
    assert artifacts["Evaluator.blessing"].custom_properties["blessed"].int_value == 1
    assert artifacts["Pusher.pushed_model"].custom_properties["pushed"].int_value == 1
    pushed = artifacts["Pusher.pushed_model"].custom_properties["pushed_destination"].string_value
    assert pushed.startswith(runs.serving_model_dir)

    micrographs = list(reports.read_split(artifacts["PseudoLabeler.pseudo_labelled_examples"].uri,
                                          "test"))[:4]
    serialized = [contract.to_example(m).SerializeToString() for m in micrographs]
    model = tf.saved_model.load(pushed)
    outputs = model.signatures["serving_default"](examples=tf.constant(serialized))
    probabilities = outputs["probabilities"].numpy()
    assert probabilities.shape == (4, len(IMAGE_CLASSES))
    assert probabilities.sum(axis=1) == pytest.approx(1.0, abs=1e-4)
    assert {label.decode() for label in outputs["label"].numpy()} <= set(IMAGE_CLASSES)
    # the same answers from the maps themselves, without tf.Examples
    maps = {source: tf.constant(np.stack([getattr(m, source) for m in micrographs]))
            for source in set(runs.input_channels)}
    maps[contract.MASK_PSEUDO] = tf.constant(np.stack([m.mask_pseudo for m in micrographs]))
    from_maps = model.signatures["serving_maps"](**maps)
    np.testing.assert_allclose(from_maps["probabilities"].numpy(), probabilities, atol=1e-5)


def test_segmenter_is_scored_against_pseudo_labels_and_truth_then_pushed(runs):
    artifacts = outputs_of_run(runs.metadata_path, run_index=0)
    evaluation = artifacts["SegmentationEvaluator.evaluation"].uri
    with open(os.path.join(evaluation, EVALUATION_FILE)) as handle:
        report = json.load(handle)
    test_images = sum(len(labels) for labels in runs.material_labels().values())
    assert report["images"] == report["images_with_ground_truth"] == test_images
    for comparison in COMPARISONS:
        assert set(report[comparison]) == set(DEFECT_CLASSES)
    assert report["blessed"] and not report["failures"]  # the test profile's gate is 0
    for kind in ("combined", "per_class"):
        figures = glob.glob(os.path.join(evaluation, "heatmaps", f"*_{kind}.png"))
        assert len(figures) == runs.heatmap_images
        assert all(os.path.getsize(f) > 10_000 for f in figures)

    pushed = artifacts["SegmenterPusher.pushed_model"].custom_properties
    assert pushed["pushed"].int_value == 1
    destination = pushed["pushed_destination"].string_value
    assert destination.startswith(runs.segmenter_serving_dir)
    micrograph = next(reports.read_split(artifacts["PseudoLabeler.pseudo_labelled_examples"].uri, "test"))
    serve = tf.saved_model.load(destination).signatures["serving_images"]
    maps = serve(images=tf.constant(micrograph.image[None]),
                 deviation_z=tf.constant(micrograph.deviation_z[None]))  # the teacher's map too
    assert maps["probabilities"].shape == (1,) + micrograph.image.shape + (len(DEFECT_CLASSES),)


def test_every_example_is_clustered_and_leads_back_to_its_micrograph(runs):
    artifacts = outputs_of_run(runs.metadata_path, run_index=0)
    clusters = artifacts["DefectClusterer.clusters"].uri
    assert inputs_of_component(runs.metadata_path, "DefectClusterer", run_index=0)["examples"] == \
        [artifacts["PseudoLabeler.pseudo_labelled_examples"].id]
    with open(os.path.join(clusters, clustering.REPORT_FILE)) as handle:
        report = json.load(handle)
    assert report["examples"] == runs.num_images
    assert report["k_values"][0] <= report["chosen_k"] <= report["k_values"][-1] <= 4
    assert sum(c["size"] for c in report["clusters"].values()) == runs.num_images
    assert set(report["agreement_with_labels"]) == {"ari", "nmi"}
    assert report["model_blessed"] is True

    with open(os.path.join(clusters, clustering.ASSIGNMENTS_FILE)) as handle:
        rows = list(csv.DictReader(handle))
    labelled = artifacts["PseudoLabeler.pseudo_labelled_examples"].uri
    sources = {(split, m.source): m.label for split in ("train", "eval", "test")
               for m in reports.read_split(labelled, split)}
    assert {(row["split"], row["source"]): row["label"] for row in rows} == sources
    assert {int(row["cluster"]) for row in rows} == set(range(report["chosen_k"]))
    for figure in (clustering.SILHOUETTE_FIGURE, clustering.TSNE_FIGURE, clustering.GALLERY_FIGURE):
        assert os.path.getsize(os.path.join(clusters, figure)) > 10_000, figure
    assert reports.clustering_summary(clusters)[0].startswith(f"k = {report['chosen_k']} ")


def test_lineage_leads_from_pushed_model_and_clusters_back_to_the_synthesis(runs):
    store = reports.open_store(runs.metadata_path)
    artifacts = outputs_of_run(runs.metadata_path, run_index=0)
    pushed = artifacts["Pusher.pushed_model"]
    chain = lineage.upstream(store, lineage.find_artifact(
        store, pushed.custom_properties["pushed_destination"].string_value))
    assert chain[0]["artifact"].id == pushed.id
    assert {"Pusher", "Evaluator", "Trainer", "Transform", "PseudoLabeler", "SyntheticStemGen",
            "ImportSchemaGen"} <= {entry["component"] for entry in chain}
    text = "\n".join(lineage.format_chain(chain))
    for name in ("StatisticsGen.statistics", "ExampleValidator.anomalies", "SchemaGate.verdict",
                 "Evaluator.evaluation", "PseudoLabeler.report"):
        assert text.count(f"{name} #{artifacts[name].id} ") == 1, name
    clusters = lineage.upstream(store, lineage.find_artifact(store, artifacts["DefectClusterer.clusters"].uri))
    assert {"SegmenterTrainer", "SegmentationEvaluator", "PseudoLabeler", "SyntheticStemGen"} <= \
        {entry["component"] for entry in clusters}
    table = lineage.run_table(store)
    assert table[0].startswith("0  ") and "classifier pushed" in table[0]
    assert "cached" in table[1]


def test_run_report_is_one_html_file_with_every_section_and_figure(runs, tmp_path):
    path = run_report.write_report(runs.metadata_path, str(tmp_path / "run.html"), run_index=0)
    with open(path) as handle:
        page = handle.read()
    for section in ("Data:", "Classifier", "Segmenter", "Defect clusters"):
        assert f"<h2>{section}" in page
    assert "not available" not in page and "src=\"file:" not in page
    assert "passed: training went ahead" in page
    # the schema reached StatisticsGen: arrays are counted in bytes, not sketched by value
    assert page.count("serialized arrays, ") == len(contract.ARRAY_FEATURES)
    # example sheet, curves and confusion matrices, U-Net curves and heat maps, 3 cluster figures
    assert page.count('src="data:image/png;base64,') == 3 + 1 + 2 * runs.heatmap_images + 3


@pytest.mark.skipif(not shutil.which("chromium"), reason="headless Chromium not installed "
                    "(Debian: apt install chromium)")
def test_run_report_renders_in_headless_chromium(runs, tmp_path):
    path = run_report.write_report(runs.metadata_path, str(tmp_path / "run.html"), run_index=0)
    with open(path) as handle:  # after loading, record how many images decoded
        page = handle.read().replace("</body>", (
            "<script>window.onload = () => document.body.setAttribute('data-decoded', "
            "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length "
            "+ '/' + document.images.length);</script></body>"))
    with open(path, "w") as handle:
        handle.write(page)
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=10000", "--dump-dom", f"file://{path}"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    images = page.count("<img ")
    assert f'data-decoded="{images}/{images}"' in dom, dom[:300]


def test_training_curves_are_written(runs):
    artifacts = outputs_of_run(runs.metadata_path, run_index=0)
    curves = os.path.join(artifacts["Trainer.model_run"].uri, "training_curves.png")
    assert os.path.getsize(curves) > 10_000


def test_confusion_matrix_per_material_is_drawn(runs, tmp_path):
    artifacts = outputs_of_run(runs.metadata_path, run_index=0)
    matrices = reports.confusion_matrices(artifacts["Evaluator.evaluation"].uri)
    assert set(matrices) == {"overall"} | {f"material={m}" for m in runs.materials}
    pairs = runs.material_labels()
    for material, labels in pairs.items():  # one test image per (material, label)
        assert matrices[f"material={material}"].sum() == len(labels)
    assert matrices["overall"].sum() == sum(len(labels) for labels in pairs.values())
    vocabulary = reports.label_vocabulary(artifacts["Transform.transform_graph"].uri)
    assert sorted(vocabulary) == sorted(set(IMAGE_CLASSES))
    path = reports.write_confusion_matrices(matrices, vocabulary, str(tmp_path / "confusion.png"))
    assert os.path.getsize(path) > 10_000


def test_unreachable_threshold_pushes_nothing(runs):
    strict = runs.replace(min_accuracy={material: 1.01 for material in runs.materials})
    tfx.orchestration.LocalDagRunner().run(create_pipeline(strict))
    states = executions_by_component(runs.metadata_path)
    assert states["Trainer"] == Execution.CACHED
    assert states["Evaluator"] == states["Pusher"] == Execution.COMPLETE
    artifacts = outputs_of_run(runs.metadata_path, run_index=-1)
    assert artifacts["Evaluator.blessing"].custom_properties["blessed"].int_value == 0
    assert artifacts["Pusher.pushed_model"].custom_properties["pushed"].int_value == 0
    validation = tfma.load_validation_result(artifacts["Evaluator.evaluation"].uri)
    assert not validation.validation_ok
    summary = reports.accuracy_summary(artifacts["Evaluator.evaluation"].uri)
    for material in runs.materials:
        assert any(line.startswith(f"gate: FAILED on material={material}: ") for line in summary), summary


def test_warm_start_continues_from_the_latest_blessed_model(runs):
    blessed_model = outputs_of_run(runs.metadata_path, run_index=0)["Trainer.model"]
    tfx.orchestration.LocalDagRunner().run(create_pipeline(runs.replace(warm_start=True)))
    assert executions_by_component(runs.metadata_path)["Trainer"] == Execution.COMPLETE
    assert inputs_of_component(runs.metadata_path, "Trainer")["base_model"] == [blessed_model.id]
    assert inputs_of_component(runs.metadata_path, "Evaluator")["baseline_model"] == [blessed_model.id]
    history = os.path.join(outputs_of_run(runs.metadata_path, run_index=-1)["Trainer.model_run"].uri,
                           "history.json")
    with open(history) as handle:
        assert blessed_model.uri in json.load(handle)["started_from"][0]
