"""`tfx pipeline create` / `tfx run create` through the real CLI with both engines (local and
Beam), on the shared test-profile output: the graph compiles and runs under each orchestrator
and every step the earlier runs made is reused from the cache, so each engine costs a minute,
not a whole run."""

import os

import pytest

from pipeline import demo, reports
from tests.e2e.mlmd import Execution, executions_by_component
from tests.e2e.test_pipeline import COMPONENTS

# The resolver and ImportSchemaGen re-resolve every run, and the Evaluator (with the Pusher
# after it) takes the resolver's output, so those run again; everything else is cached.
RERUN = {"ImportSchemaGen", "latest_blessed_model", "Evaluator", "Pusher"}


@pytest.mark.parametrize("engine", sorted(demo.ENGINES))
def test_cli_runs_the_graph_with_each_engine(runs, engine, monkeypatch):
    monkeypatch.setenv("STEM_PROFILE", "test")
    folder = demo.ENGINES[engine][2]
    before = len(reports.pipeline_runs(reports.open_store(runs.metadata_path)))
    demo.run_through_cli(runs, engine)
    assert len(reports.pipeline_runs(reports.open_store(runs.metadata_path))) == before + 1
    assert os.path.isdir(os.path.join(runs.output_dir, folder, runs.pipeline_name))
    states = executions_by_component(runs.metadata_path)
    assert set(states) == COMPONENTS
    cached = {name for name, state in states.items() if state == Execution.CACHED}
    assert cached >= COMPONENTS - RERUN, states
    assert all(state in (Execution.CACHED, Execution.COMPLETE) for state in states.values()), states
