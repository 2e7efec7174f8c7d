"""Reading a pipeline's runs back from ML Metadata, for the end-to-end tests."""

from typing import Dict

from ml_metadata.proto import metadata_store_pb2

from pipeline import reports

Execution = metadata_store_pb2.Execution


def executions_by_component(metadata_path: str, run_index: int = -1) -> Dict[str, int]:
    """{component id: last_known_state} for one pipeline run (default: the newest)."""
    store = reports.open_store(metadata_path)
    names = reports.component_names(store)
    run = reports.pipeline_runs(store)[run_index]
    return {names[e.id]: e.last_known_state for e in store.get_executions_by_context(run.id)}


def outputs_of_run(metadata_path: str, run_index: int) -> Dict[str, metadata_store_pb2.Artifact]:
    return reports.run_outputs(reports.open_store(metadata_path), run_index)
