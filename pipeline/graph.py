"""create_pipeline(): the component graph, built from one PipelineConfig."""

from __future__ import annotations

import json
from typing import List, Optional

from ml_metadata.proto import metadata_store_pb2
from tfx import v1 as tfx

from components.synthesis.component import SyntheticStemGen
from pipeline.config import SCHEMA_DIR, PipelineConfig


def synthesis_config_json(config: PipelineConfig) -> str:
    return json.dumps({
        "materials": list(config.materials),
        "labels": list(config.labels),
        "split_tenths": list(config.split_tenths),
        "size": config.image_size,
        "pixel_size_pm": list(config.pixel_size_pm),
        "dose": list(config.dose),
    }, sort_keys=True)


def create_components(config: PipelineConfig) -> List:
    examples_gen = SyntheticStemGen(
        num_images=config.num_images,
        seed=config.seed,
        synthesis_config=synthesis_config_json(config),
    )
    statistics_gen = tfx.components.StatisticsGen(examples=examples_gen.outputs["examples"])
    schema_gen = tfx.components.ImportSchemaGen(schema_file=f"{SCHEMA_DIR}/schema.pbtxt")
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"],
        schema=schema_gen.outputs["schema"],
    )
    return [examples_gen, statistics_gen, schema_gen, example_validator]


def create_pipeline(config: PipelineConfig,
                    metadata_connection_config: Optional[metadata_store_pb2.ConnectionConfig] = None,
                    enable_cache: bool = True) -> tfx.dsl.Pipeline:
    if metadata_connection_config is None:
        metadata_connection_config = tfx.orchestration.metadata.sqlite_metadata_connection_config(
            config.metadata_path)
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=config.pipeline_root,
        components=create_components(config),
        enable_cache=enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(config.beam_pipeline_args),
    )
