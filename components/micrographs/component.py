"""MicrographExampleGen: a Beam component that turns a folder of microscope files into examples."""

from __future__ import annotations

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from components.micrographs import executor


class QuarantineReport(types.Artifact):
    """`quarantine.json` and `quarantine.csv`: every file set aside with its reason, the
    counts, and the pixel sizes estimated from the lattice. An artifact, not a log line, so
    the lineage of a model shows which files its data left out.

    Namespaced because Kubeflow V2 only accepts custom types as `namespace.Name`.
    """

    TYPE_NAME = "stem_defects.QuarantineReport"


class MicrographExampleGenSpec(types.ComponentSpec):
    PARAMETERS = {
        # JSON of executor.MicrographConfig, plus optional cache keys (executor.CACHE_KEYS).
        "micrograph_config": ExecutionParameter(type=str),
    }
    INPUTS = {}
    OUTPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "quarantine": ChannelParameter(type=QuarantineReport),
    }


class MicrographExampleGen(base_beam_component.BaseBeamComponent):
    """Examples of the data contract from .dm3/.dm4/.emd/.ser/.tif/.png files under a folder,
    tiled at the pipeline's pixel size, in splits `train`, `eval`, `test` by source file (a
    .ser's TIA .emi is reported as its companion).

    The configuration is checked here, so a bad one stops the pipeline's construction with a
    message naming the field, not a run halfway.
    """

    SPEC_CLASS = MicrographExampleGenSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, micrograph_config: str):
        executor.MicrographConfig.from_json(micrograph_config)
        spec = MicrographExampleGenSpec(
            micrograph_config=micrograph_config,
            examples=types.Channel(type=standard_artifacts.Examples),
            quarantine=types.Channel(type=QuarantineReport),
        )
        super().__init__(spec=spec)
