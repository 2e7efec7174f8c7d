"""SyntheticStemGen: a Beam component that writes simulated HAADF-STEM examples."""

from __future__ import annotations

from typing import Optional

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from components.synthesis import executor


class SyntheticStemGenSpec(types.ComponentSpec):
    PARAMETERS = {
        "num_images": ExecutionParameter(type=int),
        "seed": ExecutionParameter(type=int),
        # JSON: materials, labels, split_tenths and the simulator's SimulationConfig fields.
        "synthesis_config": ExecutionParameter(type=str),
    }
    INPUTS = {}
    OUTPUTS = {"examples": ChannelParameter(type=standard_artifacts.Examples)}


class SyntheticStemGen(base_beam_component.BaseBeamComponent):
    """Generates `num_images` labelled micrographs, reproducibly from `seed`.

    Output splits are `train`, `eval` and `test`, stratified by material and label.
    """

    SPEC_CLASS = SyntheticStemGenSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, num_images: int, seed: int, synthesis_config: str,
                 examples: Optional[types.Channel] = None):
        spec = SyntheticStemGenSpec(
            num_images=num_images,
            seed=seed,
            synthesis_config=synthesis_config,
            examples=examples or types.Channel(type=standard_artifacts.Examples),
        )
        super().__init__(spec=spec)
