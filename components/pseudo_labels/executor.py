"""Beam executor of PseudoLabeler: pseudo-label every example of every split, and score them.

The science is in lattice.py; this module only moves examples through it. The labeller sees
the image, and of its material only the contrast its substituents give (brighter or dimmer,
`components.materials.substitution_contrast`; either for a material the registry lacks).
mask_true is read afterwards, and only to score the pseudo-masks for the
report, so real micrographs (without it) get the same labels as synthetic ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
from threadpoolctl import ThreadpoolController
from tfx import types
from tfx.dsl.components.base import base_beam_executor
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils

from components import contract, materials, progress
from components.defects import DEFECT_CLASSES
from components.pseudo_labels import lattice

REPORT_FILE = "pseudo_label_quality.json"
STATUS_OK = "ok"
STATUS_NO_LATTICE = "no_lattice"
_NO_COUNTS = (0,) * len(DEFECT_CLASSES)


def parse_pseudo_label_config(text: str) -> lattice.PseudoLabelConfig:
    """PseudoLabelConfig from the component's JSON of field overrides."""
    options = json.loads(text)
    options.pop("code_fingerprint", None)  # only part of the cache key
    known = {field.name for field in dataclasses.fields(lattice.PseudoLabelConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"pseudo_label_config has unknown fields {unknown}; known: {sorted(known)}")
    return lattice.PseudoLabelConfig(**options)


@dataclasses.dataclass(frozen=True)
class Counts:
    """Tallies that add up over images: examples, how many got a lattice, and pixel
    tp, fp, fn per defect class over the examples that have mask_true."""

    examples: int = 0
    ok: int = 0
    with_truth: int = 0
    tp: Tuple[int, ...] = _NO_COUNTS
    fp: Tuple[int, ...] = _NO_COUNTS
    fn: Tuple[int, ...] = _NO_COUNTS

    def __add__(self, other: "Counts") -> "Counts":
        def add(mine, theirs):
            return tuple(a + b for a, b in zip(mine, theirs))

        return Counts(self.examples + other.examples, self.ok + other.ok,
                      self.with_truth + other.with_truth, add(self.tp, other.tp),
                      add(self.fp, other.fp), add(self.fn, other.fn))


def total(counts: Iterable[Counts]) -> Counts:
    return sum(counts, Counts())


class Labelled(NamedTuple):
    example: bytes  # the input example with the pseudo-label features added
    material: str
    counts: Counts  # this image's tallies


def _noise_without_lattice(image: np.ndarray) -> float:
    """The labeller's lattice-free noise estimate, so noise_sigma keeps its meaning; 1.0 for a
    noiseless constant image, so that deviation / noise_sigma (zero here) stays defined."""
    sigma = lattice.noise_level(image)
    return sigma if sigma > 0 else 1.0


# Beam runs one worker process per core; a BLAS library that also starts a thread per core
# for the labeller's small matrix operations oversubscribes them (86 against 126-154 ms per
# 256 x 256 image, measured while another job shared the 2 cores).
_BLAS = ThreadpoolController()


def label_example(serialized: bytes, config: lattice.PseudoLabelConfig) -> Labelled:
    """Adds the pseudo-label features to one serialized example; the others keep their bytes.

    An image without a lattice is kept: zero deviation, empty mask, status "no_lattice: why".
    """
    example = tf.train.Example.FromString(serialized)
    micrograph = contract.from_example(example)
    image = micrograph.image
    try:
        with _BLAS.limit(limits=1, user_api="blas"):
            labels = lattice.pseudo_labels(image, config,
                                           materials.substitution_contrast(micrograph.material))
        added = dict(deviation=labels.deviation, deviation_z=labels.z, mask_pseudo=labels.mask,
                     noise_sigma=labels.noise, pseudo_label_status=STATUS_OK)
    except ValueError as error:
        added = dict(deviation=np.zeros_like(image), deviation_z=np.zeros_like(image),
                     mask_pseudo=np.zeros((len(DEFECT_CLASSES),) + image.shape, contract.MASK_DTYPE),
                     noise_sigma=_noise_without_lattice(image),
                     pseudo_label_status=f"{STATUS_NO_LATTICE}: {error}")
    encoded = contract.to_example(dataclasses.replace(micrograph, **added)).features.feature
    for key in contract.PSEUDO_LABEL_KEYS:
        example.features.feature[key].CopyFrom(encoded[key])

    counts = Counts(examples=1, ok=int(added["pseudo_label_status"] == STATUS_OK))
    if micrograph.mask_true is not None:
        scores = lattice.quality(added["mask_pseudo"], micrograph.mask_true)
        counts = dataclasses.replace(
            counts, with_truth=1,
            **{kind: tuple(scores[name][kind] for name in DEFECT_CLASSES) for kind in ("tp", "fp", "fn")})
    # deterministic: map entries in key order, the same bytes on every run and runner
    return Labelled(example.SerializeToString(deterministic=True), micrograph.material, counts)


def _ratio(numerator: int, denominator: int) -> Optional[float]:
    """lattice.quality's convention (nothing to measure: nan), with JSON's null for nan."""
    return numerator / denominator if denominator else None


def summarise(counts: Counts) -> Dict[str, Any]:
    """Examples, lattice found, and pooled pixel scores per class (only with ground truth)."""
    summary = {
        "examples": counts.examples,
        "ok": counts.ok,
        "no_lattice": counts.examples - counts.ok,
        "examples_with_ground_truth": counts.with_truth,
    }
    if not counts.with_truth:
        summary["ground_truth"] = "absent"
        return summary
    summary["ground_truth"] = "present"
    summary["per_class"] = {
        name: {
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "iou": _ratio(tp, tp + fp + fn),
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }
        for name, tp, fp, fn in zip(DEFECT_CLASSES, counts.tp, counts.fp, counts.fn)
    }
    return summary


def build_report(totals: Dict[Tuple[str, str], Counts], split_names: Sequence[str]) -> Dict[str, Any]:
    """The report from tallies per (split, material): per split and overall, each by material."""

    def section(keys):
        materials = sorted({material for _, material in keys})
        by_material = {m: total(totals[k] for k in keys if k[1] == m) for m in materials}
        return dict(summarise(total(by_material.values())),
                    by_material={m: summarise(c) for m, c in by_material.items()})

    return {
        "splits": {split: section([k for k in totals if k[0] == split]) for split in split_names},
        "overall": section(list(totals)),
    }


class Executor(base_beam_executor.BaseBeamExecutor):

    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        config = parse_pseudo_label_config(exec_properties["pseudo_label_config"])
        source = artifact_utils.get_single_instance(input_dict["examples"])
        split_names = artifact_utils.decode_split_names(source.split_names)

        examples = artifact_utils.get_single_instance(output_dict["pseudo_labelled_examples"])
        examples.split_names = artifact_utils.encode_split_names(split_names)
        examples.set_string_custom_property(
            "payload_format", example_gen_pb2.PayloadFormat.Name(example_gen_pb2.FORMAT_TF_EXAMPLE))
        report = artifact_utils.get_single_instance(output_dict["report"])
        workers = progress.beam_worker_count(self._beam_pipeline_args)

        with self._make_beam_pipeline() as pipeline:
            sums = []
            for split in split_names:
                files = os.path.join(artifact_utils.get_split_uri([source], split), "*.gz")
                label = progress.Counted(label_example, f"PseudoLabeler [{split}]",
                                         progress.count_records(files), "images", workers)
                labelled = (
                    pipeline
                    | f"Read[{split}]" >> beam.io.ReadFromTFRecord(
                        files, compression_type=beam.io.filesystem.CompressionTypes.GZIP)
                    | f"Label[{split}]" >> beam.Map(label, config)
                )
                _ = (
                    labelled
                    | f"Examples[{split}]" >> beam.Map(lambda item: item.example)
                    | f"Write[{split}]" >> beam.io.WriteToTFRecord(
                        os.path.join(examples.uri, f"Split-{split}", "data_tfrecord"),
                        file_name_suffix=".gz",
                    )
                )
                sums.append(
                    labelled
                    | f"Tally[{split}]" >> beam.Map(
                        lambda item, split=split: ((split, item.material), item.counts))
                    | f"SumByMaterial[{split}]" >> beam.CombinePerKey(total)
                )
            # The splits' sums meet as side inputs, not through a Flatten, which lost elements
            # under the multi-process DirectRunner (components/clustering/executor.py).
            _ = (
                pipeline
                | "Once" >> beam.Create([None])
                | "Report" >> beam.Map(
                    lambda _, *per_split: json.dumps(build_report(
                        {key: counts for totals in per_split for key, counts in totals.items()},
                        split_names), indent=2),
                    *[beam.pvalue.AsDict(split_sums) for split_sums in sums])
                | "WriteReport" >> beam.io.WriteToText(
                    os.path.join(report.uri, REPORT_FILE), shard_name_template="", num_shards=1)
            )
