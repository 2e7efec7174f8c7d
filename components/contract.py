"""The data contract: one micrograph per tf.train.Example.

Every component writes and reads examples through this module, so synthetic and real images
look the same to everything downstream. Arrays are stored as serialized TensorProtos
(`tf.io.serialize_tensor` format): lossless, any size, and decodable inside a TF graph with
`tf.io.parse_tensor`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

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
    if micrograph.mask_true is not None:
        expected = (len(DEFECT_CLASSES),) + image.shape
        if micrograph.mask_true.shape != expected:
            raise ValueError(
                f"{micrograph.source}: mask shape {micrograph.mask_true.shape}, expected {expected}"
            )
    if micrograph.defect_classes is not None and len(micrograph.defect_classes) != len(DEFECT_CLASSES):
        raise ValueError(
            f"{micrograph.source}: defect_classes has {len(micrograph.defect_classes)} entries, "
            f"expected {len(DEFECT_CLASSES)} ({', '.join(DEFECT_CLASSES)})"
        )


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
    )
