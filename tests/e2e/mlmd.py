"""Reading a pipeline's runs back from ML Metadata, for the end-to-end tests."""

from typing import Dict

from ml_metadata.proto import metadata_store_pb2

from pipeline import reports

Execution = metadata_store_pb2.Execution


def executions_by_component(metadata_path: str, run_index: int = -1) -> Dict[str, int]:
    """{component id: last_known_state} for one pipeline run (default: the newest)."""
    store = reports.open_store(metadata_path)
    component_of = {}
    for node in store.get_contexts_by_type("node"):
        for execution in store.get_executions_by_context(node.id):
            component_of[execution.id] = node.name.split(".")[-1]
    runs = sorted(store.get_contexts_by_type("pipeline_run"), key=lambda c: c.create_time_since_epoch)
    return {component_of[e.id]: e.last_known_state
            for e in store.get_executions_by_context(runs[run_index].id)}
