"""Beam executor of DefectClusterer: maps -> descriptors (Beam, batched) -> k-means -> report.

The science is in descriptors.py, grouping.py and figures.py (no TFX there). This module
runs the segmentation model over every example of the chosen splits in Beam workers (each
loads the SavedModel once), turns each image's maps and deviation map into one descriptor
vector, then gathers the vectors, in a fixed order, for the clustering: k-means is one
global step and runs in the executor itself.

Every row keeps its example's split and `source`, so a cluster member leads back to its
micrograph; the examples artifact it came from is this execution's input in ML Metadata.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
from tfx import types
from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils
from tfx.utils import path_utils

from components import contract, progress
from components.clustering import descriptors, figures, grouping
from components.defects import DEFECT_CLASSES
from components.pseudo_labels.executor import STATUS_OK
from components.segmentation.executor import read_split
from components.segmentation import serving

REPORT_FILE = "clusters.json"
ASSIGNMENTS_FILE = "assignments.csv"
DESCRIPTORS_FILE = "descriptors.csv"
SILHOUETTE_FIGURE = "silhouette.png"
TSNE_FIGURE = "tsne.png"
GALLERY_FIGURE = "gallery.png"
ROW_KEYS = ("split", "source", "material", "label")
# Labels that mean "class not known": no agreement scores against them.
UNKNOWN_LABELS = ("", "unknown", "unlabelled")


@dataclasses.dataclass(frozen=True)
class ClusteringConfig:
    """What to cluster and how; the component's JSON overrides these fields."""

    splits: Tuple[str, ...] = ("train", "eval", "test")
    threshold: float = 0.5  # probability above which a pixel counts as defect
    k_min: int = 2
    k_max: int = 12
    outlier_clip: Optional[float] = grouping.OUTLIER_CLIP  # standardised units; None: no clip
    seed: int = 0
    silhouette_sample: int = 10_000  # silhouette on at most this many descriptors per k
    minibatch_above: int = grouping.MINIBATCH_ABOVE  # mini-batch k-means above this many rows
    tsne_sample: int = 5_000  # t-SNE on at most this many descriptors
    gallery_per_cluster: int = 4
    batch_size: int = 16  # images per model call

    def __post_init__(self):
        if not self.splits or not all(isinstance(s, str) and s for s in self.splits):
            raise ValueError(f"clustering splits must be split names, got {self.splits!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"clustering threshold must lie in (0, 1), got {self.threshold!r}")
        if self.outlier_clip is not None and not float(self.outlier_clip) > 0:
            raise ValueError(f"clustering outlier_clip must be a positive number of standard "
                             f"deviations or null, got {self.outlier_clip!r}")
        if not 2 <= int(self.k_min) <= int(self.k_max):
            raise ValueError(f"clustering needs 2 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        for name in ("silhouette_sample", "minibatch_above", "tsne_sample",
                     "gallery_per_cluster", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"clustering option {name} must be a positive integer, "
                                 f"got {getattr(self, name)!r}")

    @classmethod
    def from_options(cls, options: Dict[str, Any]) -> "ClusteringConfig":
        """From a dict of field overrides (the pipeline config's `clustering`)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown clustering options {unknown}; known: {sorted(known)}")
        options = dict(options)
        if "splits" in options:
            options["splits"] = tuple(options["splits"])
        return cls(**options)


def parse_clustering_config(text: str) -> ClusteringConfig:
    """ClusteringConfig from the component's JSON; unknown fields are refused by name."""
    options = json.loads(text)
    options.pop("code_fingerprint", None)  # only part of the cache key
    return ClusteringConfig.from_options(options)


class DescribeFn(beam.DoFn):
    """(split, serialized example) batches -> one row per example with its descriptor.

    The model is loaded once per worker; images of one shape go through it together.
    """

    def __init__(self, model_dir: str, threshold: float):
        self._model_dir = model_dir
        self._threshold = threshold
        self._predict = None

    def setup(self):
        self._predict = tf.saved_model.load(self._model_dir).signatures[serving.IMAGES_SIGNATURE]

    def process(self, batch: Sequence[Tuple[str, bytes]]) -> Iterable[Dict[str, Any]]:
        by_shape = collections.defaultdict(list)
        for split, serialized in batch:
            micrograph = contract.from_example(serialized)
            by_shape[micrograph.image.shape].append((split, micrograph))
        for group in by_shape.values():
            images = np.stack([micrograph.image for _, micrograph in group])
            deviations = [micrograph.deviation_z for _, micrograph in group]
            arguments = serving.signature_arguments(
                self._predict, images, None if any(d is None for d in deviations) else np.stack(deviations),
                source=group[0][1].source)
            maps = self._predict(**arguments)[serving.PROBABILITIES].numpy()  # [N, H, W, C]
            for (split, micrograph), probabilities in zip(group, maps):
                # An image without a lattice has an all-zero deviation map that means "none".
                deviation = (micrograph.deviation_z if micrograph.pseudo_label_status == STATUS_OK
                             else None)
                vector = descriptors.describe(
                    np.moveaxis(probabilities, -1, 0), deviation, DEFECT_CLASSES,
                    threshold=self._threshold, pixel_size_pm=micrograph.pixel_size_pm)
                yield dict(split=split, source=micrograph.source, material=micrograph.material,
                           label=micrograph.label, descriptor=[float(v) for v in vector])


def read_keyed_by_split(pipeline: beam.Pipeline, files: Dict[str, str]) -> beam.PCollection:
    """(split, serialized example) of every record of the splits' GZIP TFRecord `files`
    (split -> file pattern), through one ReadAllFromTFRecord. A Flatten of one read per split
    lost records under the multi-processing DirectRunner (Beam 2.61) with full-size images:
    1,587 to 1,828 of 2,000 paper-profile examples arrived, a different number each run."""
    split_of_folder = {os.path.normpath(os.path.dirname(pattern)): split
                       for split, pattern in files.items()}
    return (
        pipeline
        | "SplitFiles" >> beam.Create(sorted(files.values()))
        | "Read" >> beam.io.ReadAllFromTFRecord(
            compression_type=beam.io.filesystem.CompressionTypes.GZIP, with_filename=True)
        | "KeyBySplit" >> beam.Map(lambda item, folders=split_of_folder: (
            folders[os.path.normpath(os.path.dirname(item[0]))], item[1]))
    )


def _read_rows(directory: str) -> List[Dict[str, Any]]:
    """The Beam step's rows in a fixed order (split, source): the clustering and its files
    do not depend on how many workers ran or in which order they finished."""
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "rows*"))):
        with open(path) as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    return sorted(rows, key=lambda row: (row["split"], row["source"]))


def _write_csv(path: str, header: Sequence[str], lines: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(lines)


def composition(rows: Sequence[Dict[str, Any]], clusters: np.ndarray) -> Dict[str, Any]:
    """Per cluster: size, and how many members of each label and material it holds."""
    summary = {}
    for cluster in sorted(set(int(c) for c in clusters)):
        members = [row for row, c in zip(rows, clusters) if c == cluster]
        summary[str(cluster)] = {
            "size": len(members),
            "labels": dict(collections.Counter(row["label"] for row in members).most_common()),
            "materials": dict(collections.Counter(row["material"] for row in members).most_common()),
        }
    return summary


def _gallery_images(examples: types.Artifact, wanted: Dict[Tuple[str, str], None]
                    ) -> Dict[Tuple[str, str], np.ndarray]:
    """The images of the (split, source) pairs in `wanted`, read in one pass per split."""
    return {(split, micrograph.source): micrograph.image
            for split in sorted({split for split, _ in wanted})
            for micrograph in read_split(examples, split) if (split, micrograph.source) in wanted}


class Executor(base_beam_executor.BaseBeamExecutor):

    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        config = parse_clustering_config(exec_properties["clustering_config"])
        model = artifact_utils.get_single_instance(input_dict["model"])
        examples = artifact_utils.get_single_instance(input_dict["examples"])
        clusters = artifact_utils.get_single_instance(output_dict["clusters"])
        blessings = input_dict.get("model_blessing") or []

        available = artifact_utils.decode_split_names(examples.split_names)
        missing = sorted(set(config.splits) - set(available))
        if missing:
            raise ValueError(f"clustering splits {missing} are not in the examples at "
                             f"{examples.uri} (splits: {available})")
        model_dir = path_utils.serving_model_path(model.uri, path_utils.is_old_model_artifact(model))
        rows_dir = os.path.join(self._get_tmp_dir(), "descriptor_rows")
        files = {split: os.path.join(artifact_utils.get_split_uri([examples], split), "*.gz")
                 for split in config.splits}
        expected = sum(map(progress.count_records, files.values()))
        # Counted as each image's row leaves the U-Net step, in the same worker.
        to_json = progress.Counted(json.dumps, "DefectClusterer (U-Net maps)", expected, "images",
                                   progress.beam_worker_count(self._beam_pipeline_args))

        with self._make_beam_pipeline() as pipeline:
            _ = (
                read_keyed_by_split(pipeline, files)
                | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=config.batch_size)
                | "Describe" >> beam.ParDo(DescribeFn(model_dir, config.threshold))
                | "ToJson" >> beam.Map(to_json)
                | "WriteRows" >> beam.io.WriteToText(os.path.join(rows_dir, "rows"))
            )
        rows = _read_rows(rows_dir)
        if len(rows) != expected:
            raise RuntimeError(f"the Beam step described {len(rows)} of the {expected} examples in "
                               f"splits {list(config.splits)} of {examples.uri}; refusing to "
                               f"cluster a partial set")
        if len(rows) <= config.k_min:
            raise ValueError(f"{len(rows)} examples in splits {list(config.splits)} of "
                             f"{examples.uri}: too few to cluster into k >= {config.k_min} groups")
        names = descriptors.descriptor_names(DEFECT_CLASSES)
        matrix = np.array([row["descriptor"] for row in rows], dtype=np.float64)

        result = grouping.cluster(matrix, k_range=(config.k_min, config.k_max), seed=config.seed,
                                  silhouette_sample=config.silhouette_sample,
                                  minibatch_above=config.minibatch_above, clip=config.outlier_clip)
        labels = [row["label"] for row in rows]
        labelled = all(label not in UNKNOWN_LABELS for label in labels)
        standardised, _, _ = grouping.standardise(matrix, config.outlier_clip)
        sample, coords = grouping.embed(standardised, seed=config.seed, sample=config.tsne_sample)

        out = clusters.uri
        _write_csv(os.path.join(out, DESCRIPTORS_FILE), ROW_KEYS + tuple(names),
                   ([row[key] for key in ROW_KEYS] + row["descriptor"] for row in rows))
        _write_csv(os.path.join(out, ASSIGNMENTS_FILE), ROW_KEYS + ("cluster", "distance_to_center"),
                   ([row[key] for key in ROW_KEYS] + [int(c), float(d)]
                    for row, c, d in zip(rows, result.labels, result.distance_to_center)))
        figures.silhouette_figure(result.k_values, result.silhouette, result.chosen_k,
                                  os.path.join(out, SILHOUETTE_FIGURE), inertia=result.inertia)
        figures.tsne_figure(coords, np.asarray(result.labels)[sample], os.path.join(out, TSNE_FIGURE),
                            true_labels=[labels[i] for i in sample] if labelled else None)
        nearest = grouping.nearest_to_centers(result, per_cluster=config.gallery_per_cluster)
        wanted = {(rows[i]["split"], rows[i]["source"]): None for members in nearest.values()
                  for i in members}
        images = _gallery_images(examples, wanted)
        figures.gallery_figure(
            {cluster: [images[(rows[i]["split"], rows[i]["source"])] for i in members]
             for cluster, members in nearest.items()},
            os.path.join(out, GALLERY_FIGURE),
            captions={cluster: [f"{rows[i]['material']} {rows[i]['label']}" for i in members]
                      for cluster, members in nearest.items()})

        report = dict(
            result.to_dict(),
            examples=len(rows), splits=list(config.splits), descriptor_names=names,
            config=dataclasses.asdict(config), tsne_sample=int(len(sample)),
            tsne_perplexity=grouping.effective_perplexity(len(sample)),
            clusters=composition(rows, np.asarray(result.labels)),
            agreement_with_labels=(grouping.agreement(labels, result.labels) if labelled
                                   else "labels unknown: not scored"),
            model_blessed=(bool(blessings[0].get_int_custom_property("blessed"))
                           if blessings else None),
        )
        with open(os.path.join(out, REPORT_FILE), "w") as handle:
            json.dump(report, handle, indent=1)
