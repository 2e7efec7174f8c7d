"""PseudoLabeler: a Beam component that adds lattice pseudo-labels to every example."""

from __future__ import annotations

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from components.pseudo_labels import executor


class PseudoLabelReport(types.Artifact):
    """`pseudo_label_quality.json`: examples labelled per split, and the pseudo-masks'
    pixel precision, recall and IoU against mask_true where it exists.

    No standard artifact fits (ModelEvaluation and ExampleStatistics have fixed formats).
    The name has a namespace because Kubeflow V2 only accepts custom types as
    `namespace.Name`.
    """

    TYPE_NAME = "stem_defects.PseudoLabelReport"


class PseudoLabelerSpec(types.ComponentSpec):
    PARAMETERS = {
        # JSON: PseudoLabelConfig fields to override, and an optional code_fingerprint.
        "pseudo_label_config": ExecutionParameter(type=str),
    }
    INPUTS = {"examples": ChannelParameter(type=standard_artifacts.Examples)}
    # TFX forbids an output with an input's name, hence not plain `examples`.
    OUTPUTS = {
        "pseudo_labelled_examples": ChannelParameter(type=standard_artifacts.Examples),
        "report": ChannelParameter(type=PseudoLabelReport),
    }


class PseudoLabeler(base_beam_component.BaseBeamComponent):
    """Adds `deviation`, `deviation_z`, `mask_pseudo`, `noise_sigma` and `pseudo_label_status` to every
    example, from its image alone; the splits and every other feature stay as they were.
    """

    SPEC_CLASS = PseudoLabelerSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, examples: types.BaseChannel, pseudo_label_config: str):
        spec = PseudoLabelerSpec(
            examples=examples,
            pseudo_label_config=pseudo_label_config,
            pseudo_labelled_examples=types.Channel(type=standard_artifacts.Examples),
            report=types.Channel(type=PseudoLabelReport),
        )
        super().__init__(spec=spec)
