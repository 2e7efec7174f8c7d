"""The compiled Kubeflow spec: same graph, the configured image, GPUs for the model steps only."""

import json

from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from kubeflow.runner import compile_pipeline
from pipeline.config import load_config


def test_compiled_spec_has_the_graph_image_and_gpu_requests(tmp_path):
    config = load_config("test", output_dir=str(tmp_path))
    path = compile_pipeline(config, str(tmp_path / "pipeline.json"))
    with open(path) as handle:
        job = json.load(handle)
    spec = json_format.ParseDict(job["pipelineSpec"], pipeline_spec_pb2.PipelineSpec(),
                                 ignore_unknown_fields=True)
    tasks = set(spec.root.dag.tasks)
    assert tasks == {"SyntheticStemGen", "PseudoLabeler", "StatisticsGen", "ImportSchemaGen",
                     "ExampleValidator", "SchemaGate", "Transform", "Trainer", "Evaluator", "Pusher",
                     "SegmenterTrainer", "SegmentationEvaluator", "SegmenterPusher",
                     "DefectClusterer",
                     "latest_blessed_model-model-resolver",
                     "latest_blessed_model-model-blessing-resolver"}
    assert set(spec.root.dag.tasks["Trainer"].dependent_tasks) == {"Transform", "ImportSchemaGen"}
    # Nothing trains before the SchemaGate has passed the data.
    for step in ("Transform", "SegmenterTrainer"):
        assert "SchemaGate" in spec.root.dag.tasks[step].dependent_tasks, step

    executors = job["pipelineSpec"]["deploymentSpec"]["executors"]
    containers = {name: e["container"] for name, e in executors.items() if "container" in e}
    assert {c["image"] for c in containers.values()} == {config.kubeflow.image}
    gpus = {name: c["resources"].get("accelerator") for name, c in containers.items()}
    gpu_steps = [name for name in gpus
                 if name.startswith(("Trainer", "SegmenterTrainer", "DefectClusterer"))]
    assert len(gpu_steps) == 3, gpus
    for step in gpu_steps:
        assert gpus.pop(step) == {"type": config.kubeflow.trainer_gpu_type,
                                     "count": str(config.kubeflow.trainer_gpu_count)}
    assert not any(gpus.values()), gpus
    assert job["runtimeConfig"]["gcsOutputDirectory"] == config.kubeflow.pipeline_root
