"""Transform module: decode, normalise and size micrographs; the label vocabulary from data.

Images of any size arrive as serialized float32 tensors. Each is cut to its central square
and resized by the same factor in both axes, so the lattice keeps its angles and the ratio
of its spacings (a stretch would turn SrTiO3's square cell into a rectangle). Intensities
are standardised per image: dose and detector gain differ from image to image and carry no
information about the defect class.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from typing import Any, Dict, Optional  # noqa: E402

import tensorflow as tf  # noqa: E402
import tensorflow_transform as tft  # noqa: E402

from components import contract  # noqa: E402

IMAGE_XF = "image_xf"
LABEL_XF = "label_xf"
LABEL_VOCABULARY = "label"
DEFAULT_INPUT_SIZE = 128
# custom_config key whose value changes with the module code, so that TFX's cache (which
# does not see code named by a dotted path) re-runs Transform and Trainer after an edit.
CODE_FINGERPRINT = "code_fingerprint"


def input_size(custom_config: Optional[Dict[str, Any]]) -> int:
    return int((custom_config or {}).get("input_size", DEFAULT_INPUT_SIZE))


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


def decode_images(serialized: tf.Tensor, size: int) -> tf.Tensor:
    """[batch, 1] serialized tensors -> [batch, size, size, 1] standardised float32."""

    def decode(one: tf.Tensor) -> tf.Tensor:
        image = tf.io.parse_tensor(one, out_type=tf.float32)
        return standardise(square_and_resize(image, size))

    return tf.map_fn(
        decode,
        tf.reshape(serialized, [-1]),
        fn_output_signature=tf.TensorSpec([size, size, 1], tf.float32),
    )


def preprocessing_fn(inputs: Dict[str, tf.Tensor], custom_config: Optional[Dict[str, Any]] = None):
    """TFX Transform entry point."""
    labels = tf.reshape(inputs[contract.LABEL], [-1])
    return {
        IMAGE_XF: decode_images(inputs[contract.IMAGE], input_size(custom_config)),
        LABEL_XF: tft.compute_and_apply_vocabulary(labels, vocab_filename=LABEL_VOCABULARY),
    }
