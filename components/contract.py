"""The data contract: one micrograph per tf.train.Example.

Every component writes and reads examples through this module, so synthetic and real images
look the same to everything downstream. Arrays are stored as serialized TensorProtos
(`tf.io.serialize_tensor` format): lossless, any size, and decodable inside a TF graph with
`tf.io.parse_tensor`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from components.defects import DEFECT_CLASSES

IMAGE = "image"
HEIGHT = "height"
WIDTH = "width"
PIXEL_SIZE_PM = "pixel_size_pm"
MATERIAL = "material"
LABEL = "label"
DEFECT_CLASSES_KEY = "defect_classes"
MASK_TRUE = "mask_true"
DOSE = "dose"
SOURCE = "source"
# Added by the pseudo-labeller (components/pseudo_labels), from the image alone.
DEVIATION = "deviation"
DEVIATION_Z = "deviation_z"
MASK_PSEUDO = "mask_pseudo"
NOISE_SIGMA = "noise_sigma"
PSEUDO_LABEL_STATUS = "pseudo_label_status"
PSEUDO_LABEL_KEYS = (DEVIATION, DEVIATION_Z, MASK_PSEUDO, NOISE_SIGMA, PSEUDO_LABEL_STATUS)
# Real micrographs only (components/micrographs): where a tile lies in its resampled frame,
# the source file's own pixel size, and where that pixel size came from.
TILE_ORIGIN = "tile_origin"
SOURCE_PIXEL_SIZE_PM = "source_pixel_size_pm"
PIXEL_SIZE_SOURCE = "pixel_size_source"
# The features that hold serialized arrays. The schema gives them `image_domain`, which makes
# TFDV count their bytes instead of collecting their distinct values (megabytes each).
ARRAY_FEATURES = (IMAGE, MASK_TRUE, DEVIATION, DEVIATION_Z, MASK_PSEUDO)
PIXEL_SIZE_SOURCES = ("metadata", "estimated", "fallback")

IMAGE_DTYPE = np.float32
MASK_DTYPE = np.uint8


@dataclasses.dataclass
class Micrograph:
    """One example of the contract, as NumPy arrays."""

    image: np.ndarray  # float32 (H, W)
    material: str
    label: str
    pixel_size_pm: float
    source: str
    defect_classes: Optional[np.ndarray] = None  # int64 multi-hot, len(DEFECT_CLASSES)
    mask_true: Optional[np.ndarray] = None  # uint8 (C, H, W), synthetic only
    dose: Optional[float] = None  # electrons per square angstrom, when known
    # Pseudo-labels, once the pseudo-labeller has run:
    deviation: Optional[np.ndarray] = None  # float32 (H, W): image minus its bulk lattice
    # float32 (H, W): the deviation filtered to the column shape, in units of the local noise
    deviation_z: Optional[np.ndarray] = None
    mask_pseudo: Optional[np.ndarray] = None  # uint8 (C, H, W), channels as mask_true
    noise_sigma: Optional[float] = None  # noise standard deviation of one pixel, image units
    pseudo_label_status: Optional[str] = None  # "ok", or "no_lattice: <reason>"
    # Real micrographs, cut from a file (components/micrographs):
    tile_origin: Optional[Tuple[int, int]] = None  # (row, col) of the tile in the resampled frame
    source_pixel_size_pm: Optional[float] = None  # the file's pixel size, before resampling
    pixel_size_source: Optional[str] = None  # one of PIXEL_SIZE_SOURCES


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _floats(values: Sequence[float]) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _ints(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def serialize_array(array: np.ndarray) -> bytes:
    """Same bytes as `tf.io.serialize_tensor`, without building a graph."""
    return tf.make_tensor_proto(array).SerializeToString()


def parse_array(data: bytes, dtype: np.dtype) -> np.ndarray:
    proto = tf.make_tensor_proto(np.zeros(0, dtype))  # right message type
    proto.ParseFromString(data)
    return tf.make_ndarray(proto).astype(dtype, copy=False)


def _check(micrograph: Micrograph) -> None:
    image = micrograph.image
    if image.ndim != 2:
        raise ValueError(f"{micrograph.source}: image must be 2-D, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{micrograph.source}: image contains NaN or infinite pixels")
    if not micrograph.pixel_size_pm > 0:
        raise ValueError(f"{micrograph.source}: pixel size must be positive, got {micrograph.pixel_size_pm}")
    expected = (len(DEFECT_CLASSES),) + image.shape
    for name in (MASK_TRUE, MASK_PSEUDO):
        mask = getattr(micrograph, name)
        if mask is not None and mask.shape != expected:
            raise ValueError(f"{micrograph.source}: {name}: mask shape {mask.shape}, expected {expected}")
    for name in (DEVIATION, DEVIATION_Z):
        deviation = getattr(micrograph, name)
        if deviation is not None and deviation.shape != image.shape:
            raise ValueError(
                f"{micrograph.source}: {name} shape {deviation.shape}, expected the image's {image.shape}")
    if micrograph.defect_classes is not None and len(micrograph.defect_classes) != len(DEFECT_CLASSES):
        raise ValueError(
            f"{micrograph.source}: defect_classes has {len(micrograph.defect_classes)} entries, "
            f"expected {len(DEFECT_CLASSES)} ({', '.join(DEFECT_CLASSES)})"
        )
    if micrograph.tile_origin is not None and (
            len(micrograph.tile_origin) != 2 or min(micrograph.tile_origin) < 0):
        raise ValueError(
            f"{micrograph.source}: tile_origin must be (row, col) >= 0, got {micrograph.tile_origin}")
    if micrograph.source_pixel_size_pm is not None and not micrograph.source_pixel_size_pm > 0:
        raise ValueError(f"{micrograph.source}: source_pixel_size_pm must be positive, "
                         f"got {micrograph.source_pixel_size_pm}")
    if micrograph.pixel_size_source not in (None,) + PIXEL_SIZE_SOURCES:
        raise ValueError(f"{micrograph.source}: pixel_size_source must be one of "
                         f"{', '.join(PIXEL_SIZE_SOURCES)}, got {micrograph.pixel_size_source!r}")


def to_example(micrograph: Micrograph) -> tf.train.Example:
    """Encode a micrograph; raises ValueError naming the source when it breaks the contract."""
    _check(micrograph)
    image = np.ascontiguousarray(micrograph.image, dtype=IMAGE_DTYPE)
    features = {
        IMAGE: _bytes(serialize_array(image)),
        HEIGHT: _ints([image.shape[0]]),
        WIDTH: _ints([image.shape[1]]),
        PIXEL_SIZE_PM: _floats([micrograph.pixel_size_pm]),
        MATERIAL: _bytes(micrograph.material.encode()),
        LABEL: _bytes(micrograph.label.encode()),
        SOURCE: _bytes(micrograph.source.encode()),
    }
    if micrograph.defect_classes is not None:
        features[DEFECT_CLASSES_KEY] = _ints(np.asarray(micrograph.defect_classes, np.int64))
    if micrograph.mask_true is not None:
        mask = np.ascontiguousarray(micrograph.mask_true, dtype=MASK_DTYPE)
        features[MASK_TRUE] = _bytes(serialize_array(mask))
    if micrograph.dose is not None:
        features[DOSE] = _floats([micrograph.dose])
    for name in (DEVIATION, DEVIATION_Z):
        if getattr(micrograph, name) is not None:
            deviation = np.ascontiguousarray(getattr(micrograph, name), dtype=IMAGE_DTYPE)
            features[name] = _bytes(serialize_array(deviation))
    if micrograph.mask_pseudo is not None:
        mask = np.ascontiguousarray(micrograph.mask_pseudo, dtype=MASK_DTYPE)
        features[MASK_PSEUDO] = _bytes(serialize_array(mask))
    if micrograph.noise_sigma is not None:
        features[NOISE_SIGMA] = _floats([micrograph.noise_sigma])
    if micrograph.pseudo_label_status is not None:
        features[PSEUDO_LABEL_STATUS] = _bytes(micrograph.pseudo_label_status.encode())
    if micrograph.tile_origin is not None:
        features[TILE_ORIGIN] = _ints([int(v) for v in micrograph.tile_origin])
    if micrograph.source_pixel_size_pm is not None:
        features[SOURCE_PIXEL_SIZE_PM] = _floats([micrograph.source_pixel_size_pm])
    if micrograph.pixel_size_source is not None:
        features[PIXEL_SIZE_SOURCE] = _bytes(micrograph.pixel_size_source.encode())
    return tf.train.Example(features=tf.train.Features(feature=features))


def from_example(example: tf.train.Example | bytes) -> Micrograph:
    """Decode an example written by `to_example` (or a serialized one)."""
    if isinstance(example, bytes):
        example = tf.train.Example.FromString(example)
    feature = example.features.feature

    def first_bytes(key: str) -> bytes:
        return feature[key].bytes_list.value[0]

    image = parse_array(first_bytes(IMAGE), IMAGE_DTYPE)
    return Micrograph(
        image=image,
        material=first_bytes(MATERIAL).decode(),
        label=first_bytes(LABEL).decode(),
        pixel_size_pm=feature[PIXEL_SIZE_PM].float_list.value[0],
        source=first_bytes(SOURCE).decode(),
        defect_classes=(
            np.array(feature[DEFECT_CLASSES_KEY].int64_list.value, np.int64)
            if DEFECT_CLASSES_KEY in feature
            else None
        ),
        mask_true=parse_array(first_bytes(MASK_TRUE), MASK_DTYPE) if MASK_TRUE in feature else None,
        dose=feature[DOSE].float_list.value[0] if DOSE in feature else None,
        deviation=parse_array(first_bytes(DEVIATION), IMAGE_DTYPE) if DEVIATION in feature else None,
        deviation_z=(
            parse_array(first_bytes(DEVIATION_Z), IMAGE_DTYPE) if DEVIATION_Z in feature else None
        ),
        mask_pseudo=(
            parse_array(first_bytes(MASK_PSEUDO), MASK_DTYPE) if MASK_PSEUDO in feature else None
        ),
        noise_sigma=feature[NOISE_SIGMA].float_list.value[0] if NOISE_SIGMA in feature else None,
        pseudo_label_status=(
            first_bytes(PSEUDO_LABEL_STATUS).decode() if PSEUDO_LABEL_STATUS in feature else None
        ),
        tile_origin=(
            tuple(int(v) for v in feature[TILE_ORIGIN].int64_list.value)
            if TILE_ORIGIN in feature else None
        ),
        source_pixel_size_pm=(
            feature[SOURCE_PIXEL_SIZE_PM].float_list.value[0]
            if SOURCE_PIXEL_SIZE_PM in feature else None
        ),
        pixel_size_source=(
            first_bytes(PIXEL_SIZE_SOURCE).decode() if PIXEL_SIZE_SOURCE in feature else None
        ),
    )
