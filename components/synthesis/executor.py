"""Beam executor of SyntheticStemGen: simulate in parallel, write split TFRecords.

Each image's random stream comes from (seed, index) alone, so the examples are the same
bytes whatever the runner or number of workers.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

import apache_beam as beam
from tfx import types
from tfx.dsl.components.base import base_beam_executor
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils

from components import contract, progress
from components.synthesis import simulator

SPLITS = ("train", "eval", "test")


def write_splits(keyed: beam.PCollection, examples_uri: str) -> None:
    """(split name, serialized example) pairs -> `Split-<name>/data_tfrecord-*.gz` under
    `examples_uri`, the layout of an Examples artifact."""
    parts = keyed | "Split" >> beam.Partition(lambda kv, _: SPLITS.index(kv[0]), len(SPLITS))
    for split, part in zip(SPLITS, parts):
        _ = (
            part
            | f"Values[{split}]" >> beam.Values()
            | f"Write[{split}]" >> beam.io.WriteToTFRecord(
                os.path.join(examples_uri, f"Split-{split}", "data_tfrecord"),
                file_name_suffix=".gz",
            )
        )


def split_pattern(split_tenths: Tuple[int, int, int]) -> Tuple[int, ...]:
    """Ten split indices in which every prefix is as close to the ratio as it can be.

    Each slot goes to the split furthest behind its share (ties to the smaller split), so
    even five images of a class give train, eval and test at least one each.
    """
    assigned = [0, 0, 0]
    pattern = []
    for slot in range(10):
        deficits = [tenths * (slot + 1) / 10 - done for tenths, done in zip(split_tenths, assigned)]
        split = max(range(3), key=lambda s: (round(deficits[s], 9), s))
        assigned[split] += 1
        pattern.append(split)
    return tuple(pattern)


def split_of(occurrence: int, pattern: Tuple[int, ...]) -> int:
    """Stratified split: the n-th image of each (material, label) pair takes slot n mod 10."""
    return pattern[occurrence % len(pattern)]


def parse_synthesis_config(text: str):
    """(materials, labels or None, split_tenths, SimulationConfig) from the component's JSON.

    labels None means every label that applies to each material.
    """
    # JSON has no tuples; SimulationConfig's ranges are tuples (and must stay hashable).
    options = {key: tuple(value) if isinstance(value, list) else value
               for key, value in json.loads(text).items()}
    options.pop("code_fingerprint", None)  # only part of the cache key
    materials = options.pop("materials")
    labels = options.pop("labels")
    split_tenths = options.pop("split_tenths")
    return materials, labels, split_tenths, simulator.SimulationConfig(**options)


def simulate_example(item: Tuple[int, str, str, int], seed: int,
                     config: "simulator.SimulationConfig") -> bytes:
    """One planned (index, material, label, occurrence) image as a serialized tf.Example."""
    index, material, label, _ = item
    simulated = simulator.simulate_image(material, label, simulator.seed_for(seed, index), config)
    micrograph = contract.Micrograph(
        image=simulated.image,
        material=material,
        label=label,
        pixel_size_pm=simulated.pixel_size_pm,
        source=f"synthetic:seed={seed}:index={index}",
        defect_classes=simulated.defect_classes,
        mask_true=simulated.mask,
        dose=simulated.dose,
    )
    return contract.to_example(micrograph).SerializeToString()


class Executor(base_beam_executor.BaseBeamExecutor):

    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        num_images = exec_properties["num_images"]
        seed = exec_properties["seed"]
        materials, labels, split_tenths, config = parse_synthesis_config(
            exec_properties["synthesis_config"])
        plan = simulator.plan_dataset(num_images, materials, seed, labels)
        pattern = split_pattern(split_tenths)

        examples = artifact_utils.get_single_instance(output_dict["examples"])
        examples.split_names = artifact_utils.encode_split_names(list(SPLITS))
        examples.set_string_custom_property(
            "payload_format", example_gen_pb2.PayloadFormat.Name(example_gen_pb2.FORMAT_TF_EXAMPLE))

        simulate = progress.Counted(
            lambda item: (SPLITS[split_of(item[3], pattern)], simulate_example(item, seed, config)),
            "SyntheticStemGen", len(plan), "images",
            progress.beam_worker_count(self._beam_pipeline_args))
        with self._make_beam_pipeline() as pipeline:
            keyed = (
                pipeline
                | "Plan" >> beam.Create(plan, reshuffle=True)
                | "Simulate" >> beam.Map(simulate)
            )
            write_splits(keyed, examples.uri)
