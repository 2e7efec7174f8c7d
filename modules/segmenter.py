"""Trainer module: a U-Net that segments defects, trained on the pseudo-labeller's masks only.

The teacher (components/pseudo_labels) marks defect pixels from the image alone; this
student learns to do the same from the standardised image and the teacher's evidence, one
sigmoid output channel per defect class (the channel order of
`components.defects.DEFECT_CLASSES`, as in every mask).
It is trained on `mask_pseudo` and never reads `mask_true`: the ground truth is kept for
scoring (`mask_scores`), which is what makes the comparison of student and teacher against
it honest.

The Trainer reads the PseudoLabeler's examples directly (GZIP TFRecords of the data
contract, `components/contract.py`), without Transform: the masks are C x H x W per image
and would make the transformed examples huge, and the tiling below is random per epoch.

- Input (`inputs`): the image standardised per image (`modules.transform.standardise`) and
  the teacher's `deviation_z` (the image minus its fitted bulk lattice, in noise sigmas;
  clipped and scaled as the classifier's), whole, at their native pixel size (the masks are
  never resized). Both come from the image alone, so the student still learns only from what
  a microscope gives; the deviation map shows a point defect as the brightest or darkest spot
  of the frame instead of one column in hundreds, which the image alone did not teach in the
  demo's budget (IoU 0.00 for every point class with the image alone, 0.64 / 0.63 / 0.31 for
  vacancies, substitutions and interstitials with both, in 12 epochs on 336 images).
- Training: `tiles_per_image` random `tile_size` tiles are cut from every image's central
  square per epoch, a share `defect_tile_fraction` of them centred on a pixel the teacher
  marked (of a class drawn evenly from those the image holds: point defects cover 1e-4 of
  an image), each rotated by a random multiple of 90 degrees and mirrored at random; the
  mask is cut and turned with the image, so every one of these is label-preserving.
  Validation uses the central tile. An image smaller than the tile is padded with zeros
  (the standardised mean). The learning rate decays along a cosine over the epochs. A
  channel still silent on every validation pixel it should mark after a third of the
  epochs sends training back to the start with the next seed (`dead_channel_retries`).
- Examples whose `pseudo_label_status` is not "ok" (no lattice found: an all-empty mask
  that means "unknown", not "no defect") are skipped unless `skip_no_lattice` is False.
- Loss: weighted binary cross-entropy (defect pixels weighted by `positive_weight`) plus
  `dice_weight` x (1 - soft Dice), Dice pooled over the batch and averaged over the classes
  the batch's masks mark (an absent class's Dice would only reward predicting nothing, and
  at full weight: that drove every output to 0). The output starts at `prior_probability`.
- Contrast split (`contrast_split`, default substitutions): a class whose defects can be
  brighter or dimmer than the bulk column is trained as two channels, its marks split by
  the sign of the deviation map around them (`contrast_targets`), and served as the larger
  of the two (`JoinContrasts`). With one channel, the seed-777 benchmark's student learnt
  one contrast and never marked the other (model seed 1: CdTe's dimmer substitutions IoU
  0.00; model seed 0: SrTiO3's brighter ones 0.00): a dim column pulls the shared feature
  towards "vacancy", a bright one away from it.
- Network: with `input_stride` 2 the U-Net sees the image averaged over 2 x 2 pixels (the
  probe is several pixels wide, so little is lost) and its answer is enlarged back.
- The network is fully convolutional: it takes images of any height and width divisible by
  `input_stride` x 2**depth. The exported signatures pad each image up to such a size and
  crop the answer, and serve the mean of the answers to `test_time_views` turned and
  mirrored views of it (`predict`), each turned back, with the planar classes' marks
  narrower than `planar_min_width` removed (`open_planar`).

Exported signatures (see `_signatures`):
- `serving_default`: `examples` [N] tf.string serialized tf.Examples (`image`, and
  `deviation_z` when an input: examples through the PseudoLabeler) -> `probabilities`
  [N, H, W, C] float32. The examples of one call must hold images of the same size (they
  are stacked into one batch).
- `serving_images`: `images` [N, H, W] float32 raw (unstandardised) images, each
  standardised by itself (and `deviation_z` [N, H, W], the teacher's map of the same images,
  when an input) -> `probabilities` [N, H, W, C] float32. `components.segmentation.serving
  .signature_arguments` builds the arguments a given export takes.
- `serving_standardised`: `images` [N, H, W] float32 already standardised (the model's own
  input, as training sees it; `deviation_z` as above) -> `probabilities` [N, H, W, C]
  float32. For tiles of a larger frame (`components/segmentation/tiling.py`): the frame is
  standardised once as a whole, as a training image is before it is tiled; `serving_images`
  would scale every tile by its own statistics instead, so overlapping tiles would disagree
  about the same pixels.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
from typing import Any, Dict, Optional, Sequence, Tuple, Union  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from components import contract  # noqa: E402
from components.defects import DEFECT_CLASSES, PLANAR_CLASSES  # noqa: E402
from components.progress import log_line  # noqa: E402
from components.pseudo_labels import lattice  # noqa: E402
from components.segmentation import serving  # noqa: E402
from components.segmentation.serving import PROBABILITIES  # noqa: E402
from modules import plots  # noqa: E402
from modules.progress_callback import EpochProgress  # noqa: E402
from modules.transform import CHANNEL_SOURCES, config_options, scale_deviation, standardise  # noqa: E402

IMAGE_INPUT = "image"  # the Keras model's input: [N, H, W, len(inputs)]
DEVIATION_INPUT = serving.DEVIATION
PSEUDO_LABEL_OK = "ok"  # components/pseudo_labels/executor.STATUS_OK
CHANNEL_PROBABILITIES = "channel_probabilities"  # the sigmoid layer before JoinContrasts
CONTRAST_WINDOW = 5  # pixels; a point defect's mark is a disc of about 3 pixels' radius
DICE_SMOOTH = 1.0
VIEW_COUNTS = (1, 4, 8)  # test_time_views: as given, the 90-degree rotations, and mirrored
# How a model trained before these serving options existed was served: one view, no opening.
SERVED_BEFORE_OPTIONS = {"test_time_views": 1, "planar_min_width": 0}
BCE_EPSILON = 1e-7


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """U-Net size and training settings; `from_custom_config` reads the Trainer's custom_config."""

    tile_size: int = 128  # training and validation tiles, pixels; divisible by `multiple`
    base_filters: int = 16  # filters of the first level; doubled at every level down
    depth: int = 3  # number of 2x poolings
    # The image is averaged over input_stride x input_stride pixels before the U-Net and its
    # answer enlarged back (bilinear): the probe blurs over several pixels (sigma about 2 at
    # 20 pm), so 2 loses almost nothing, makes every step 4 times cheaper and doubles what a
    # pixel of the answer sees (a planar defect is a long band).
    input_stride: int = 2
    epochs: int = 25
    batch_size: int = 32
    learning_rate: float = 3e-3  # at the start; decays along a cosine over the epochs
    dice_weight: float = 1.0
    positive_weight: float = 3.0  # BCE weight of a defect pixel (background: 1)
    shuffle_buffer: int = 256  # decoded images (and as many tiles) held for shuffling
    skip_no_lattice: bool = True  # leave out examples the pseudo-labeller found no lattice in
    tiles_per_image: int = 8  # random training tiles cut from every image per epoch
    defect_tile_fraction: float = 0.5  # share of training tiles centred on a pseudo-defect
    prior_probability: float = 0.01  # the sigmoid's starting output (defect pixels are rare)
    seed: int = 0  # weights, file order, shuffles and tiles: the same seed, the same model
    # A small student can lose a rare channel early and never get it back, depending on
    # its seed: on the seed-6262 benchmark data, model seed 0 never marked one SrTiO3
    # substitution (IoU 0.00 against the teacher's 0.78); restarted from seed 1, 0.79.
    # So after a third of the epochs (`dead_channel_epoch`) every output channel with marks
    # on the validation tiles must have marked at least one of them; if one has not,
    # training starts again from seed + 1, at most this many times (the last attempt always
    # runs to the end). history.json lists the attempts. 0: never. Silent is not always dead
    # (seed 1 there had two channels silent after epoch 8 that came back later), so a
    # restart can be spent on a channel that is only late.
    dead_channel_retries: int = 1
    # The network's input channels, named as the classifier's (modules.transform
    # .CHANNEL_SOURCES): the image, and the teacher's own
    # evidence (its deviation from the bulk lattice in noise sigmas). From the image alone a
    # point defect is one column in hundreds and the demo's budget learns none of them.
    inputs: Tuple[str, ...] = ("image", DEVIATION_INPUT)
    # Classes whose marks are split by contrast for training: a column brighter than the
    # bulk and one dimmer (SrTiO3's La/Nb substitutions against CdTe's Zn/Se ones) each get
    # an output channel of their own, and the class's probability is the larger of the two.
    # One channel for both contrasts learnt only one of them (which one, by the model seed).
    # Keeping all marks in the class's own channel beside a dimmer one, or beside a brighter
    # and a dimmer one, lost a whole material's substitutions too (README, the A/B above the
    # paper results). The sign comes from the teacher's deviation map, which must then be
    # an input.
    contrast_split: Tuple[str, ...] = ("substitution",)
    # The served probability is the mean of the network's answers over this many views of
    # the input, each turned back (`predict`): 1 as given, 4 the four 90-degree rotations,
    # 8 these and their mirror images. Training turns tiles the same ways, yet a small
    # student answers each view a little differently, and the mean is better than any one:
    # on the paper run's test split 4 views raised the IoU against the truth by 0.05
    # (substitution), 0.08 (interstitial), 0.02 (stacking fault) and lowered none by more
    # than 0.003; 8 added at most 0.014 more but took a 4096 x 4096 frame from 46 to 67 s,
    # over the 60 s target (benchmarks/segmentation_views.py, README).
    test_time_views: int = 4
    # The served probabilities of the planar classes (`components.defects.PLANAR_CLASSES`)
    # are opened over a square this many pixels wide (`open_planar`: a minimum filter, then
    # a maximum filter), which removes any mark narrower than it and keeps wider ones. A
    # fault's band is 20-30 pixels wide, a point defect's mark about 7, and the small
    # student's stacking-fault channel also fires on bright point defects: on the paper
    # run's test split (4 views) 9 raised stacking faults from 0.836 to 0.864 (false pixels
    # 14,311 -> 7,982) and twin boundaries from 0.701 to 0.705 (7 to 15 gave 0.862-0.864).
    # Odd, so the square is centred; 0: no opening.
    planar_min_width: int = 9

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))  # a JSON list, as a tuple
        object.__setattr__(self, "contrast_split", tuple(self.contrast_split))
        unknown = [name for name in self.contrast_split if name not in DEFECT_CLASSES]
        if unknown or len(set(self.contrast_split)) != len(self.contrast_split):
            raise ValueError(f"segmenter option contrast_split must be distinct names from "
                             f"{', '.join(DEFECT_CLASSES)}, got {list(self.contrast_split)!r}")
        if self.contrast_split and DEVIATION_INPUT not in self.inputs:
            raise ValueError(f"segmenter option contrast_split {list(self.contrast_split)!r} needs "
                             f"{DEVIATION_INPUT!r} among the inputs (the sign of a mark's "
                             f"contrast is read from it); set contrast_split to [] for inputs "
                             f"{list(self.inputs)!r}")
        unknown = [name for name in self.inputs if name not in CHANNEL_SOURCES]
        if not self.inputs or unknown or len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"segmenter option inputs must be distinct names from "
                             f"{', '.join(CHANNEL_SOURCES)}, got {list(self.inputs)!r}")
        if self.test_time_views not in VIEW_COUNTS:
            raise ValueError(f"segmenter option test_time_views must be one of "
                             f"{', '.join(map(str, VIEW_COUNTS))}, got {self.test_time_views!r}")
        width = self.planar_min_width
        if not isinstance(width, int) or isinstance(width, bool) or width < 0 or (width and not width % 2):
            raise ValueError(f"segmenter option planar_min_width must be 0 (no opening) or an odd "
                             f"positive number of pixels, got {width!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"segmenter option seed must be a non-negative integer, got {self.seed!r}")
        retries = self.dead_channel_retries
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"segmenter option dead_channel_retries must be a non-negative "
                             f"integer, got {retries!r}")
        for name in ("tile_size", "base_filters", "depth", "epochs", "batch_size", "shuffle_buffer",
                     "tiles_per_image", "input_stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"segmenter option {name} must be a positive integer, "
                                 f"got {getattr(self, name)!r}")
        for name in ("learning_rate", "positive_weight"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"segmenter option {name} must be positive, got {getattr(self, name)!r}")
        if not float(self.dice_weight) >= 0:
            raise ValueError(f"segmenter option dice_weight must be >= 0, got {self.dice_weight!r}")
        if not 0.0 <= float(self.defect_tile_fraction) <= 1.0:
            raise ValueError(f"segmenter option defect_tile_fraction must lie in [0, 1], "
                             f"got {self.defect_tile_fraction!r}")
        if not 0.0 < float(self.prior_probability) < 1.0:
            raise ValueError(f"segmenter option prior_probability must lie in (0, 1), "
                             f"got {self.prior_probability!r}")
        if self.tile_size % self.multiple:
            raise ValueError(f"tile_size {self.tile_size} is not divisible by input_stride x "
                             f"2**depth = {self.multiple}")

    @property
    def multiple(self) -> int:
        """Heights and widths the network takes are multiples of this."""
        return int(self.input_stride) * 2 ** int(self.depth)

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
    `positive_weight`) plus `dice_weight` x the mean of (1 - soft Dice) over the classes the
    batch's masks mark (none: no Dice term), Dice pooled over the batch's pixels:
    (2 sum(y p) + s) / (sum(y) + sum(p) + s) with s = DICE_SMOOTH. An absent class is left to
    the cross-entropy: its Dice, 1 / (sum(p) + s), would cost almost a whole point for the
    faint output a rare class starts with, and push every output to 0 before anything is
    learnt.
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
        marked = tf.reduce_sum(y_true, axis=axes)
        predicted = tf.reduce_sum(y_pred, axis=axes)
        dice = (2.0 * intersection + DICE_SMOOTH) / (marked + predicted + DICE_SMOOTH)
        present = tf.cast(marked > 0, tf.float32)
        mean_dice_loss = tf.reduce_sum(present * (1.0 - dice)) / tf.maximum(tf.reduce_sum(present), 1.0)
        return bce + dice_weight * mean_dice_loss

    return bce_dice


def output_channels(num_classes: int, config: SegmenterConfig) -> Tuple[str, ...]:
    """Names of the network's sigmoid channels before `JoinContrasts`: the classes (a split
    class's own channel holds its brighter marks), then "<class> dimmer" per
    `config.contrast_split` class."""
    classes = tuple(DEFECT_CLASSES[:num_classes])
    return classes + tuple(f"{name} dimmer" for name in config.contrast_split)


class JoinContrasts(keras.layers.Layer):
    """[..., C + S] channel probabilities -> [..., C] class probabilities: a split class's
    probability is the larger of its own (brighter) channel and its dimmer channel; the
    other classes pass unchanged."""

    def __init__(self, num_classes: int, split_indices: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.split_indices = tuple(int(index) for index in split_indices)
        # placement[s, c] = 1 where the dimmer channel s belongs to class c
        self.placement = np.eye(self.num_classes, dtype=np.float32)[list(self.split_indices)]

    def call(self, channels):
        own = channels[..., :self.num_classes]
        dimmer = tf.einsum("...s,sc->...c", channels[..., self.num_classes:], self.placement)
        return tf.maximum(own, dimmer)  # 0 for the classes without a dimmer channel

    def get_config(self):
        return dict(super().get_config(), num_classes=self.num_classes,
                    split_indices=list(self.split_indices))


def contrast_targets(x: tf.Tensor, masks: tf.Tensor, config: SegmenterConfig):
    """(inputs [B, H, W, K], masks [B, H, W, C]) -> (inputs, targets [B, H, W, C + S]) for
    the network's channels (`output_channels`): the marks of each `config.contrast_split`
    class go to its own channel where the deviation map, averaged over CONTRAST_WINDOW x
    CONTRAST_WINDOW pixels, is >= 0 (a brighter column) and to its dimmer channel where it is
    below 0."""
    if not config.contrast_split:
        return x, masks
    deviation = x[..., config.inputs.index(DEVIATION_INPUT)][..., tf.newaxis]
    local = tf.nn.avg_pool2d(deviation, CONTRAST_WINDOW, 1, "SAME")[..., 0]
    dimmer = tf.cast(local < 0, masks.dtype)
    channels = tf.unstack(masks, num=len(DEFECT_CLASSES), axis=-1)
    dimmer_marks = []
    for name in config.contrast_split:
        index = DEFECT_CLASSES.index(name)
        dimmer_marks.append(channels[index] * dimmer)
        channels[index] = channels[index] * (1 - dimmer)
    return x, tf.stack(channels + dimmer_marks, axis=-1)


def build_unet(num_classes: int, config: SegmenterConfig = SegmenterConfig()) -> keras.Model:
    """U-Net: (conv-BN-ReLU) x 2 per level, max-pool down, transposed conv up, skip
    concatenation, a 1x1 convolution with one channel per `output_channels` name, a sigmoid,
    and `JoinContrasts` when classes are split by contrast. With `input_stride` s > 1 the
    U-Net works on the image averaged over s x s pixels and its logits are enlarged back
    bilinearly. Not compiled: `training_model` is the view that is trained.

    Input [N, H, W, len(config.inputs)] (named "image"), any H and W divisible by config.multiple (otherwise
    the skip concatenation fails); output [N, H, W, num_classes] named "probabilities".
    """
    inputs = keras.Input((None, None, len(config.inputs)), name=IMAGE_INPUT)
    x = inputs
    if config.input_stride > 1:
        x = keras.layers.AveragePooling2D(config.input_stride, name="stem")(x)
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
    # Starting at the prior instead of 0.5 spares the first hundreds of steps (all a short
    # CPU run has) the walk of every pixel's output down from 0.5 to the rare-defect level.
    prior_logit = float(np.log(config.prior_probability / (1.0 - config.prior_probability)))
    channels = output_channels(num_classes, config)
    x = keras.layers.Conv2D(len(channels), 1, dtype="float32",
                            bias_initializer=keras.initializers.Constant(prior_logit),
                            name="logits")(x)
    if config.input_stride > 1:
        x = keras.layers.UpSampling2D(config.input_stride, interpolation="bilinear",
                                      name="enlarge")(x)
    if not config.contrast_split:
        outputs = keras.layers.Activation("sigmoid", dtype="float32", name=PROBABILITIES)(x)
        return keras.Model(inputs, outputs, name="unet")
    x = keras.layers.Activation("sigmoid", dtype="float32", name=CHANNEL_PROBABILITIES)(x)
    split = [DEFECT_CLASSES.index(name) for name in config.contrast_split]
    outputs = JoinContrasts(num_classes, split, dtype="float32", name=PROBABILITIES)(x)
    return keras.Model(inputs, outputs, name="unet")


def training_model(network: keras.Model, config: SegmenterConfig) -> keras.Model:
    """The view of `network` that is trained, compiled: its output is every channel of
    `output_channels` (before `JoinContrasts`), to be fitted to `contrast_targets`. It shares
    the network's layers, so training it trains the network."""
    channels = (network.get_layer(CHANNEL_PROBABILITIES).output if config.contrast_split
                else network.output)
    model = keras.Model(network.input, channels, name="unet_training")
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


def network_input(images: tf.Tensor, deviation_z: Optional[tf.Tensor], inputs: Sequence[str],
                  standardised: bool = False) -> tf.Tensor:
    """Maps [..., H, W] of the same images -> the network's input [..., H, W, len(inputs)]:
    each image standardised by itself (unless `standardised` already), the deviation clipped
    and scaled as the classifier's (`modules.transform.scale_deviation`)."""
    channels = []
    for name in inputs:
        if name == DEVIATION_INPUT:
            channels.append(scale_deviation(tf.cast(deviation_z, tf.float32)))
        elif standardised:
            channels.append(tf.cast(images, tf.float32))
        else:
            flat = tf.reshape(tf.cast(images, tf.float32),
                              tf.concat([[-1], tf.shape(images)[-2:], [1]], axis=0))
            channels.append(tf.reshape(tf.map_fn(standardise, flat), tf.shape(images)))
    return tf.stack(channels, axis=-1)


def parse_example(serialized: tf.Tensor, inputs: Sequence[str] = ("image",)):
    """One serialized contract example -> (network input [H, W, len(inputs)] float32,
    mask [H, W, C] uint8 from `mask_pseudo`, usable: pseudo_label_status == "ok").

    Reads `image`, `deviation_z` when an input, `mask_pseudo` and `pseudo_label_status` only;
    `mask_true` is never parsed.
    """
    spec = {
        contract.IMAGE: tf.io.FixedLenFeature([], tf.string),
        contract.MASK_PSEUDO: tf.io.FixedLenFeature([], tf.string),
        contract.PSEUDO_LABEL_STATUS: tf.io.FixedLenFeature([], tf.string, default_value=PSEUDO_LABEL_OK),
    }
    if DEVIATION_INPUT in inputs:
        spec[contract.DEVIATION_Z] = tf.io.FixedLenFeature([], tf.string)
    features = tf.io.parse_single_example(serialized, spec)
    image = tf.ensure_shape(tf.io.parse_tensor(features[contract.IMAGE], tf.float32), [None, None])
    deviation = None
    if DEVIATION_INPUT in inputs:
        deviation = tf.ensure_shape(tf.io.parse_tensor(features[contract.DEVIATION_Z], tf.float32),
                                    [None, None])
    mask = tf.io.parse_tensor(features[contract.MASK_PSEUDO], tf.uint8)
    mask = tf.ensure_shape(mask, [len(DEFECT_CLASSES), None, None])
    mask = tf.transpose(mask, [1, 2, 0])
    usable = tf.equal(features[contract.PSEUDO_LABEL_STATUS], PSEUDO_LABEL_OK)
    return network_input(image, deviation, inputs), mask, usable


def _tile_origin(mask: tf.Tensor, tile: int, defect_fraction: float) -> tf.Tensor:
    """(row, column) of a random tile of a square mask [side, side, C], side >= tile.

    With probability `defect_fraction`, when the mask marks anything, the tile is centred
    (give or take a quarter tile) on a marked pixel of a class drawn evenly from those
    present: a point defect covers 1e-4 of an image, so uniform tiles would show the
    network one in thousands of pixels, and a planar band would crowd out the points.
    """
    room = tf.shape(mask)[0] - tile
    uniform = tf.random.uniform([2], 0, room + 1, tf.int32)
    if not defect_fraction:
        return uniform
    present = tf.reduce_any(mask > 0, axis=[0, 1])

    def on_a_defect():
        logits = tf.where(present, 0.0, -np.inf)[tf.newaxis]
        channel = tf.random.categorical(logits, 1, dtype=tf.int32)[0, 0]
        pixels = tf.cast(tf.where(mask[..., channel] > 0), tf.int32)
        pixel = pixels[tf.random.uniform([], 0, tf.shape(pixels)[0], tf.int32)]
        jitter = tf.random.uniform([2], -(tile // 4), tile // 4 + 1, tf.int32)
        return tf.clip_by_value(pixel - tile // 2 + jitter, 0, room)

    centred = tf.logical_and(tf.reduce_any(present), tf.random.uniform([]) < defect_fraction)
    return tf.cond(centred, on_a_defect, lambda: uniform)


def cut_tile(image: tf.Tensor, mask: tf.Tensor, tile: int, training: bool,
             defect_fraction: float = 0.0):
    """(input [H, W, K], mask [H, W, C]) -> ([tile, tile, K], [tile, tile, C] float32).

    The central square of the input; in training a random tile of it (centred on a marked
    pixel with probability `defect_fraction`, see `_tile_origin`), turned by a random
    multiple of 90 degrees and mirrored at random (image and mask together); otherwise its
    central tile. Zero-padded (centred) where the square is smaller than the tile.
    """
    channels = len(DEFECT_CLASSES)
    inputs = image.shape[-1]
    stack = tf.concat([tf.cast(image, tf.float32), tf.cast(mask, tf.float32)], axis=-1)
    stack = tf.ensure_shape(stack, [None, None, inputs + channels])
    side = tf.minimum(tf.shape(stack)[0], tf.shape(stack)[1])
    if training:
        side = tf.maximum(side, tile)
        square = tf.image.resize_with_crop_or_pad(stack, side, side)
        row, column = tf.unstack(_tile_origin(square[..., inputs:], tile, defect_fraction))
        stack = square[row:row + tile, column:column + tile]
        stack = tf.image.rot90(stack, tf.random.uniform([], 0, 4, tf.int32))
        stack = tf.image.random_flip_left_right(stack)
    else:
        square = tf.image.resize_with_crop_or_pad(stack, side, side)
        stack = tf.image.resize_with_crop_or_pad(square, tile, tile)
    stack = tf.ensure_shape(stack, [tile, tile, inputs + channels])
    return stack[..., :inputs], stack[..., inputs:]


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
    fn_args.train_files). In training: shuffled, `tiles_per_image` random augmented tiles
    cut from every image (each image is decoded once for all of them), the tiles shuffled
    again so that a batch mixes images; otherwise one central tile per image."""
    files = _files(file_pattern)
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if training:
        dataset = dataset.shuffle(len(files), seed=config.seed)
    dataset = tf.data.TFRecordDataset(dataset, compression_type="GZIP")
    dataset = dataset.map(lambda serialized: parse_example(serialized, config.inputs),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if config.skip_no_lattice:
        dataset = dataset.filter(lambda image, mask, usable: usable)
    if training:
        dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed + 1,
                                  reshuffle_each_iteration=True)
        if config.tiles_per_image > 1:
            dataset = dataset.flat_map(lambda *example: tf.data.Dataset.from_tensors(example)
                                       .repeat(config.tiles_per_image))
    # The random tiles are cut one after another: parallel calls would share the random
    # ops' state in whatever order the threads reach it, and the same seed would give
    # different tiles (and models). Cutting a tile costs little next to a training step.
    dataset = dataset.map(lambda image, mask, usable: cut_tile(
        image, mask, config.tile_size, training, config.defect_tile_fraction),
        num_parallel_calls=None if training else tf.data.AUTOTUNE)
    if training and config.tiles_per_image > 1:
        dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed + 2,
                                  reshuffle_each_iteration=True)
    return dataset.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------
# Export


def predict(model: keras.Model, x: tf.Tensor, multiple: int, views: int = 1) -> tf.Tensor:
    """Network inputs [N, H, W, K] -> probabilities [N, H, W, C]: padded with zeros at the
    bottom and right to a multiple of `multiple`, the answer cropped back. With `views` 4 or
    8 (`VIEW_COUNTS`), the mean of the answers to the input turned by 0, 90, 180 and 270
    degrees (and, for 8, each mirrored left to right), every answer turned back first. The
    views of one shape go through the network as one batch: two calls, not eight."""
    height, width = tf.shape(x)[1], tf.shape(x)[2]
    x = tf.pad(x, [[0, 0], [0, (-height) % multiple], [0, (-width) % multiple], [0, 0]])
    if views == 1:
        return model(x, training=False)[:, :height, :width, :]
    mirrorings = (False, True)[:views // 4]
    total = 0.0
    for first_turn in (0, 1):  # upright and half-turned views, then the quarter-turned ones
        turns = [(quarter_turns, mirrored) for quarter_turns in (first_turn, first_turn + 2)
                 for mirrored in mirrorings]
        batch = tf.concat([tf.image.rot90(tf.image.flip_left_right(x) if mirrored else x, k)
                           for k, mirrored in turns], axis=0)
        answers = tf.split(model(batch, training=False), len(turns), axis=0)
        for (k, mirrored), answer in zip(turns, answers):
            back = tf.image.rot90(answer, -k)
            total += tf.image.flip_left_right(back) if mirrored else back
    return (total / views)[:, :height, :width, :]


def open_planar(probabilities: tf.Tensor, width: int) -> tf.Tensor:
    """Probabilities [N, H, W, C] (channels in `DEFECT_CLASSES` order) with the planar
    classes' channels opened over a `width` x `width` square: a minimum filter, then a
    maximum filter. A mark narrower than the square is removed, a wider band kept as it
    was; the other classes are untouched. Outside the image the minimum sees nothing, so a
    band running out of the frame keeps its end. `width` 0 or 1: unchanged."""
    if width <= 1:
        return probabilities

    def max_filter(t):  # a square's maximum as a column's then a row's: 2 w, not w**2, per pixel
        return tf.nn.max_pool2d(tf.nn.max_pool2d(t, (width, 1), 1, "SAME"), (1, width), 1, "SAME")

    planar_indices = [DEFECT_CLASSES.index(name) for name in PLANAR_CLASSES]
    opened = max_filter(-max_filter(-tf.gather(probabilities, planar_indices, axis=-1)))
    # every channel's opened counterpart (a non-planar channel's is unused), then chosen
    source = [planar_indices.index(c) if c in planar_indices else 0 for c in range(len(DEFECT_CLASSES))]
    planar = tf.constant([name in PLANAR_CLASSES for name in DEFECT_CLASSES])
    return tf.where(planar, tf.gather(opened, source, axis=-1), probabilities)


def served_probabilities(model: keras.Model, x: tf.Tensor, config: SegmenterConfig) -> tf.Tensor:
    """What every exported signature answers for network inputs [N, H, W, K]: the mean over
    `config.test_time_views` views (`predict`), planar marks narrower than
    `config.planar_min_width` removed (`open_planar`)."""
    probabilities = predict(model, x, config.multiple, config.test_time_views)
    return open_planar(probabilities, config.planar_min_width)


def _signatures(model: keras.Model, config: SegmenterConfig) -> Dict[str, Any]:
    inputs = config.inputs
    maps = tf.TensorSpec([None, None, None], tf.float32, name=serving.IMAGES)

    def answer(x):
        return {PROBABILITIES: served_probabilities(model, x, config)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=serving.EXAMPLES)])
    def serve(serialized):
        return answer(tf.map_fn(lambda one: parse_example(one, inputs)[0], serialized,
                                fn_output_signature=tf.TensorSpec([None, None, len(inputs)],
                                                                  tf.float32)))

    if DEVIATION_INPUT in inputs:
        deviation = tf.TensorSpec([None, None, None], tf.float32, name=DEVIATION_INPUT)

        @tf.function(input_signature=[maps, deviation])
        def serve_images(images, deviation_z):
            return answer(network_input(images, deviation_z, inputs))

        @tf.function(input_signature=[maps, deviation])
        def serve_standardised(images, deviation_z):
            return answer(network_input(images, deviation_z, inputs, standardised=True))
    else:
        @tf.function(input_signature=[maps])
        def serve_images(images):
            return answer(network_input(images, None, inputs))

        @tf.function(input_signature=[maps])
        def serve_standardised(images):
            return answer(network_input(images, None, inputs, standardised=True))

    return {"serving_default": serve, serving.IMAGES_SIGNATURE: serve_images,
            serving.STANDARDISED_SIGNATURE: serve_standardised}


def learning_rate_schedule(config: SegmenterConfig) -> keras.callbacks.Callback:
    """Cosine decay of the learning rate from `learning_rate` towards 0 over the epochs: a
    short run ends on a settled model instead of wherever the last noisy steps left it."""
    epochs = int(config.epochs)

    def rate(epoch, _):
        return float(config.learning_rate * 0.5 * (1.0 + np.cos(np.pi * epoch / epochs)))

    return keras.callbacks.LearningRateScheduler(rate)


def dead_channel_epoch(config: SegmenterConfig) -> int:
    """The epoch after which `DeadChannelCheck` looks: a third of them, at least the first."""
    return max(1, round(config.epochs / 3))


class DeadChannelCheck(keras.callbacks.Callback):
    """After epoch `epoch` (counted from 1), the output channels that the validation tiles'
    targets mark and that mark none of those pixels above 0.5 (`dead`, by name); with
    `stop`, training stops there when there is one."""

    def __init__(self, validation: tf.data.Dataset, epoch: int, channels: Sequence[str], stop: bool):
        super().__init__()
        self._validation, self._epoch, self._channels, self._stop = validation, epoch, channels, stop
        self.dead: list = []
        self.stopped = False

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 != self._epoch:
            return
        marked = np.zeros(len(self._channels))
        hit = np.zeros(len(self._channels))
        for x, targets in self._validation:
            target = targets.numpy() > 0.5
            marked += target.sum(axis=(0, 1, 2))
            hit += (target & (self.model(x, training=False).numpy() > 0.5)).sum(axis=(0, 1, 2))
        self.dead = [name for name, m, h in zip(self._channels, marked, hit) if m and not h]
        if self.dead and self._stop:
            self.model.stop_training = self.stopped = True


def _fit(fn_args, config: SegmenterConfig, last_attempt: bool):
    """One training of a fresh network from `config.seed`: (network, Keras history,
    DeadChannelCheck)."""
    keras.utils.set_random_seed(config.seed)  # before the datasets' random ops are traced
    train, validation = (
        make_dataset(files, config, training).map(lambda x, masks: contrast_targets(x, masks, config))
        for files, training in ((fn_args.train_files, True), (fn_args.eval_files, False)))
    network = build_unet(len(DEFECT_CLASSES), config)
    check = DeadChannelCheck(validation, dead_channel_epoch(config),
                             output_channels(len(DEFECT_CLASSES), config), stop=not last_attempt)
    history = training_model(network, config).fit(
        train, validation_data=validation, epochs=config.epochs, verbose=0,
        callbacks=[learning_rate_schedule(config), EpochProgress("SegmenterTrainer"), check])
    return network, history, check


def run_fn(fn_args) -> None:
    """TFX Trainer entry point (reads the PseudoLabeler's examples; no Transform)."""
    requested = SegmenterConfig.from_custom_config(fn_args.custom_config)
    attempts = []
    for attempt in range(requested.dead_channel_retries + 1):
        config = dataclasses.replace(requested, seed=requested.seed + attempt)
        last_attempt = attempt == requested.dead_channel_retries
        model, history, check = _fit(fn_args, config, last_attempt)
        attempts.append({"seed": config.seed, "epochs": len(history.history["loss"]),
                         "dead_channels": check.dead})
        if not check.stopped:
            break
        log_line(f"SegmenterTrainer: with seed {config.seed} the channel(s) "
                 f"{', '.join(check.dead)} marked no validation pixel after epoch "
                 f"{dead_channel_epoch(config)}; training again with seed {config.seed + 1}")

    model.save(fn_args.serving_model_dir, save_format="tf", signatures=_signatures(model, config))
    os.makedirs(fn_args.model_run_dir, exist_ok=True)
    curves = {name: [float(value) for value in values] for name, values in history.history.items()}
    record = dict(curves, config=[dataclasses.asdict(config)], classes=[list(DEFECT_CLASSES)],
                  channels=[list(output_channels(len(DEFECT_CLASSES), config))],
                  attempts=[attempts])
    with open(os.path.join(fn_args.model_run_dir, "history.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    plots.training_curves(
        curves, os.path.join(fn_args.model_run_dir, "training_curves.png"),
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
