"""The README's results section (pipeline/results.py) from the shared LocalDagRunner run of the test
profile: every number is checked against the artifacts' own files, read here independently."""

import datetime
import glob
import json
import os
import re
import shutil
import types

import pytest
import tensorflow_model_analysis as tfma
from ml_metadata import metadata_store
from ml_metadata.proto import metadata_store_pb2

from components.clustering import executor as clustering
from components.defects import DEFECT_CLASSES
from components.segmentation.executor import EVALUATION_FILE
from pipeline import reports, results
from tests.e2e.mlmd import outputs_of_run

PAPER = {"SrTiO3": 0.94, "CdTe": 0.993}
PREFIX = "# A project\r\n\r\nText before, with a CRLF line end and  two spaces.\n\n## Results\n\n"
SUFFIX = "\n\n## After\n\nText after, without a final newline"
OLD = "\nold numbers typed by hand: 0.999\n"


@pytest.fixture(scope="module")
def generated(runs, tmp_path_factory):
    """The CLI on the shared test-profile output (its first, uncached run) and a README with markers."""
    config = runs
    repo = tmp_path_factory.mktemp("results") / "repo"
    repo.mkdir()
    readme = repo / "README.md"
    readme.write_bytes((PREFIX + results.BEGIN + OLD + results.END + SUFFIX).encode())
    figures = repo / "docs" / "results"
    results.main(["--profile", "test", "--output-dir", config.output_dir, "--run", "0",
                  "--readme", str(readme), "--figures", str(figures)])
    text = readme.read_bytes().decode()
    section = text[text.index(results.BEGIN) + len(results.BEGIN):text.index(results.END)]
    with open(figures / results.RESULTS_JSON) as handle:
        collected = json.load(handle)
    return types.SimpleNamespace(config=config, readme=readme, text=text, section=section,
                                 figures=figures, results=collected,
                                 artifacts=outputs_of_run(config.metadata_path, run_index=0))


def _rows(section, first_cell):
    return [line for line in section.splitlines() if line.startswith(f"| {first_cell} |")]


def test_readme_changed_only_between_the_markers(generated):
    text = generated.text
    assert text.startswith(PREFIX + results.BEGIN + "\n")
    assert text.endswith("\n" + results.END + SUFFIX)
    assert text.count(results.BEGIN) == text.count(results.END) == 1
    assert "0.999" not in generated.section and "### Classifier" in generated.section


def test_header_names_the_run_and_the_command_that_regenerates_it(generated):
    store = reports.open_store(generated.config.metadata_path)
    run = reports.pipeline_runs(store)[0]
    started = datetime.datetime.fromtimestamp(run.create_time_since_epoch / 1000, datetime.timezone.utc)
    first = generated.section.strip().splitlines()[0]
    assert f"`{generated.config.pipeline_name}`" in first
    assert f"run id `{run.name}`" in first
    assert started.strftime("%Y-%m-%d %H:%M") in first
    assert (f"`.venv/bin/python -m pipeline.results --profile test --output-dir "
            f"{generated.config.output_dir} --run 0`") in first
    assert "docs/results/results.json" in first


def test_accuracy_per_material_against_the_paper_from_tfma(generated):
    evaluation = generated.artifacts["Evaluator.evaluation"].uri
    metrics = {dict(key).get("material", "all"): values[""][""]
               for key, values in tfma.load_eval_result(evaluation).slicing_metrics}
    assert set(metrics) == set(generated.config.materials) | {"all"}
    for name, values in metrics.items():
        accuracy = values["sparse_categorical_accuracy"]["doubleValue"]
        images = int(values["example_count"]["doubleValue"])
        cell = f"| {name} | {accuracy:.3f} ({round(accuracy * images)}/{images}) |"
        if name == "all":
            expected = f"{cell} | | | {images} |"
        else:
            gate = generated.config.min_accuracy[name]
            expected = (f"{cell} {PAPER[name]:.3f} | {accuracy - PAPER[name]:+.3f} | {gate:.3f} "
                        f"| {images} |")
        assert _rows(generated.section, name) == [expected]
    blessed = generated.artifacts["Evaluator.blessing"].custom_properties["blessed"].int_value
    pushed = generated.artifacts["Pusher.pushed_model"].custom_properties["pushed"].int_value
    yes = {1: "yes", 0: "no"}
    assert f"blessed: {yes[blessed]}, pushed: {yes[pushed]}." in generated.section


def test_iou_per_class_student_and_teacher_from_the_evaluation_file(generated):
    path = os.path.join(generated.artifacts["SegmentationEvaluator.evaluation"].uri, EVALUATION_FILE)
    with open(path) as handle:
        report = json.load(handle)

    def cell(comparison, cls):
        value = report[comparison][cls]["iou"]
        return "–" if value is None else f"{value:.2f}"

    for cls in DEFECT_CLASSES:
        assert _rows(generated.section, cls) == [
            f"| {cls} | {cell('student_vs_truth', cls)} | {cell('teacher_vs_truth', cls)} | "
            f"{cell('student_vs_pseudo', cls)} |"]
    assert f"{report['images']} {report['split']} images ({report['images_with_ground_truth']} with " \
           f"ground truth)" in generated.section
    assert generated.results["segmentation"]["source"] == path
    # the views the run served with, from its Trainer's own record
    with open(os.path.join(generated.artifacts["SegmenterTrainer.model_run"].uri, "history.json")) as handle:
        recorded = json.load(handle)["config"][0]
    views, width = recorded["test_time_views"], recorded["planar_min_width"]
    assert views > 1 and f"the mean over {views} turned and mirrored views" in generated.section
    assert width > 1 and f"planar marks narrower than {width} pixels removed" in generated.section
    assert generated.results["segmentation"]["classes"]["vacancy"]["teacher_vs_truth"] == \
        report["teacher_vs_truth"]["vacancy"]["iou"]


def test_clustering_numbers_from_clusters_json(generated):
    with open(os.path.join(generated.artifacts["DefectClusterer.clusters"].uri,
                           clustering.REPORT_FILE)) as handle:
        report = json.load(handle)
    k = report["chosen_k"]
    silhouette = report["silhouette"][report["k_values"].index(k)]
    agreement = report["agreement_with_labels"]
    assert (f"chosen k = {k}, silhouette {silhouette:.3f}; ARI {agreement['ari']:.3f}, "
            f"NMI {agreement['nmi']:.3f} against the true classes") in generated.section
    assert _rows(generated.section, "k") == ["| k | " + " | ".join(map(str, report["k_values"])) + " |"]
    assert _rows(generated.section, "silhouette") == [
        "| silhouette | " + " | ".join(f"{v:.3f}" for v in report["silhouette"]) + " |"]
    assert f"{report['examples']} images (train+eval+test)" in generated.section


def test_throughput_of_every_stage_from_ml_metadata(generated):
    config = generated.config
    store = reports.open_store(config.metadata_path)
    names = reports.component_names(store)
    executions = store.get_executions_by_context(reports.pipeline_runs(store)[0].id)
    split = {s: sum(1 for _ in reports.read_split(
        generated.artifacts["PseudoLabeler.pseudo_labelled_examples"].uri, s))
        for s in ("train", "eval", "test")}
    assert f"split {split['train']} train / {split['eval']} eval / {split['test']} test" in generated.section
    images = {"SyntheticStemGen": (config.num_images, "all splits"),
              "StatisticsGen": (config.num_images, "all splits"),
              "Trainer": (split["train"] * config.epochs, f"{split['train']} train x {config.epochs} "
                          f"epoch{'s' if config.epochs != 1 else ''}"),
              "Evaluator": (split["test"], "test split"),
              "DefectClusterer": (config.num_images, "train+eval+test")}
    stage_rows = generated.section.split("### Throughput per stage")[1].splitlines()
    assert len([line for line in stage_rows if line.startswith("| ") and " | complete | " in line]) \
        == len(executions) > 10
    for execution in executions:
        name = names[execution.id]
        assert execution.last_known_state == metadata_store_pb2.Execution.COMPLETE
        seconds = (execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000
        (row,) = _rows(generated.section, name)
        assert row.startswith(f"| {name} | complete | {seconds:.1f} |"), row
        if name in images:
            count, what = images[name]
            assert row == f"| {name} | complete | {seconds:.1f} | {count} ({what}) | {count / seconds:.1f} |"
    assert _rows(generated.section, "ExampleValidator")[0].endswith(" |  |  |")


def test_a_cached_stage_has_no_time(generated, tmp_path):
    copy = str(tmp_path / "metadata.db")
    shutil.copyfile(generated.config.metadata_path, copy)
    connection = metadata_store_pb2.ConnectionConfig()
    connection.sqlite.filename_uri = copy
    store = metadata_store.MetadataStore(connection)
    names = reports.component_names(store)
    run = reports.pipeline_runs(store)[0]
    trainer = next(e for e in store.get_executions_by_context(run.id) if names[e.id] == "SegmenterTrainer")
    trainer.last_known_state = metadata_store_pb2.Execution.CACHED
    store.put_executions([trainer])
    collected = results.collect(copy, 0)
    (stage,) = [s for s in collected["stages"] if s["component"] == "SegmenterTrainer"]
    assert stage["state"] == "cached" and stage["seconds"] is None and stage["images_per_second"] is None
    section = results.markdown(collected, "figures")
    assert _rows(section, "SegmenterTrainer") == ["| SegmenterTrainer | cached | cached | | |"]
    assert _rows(section, "Trainer")[0].startswith("| Trainer | complete | ")


def test_figures_are_copied_linked_and_exist(generated):
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", generated.section)
    copied = sorted(os.path.basename(p) for p in glob.glob(str(generated.figures / "*.png")))
    # classifier curves and confusion matrices, U-Net curves, heat maps, three cluster figures
    assert len(links) == len(copied) == 2 + 1 + 2 * generated.config.heatmap_images + 3
    assert sorted(os.path.basename(link) for link in links) == copied
    for link in links:
        assert not os.path.isabs(link) and link.startswith("docs/results/"), link
        path = generated.readme.parent / link
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", link
        assert os.path.getsize(path) > 10_000, link
    sources = {"classifier_training_curves.png":
               os.path.join(generated.artifacts["Trainer.model_run"].uri, "training_curves.png"),
               "clustering_tsne.png":
               os.path.join(generated.artifacts["DefectClusterer.clusters"].uri, clustering.TSNE_FIGURE)}
    for path in glob.glob(os.path.join(generated.artifacts["SegmentationEvaluator.evaluation"].uri,
                                       "heatmaps", "*.png")):
        sources[f"heatmap_{os.path.basename(path)}"] = path
    for name, source in sources.items():
        with open(generated.figures / name, "rb") as copy, open(source, "rb") as original:
            assert copy.read() == original.read(), name


def test_results_json_holds_the_numbers_and_their_sources(generated):
    collected = generated.results
    store = reports.open_store(generated.config.metadata_path)
    assert collected["run"]["run_id"] == reports.pipeline_runs(store)[0].name
    assert collected["run"]["pipeline"] == generated.config.pipeline_name
    assert collected["profile"]["data"]["num_images"] == generated.config.num_images
    assert collected["profile"]["classifier"]["epochs"] == generated.config.epochs
    with open(collected["clustering"]["source"]) as handle:
        assert collected["clustering"]["chosen_k"] == json.load(handle)["chosen_k"]
    assert {f["name"] for f in collected["figures"]} == \
        {os.path.basename(p) for p in glob.glob(str(generated.figures / "*.png"))}


def test_update_readme_keeps_everything_outside_the_markers(tmp_path):
    path = tmp_path / "README.md"
    path.write_bytes((PREFIX + results.BEGIN + OLD + results.END + SUFFIX).encode())
    results.update_readme(str(path), "### New\n\n| a | 1 |\n")
    expected = PREFIX + results.BEGIN + "\n### New\n\n| a | 1 |\n" + results.END + SUFFIX
    assert path.read_bytes().decode() == expected
    results.update_readme(str(path), "### New\n\n| a | 1 |\n")  # again: the same file
    assert path.read_bytes().decode() == expected


@pytest.mark.parametrize("text", ["# no markers at all\n",
                                  f"only the start {results.BEGIN}\n",
                                  f"{results.END} then {results.BEGIN}\n"])
def test_update_readme_refuses_without_its_markers(tmp_path, text):
    path = tmp_path / "README.md"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        results.update_readme(str(path), "### New\n")
    assert path.read_text() == text


def test_cli_refuses_a_readme_without_markers_before_writing_anything(generated, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# nothing to replace\n")
    with pytest.raises(ValueError, match="results:begin"):
        results.main(["--profile", "test", "--output-dir", generated.config.output_dir,
                      "--readme", str(readme), "--figures", str(tmp_path / "figures")])
    assert not (tmp_path / "figures").exists()
    assert readme.read_text() == "# nothing to replace\n"
