"""One pipeline run of the test profile shared by every end-to-end module (each run costs minutes)."""

import pytest
from tfx import v1 as tfx

from pipeline.config import load_config
from pipeline.graph import create_pipeline


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Run the test profile twice; the second run should be served from the cache."""
    config = load_config("test", output_dir=str(tmp_path_factory.mktemp("e2e")))
    for _ in range(2):
        tfx.orchestration.LocalDagRunner().run(create_pipeline(config))
    return config
