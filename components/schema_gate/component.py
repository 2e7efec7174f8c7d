"""SchemaGate: stops the run after ExampleValidator when the examples violate the schema."""

from __future__ import annotations

from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from components.schema_gate import executor


class SchemaVerdict(types.Artifact):
    """`schema_verdict.json`: the anomalies let through (tolerated, or warnings only). Only a
    passing gate publishes one, so a run that has it had its data checked.

    Namespaced because Kubeflow V2 only accepts custom types as `namespace.Name`.
    """

    TYPE_NAME = "stem_defects.SchemaVerdict"


class SchemaGateSpec(types.ComponentSpec):
    PARAMETERS = {
        # JSON: {"tolerated": {feature: [anomaly kinds]}, "schema": where the schema came from}.
        "gate_config": ExecutionParameter(type=str),
    }
    INPUTS = {"anomalies": ChannelParameter(type=standard_artifacts.ExampleAnomalies)}
    OUTPUTS = {"verdict": ChannelParameter(type=SchemaVerdict)}


class SchemaGate(base_component.BaseComponent):
    """ExampleValidator records anomalies but stops nothing; this step fails (naming each
    feature and why) when an ERROR anomaly is not tolerated, and the trainers wait for it."""

    SPEC_CLASS = SchemaGateSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, anomalies: types.BaseChannel, gate_config: str):
        super().__init__(spec=SchemaGateSpec(
            anomalies=anomalies,
            gate_config=gate_config,
            verdict=types.Channel(type=SchemaVerdict),
        ))
