"""Trainer module: the paper's MobileNet image classifier, fine-tuned in its last layers.

`run_fn` builds MobileNetV2 (Keras 2), loads backbone weights from a local file when one is
configured (nothing is ever downloaded), fine-tunes the last `fine_tune_layers` layers of a
loaded backbone (all layers when training from scratch: frozen random filters learn
nothing), and exports a model that takes serialized tf.Examples and returns class
probabilities. Every run also writes its training curves as a PNG beside the model.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
from typing import Any, Dict, Optional  # noqa: E402

import tensorflow as tf  # noqa: E402
import tensorflow_transform as tft  # noqa: E402
import tf_keras as keras  # noqa: E402
from tfx_bsl.public import tfxio  # noqa: E402

from components import contract  # noqa: E402
from modules import plots  # noqa: E402
from modules.transform import (CODE_FINGERPRINT, DEFAULT_INPUT_SIZE, IMAGE_XF,  # noqa: E402
                               LABEL_VOCABULARY, LABEL_XF)

PROBABILITIES = "probabilities"
PREDICTED_LABEL = "label"
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
    batch_norm_momentum: float = 0.9
    pooling: str = "max"
    weights_path: Optional[str] = None  # a MobileNetV2 no-top .h5 file, or None: from scratch

    @classmethod
    def from_custom_config(cls, custom_config: Optional[Dict[str, Any]]) -> "TrainingConfig":
        options = dict(custom_config or {})
        options.pop(CODE_FINGERPRINT, None)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown classifier options {unknown}; known: {sorted(known)}")
        return cls(**options)


def build_model(num_classes: int, config: TrainingConfig) -> keras.Model:
    size = config.input_size
    image = keras.Input((size, size, 1), name=IMAGE_XF)
    rgb = keras.layers.Concatenate(name="grey_to_rgb")([image, image, image])
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=config.alpha, include_top=False, weights=None,
        pooling=config.pooling)
    # Keras' default momentum (0.999) lets the moving statistics of batch normalisation move
    # too little in a few hundred steps from scratch: the model then predicts one class at
    # inference whatever it learned. 0.9 settles them within a couple of epochs.
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = config.batch_norm_momentum
    if config.weights_path:
        if not os.path.isfile(config.weights_path):
            raise FileNotFoundError(
                f"classifier weights file {config.weights_path} does not exist. Provide a "
                f"MobileNetV2 no-top weights file for alpha={config.alpha} (for example "
                f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{config.alpha}_{size}_no_top.h5 "
                f"from {WEIGHTS_URL}), or leave weights_path empty to train from scratch.")
        backbone.load_weights(config.weights_path)
        for layer in backbone.layers[:-config.fine_tune_layers]:
            layer.trainable = False
    features = keras.layers.Dropout(0.2)(backbone(rgb))
    probabilities = keras.layers.Dense(num_classes, activation="softmax", name=PROBABILITIES)(features)
    model = keras.Model(image, probabilities)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def _dataset(file_pattern, data_accessor, transform_output, batch_size: int, shuffle: bool):
    return data_accessor.tf_dataset_factory(
        file_pattern,
        tfxio.TensorFlowDatasetOptions(
            batch_size=batch_size, label_key=LABEL_XF, num_epochs=1, shuffle=shuffle),
        transform_output.transformed_metadata.schema,
    )


def _signatures(model: keras.Model, transform_output: tft.TFTransformOutput) -> Dict[str, Any]:
    """serving_default: examples -> probabilities and label; transform_features for TFMA."""
    model.tft_layer = transform_output.transform_features_layer()
    vocabulary = tf.constant(transform_output.vocabulary_by_name(LABEL_VOCABULARY))
    raw_spec = transform_output.raw_feature_spec()
    serving_spec = {k: v for k, v in raw_spec.items() if k != contract.LABEL}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(serialized):
        transformed = model.tft_layer(tf.io.parse_example(serialized, serving_spec))
        probabilities = model(transformed[IMAGE_XF])
        return {PROBABILITIES: probabilities,
                PREDICTED_LABEL: tf.gather(vocabulary, tf.argmax(probabilities, axis=-1))}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def transform_features(serialized):
        return model.tft_layer(tf.io.parse_example(serialized, raw_spec))

    return {"serving_default": serve, "transform_features": transform_features}


def run_fn(fn_args) -> None:
    """TFX Trainer entry point."""
    config = TrainingConfig.from_custom_config(fn_args.custom_config)
    transform_output = tft.TFTransformOutput(fn_args.transform_output)
    train = _dataset(fn_args.train_files, fn_args.data_accessor, transform_output, config.batch_size, True)
    validation = _dataset(fn_args.eval_files, fn_args.data_accessor, transform_output,
                          config.batch_size, False)
    num_classes = transform_output.vocabulary_size_by_name(LABEL_VOCABULARY)

    model = build_model(num_classes, config)
    history = model.fit(train, validation_data=validation, epochs=config.epochs, verbose=2)

    model.save(fn_args.serving_model_dir, save_format="tf",
               signatures=_signatures(model, transform_output))
    os.makedirs(fn_args.model_run_dir, exist_ok=True)
    with open(os.path.join(fn_args.model_run_dir, "history.json"), "w") as handle:
        json.dump(history.history, handle, indent=1)
    plots.training_curves(history.history, os.path.join(fn_args.model_run_dir, "training_curves.png"),
                          title=f"MobileNetV2 classifier ({num_classes} classes)")
