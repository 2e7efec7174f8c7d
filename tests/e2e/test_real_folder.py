"""The pipeline on a folder of unlabelled microscope files with broken ones among them."""

import json
import os

import pytest
from tfx import v1 as tfx

from components.clustering import executor as clustering
from components.micrographs.executor import QUARANTINE_JSON, split_of_file
from components.segmentation.executor import EVALUATION_FILE
from pipeline import demo, reports, run_report
from pipeline.config import load_config
from pipeline.graph import create_pipeline
from tests.e2e.mlmd import Execution, executions_by_component, outputs_of_run
from tests.test_micrograph_reader import lattice_image, write_broken_corpus, write_dm, write_tiff_imagej

STEPS = {"MicrographExampleGen", "PseudoLabeler", "StatisticsGen", "ImportSchemaGen",
         "ExampleValidator", "SchemaGate", "SegmenterTrainer", "SegmentationEvaluator", "SegmenterPusher",
         "DefectClusterer"}


def _names_covering_every_split(count):
    """File names, alternately DM3 and TIFF, whose hashed splits include train, eval and test
    (a few files could miss one)."""
    names = []
    while len(names) < count or {split_of_file(n, (7, 2, 1)) for n in names} != {"train", "eval", "test"}:
        names.append(f"frame_{len(names):03d}.{'dm3' if len(names) % 2 else 'tif'}")
    return names


def write_micrograph_folder(root):
    """Eight good unlabelled files (DM3 and TIFF) and a corpus of broken ones under `root`;
    returns {relative path: quarantine reason} of the broken ones."""
    for index, name in enumerate(_names_covering_every_split(8)):
        image = lattice_image(size=96, seed=index, label="vacancy" if index % 2 else "bulk")
        if name.endswith(".dm3"):
            write_dm(root / name, image, 20.0)
        else:
            write_tiff_imagej(root / name, image, 20.0)
    broken = root / "broken"
    broken.mkdir()
    return {f"broken/{name}": reason for name, reason in write_broken_corpus(broken).items()}


def real_folder_config(root, output_dir):
    """The test profile on the folder at `root`, unlabelled."""
    return load_config("test", output_dir=str(output_dir)).replace(
        pipeline_name="stem-defects-real-test", materials=("SrTiO3",),
        micrographs=dict(root=str(root), material="SrTiO3"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("micrographs")
    expected = write_micrograph_folder(root)
    config = real_folder_config(root, tmp_path_factory.mktemp("real"))
    tfx.orchestration.LocalDagRunner().run(create_pipeline(config))
    return config, expected


def test_unlabelled_files_run_every_step_but_the_classifier(run):
    config, _ = run
    states = executions_by_component(config.metadata_path)
    assert set(states) == STEPS
    assert all(state == Execution.COMPLETE for state in states.values()), states


def test_broken_files_are_quarantined_with_their_reasons_and_the_rest_go_on(run):
    config, expected = run
    artifacts = outputs_of_run(config.metadata_path, run_index=-1)
    with open(os.path.join(artifacts["MicrographExampleGen.quarantine"].uri, QUARANTINE_JSON)) as handle:
        report = json.load(handle)
    assert {row["relative_path"]: row["reason"] for row in report["quarantined"]} == expected
    examples = artifacts["PseudoLabeler.pseudo_labelled_examples"].uri
    micrographs = [m for split in ("train", "eval", "test") for m in reports.read_split(examples, split)]
    assert len(micrographs) == report["files_used"] == len(_names_covering_every_split(8))
    assert {m.label for m in micrographs} == {"unknown"}
    assert all(m.mask_true is None and m.mask_pseudo is not None for m in micrographs)


def test_ground_truth_scores_are_skipped_and_said_so(run):
    config, _ = run
    artifacts = outputs_of_run(config.metadata_path, run_index=-1)
    with open(os.path.join(artifacts["SegmentationEvaluator.evaluation"].uri, EVALUATION_FILE)) as handle:
        segmentation = json.load(handle)
    assert segmentation["images_with_ground_truth"] == 0
    assert "no ground truth" in segmentation["student_vs_truth"]
    with open(os.path.join(artifacts["DefectClusterer.clusters"].uri, clustering.REPORT_FILE)) as handle:
        clusters = json.load(handle)
    assert clusters["agreement_with_labels"] == "labels unknown: not scored"
    assert clusters["examples"] == len(_names_covering_every_split(8))


def test_run_summary_and_report_name_the_quarantined_files(run, capsys):
    config, expected = run
    demo.summarise(config)
    printed = capsys.readouterr().out
    assert f"{len(expected)} set aside" in printed
    for path, reason in expected.items():
        assert f"{path}: {reason} (" in printed
    assert "pushed classifier" not in printed and "pushed segmenter" in printed
    with open(os.path.join(config.output_dir, "reports", "run-0.html")) as handle:
        page = handle.read()
    assert all(path in page for path in expected)
    assert "<h2>Classifier" in page and "not available in this run" in page
    assert page == run_report.build_report(config.metadata_path)
