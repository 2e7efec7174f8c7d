"""Where did this model (or clustering result) come from? Its chain in ML Metadata, and past runs.

    python -m pipeline.lineage                      # the newest pushed classifier
    python -m pipeline.lineage --uri output/serving_model/stem-defects/1733150000
    python -m pipeline.lineage --uri <DefectClusterer clusters URI>
    python -m pipeline.lineage --runs               # every run and what it ended with

The chain is walked upstream from one artifact: the execution that made it, that execution's
inputs, the executions that made those, and so on to the synthetic or real examples. An
artifact a later run took from the cache has more than one execution that output it; the
one that made it (the earliest) is shown. Each artifact appears once; a second path to it
says "(shown above)". Statistics and anomalies are not inputs of any model, so they are not
upstream of one: under every examples artifact of the chain, the statistics computed from
it, the anomalies found in those and the SchemaGate's verdict are listed as "checked by".
"""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Dict, List, Optional, Tuple

from ml_metadata import metadata_store
from ml_metadata.proto import metadata_store_pb2

from pipeline import reports
from pipeline.config import load_config

Event = metadata_store_pb2.Event
Execution = metadata_store_pb2.Execution
STATE_NAMES = {value: name.lower() for name, value in Execution.State.items()}


def _when(milliseconds: int) -> str:
    return datetime.datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M:%S")


def find_artifact(store: metadata_store.MetadataStore, uri: str) -> metadata_store_pb2.Artifact:
    """The artifact stored at `uri`, or the pushed model whose destination it is."""
    wanted = os.path.abspath(uri).rstrip("/")
    for artifact in store.get_artifacts():
        destination = artifact.custom_properties.get("pushed_destination")
        places = [artifact.uri] + ([destination.string_value] if destination is not None else [])
        if any(place and os.path.abspath(place).rstrip("/") == wanted for place in places):
            return artifact
    raise LookupError(f"no artifact in ML Metadata is stored at {uri} (or was pushed there)")


def newest_pushed_model(store: metadata_store.MetadataStore,
                        pusher: str = "Pusher") -> metadata_store_pb2.Artifact:
    """The newest run's pushed model of `pusher` that was pushed."""
    for index in range(len(reports.pipeline_runs(store)) - 1, -1, -1):
        artifact = reports.run_outputs(store, index).get(f"{pusher}.pushed_model")
        if artifact is not None and artifact.custom_properties["pushed"].int_value:
            return artifact
    raise LookupError(f"no run of this pipeline has pushed a model with {pusher}")


def _producer(store: metadata_store.MetadataStore, artifact_id: int
              ) -> Optional[Tuple[Execution, str]]:
    """The earliest execution that output the artifact, and the output's key."""
    outputs = [e for e in store.get_events_by_artifact_ids([artifact_id]) if e.type == Event.OUTPUT]
    if not outputs:
        return None
    executions = {e.id: e for e in store.get_executions_by_id([e.execution_id for e in outputs])}
    event = min(outputs, key=lambda e: (executions[e.execution_id].create_time_since_epoch,
                                        e.execution_id))
    return executions[event.execution_id], event.path.steps[0].key


# Artifacts that describe examples rather than being made from them for training.
VALIDATION_TYPES = ("ExampleStatistics", "ExampleAnomalies", "stem_defects.SchemaVerdict")
# Reports made beside an artifact of the chain (the evaluation beside a blessing, the
# pseudo-label quality beside the pseudo-labelled examples): shown as "with".
REPORT_TYPES = ("ModelEvaluation", "stem_defects.PseudoLabelReport", "stem_defects.QuarantineReport")


def _downstream(store: metadata_store.MetadataStore, artifact_id: int, names: Dict[int, str],
                types: Dict[int, str]) -> List[Tuple[str, metadata_store_pb2.Artifact]]:
    """('Component.key', artifact) of validation artifacts made from the artifact, and from
    those in turn (statistics, then the anomalies found in them)."""
    found, frontier, seen = [], [artifact_id], set()
    while frontier:
        readers = {e.execution_id for e in store.get_events_by_artifact_ids(frontier)
                   if e.type == Event.INPUT}
        outputs = [e for e in store.get_events_by_execution_ids(sorted(readers)) if e.type == Event.OUTPUT]
        made = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in outputs])}
        frontier = []
        for event in sorted(outputs, key=lambda e: e.artifact_id):
            artifact = made[event.artifact_id]
            if types.get(artifact.type_id) in VALIDATION_TYPES and artifact.id not in seen:
                seen.add(artifact.id)
                found.append((f"{names.get(event.execution_id, '?')}.{event.path.steps[0].key}", artifact))
                frontier.append(artifact.id)
    return found


def upstream(store: metadata_store.MetadataStore, artifact: metadata_store_pb2.Artifact
             ) -> List[Dict]:
    """Depth-first chain from `artifact` upstream: one entry per artifact, with the key it
    was read under, its depth, and the execution that made it (None for an imported file)."""
    names = reports.component_names(store)
    types = {t.id: t.name for t in store.get_artifact_types()}
    chain, seen = [], set()

    def visit(current, key, depth):
        entry = dict(artifact=current, type=types.get(current.type_id, "?"), key=key, depth=depth,
                     seen=current.id in seen, component=None, execution=None, output_key=None,
                     checked_by=[], reports=[])
        chain.append(entry)
        if entry["seen"]:
            return
        seen.add(current.id)
        if entry["type"] == "Examples":
            entry["checked_by"] = _downstream(store, current.id, names, types)
        made = _producer(store, current.id)
        if made is None:
            return
        execution, output_key = made
        entry.update(component=names.get(execution.id, "?"), execution=execution, output_key=output_key)
        events = store.get_events_by_execution_ids([execution.id])
        siblings = [e for e in events if e.type == Event.OUTPUT and e.artifact_id != current.id]
        made_beside = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in siblings])}
        entry["reports"] = [(f"{entry['component']}.{e.path.steps[0].key}", made_beside[e.artifact_id])
                            for e in siblings
                            if types.get(made_beside[e.artifact_id].type_id) in REPORT_TYPES]
        inputs = [e for e in events if e.type == Event.INPUT]
        artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in inputs])}
        for event in sorted(inputs, key=lambda e: (e.path.steps[0].key, e.artifact_id)):
            visit(artifacts[event.artifact_id], event.path.steps[0].key, depth + 1)

    visit(artifact, None, 0)
    return chain


def format_chain(chain: List[Dict]) -> List[str]:
    lines = []
    for entry in chain:
        artifact, indent = entry["artifact"], "    " * entry["depth"]
        read_as = f"{entry['key']} <- " if entry["key"] else ""
        head = f"{indent}{read_as}{entry['type']} #{artifact.id}"
        if entry["seen"]:
            lines.append(f"{head} (shown above)")
            continue
        lines.append(f"{head}  {artifact.uri}")
        execution = entry["execution"]
        if execution is None:
            lines.append(f"{indent}    (no execution recorded: imported)")
        else:
            lines.append(f"{indent}    made by {entry['component']}.{entry['output_key']} "
                         f"(execution #{execution.id}, {STATE_NAMES[execution.last_known_state]}, "
                         f"{_when(execution.create_time_since_epoch)})")
        for made_by, report in entry["reports"]:
            lines.append(f"{indent}    with {made_by} #{report.id}  {report.uri}")
        for made_by, checked in entry["checked_by"]:
            lines.append(f"{indent}    checked by {made_by} #{checked.id}  {checked.uri}")
    return lines


def run_table(store: metadata_store.MetadataStore) -> List[str]:
    """One line per run: when, how its steps ended, and what it shipped."""
    names = reports.component_names(store)
    lines = []
    for index, run in enumerate(reports.pipeline_runs(store)):
        executions = store.get_executions_by_context(run.id)
        states: Dict[str, int] = {}
        for execution in executions:
            state = STATE_NAMES[execution.last_known_state]
            states[state] = states.get(state, 0) + 1
        outputs = reports.run_outputs(store, index)
        shipped = []
        for label, pusher in (("classifier", "Pusher"), ("segmenter", "SegmenterPusher")):
            pushed = outputs.get(f"{pusher}.pushed_model")
            if pushed is not None:
                shipped.append(f"{label} {'pushed' if pushed.custom_properties['pushed'].int_value else 'not pushed'}")
        failed = sorted(names.get(e.id, "?") for e in executions
                        if e.last_known_state == Execution.FAILED)
        steps = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        lines.append(f"{index}  {_when(run.create_time_since_epoch)}  {run.name}: {steps}"
                     + (f"; {', '.join(shipped)}" if shipped else "")
                     + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata", help="ML Metadata SQLite file (default: the profile's)")
    parser.add_argument("--profile", help="config profile (default: $STEM_PROFILE or demo)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--uri", help="an artifact's URI, or where a model was pushed")
    what.add_argument("--segmenter", action="store_true", help="the newest pushed U-Net")
    what.add_argument("--runs", action="store_true", help="list the runs instead")
    args = parser.parse_args(argv)
    store = reports.open_store(args.metadata or load_config(args.profile).metadata_path)
    if args.runs:
        lines = run_table(store)
    else:
        if args.uri:
            artifact = find_artifact(store, args.uri)
        else:
            artifact = newest_pushed_model(store, "SegmenterPusher" if args.segmenter else "Pusher")
        lines = format_chain(upstream(store, artifact))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
