"""A run killed in the middle, started again: it finishes from the cached steps, and ML
Metadata keeps both runs."""

import os
import signal
import subprocess
import sys
import time

from tfx import v1 as tfx

from pipeline import lineage, reports
from pipeline.graph import create_pipeline
from tests.e2e.mlmd import Execution, executions_by_component
from tests.e2e.test_real_folder import STEPS, real_folder_config, write_micrograph_folder

# Runs the same pipeline as the test below, in a process the test can kill.
RUNNER = """
import sys
from tfx import v1 as tfx
from pipeline.graph import create_pipeline
from tests.e2e.test_real_folder import real_folder_config
tfx.orchestration.LocalDagRunner().run(create_pipeline(real_folder_config(sys.argv[1], sys.argv[2])))
"""
KILL_AFTER = "PseudoLabeler"


def _completed(metadata_path, component):
    if not os.path.exists(metadata_path):
        return False
    try:
        return executions_by_component(metadata_path).get(component) == Execution.COMPLETE
    except Exception:  # the database may be mid-write, or hold no run yet
        return False


def test_a_killed_run_resumes_from_the_cache(tmp_path):
    root, output = tmp_path / "micrographs", tmp_path / "output"
    root.mkdir()
    write_micrograph_folder(root)
    config = real_folder_config(root, output)
    process = subprocess.Popen([sys.executable, "-c", RUNNER, str(root), str(output)],
                               cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                               start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not _completed(config.metadata_path, KILL_AFTER):
            assert process.poll() is None, "the pipeline ended before it could be killed"
            assert time.monotonic() < deadline, f"{KILL_AFTER} did not complete in 10 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed = executions_by_component(config.metadata_path)
    assert set(killed) < STEPS  # stopped part-way

    tfx.orchestration.LocalDagRunner().run(create_pipeline(config))
    resumed = executions_by_component(config.metadata_path)
    assert set(resumed) == STEPS
    assert resumed["MicrographExampleGen"] == resumed[KILL_AFTER] == Execution.CACHED
    assert all(state in (Execution.COMPLETE, Execution.CACHED) for state in resumed.values()), resumed
    store = reports.open_store(config.metadata_path)
    assert len(reports.pipeline_runs(store)) == 2
    assert len(lineage.run_table(store)) == 2
