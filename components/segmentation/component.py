"""SegmentationEvaluator: scores the U-Net against pseudo-labels and ground truth, and gates it."""

from __future__ import annotations

from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from components.segmentation import executor


class SegmentationEvaluatorSpec(types.ComponentSpec):
    PARAMETERS = {
        # JSON: split, threshold (probability), min_iou (against the pseudo-labels, every
        # class the teacher marked), heatmap_images, and a code_fingerprint for the cache.
        "evaluation_config": ExecutionParameter(type=str),
    }
    INPUTS = {
        "model": ChannelParameter(type=standard_artifacts.Model),
        "examples": ChannelParameter(type=standard_artifacts.Examples),
    }
    OUTPUTS = {
        # segmentation_evaluation.json and heatmaps/*.png (the paper's Figures 2 and 3)
        "evaluation": ChannelParameter(type=standard_artifacts.ModelEvaluation),
        "blessing": ChannelParameter(type=standard_artifacts.ModelBlessing),
    }


class SegmentationEvaluator(base_component.BaseComponent):
    """Per-class IoU, F1, precision and recall of the student (against the pseudo-labels and
    the ground truth) beside the teacher's own (against the ground truth); blesses the model
    when every class reaches `min_iou` against the pseudo-labels."""

    SPEC_CLASS = SegmentationEvaluatorSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, model: types.BaseChannel, examples: types.BaseChannel,
                 evaluation_config: str):
        super().__init__(spec=SegmentationEvaluatorSpec(
            model=model,
            examples=examples,
            evaluation_config=evaluation_config,
            evaluation=types.Channel(type=standard_artifacts.ModelEvaluation),
            blessing=types.Channel(type=standard_artifacts.ModelBlessing),
        ))
