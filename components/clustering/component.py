"""DefectClusterer: groups micrographs by the U-Net's defect maps, without labels."""

from __future__ import annotations

from typing import Optional

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from components.clustering import executor


class DefectClusters(types.Artifact):
    """`clusters.json` (k per silhouette, agreement with known classes, cluster make-up),
    `assignments.csv` (every example's split, source and cluster), `descriptors.csv`, and the
    figures `silhouette.png`, `tsne.png`, `gallery.png`.

    Namespaced because Kubeflow V2 only accepts custom types as `namespace.Name`.
    """

    TYPE_NAME = "stem_defects.DefectClusters"


class DefectClustererSpec(types.ComponentSpec):
    PARAMETERS = {
        # JSON: ClusteringConfig fields to override, and an optional code_fingerprint.
        "clustering_config": ExecutionParameter(type=str),
    }
    INPUTS = {
        "model": ChannelParameter(type=standard_artifacts.Model),
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        # Only recorded in the report: the maps of a model that failed its gate are still
        # worth a look, but a reader should know.
        "model_blessing": ChannelParameter(type=standard_artifacts.ModelBlessing, optional=True),
    }
    OUTPUTS = {"clusters": ChannelParameter(type=DefectClusters)}


class DefectClusterer(base_beam_component.BaseBeamComponent):
    """Runs the segmentation model over the examples (Beam, batched), describes each image by
    its per-class maps and deviation map, and clusters the descriptors with k-means, k chosen
    by the silhouette score."""

    SPEC_CLASS = DefectClustererSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, model: types.BaseChannel, examples: types.BaseChannel,
                 clustering_config: str, model_blessing: Optional[types.BaseChannel] = None):
        super().__init__(spec=DefectClustererSpec(
            model=model,
            examples=examples,
            model_blessing=model_blessing,
            clustering_config=clustering_config,
            clusters=types.Channel(type=DefectClusters),
        ))
