"""What a person looks at after a run: the latest artifacts in ML Metadata and figures."""

from __future__ import annotations

import glob
import os
from typing import Dict, Iterator, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tensorflow as tf  # noqa: E402
from ml_metadata import metadata_store  # noqa: E402
from ml_metadata.proto import metadata_store_pb2  # noqa: E402

from components import contract  # noqa: E402
from components.defects import DEFECT_CLASSES  # noqa: E402


def open_store(metadata_path: str) -> metadata_store.MetadataStore:
    if not os.path.exists(metadata_path):
        raise FileNotFoundError(f"no ML Metadata database at {metadata_path}: has the pipeline run?")
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return metadata_store.MetadataStore(config)


def latest_artifacts(store: metadata_store.MetadataStore) -> Dict[str, metadata_store_pb2.Artifact]:
    """The newest LIVE artifact of each type, by type name (Examples, ExampleStatistics, ...)."""
    latest: Dict[str, metadata_store_pb2.Artifact] = {}
    types = {t.id: t.name for t in store.get_artifact_types()}
    for artifact in store.get_artifacts():
        if artifact.state != metadata_store_pb2.Artifact.LIVE:
            continue
        name = types[artifact.type_id]
        if name not in latest or artifact.create_time_since_epoch >= latest[name].create_time_since_epoch:
            latest[name] = artifact
    return latest


def read_split(examples_uri: str, split: str) -> Iterator[contract.Micrograph]:
    files = sorted(glob.glob(os.path.join(examples_uri, f"Split-{split}", "*")))
    if not files:
        raise FileNotFoundError(f"no files for split {split!r} under {examples_uri}")
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        yield contract.from_example(record.numpy())


def pick_one_per_class(micrographs: Iterator[contract.Micrograph]) -> List[contract.Micrograph]:
    """The first micrograph of each (material, label), sorted for a stable sheet."""
    chosen: Dict[tuple, contract.Micrograph] = {}
    for micrograph in micrographs:
        chosen.setdefault((micrograph.material, micrograph.label), micrograph)
    return [chosen[key] for key in sorted(chosen)]


def write_example_sheet(micrographs: List[contract.Micrograph], path: str) -> str:
    """One row per material and class: the image, then the image with its mask outlined."""
    rows = len(micrographs)
    fig, axes = plt.subplots(rows, 2, figsize=(6.4, 3.0 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for row, micrograph in enumerate(micrographs):
        image = micrograph.image
        field_nm = image.shape[1] * micrograph.pixel_size_pm / 1000
        dose = f", {micrograph.dose:.0f} e/Å²" if micrograph.dose else ""
        axes[row, 0].imshow(image, cmap="gray")
        axes[row, 0].set_title(f"{micrograph.material}: {micrograph.label}\n"
                               f"{field_nm:.1f} nm field{dose}", fontsize=9)
        axes[row, 1].imshow(image, cmap="gray")
        handles = []
        if micrograph.mask_true is not None:
            for channel, name in enumerate(DEFECT_CLASSES):
                if micrograph.mask_true[channel].any():
                    colour = colours(channel)
                    axes[row, 1].contour(micrograph.mask_true[channel], levels=[0.5], colors=[colour],
                                         linewidths=1.5)
                    handles.append(plt.Line2D([], [], color=colour, label=name))
        axes[row, 1].set_title("ground-truth mask" if handles else "no defect", fontsize=9)
        if handles:
            axes[row, 1].legend(handles=handles, loc="lower right", fontsize=7)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def anomalies_summary(anomalies_uri: str) -> List[str]:
    """One line per split: 'no anomalies' or the anomalous features and their reasons."""
    from tensorflow_data_validation.utils import anomalies_util

    lines = []
    for split_dir in sorted(glob.glob(os.path.join(anomalies_uri, "Split-*"))):
        split = os.path.basename(split_dir)[len("Split-"):]
        anomalies = anomalies_util.load_anomalies_binary(os.path.join(split_dir, "SchemaDiff.pb"))
        if not anomalies.anomaly_info:
            lines.append(f"{split}: no anomalies")
        for feature, info in sorted(anomalies.anomaly_info.items()):
            lines.append(f"{split}: {feature}: {info.short_description} ({info.description})")
    return lines


def artifact_uri(artifacts: Dict[str, metadata_store_pb2.Artifact], type_name: str) -> Optional[str]:
    artifact = artifacts.get(type_name)
    return artifact.uri if artifact else None

