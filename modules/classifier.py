"""Trainer module: the paper's MobileNet image classifier, fine-tuned in its last layers.

`run_fn` builds MobileNetV2 (Keras 2) on the Transform's three channels (with
`teacher_features`, the Transform's `teacher_xf` vector joins the backbone's pooled features
before the softmax head) and starts the backbone from,
in this order of preference:
1. the backbone of a base model (TFX's `base_model`: the latest blessed model, fed by a
   resolver, so retraining on new data continues from the last good model);
2. a backbone weights file (`weights_path`: synthetic-pretrained weights written by
   `modules/pretrain.py`, or `imagenet` for Keras' own file in its cache);
3. random weights, training every layer (frozen random filters learn nothing).
When it starts from weights it fine-tunes only the last `fine_tune_layers` layers. Nothing
is ever downloaded. The exported model takes serialized (pseudo-labelled) tf.Examples and
returns class probabilities; every run writes its training curves as a PNG beside the model, and the
backbone's weights as a file the next warm start reads.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
from typing import Any, Dict, Optional, Sequence  # noqa: E402

import tensorflow as tf  # noqa: E402
import tensorflow_transform as tft  # noqa: E402
import tf_keras as keras  # noqa: E402
from tfx_bsl.public import tfxio  # noqa: E402

from components import contract  # noqa: E402
from components.defects import DEFECT_CLASSES, ORIENTATION_FREE_LABELS  # noqa: E402
from modules import plots  # noqa: E402
from modules.progress_callback import EpochProgress  # noqa: E402
from modules.transform import (DEFAULT_CHANNELS, DEFAULT_INPUT_SIZE,  # noqa: E402
                               DEFAULT_TEACHER_FEATURES, IMAGE_XF, LABEL_VOCABULARY, LABEL_XF,
                               TEACHER_SIZE, TEACHER_XF, config_options, model_input,
                               teacher_vector)

PROBABILITIES = "probabilities"
PREDICTED_LABEL = "label"
BACKBONE_WEIGHTS = "backbone_weights.h5"  # beside the exported model: a warm start's input
IMAGENET = "imagenet"
# The teacher vector enters the head multiplied by this. Adam moves a weight by about the
# learning rate per step, so in the few hundred steps of a fine-tuning a weight on a feature
# in [0, 1] stays small next to the ~1,300 pooled features, and the head leans on the CNN
# where the teacher is the better witness. Scaled by 10, the teacher can dominate when the
# data say so (demo data, validation split: 0.89 at gains 10 and 30, 0.86 at 3 and with a
# batch normalisation instead; 0.80 unscaled, 0.83 through a hidden layer).
TEACHER_GAIN = 10.0
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The paper's settings by default: batch 32, 25 epochs, last 40 layers fine-tuned."""

    epochs: int = 25
    batch_size: int = 32
    fine_tune_layers: int = 40
    learning_rate: float = 1e-3
    alpha: float = 0.35  # MobileNetV2 width multiplier
    input_size: int = DEFAULT_INPUT_SIZE
    input_channels: Sequence[str] = DEFAULT_CHANNELS  # as Transform made them
    batch_norm_momentum: float = 0.9
    pooling: str = "max"
    # A MobileNetV2 no-top .h5 file, `imagenet` (Keras' cached file), or None: from scratch.
    weights_path: Optional[str] = None
    # Labels rotated and mirrored at random in training (none of the others ever are).
    augment_labels: Sequence[str] = ORIENTATION_FREE_LABELS
    # The Transform's teacher_xf (mask_pseudo's areas per class) beside the pooled features;
    # as Transform made them.
    teacher_features: bool = DEFAULT_TEACHER_FEATURES
    seed: int = 0  # weights, dropout, shuffles and augmentation: the same seed, the same model

    def __post_init__(self):
        if not isinstance(self.teacher_features, bool):
            raise ValueError(
                f"teacher_features must be true or false, got {self.teacher_features!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"classifier option seed must be a non-negative integer, got {self.seed!r}")

    @classmethod
    def from_custom_config(cls, custom_config: Optional[Dict[str, Any]]) -> "TrainingConfig":
        options = config_options(cls, custom_config, "classifier")
        for name in ("augment_labels", "input_channels"):
            if name in options:
                options[name] = tuple(options[name])
        return cls(**options)


def model_inputs(config: TrainingConfig) -> tuple:
    """The transformed features the model reads, by name: its inputs dictionary's keys."""
    return (IMAGE_XF,) + ((TEACHER_XF,) if config.teacher_features else ())


def imagenet_weights_file(config: TrainingConfig) -> str:
    name = (f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{config.alpha}_"
            f"{config.input_size}_no_top.h5")
    return os.path.join(os.path.expanduser("~"), ".keras", "models", name)


def backbone_of(model: keras.Model) -> keras.Model:
    return next(layer for layer in model.layers if layer.name.startswith("mobilenetv2"))


def _weights_file(config: TrainingConfig) -> str:
    """The configured weights file, or a FileNotFoundError that says what to put where."""
    path = imagenet_weights_file(config) if config.weights_path == IMAGENET else config.weights_path
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"classifier weights file {path} does not exist. Put a MobileNetV2 no-top weights "
            f"file for alpha={config.alpha} and input {config.input_size} there (synthetic-"
            f"pretrained: python -m modules.pretrain --output {path}; ImageNet: "
            f"{os.path.basename(imagenet_weights_file(config))} from {WEIGHTS_URL}), "
            f"or leave weights_path empty to train from scratch.")
    return path


def build_model(num_classes: int, config: TrainingConfig,
                start_weights: Optional[str] = None) -> keras.Model:
    """MobileNetV2 (+ the teacher vector) + softmax head, taking {name: tensor} for the names
    of `model_inputs`; `start_weights` (a backbone .h5) overrides weights_path."""
    size = config.input_size
    inputs = {IMAGE_XF: keras.Input((size, size, 3), name=IMAGE_XF)}
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=config.alpha, include_top=False, weights=None,
        pooling=config.pooling)
    # Keras' default momentum (0.999) lets the moving statistics of batch normalisation move
    # too little in a few hundred steps from scratch: the model then predicts one class at
    # inference whatever it learned. 0.9 settles them within a couple of epochs.
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = config.batch_norm_momentum
    start_weights = start_weights or (_weights_file(config) if config.weights_path else None)
    if start_weights:
        backbone.load_weights(start_weights)
        for layer in backbone.layers[:-config.fine_tune_layers]:
            layer.trainable = False
    features = keras.layers.Dropout(0.2)(backbone(inputs[IMAGE_XF]))
    if config.teacher_features:
        inputs[TEACHER_XF] = keras.Input((TEACHER_SIZE,), name=TEACHER_XF)
        teacher = keras.layers.Rescaling(TEACHER_GAIN, name="teacher_gain")(inputs[TEACHER_XF])
        features = keras.layers.Concatenate(name="with_teacher")([features, teacher])
    probabilities = keras.layers.Dense(num_classes, activation="softmax", name=PROBABILITIES)(features)
    model = keras.Model(inputs, probabilities)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def orientation_augmenter(augmented_ids: Sequence[int]):
    """({name: feature}, label) -> the same: a random element of the square's symmetry group
    (4 rotations x mirror) applied to the image for the labels listed, the image unchanged for
    every other. The teacher vector (areas) is the same in every orientation."""
    allowed = tf.constant(list(augmented_ids) or [-1], tf.int64)

    def augment(inputs, label):
        image = inputs[IMAGE_XF]
        turned = tf.image.rot90(image, tf.random.uniform([], 0, 4, tf.int32))
        turned = tf.image.random_flip_left_right(turned)
        applies = tf.reduce_any(tf.equal(tf.cast(label, tf.int64), allowed))
        return dict(inputs, **{IMAGE_XF: tf.where(applies, turned, image)}), label

    return augment


def _dataset(file_pattern, data_accessor, transform_output, names: Sequence[str],
             batch_size: int, augmented_ids: Optional[Sequence[int]] = None, seed: int = 0):
    """Batches of ({name: feature} for the model's input names, label); shuffled (seeded) and
    orientation-augmented when training."""
    training = augmented_ids is not None
    dataset = data_accessor.tf_dataset_factory(
        file_pattern,
        tfxio.TensorFlowDatasetOptions(
            batch_size=batch_size, label_key=LABEL_XF, num_epochs=1, shuffle=training,
            shuffle_seed=seed),
        transform_output.transformed_metadata.schema,
    ).map(lambda features, label: ({name: features[name] for name in names},
                                    tf.reshape(label, [-1])))
    if training:
        # One image after another: parallel calls would draw the random orientations in
        # whatever order the threads reach the random ops, and the same seed would not give
        # the same model. A rotation costs little next to a training step.
        dataset = (dataset.unbatch()
                   .map(orientation_augmenter(augmented_ids))
                   .batch(batch_size))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _signatures(model: keras.Model, transform_output: tft.TFTransformOutput,
                config: TrainingConfig) -> Dict[str, Any]:
    """serving_default: examples -> probabilities and label; serving_maps: the same from the
    maps themselves (one [N, H, W] float32 tensor per channel source, named after it, and with
    teacher features `mask_pseudo` [N, C, H, W], uint8); transform_features for TFMA."""
    model.tft_layer = transform_output.transform_features_layer()
    vocabulary = tf.constant(transform_output.vocabulary_by_name(LABEL_VOCABULARY))
    raw_spec = transform_output.raw_feature_spec()
    serving_spec = {k: v for k, v in raw_spec.items() if k != contract.LABEL}

    def answer(inputs):
        probabilities = model(inputs)
        return {PROBABILITIES: probabilities,
                PREDICTED_LABEL: tf.gather(vocabulary, tf.argmax(probabilities, axis=-1))}

    names = model_inputs(config)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(serialized):
        transformed = model.tft_layer(tf.io.parse_example(serialized, serving_spec))
        return answer({name: transformed[name] for name in names})

    sources = sorted(set(config.input_channels))
    size = config.input_size
    map_specs = [tf.TensorSpec([None, None, None], tf.float32, name=source) for source in sources]
    if config.teacher_features:
        map_specs.append(tf.TensorSpec([None, len(DEFECT_CLASSES), None, None], tf.uint8,
                                       name=contract.MASK_PSEUDO))

    @tf.function(input_signature=map_specs)
    def serve_maps(*maps):
        inputs = {IMAGE_XF: tf.map_fn(
            lambda one: model_input(dict(zip(sources, one)), size, config.input_channels),
            maps[:len(sources)], fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))}
        if config.teacher_features:
            inputs[TEACHER_XF] = teacher_vector(maps[len(sources)])
        return answer(inputs)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def transform_features(serialized):
        return model.tft_layer(tf.io.parse_example(serialized, raw_spec))

    return {"serving_default": serve, "serving_maps": serve_maps,
            "transform_features": transform_features}


def warm_start_weights(base_model: Optional[str]) -> Optional[str]:
    """The backbone weights a base model (an earlier run's export) left beside itself."""
    if not base_model:
        return None
    path = os.path.join(base_model, BACKBONE_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"base model {base_model} has no {BACKBONE_WEIGHTS} to start from")
    return path


def train(fn_args, config: TrainingConfig, transform_output: tft.TFTransformOutput,
          vocabulary: Sequence[str]):
    """(model, Keras history, what it started from): the fit on fn_args' train files, its
    eval files as validation data; seeded by config.seed."""
    augmented_ids = [i for i, label in enumerate(vocabulary) if label in config.augment_labels]
    names = model_inputs(config)
    missing = sorted(set(names) - set(transform_output.transformed_feature_spec()))
    if missing:
        raise ValueError(f"the classifier reads {missing}, which Transform did not write: give "
                         f"Transform and Trainer the same teacher_features")
    keras.utils.set_random_seed(config.seed)  # before the datasets' random ops are traced
    train_data = _dataset(fn_args.train_files, fn_args.data_accessor, transform_output, names,
                          config.batch_size, augmented_ids, config.seed)
    validation = _dataset(fn_args.eval_files, fn_args.data_accessor, transform_output, names,
                          config.batch_size)
    start = warm_start_weights(getattr(fn_args, "base_model", None))
    model = build_model(len(vocabulary), config, start_weights=start)
    history = model.fit(train_data, validation_data=validation, epochs=config.epochs, verbose=0,
                        callbacks=[EpochProgress("Trainer")])
    return model, history, start or config.weights_path or "scratch"


def run_fn(fn_args) -> None:
    """TFX Trainer entry point."""
    config = TrainingConfig.from_custom_config(fn_args.custom_config)
    transform_output = tft.TFTransformOutput(fn_args.transform_output)
    vocabulary = transform_output.vocabulary_by_name(LABEL_VOCABULARY)
    vocabulary = [v.decode() if isinstance(v, bytes) else v for v in vocabulary]
    model, history, started_from = train(fn_args, config, transform_output, vocabulary)

    model.save(fn_args.serving_model_dir, save_format="tf",
               signatures=_signatures(model, transform_output, config))
    backbone_of(model).save_weights(os.path.join(fn_args.serving_model_dir, BACKBONE_WEIGHTS))
    os.makedirs(fn_args.model_run_dir, exist_ok=True)
    record = dict(history.history, started_from=[started_from])
    with open(os.path.join(fn_args.model_run_dir, "history.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    plots.training_curves(history.history, os.path.join(fn_args.model_run_dir, "training_curves.png"),
                          title=f"MobileNetV2 classifier ({len(vocabulary)} classes)")
