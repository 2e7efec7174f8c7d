"""Examples that break the schema stop the run at the SchemaGate, before any training."""

import pytest
from tfx import v1 as tfx

from pipeline.config import SCHEMA_DIR
from pipeline.graph import create_pipeline
from tests.e2e.mlmd import Execution, executions_by_component
from tests.e2e.test_real_folder import real_folder_config, write_micrograph_folder


def test_a_schema_violation_stops_training_and_names_the_feature(tmp_path):
    root = tmp_path / "micrographs"
    root.mkdir()
    write_micrograph_folder(root)
    # A schema that knows CdTe only: the folder's SrTiO3 examples violate the material domain.
    with open(f"{SCHEMA_DIR}/schema.pbtxt") as handle:
        schema = handle.read().replace('  value: "SrTiO3"\n', "")
    assert 'value: "SrTiO3"' not in schema
    (tmp_path / "cdte_only.pbtxt").write_text(schema)
    config = real_folder_config(root, tmp_path / "output").replace(
        schema_file=str(tmp_path / "cdte_only.pbtxt"))

    with pytest.raises(Exception) as stopped:
        tfx.orchestration.LocalDagRunner().run(create_pipeline(config))
    assert "feature 'material'" in str(stopped.value), stopped.value
    assert "SrTiO3" in str(stopped.value)

    states = executions_by_component(config.metadata_path)
    assert states["ExampleValidator"] == Execution.COMPLETE
    assert states["SchemaGate"] == Execution.FAILED
    assert not {"SegmenterTrainer", "SegmentationEvaluator", "DefectClusterer"} & set(states), states
