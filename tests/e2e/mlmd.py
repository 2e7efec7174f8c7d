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


def inputs_of_component(metadata_path: str, component: str, run_index: int = -1) -> Dict[str, list]:
    """{input key: [artifact ids]} of one component's execution in one run (default: newest)."""
    store = reports.open_store(metadata_path)
    names = reports.component_names(store)
    run = reports.pipeline_runs(store)[run_index]
    execution = next(e for e in store.get_executions_by_context(run.id) if names[e.id] == component)
    inputs: Dict[str, list] = {}
    for event in store.get_events_by_execution_ids([execution.id]):
        if event.type == metadata_store_pb2.Event.INPUT:
            inputs.setdefault(event.path.steps[0].key, []).append(event.artifact_id)
    return inputs
