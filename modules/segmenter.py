"""Trainer module: a U-Net that segments defects, trained on the pseudo-labeller's masks only.

The teacher (components/pseudo_labels) marks defect pixels from the image alone; this
student learns to do the same from the standardised image, one sigmoid output channel per
defect class (the channel order of `components.defects.DEFECT_CLASSES`, as in every mask).
It is trained on `mask_pseudo` and never reads `mask_true`: the ground truth is kept for
scoring (`mask_scores`), which is what makes the comparison of student and teacher against
it honest.

The Trainer reads the PseudoLabeler's examples directly (GZIP TFRecords of the data
contract, `components/contract.py`), without Transform: the masks are C x H x W per image
and would make the transformed examples huge, and the tiling below is random per epoch.

- Input: the image standardised per image (`modules.transform.standardise`), whole, at its
  native pixel size (the masks are never resized).
- Training: the image's central square is cut to a random `tile_size` tile, rotated by a
  random multiple of 90 degrees and mirrored at random; the mask is cut and turned with the
  image, so every one of these is label-preserving. Validation uses the central tile. An
  image smaller than the tile is padded with zeros (the standardised mean).
- Examples whose `pseudo_label_status` is not "ok" (no lattice found: an all-empty mask
  that means "unknown", not "no defect") are skipped unless `skip_no_lattice` is False.
- Loss: weighted binary cross-entropy (defect pixels weighted by `positive_weight`) plus
  `dice_weight` x (1 - soft Dice), Dice averaged over classes and pooled over the batch; a
  class absent from the batch has a well-defined Dice thanks to a smoothing term.
- The network is fully convolutional: it takes images of any height and width divisible by
  2**depth. The exported signatures pad each image up to such a size and crop the answer.

Exported signatures (see `_signatures`):
- `serving_default`: `examples` [N] tf.string serialized tf.Examples (only `image` is read)
  -> `probabilities` [N, H, W, C] float32. The examples of one call must hold images of the
  same size (they are stacked into one batch).
- `serving_images`: `images` [N, H, W] float32 raw (unstandardised) images
  -> `probabilities` [N, H, W, C] float32.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
from typing import Any, Dict, Optional, Sequence, Union  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from components import contract  # noqa: E402
from components.defects import DEFECT_CLASSES  # noqa: E402
from components.pseudo_labels import lattice  # noqa: E402
from modules import plots  # noqa: E402
from modules.transform import config_options, standardise  # noqa: E402

PROBABILITIES = "probabilities"
IMAGE_INPUT = "image"  # the Keras model's input: [N, H, W, 1] standardised images
SERVING_EXAMPLES = "examples"
SERVING_IMAGES = "images"
PSEUDO_LABEL_OK = "ok"  # components/pseudo_labels/executor.STATUS_OK
DICE_SMOOTH = 1.0
BCE_EPSILON = 1e-7


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """U-Net size and training settings; `from_custom_config` reads the Trainer's custom_config."""

    tile_size: int = 128  # training and validation tiles, pixels; divisible by 2**depth
    base_filters: int = 16  # filters of the first level; doubled at every level down
    depth: int = 3  # number of 2x poolings
    epochs: int = 25
    batch_size: int = 16
    learning_rate: float = 1e-3
    dice_weight: float = 1.0
    positive_weight: float = 5.0  # BCE weight of a defect pixel (background: 1)
    shuffle_buffer: int = 256  # decoded images held for shuffling in training
    skip_no_lattice: bool = True  # leave out examples the pseudo-labeller found no lattice in

    def __post_init__(self):
        for name in ("tile_size", "base_filters", "depth", "epochs", "batch_size", "shuffle_buffer"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"segmenter option {name} must be a positive integer, "
                                 f"got {getattr(self, name)!r}")
        for name in ("learning_rate", "positive_weight"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"segmenter option {name} must be positive, got {getattr(self, name)!r}")
        if not float(self.dice_weight) >= 0:
            raise ValueError(f"segmenter option dice_weight must be >= 0, got {self.dice_weight!r}")
        if self.tile_size % (2 ** self.depth):
            raise ValueError(f"tile_size {self.tile_size} is not divisible by 2**depth = "
                             f"{2 ** self.depth}")

    @property
    def multiple(self) -> int:
        """Heights and widths the network takes are multiples of this."""
        return 2 ** self.depth

    @classmethod
    def from_custom_config(cls, custom_config: Optional[Dict[str, Any]]) -> "SegmenterConfig":
        return cls(**config_options(cls, custom_config, "segmenter"))


# ---------------------------------------------------------------------------------------
# Model and loss


def _conv_block(x, filters: int, name: str):
    for i in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def bce_dice_loss(positive_weight: float = 5.0, dice_weight: float = 1.0):
    """loss(y_true, y_pred) on [N, H, W, C] masks and sigmoid outputs -> one scalar per batch.

    Weighted binary cross-entropy (mean over pixels and classes, defect pixels weighted by
    `positive_weight`) plus `dice_weight` x mean over classes of (1 - soft Dice), Dice pooled
    over the batch's pixels: (2 sum(y p) + s) / (sum(y) + sum(p) + s) with s = DICE_SMOOTH,
    so a class absent from the batch scores 1 when nothing is predicted for it and is never
    a division by zero.
    """
    positive_weight = float(positive_weight)
    dice_weight = float(dice_weight)

    def bce_dice(y_true, y_pred):
        y_true = tf.cast(y_true, tf.float32)
        y_pred = tf.cast(y_pred, tf.float32)
        p = tf.clip_by_value(y_pred, BCE_EPSILON, 1.0 - BCE_EPSILON)
        bce = -tf.reduce_mean(positive_weight * y_true * tf.math.log(p)
                              + (1.0 - y_true) * tf.math.log(1.0 - p))
        axes = tf.range(tf.rank(y_pred) - 1)  # every axis but the class channel
        intersection = tf.reduce_sum(y_true * y_pred, axis=axes)
        total = tf.reduce_sum(y_true, axis=axes) + tf.reduce_sum(y_pred, axis=axes)
        dice = (2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
        return bce + dice_weight * tf.reduce_mean(1.0 - dice)

    return bce_dice


def build_unet(num_classes: int, config: SegmenterConfig = SegmenterConfig()) -> keras.Model:
    """U-Net: (conv-BN-ReLU) x 2 per level, max-pool down, transposed conv up, skip
    concatenation, a 1x1 sigmoid convolution with one channel per class; compiled.

    Input [N, H, W, 1] (named "image"), any H and W divisible by 2**config.depth (otherwise
    the skip concatenation fails); output [N, H, W, num_classes] named "probabilities".
    """
    inputs = keras.Input((None, None, 1), name=IMAGE_INPUT)
    x = inputs
    skips = []
    for level in range(config.depth):
        x = _conv_block(x, config.base_filters * 2 ** level, f"down{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _conv_block(x, config.base_filters * 2 ** config.depth, "bottom")
    for level in reversed(range(config.depth)):
        filters = config.base_filters * 2 ** level
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"up{level}")(x)
        x = keras.layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = _conv_block(x, filters, f"dec{level}")
    outputs = keras.layers.Conv2D(num_classes, 1, activation="sigmoid", dtype="float32",
                                  name=PROBABILITIES)(x)
    model = keras.Model(inputs, outputs, name="unet")
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=bce_dice_loss(config.positive_weight, config.dice_weight),
        metrics=[keras.metrics.Precision(thresholds=0.5, name="precision"),
                 keras.metrics.Recall(thresholds=0.5, name="recall"),
                 keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.5, name="iou")],
    )
    return model


# ---------------------------------------------------------------------------------------
# Data


def parse_example(serialized: tf.Tensor):
    """One serialized contract example -> (image [H, W, 1] standardised float32,
    mask [H, W, C] uint8 from `mask_pseudo`, usable: pseudo_label_status == "ok").

    Reads `image`, `mask_pseudo` and `pseudo_label_status` only; `mask_true` is never parsed.
    """
    features = tf.io.parse_single_example(serialized, {
        contract.IMAGE: tf.io.FixedLenFeature([], tf.string),
        contract.MASK_PSEUDO: tf.io.FixedLenFeature([], tf.string),
        contract.PSEUDO_LABEL_STATUS: tf.io.FixedLenFeature([], tf.string, default_value=PSEUDO_LABEL_OK),
    })
    image = tf.ensure_shape(tf.io.parse_tensor(features[contract.IMAGE], tf.float32), [None, None])
    mask = tf.io.parse_tensor(features[contract.MASK_PSEUDO], tf.uint8)
    mask = tf.ensure_shape(mask, [len(DEFECT_CLASSES), None, None])
    mask = tf.transpose(mask, [1, 2, 0])
    usable = tf.equal(features[contract.PSEUDO_LABEL_STATUS], PSEUDO_LABEL_OK)
    return standardise(image[..., tf.newaxis]), mask, usable


def cut_tile(image: tf.Tensor, mask: tf.Tensor, tile: int, training: bool):
    """(image [H, W, 1], mask [H, W, C]) -> ([tile, tile, 1], [tile, tile, C] float32).

    The central square of the image; in training a random tile of it, turned by a random
    multiple of 90 degrees and mirrored at random (image and mask together); otherwise its
    central tile. Zero-padded (centred) where the square is smaller than the tile.
    """
    channels = len(DEFECT_CLASSES)
    stack = tf.concat([tf.cast(image, tf.float32), tf.cast(mask, tf.float32)], axis=-1)
    stack = tf.ensure_shape(stack, [None, None, 1 + channels])
    side = tf.minimum(tf.shape(stack)[0], tf.shape(stack)[1])
    if training:
        side = tf.maximum(side, tile)
        square = tf.image.resize_with_crop_or_pad(stack, side, side)
        stack = tf.image.random_crop(square, [tile, tile, 1 + channels])
        stack = tf.image.rot90(stack, tf.random.uniform([], 0, 4, tf.int32))
        stack = tf.image.random_flip_left_right(stack)
    else:
        square = tf.image.resize_with_crop_or_pad(stack, side, side)
        stack = tf.image.resize_with_crop_or_pad(square, tile, tile)
    stack = tf.ensure_shape(stack, [tile, tile, 1 + channels])
    return stack[..., :1], stack[..., 1:]


def decode_example(serialized: tf.Tensor, tile: int, training: bool):
    """One serialized example -> (image tile [tile, tile, 1], pseudo-mask tile [tile, tile, C])."""
    image, mask, _ = parse_example(serialized)
    return cut_tile(image, mask, tile, training)


def _files(file_pattern: Union[str, Sequence[str]]) -> list:
    patterns = [file_pattern] if isinstance(file_pattern, str) else list(file_pattern)
    files = sorted({path for pattern in patterns for path in tf.io.gfile.glob(pattern)})
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {patterns}")
    return files


def make_dataset(file_pattern: Union[str, Sequence[str]], config: SegmenterConfig,
                 training: bool) -> tf.data.Dataset:
    """Batches of (image [B, tile, tile, 1], pseudo-mask [B, tile, tile, C]) from GZIP
    TFRecords of contract examples (a glob pattern or a list of them, as TFX's
    fn_args.train_files); shuffled, randomly tiled and augmented when training."""
    files = _files(file_pattern)
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if training:
        dataset = dataset.shuffle(len(files))
    dataset = tf.data.TFRecordDataset(dataset, compression_type="GZIP")
    dataset = dataset.map(parse_example, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=not training)
    if config.skip_no_lattice:
        dataset = dataset.filter(lambda image, mask, usable: usable)
    if training:
        dataset = dataset.shuffle(config.shuffle_buffer, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda image, mask, usable: cut_tile(image, mask, config.tile_size, training),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
    return dataset.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------
# Export


def predict_images(model: keras.Model, images: tf.Tensor, multiple: int) -> tf.Tensor:
    """Raw images [N, H, W] -> probabilities [N, H, W, C]: each image standardised, padded
    with zeros at the bottom and right to a multiple of `multiple`, the answer cropped back."""
    images = tf.cast(images, tf.float32)
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    x = tf.map_fn(standardise, images[..., tf.newaxis])
    x = tf.pad(x, [[0, 0], [0, (-height) % multiple], [0, (-width) % multiple], [0, 0]])
    return model(x, training=False)[:, :height, :width, :]


def _signatures(model: keras.Model, config: SegmenterConfig) -> Dict[str, Any]:
    multiple = config.multiple

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=SERVING_EXAMPLES)])
    def serve(serialized):
        features = tf.io.parse_example(
            serialized, {contract.IMAGE: tf.io.FixedLenFeature([], tf.string)})
        images = tf.map_fn(lambda data: tf.io.parse_tensor(data, tf.float32), features[contract.IMAGE],
                           fn_output_signature=tf.TensorSpec([None, None], tf.float32))
        return {PROBABILITIES: predict_images(model, images, multiple)}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name=SERVING_IMAGES)])
    def serve_images(images):
        return {PROBABILITIES: predict_images(model, images, multiple)}

    return {"serving_default": serve, "serving_images": serve_images}


def run_fn(fn_args) -> None:
    """TFX Trainer entry point (reads the PseudoLabeler's examples; no Transform)."""
    config = SegmenterConfig.from_custom_config(fn_args.custom_config)
    train = make_dataset(fn_args.train_files, config, training=True)
    validation = make_dataset(fn_args.eval_files, config, training=False)
    model = build_unet(len(DEFECT_CLASSES), config)
    history = model.fit(train, validation_data=validation, epochs=config.epochs, verbose=2)

    model.save(fn_args.serving_model_dir, save_format="tf", signatures=_signatures(model, config))
    os.makedirs(fn_args.model_run_dir, exist_ok=True)
    record = dict(history.history, config=[dataclasses.asdict(config)], classes=[list(DEFECT_CLASSES)])
    with open(os.path.join(fn_args.model_run_dir, "history.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    plots.training_curves(
        history.history, os.path.join(fn_args.model_run_dir, "training_curves.png"),
        title=(f"U-Net segmenter (depth {config.depth}, {config.base_filters} filters, "
               f"{config.tile_size} px tiles) on pseudo-labels"))


# ---------------------------------------------------------------------------------------
# Scoring


def mask_scores(probabilities, masks, threshold: float = 0.5) -> dict:
    """Pixel scores of thresholded probabilities against masks, per defect class.

    `probabilities`: the model's layout, [N, H, W, C] or [H, W, C] (channels last);
    `masks`: the contract's layout, [N, C, H, W] or [C, H, W] (channels first: `mask_true`
    or `mask_pseudo`). A pixel is predicted where its probability is above `threshold`.
    Returns `lattice.quality`'s dict (precision, recall, iou, tp, fp, fn per class, pooled
    over the images) with `f1` = 2PR / (P + R) added: nan where P or R is nan, 0 where both
    are 0.
    """
    predicted = np.moveaxis(np.asarray(probabilities) > threshold, -1, -3)
    masks = np.asarray(masks)
    if predicted.shape != masks.shape:
        raise ValueError(
            f"probabilities {np.shape(probabilities)} (channels last) do not match masks "
            f"{masks.shape} (channels first, as the contract stores them)")
    scores = lattice.quality(predicted, masks)
    for entry in scores.values():
        p, r = entry["precision"], entry["recall"]
        entry["f1"] = (float("nan") if np.isnan(p) or np.isnan(r)
                       else (2 * p * r / (p + r) if p + r else 0.0))
    return scores
