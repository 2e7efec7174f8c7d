"""The whole graph on a few dozen small images with LocalDagRunner, checked in ML Metadata."""

import glob
import os

import pytest
from tfx import v1 as tfx

from pipeline import reports
from pipeline.config import load_config
from pipeline.graph import create_pipeline
from tests.e2e.mlmd import Execution, executions_by_component

COMPONENTS = {"SyntheticStemGen", "StatisticsGen", "ImportSchemaGen", "ExampleValidator"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the test profile twice; the second run should be served from the cache."""
    config = load_config("test", output_dir=str(tmp_path_factory.mktemp("e2e")))
    for _ in range(2):
        tfx.orchestration.LocalDagRunner().run(create_pipeline(config))
    return config


def test_every_component_executed(runs):
    states = executions_by_component(runs.metadata_path, run_index=0)
    assert set(states) == COMPONENTS
    assert all(state == Execution.COMPLETE for state in states.values()), states


def test_second_run_is_served_from_cache(runs):
    states = executions_by_component(runs.metadata_path, run_index=-1)
    assert set(states) == COMPONENTS
    # ImportSchemaGen is an importer-like node: it re-registers its file each run.
    cached = {name for name, state in states.items() if state == Execution.CACHED}
    assert cached >= COMPONENTS - {"ImportSchemaGen"}, states


def test_artifacts_exist_with_all_splits(runs):
    artifacts = reports.latest_artifacts(reports.open_store(runs.metadata_path))
    examples = artifacts["Examples"].uri
    counts = {}
    for split in ("train", "eval", "test"):
        assert glob.glob(os.path.join(examples, f"Split-{split}", "*.gz"))
        counts[split] = sum(1 for _ in reports.read_split(examples, split))
    assert sum(counts.values()) == runs.num_images
    # 5 images per (material, label): 3 train, 1 eval, 1 test each.
    assert counts == {"train": 24, "eval": 8, "test": 8}
    for type_name in ("ExampleStatistics", "Schema", "ExampleAnomalies"):
        assert os.listdir(artifacts[type_name].uri), type_name


def test_synthetic_data_meets_the_schema(runs):
    artifacts = reports.latest_artifacts(reports.open_store(runs.metadata_path))
    lines = reports.anomalies_summary(artifacts["ExampleAnomalies"].uri)
    assert lines == [f"{split}: no anomalies" for split in ("eval", "test", "train")]


def test_example_sheet_has_every_material_and_class(runs, tmp_path):
    artifacts = reports.latest_artifacts(reports.open_store(runs.metadata_path))
    chosen = reports.pick_one_per_class(reports.read_split(artifacts["Examples"].uri, "train"))
    assert {(m.material, m.label) for m in chosen} == {
        (material, label) for material in runs.materials for label in runs.labels}
    path = reports.write_example_sheet(chosen, str(tmp_path / "sheet.png"))
    assert os.path.getsize(path) > 10_000
