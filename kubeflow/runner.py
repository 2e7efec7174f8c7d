"""Compile the same graph for Kubeflow Pipelines (v2) with KubeflowV2DagRunner.

The trainers and the clusterer (which runs the U-Net over every image) ask for GPUs, every other step for CPU and memory, all from the config's
`kubeflow` settings. Module code is named by dotted paths, so nothing is uploaded at compile
time: the container image (kubeflow/Dockerfile) carries this project installed.

    python -m kubeflow.runner --output pipeline.json
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from kfp.pipeline_spec import pipeline_spec_pb2  # noqa: E402
from tfx import v1 as tfx  # noqa: E402
from tfx.dsl.components.base import base_component  # noqa: E402

from pipeline.config import PipelineConfig, load_config  # noqa: E402
from pipeline.graph import create_components  # noqa: E402

ResourceSpec = pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec
GPU_STEPS = ("Trainer", "SegmenterTrainer", "DefectClusterer")


def _resources(config: PipelineConfig, component_id: str) -> ResourceSpec:
    settings = config.kubeflow
    if component_id in GPU_STEPS:
        return ResourceSpec(
            cpu_limit=settings.trainer_cpu,
            memory_limit=_gigabytes(settings.trainer_memory),
            accelerator=ResourceSpec.AcceleratorConfig(
                type=settings.trainer_gpu_type, count=settings.trainer_gpu_count),
        )
    return ResourceSpec(cpu_limit=settings.step_cpu, memory_limit=_gigabytes(settings.step_memory))


def _gigabytes(text: str) -> float:
    if not text.endswith("G"):
        raise ValueError(f"memory must be given in gigabytes like '16G', got {text!r}")
    return float(text[:-1])


def compile_pipeline(config: PipelineConfig, output_path: str) -> str:
    """Write the PipelineJob JSON for `config` to `output_path` and return the path."""
    components = create_components(config)
    for component in components:
        if isinstance(component, base_component.BaseComponent):  # a resolver runs no container
            component.with_platform_config(_resources(config, component.id))
    pipeline = tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=config.kubeflow.pipeline_root,
        components=components,
        beam_pipeline_args=list(config.beam_pipeline_args),
    )
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(
            default_image=config.kubeflow.image),
        output_dir=os.path.dirname(os.path.abspath(output_path)),
        output_filename=os.path.basename(output_path),
    )
    runner.run(pipeline)
    return output_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="pipeline.json", help="PipelineJob JSON to write")
    parser.add_argument("--profile", default=None, help="config profile (default: $STEM_PROFILE or demo)")
    args = parser.parse_args()
    print(compile_pipeline(load_config(args.profile), args.output))


if __name__ == "__main__":
    main()
