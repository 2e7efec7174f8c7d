"""The SchemaGate: which anomalies stop training, and the message a person reads."""

import json
import os

import pytest
from tensorflow_metadata.proto.v0 import anomalies_pb2
from tfx.types import standard_artifacts

from components.schema_gate.component import SchemaVerdict
from components.schema_gate.executor import VERDICT_FILE, Executor, SchemaViolation
from components.schema_gate.verdict import Anomaly, blocking
from pipeline.config import load_config

UNEXPECTED = "ENUM_TYPE_UNEXPECTED_STRING_VALUES"


def anomaly(feature="label", kinds=(UNEXPECTED,), severity="ERROR"):
    return Anomaly(split="train", feature=feature, kinds=kinds, severity=severity,
                   short_description="Unexpected string values",
                   description="Examples contain values missing from the schema: bird (~33%).")


def test_errors_block_unless_every_kind_is_tolerated():
    label, other = anomaly(), anomaly(kinds=(UNEXPECTED, "FEATURE_TYPE_NOT_PRESENT"))
    assert blocking([label, other], {}) == [label, other]
    assert blocking([label, other], {"label": [UNEXPECTED]}) == [other]
    assert blocking([label], {"material": [UNEXPECTED]}) == [label]  # tolerance is per feature


def test_warnings_never_block():
    assert blocking([anomaly(severity="WARNING")], {}) == []


def write_anomalies(root, per_split):
    """An ExampleAnomalies folder as ExampleValidator writes it: Split-*/SchemaDiff.pb."""
    for split, features in per_split.items():
        proto = anomalies_pb2.Anomalies()
        for feature in features:
            info = proto.anomaly_info[feature]
            info.severity = anomalies_pb2.AnomalyInfo.ERROR
            info.short_description = "Unexpected string values"
            info.description = "Examples contain values missing from the schema: bird (~33%)."
            info.reason.add(type=anomalies_pb2.AnomalyInfo.ENUM_TYPE_UNEXPECTED_STRING_VALUES)
        os.makedirs(root / f"Split-{split}")
        (root / f"Split-{split}" / "SchemaDiff.pb").write_bytes(proto.SerializeToString())


def run_gate(tmp_path, per_split, tolerated):
    anomalies = standard_artifacts.ExampleAnomalies()
    anomalies.uri = str(tmp_path / "anomalies")
    write_anomalies(tmp_path / "anomalies", per_split)
    verdict = SchemaVerdict()
    verdict.uri = str(tmp_path / "verdict")
    os.makedirs(verdict.uri)
    Executor().Do({"anomalies": [anomalies]}, {"verdict": [verdict]},
                  {"gate_config": json.dumps({"schema": "schema/test.pbtxt", "tolerated": tolerated})})
    return verdict.uri


def test_a_violation_stops_with_the_split_feature_and_reason(tmp_path):
    with pytest.raises(SchemaViolation) as stopped:
        run_gate(tmp_path, {"train": ["label"], "eval": []}, tolerated={})
    message = str(stopped.value)
    assert "schema/test.pbtxt" in message
    assert "split 'train', feature 'label'" in message and "bird (~33%)" in message
    assert UNEXPECTED in message and "split 'eval'" not in message


def test_tolerated_anomalies_pass_and_are_written_down(tmp_path):
    uri = run_gate(tmp_path, {"train": ["label"], "test": []}, tolerated={"label": [UNEXPECTED]})
    with open(os.path.join(uri, VERDICT_FILE)) as handle:
        verdict = json.load(handle)
    assert verdict["passed"] is True
    assert [(a["split"], a["feature"], a["kinds"]) for a in verdict["let_through"]] == [
        ("train", "label", [UNEXPECTED])]


def test_no_split_to_check_is_an_error(tmp_path):
    with pytest.raises(SchemaViolation, match="no split"):
        run_gate(tmp_path, {}, tolerated={})


def test_micrograph_folders_tolerate_their_own_labels_and_bad_kinds_are_refused(tmp_path):
    synthetic = load_config("test")
    assert synthetic.schema_tolerance == {}
    real = synthetic.replace(micrographs=dict(root=str(tmp_path), material="SrTiO3"),
                             materials=("SrTiO3",))
    assert real.schema_tolerance == {"label": (UNEXPECTED,)}
    with pytest.raises(ValueError, match="tolerated_anomalies\\['label'\\].*NO_SUCH_KIND"):
        synthetic.replace(tolerated_anomalies={"label": ("NO_SUCH_KIND",)})
    with pytest.raises(ValueError, match="schema_file"):
        synthetic.replace(schema_file=str(tmp_path / "missing.pbtxt"))
