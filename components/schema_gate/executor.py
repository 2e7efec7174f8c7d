"""Reads ExampleValidator's anomalies per split and applies components/schema_gate/verdict.py."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Dict, List

from absl import logging
from tfx import types
from tfx.dsl.components.base import base_executor
from tfx.types import artifact_utils

from components.schema_gate.verdict import Anomaly, blocking, stop_message

VERDICT_FILE = "schema_verdict.json"


class SchemaViolation(RuntimeError):
    """The examples break the schema in a way the configuration does not tolerate."""


def read_anomalies(anomalies_uri: str) -> List[Anomaly]:
    """Every feature anomaly of every split of an ExampleAnomalies artifact."""
    from tensorflow_data_validation.utils import anomalies_util
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    found = []
    for split_dir in sorted(glob.glob(os.path.join(anomalies_uri, "Split-*"))):
        split = os.path.basename(split_dir)[len("Split-"):]
        anomalies = anomalies_util.load_anomalies_binary(os.path.join(split_dir, "SchemaDiff.pb"))
        for feature, info in sorted(anomalies.anomaly_info.items()):
            found.append(Anomaly(
                split=split, feature=feature,
                kinds=tuple(anomalies_pb2.AnomalyInfo.Type.Name(reason.type) for reason in info.reason),
                severity=anomalies_pb2.AnomalyInfo.Severity.Name(info.severity),
                short_description=info.short_description, description=info.description))
    return found


class Executor(base_executor.BaseExecutor):

    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        options = json.loads(exec_properties["gate_config"])
        anomalies_uri = artifact_utils.get_single_instance(input_dict["anomalies"]).uri
        if not glob.glob(os.path.join(anomalies_uri, "Split-*")):
            raise SchemaViolation(f"{anomalies_uri}: ExampleValidator wrote no split to check")
        anomalies = read_anomalies(anomalies_uri)
        blocked = blocking(anomalies, options["tolerated"])
        if blocked:
            raise SchemaViolation(stop_message(blocked, options["schema"]))
        for anomaly in anomalies:
            logging.warning("SchemaGate: let through (%s): %s", anomaly.severity, anomaly.line())
        verdict = artifact_utils.get_single_instance(output_dict["verdict"])
        with open(os.path.join(verdict.uri, VERDICT_FILE), "w") as handle:
            json.dump({"passed": True, "schema": options["schema"],
                       "let_through": [dataclasses.asdict(a) for a in anomalies]}, handle, indent=1)
