"""Transform module: the classifier's input channels, sized; the label vocabulary from data.

Images of any size arrive as serialized float32 tensors. Each is cut to its central square
and resized by the same factor in both axes, so the lattice keeps its angles and the ratio
of its spacings (a stretch would turn SrTiO3's square cell into a rectangle).

The backbone's three input channels are drawn from two maps of the same micrograph:
- `image`: the intensities, standardised per image (dose and detector gain differ from image
  to image and carry no information about the defect class);
- `deviation_z`: the pseudo-labeller's deviation from the bulk lattice in units of the
  image's own noise (components/pseudo_labels), clipped at +-`DEVIATION_CLIP` sigma and
  scaled to about unit range. A defect is one column among hundreds; in the raw image it is
  a needle a small network must learn to find, in the deviation map it is the brightest or
  darkest spot, so the same network learns from far fewer images.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import dataclasses  # noqa: E402
import math  # noqa: E402
from typing import Any, Dict, Optional, Sequence  # noqa: E402

import tensorflow as tf  # noqa: E402
import tensorflow_transform as tft  # noqa: E402

from components import contract  # noqa: E402
from components.defects import DEFECT_CLASSES  # noqa: E402

IMAGE_XF = "image_xf"
TEACHER_XF = "teacher_xf"
LABEL_XF = "label_xf"
LABEL_VOCABULARY = "label"
DEFAULT_INPUT_SIZE = 128
# Sources of the backbone's three channels, and the default choice.
CHANNEL_SOURCES = {"image": contract.IMAGE, "deviation_z": contract.DEVIATION_Z}
DEFAULT_CHANNELS = ("deviation_z", "deviation_z", "deviation_z")
DEVIATION_CLIP = 15.0  # noise sigmas; beyond this a defect is a defect
DEVIATION_SCALE = 5.0
DEFAULT_TEACHER_FEATURES = True
# Area fractions are log-scaled so that one marked column (~1e-3 of a 256 x 256 frame) and a
# band across the image (~0.1) both land in (0, 1]: log1p(scale * f) / log1p(scale).
TEACHER_AREA_SCALE = 1e4
TEACHER_SIZE = 2 * len(DEFECT_CLASSES)  # per class: scaled area, presence
# custom_config key whose value changes with the module code, so that TFX's cache (which
# does not see code named by a dotted path) re-runs Transform and Trainer after an edit.
CODE_FINGERPRINT = "code_fingerprint"


def config_options(config_class, custom_config: Optional[Dict[str, Any]], what: str) -> Dict[str, Any]:
    """A Trainer's custom_config as keyword arguments of `config_class`: the cache-only code
    fingerprint left out, unknown keys refused by name."""
    options = dict(custom_config or {})
    options.pop(CODE_FINGERPRINT, None)
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {what} options {unknown}; known: {sorted(known)}")
    return options


def input_size(custom_config: Optional[Dict[str, Any]]) -> int:
    return int((custom_config or {}).get("input_size", DEFAULT_INPUT_SIZE))


def input_channels(custom_config: Optional[Dict[str, Any]]) -> tuple:
    channels = tuple((custom_config or {}).get("input_channels", DEFAULT_CHANNELS))
    unknown = sorted(set(channels) - set(CHANNEL_SOURCES))
    if len(channels) != 3 or unknown:
        raise ValueError(f"input_channels must be three of {sorted(CHANNEL_SOURCES)}, got {channels}")
    return channels


def teacher_features(custom_config: Optional[Dict[str, Any]]) -> bool:
    value = (custom_config or {}).get("teacher_features", DEFAULT_TEACHER_FEATURES)
    if not isinstance(value, bool):
        raise ValueError(f"teacher_features must be true or false, got {value!r}")
    return value


def square_and_resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """(H, W) -> (size, size, 1): central square crop, then an isotropic resize."""
    image = tf.ensure_shape(image, [None, None])
    side = tf.minimum(tf.shape(image)[0], tf.shape(image)[1])
    square = tf.image.resize_with_crop_or_pad(image[..., tf.newaxis], side, side)
    # Antialiased bilinear: a low-pass filter when shrinking (shot noise does not alias),
    # plain interpolation when enlarging a small patch.
    resized = tf.image.resize(square, [size, size], method="bilinear", antialias=True)
    return tf.ensure_shape(resized, [size, size, 1])


def standardise(image: tf.Tensor) -> tf.Tensor:
    mean, variance = tf.nn.moments(image, axes=[0, 1, 2])
    return (image - mean) / tf.sqrt(variance + 1e-6)


def scale_deviation(deviation_z: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(deviation_z, -DEVIATION_CLIP, DEVIATION_CLIP) / DEVIATION_SCALE


def model_input(maps: Dict[str, tf.Tensor], size: int, channels: Sequence[str]) -> tf.Tensor:
    """{source: (H, W) map} of one micrograph -> (size, size, 3) backbone input."""
    prepared = {}
    if "image" in channels:
        prepared["image"] = standardise(square_and_resize(maps["image"], size))
    if "deviation_z" in channels:
        prepared["deviation_z"] = scale_deviation(square_and_resize(maps["deviation_z"], size))
    return tf.concat([prepared[name] for name in channels], axis=-1)


def decode_inputs(features: Dict[str, tf.Tensor], size: int, channels: Sequence[str]) -> tf.Tensor:
    """{feature: [batch, 1] serialized tensors} -> [batch, size, size, 3] float32."""
    sources = sorted({CHANNEL_SOURCES[name] for name in channels})
    names = {CHANNEL_SOURCES[name]: name for name in channels}

    def decode(serialized):
        maps = {names[key]: tf.io.parse_tensor(one, out_type=tf.float32)
                for key, one in zip(sources, serialized)}
        return model_input(maps, size, channels)

    return tf.map_fn(
        decode,
        tuple(tf.reshape(features[key], [-1]) for key in sources),
        fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
    )


def teacher_vector(mask: tf.Tensor) -> tf.Tensor:
    """[..., C, H, W] mask_pseudo (any dtype, nonzero = marked) -> [..., 2C] float32: per
    class the log-scaled marked fraction of the image, then per class its presence (0/1)."""
    marked = tf.cast(tf.not_equal(mask, tf.zeros([], mask.dtype)), tf.float32)
    fraction = tf.reduce_mean(marked, axis=[-2, -1])
    area = tf.math.log1p(TEACHER_AREA_SCALE * fraction) / math.log1p(TEACHER_AREA_SCALE)
    presence = tf.cast(fraction > 0, tf.float32)
    return tf.concat([area, presence], axis=-1)


def decode_teacher(features: Dict[str, tf.Tensor]) -> tf.Tensor:
    """{mask_pseudo: [batch, 1] serialized uint8 (C, H, W) tensors} -> [batch, TEACHER_SIZE]."""

    def decode(serialized):
        mask = tf.ensure_shape(tf.io.parse_tensor(serialized, out_type=tf.uint8),
                               [len(DEFECT_CLASSES), None, None])
        return teacher_vector(mask)

    return tf.map_fn(decode, tf.reshape(features[contract.MASK_PSEUDO], [-1]),
                     fn_output_signature=tf.TensorSpec([TEACHER_SIZE], tf.float32))


def preprocessing_fn(inputs: Dict[str, tf.Tensor], custom_config: Optional[Dict[str, Any]] = None):
    """TFX Transform entry point."""
    labels = tf.reshape(inputs[contract.LABEL], [-1])
    outputs = {
        IMAGE_XF: decode_inputs(inputs, input_size(custom_config), input_channels(custom_config)),
        LABEL_XF: tft.compute_and_apply_vocabulary(labels, vocab_filename=LABEL_VOCABULARY),
    }
    if teacher_features(custom_config):
        outputs[TEACHER_XF] = decode_teacher(inputs)
    return outputs
