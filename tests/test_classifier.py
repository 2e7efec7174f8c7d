import numpy as np
import pytest

from modules import classifier, transform


def config(**changes):
    return classifier.TrainingConfig(input_size=32, **{"teacher_features": False, **changes})


def test_from_scratch_trains_every_layer():
    model = classifier.build_model(4, config())
    assert model.output_shape == (None, 4)
    assert all(layer.trainable for layer in classifier.backbone_of(model).layers)


def test_local_weights_are_loaded_and_only_the_last_layers_fine_tuned(tmp_path):
    source = classifier.build_model(4, config())
    weights = str(tmp_path / "mobilenet_v2_no_top.h5")
    classifier.backbone_of(source).save_weights(weights)

    model = classifier.build_model(4, config(weights_path=weights, fine_tune_layers=40))
    layers = classifier.backbone_of(model).layers
    assert [layer.trainable for layer in layers] == [False] * (len(layers) - 40) + [True] * 40
    first_kernel = next(w for w in classifier.backbone_of(model).weights if "kernel" in w.name)
    expected = next(w for w in classifier.backbone_of(source).weights if "kernel" in w.name)
    assert (first_kernel.numpy() == expected.numpy()).all()


def test_missing_weights_file_names_it_and_what_to_provide(tmp_path):
    missing = str(tmp_path / "nowhere.h5")
    with pytest.raises(FileNotFoundError, match="nowhere.h5") as error:
        classifier.build_model(4, config(weights_path=missing))
    assert "modules.pretrain" in str(error.value) and "from scratch" in str(error.value)


def test_imagenet_without_the_cached_file_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        classifier.build_model(4, config(weights_path=classifier.IMAGENET))
    expected = tmp_path / ".keras" / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_32_no_top.h5"
    assert str(expected) in str(error.value)


def test_warm_start_reads_the_backbone_an_earlier_export_left(tmp_path):
    assert classifier.warm_start_weights(None) is None
    with pytest.raises(FileNotFoundError, match=classifier.BACKBONE_WEIGHTS):
        classifier.warm_start_weights(str(tmp_path))
    source = classifier.build_model(3, config())
    classifier.backbone_of(source).save_weights(str(tmp_path / classifier.BACKBONE_WEIGHTS))
    model = classifier.build_model(5, config(), start_weights=classifier.warm_start_weights(str(tmp_path)))
    for ours, theirs in zip(classifier.backbone_of(model).weights, classifier.backbone_of(source).weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_orientation_augmentation_only_touches_the_listed_labels():
    import tensorflow as tf

    image = tf.constant(np.arange(4, dtype=np.float32).reshape(2, 2, 1))
    teacher = tf.constant(np.arange(transform.TEACHER_SIZE, dtype=np.float32))
    inputs = {transform.IMAGE_XF: image, transform.TEACHER_XF: teacher}
    augment = classifier.orientation_augmenter([1])
    tf.random.set_seed(0)
    seen = set()
    for _ in range(40):
        out, label = augment(inputs, tf.constant(1, tf.int64))
        seen.add(out[transform.IMAGE_XF].numpy().tobytes())
        np.testing.assert_array_equal(out[transform.TEACHER_XF].numpy(), teacher.numpy())
    assert len(seen) == 8  # the square's full symmetry group
    for _ in range(10):
        out, _ = augment(inputs, tf.constant(0, tf.int64))
        np.testing.assert_array_equal(out[transform.IMAGE_XF].numpy(), image.numpy())


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="epochz"):
        classifier.TrainingConfig.from_custom_config({"epochz": 3})


def test_teacher_features_join_the_pooled_features_before_the_head():
    assert classifier.model_inputs(config()) == (transform.IMAGE_XF,)
    with_teacher = config(teacher_features=True)
    assert classifier.model_inputs(with_teacher) == (transform.IMAGE_XF, transform.TEACHER_XF)
    model = classifier.build_model(4, with_teacher)
    assert sorted(model.input_names) == sorted(classifier.model_inputs(with_teacher))
    joined = model.get_layer("with_teacher")
    pooled = classifier.backbone_of(model).output_shape[-1]
    assert joined.output_shape == (None, pooled + transform.TEACHER_SIZE)
    assert model.get_layer(classifier.PROBABILITIES).input_shape == joined.output_shape
    without = classifier.build_model(4, config())
    assert "with_teacher" not in [layer.name for layer in without.layers]


def test_teacher_features_option_must_be_a_boolean():
    assert classifier.TrainingConfig().teacher_features is transform.DEFAULT_TEACHER_FEATURES
    off = classifier.TrainingConfig.from_custom_config({"teacher_features": False})
    assert off.teacher_features is False
    for bad in ("false", 0, None):
        with pytest.raises(ValueError, match="teacher_features"):
            classifier.TrainingConfig.from_custom_config({"teacher_features": bad})


def _transform_graph(tmp_path, micrographs, custom_config):
    """A real Transform graph (tf.Transform on Beam's direct runner) over a few micrographs."""
    import functools
    import os

    import apache_beam as beam
    import tensorflow as tf
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io, schema_utils

    from components import contract

    keys = (contract.IMAGE, contract.DEVIATION_Z, contract.MASK_PSEUDO, contract.LABEL)
    spec = {key: tf.io.FixedLenFeature([1], tf.string) for key in keys}
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))
    raw = []
    for m in micrographs:
        feature = contract.to_example(m).features.feature
        raw.append({key: [feature[key].bytes_list.value[0]] for key in keys})
    output = str(tmp_path / "transform")
    with beam.Pipeline() as pipeline, tft_beam.Context(temp_dir=str(tmp_path / "tft_tmp")):
        transform_fn = ((pipeline | beam.Create(raw), metadata)
                        | tft_beam.AnalyzeDataset(functools.partial(
                            transform.preprocessing_fn, custom_config=custom_config)))
        _ = transform_fn | tft_beam.WriteTransformFn(output)
    # as TFX's Transform does: the raw metadata beside the graph (raw_feature_spec reads it)
    metadata_io.write_metadata(metadata,
                               os.path.join(output, tft.TFTransformOutput.RAW_METADATA_DIR))
    return tft.TFTransformOutput(output)


def test_model_with_teacher_features_trains_and_serves_examples_and_maps_alike(tmp_path):
    import tensorflow as tf

    from components import contract

    rng = np.random.default_rng(0)
    micrographs = []
    for n, label in enumerate(["bulk", "vacancy", "dislocation", "vacancy"]):
        shape = (48, 56)
        mask = np.zeros((len(classifier.DEFECT_CLASSES),) + shape, np.uint8)
        if label != "bulk":
            mask[classifier.DEFECT_CLASSES.index(label), 10:10 + 3 * n, 20:30] = 1
        micrographs.append(contract.Micrograph(
            image=rng.normal(size=shape).astype(np.float32), material="SrTiO3", label=label,
            pixel_size_pm=20.0, source=f"test_{n}",
            deviation_z=rng.normal(size=shape).astype(np.float32), mask_pseudo=mask))
    custom = {"input_size": 32, "input_channels": ["deviation_z"] * 3, "teacher_features": True}
    transform_output = _transform_graph(tmp_path, micrographs, custom)
    vocabulary = transform_output.vocabulary_by_name(transform.LABEL_VOCABULARY)
    serialized = [contract.to_example(m).SerializeToString() for m in micrographs]
    transformed = transform_output.transform_raw_features(
        tf.io.parse_example(serialized, transform_output.raw_feature_spec()))

    cfg = config(teacher_features=True, input_channels=("deviation_z",) * 3, batch_size=4)
    model = classifier.build_model(len(vocabulary), cfg)
    names = classifier.model_inputs(cfg)
    x = {name: transformed[name].numpy() for name in names}
    y = transformed[transform.LABEL_XF].numpy().reshape(-1)
    assert x[transform.TEACHER_XF][0].max() == 0 and x[transform.TEACHER_XF][1:].max() > 0
    before = [w.numpy().copy() for w in model.trainable_weights]
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))

    export = str(tmp_path / "model")
    model.save(export, save_format="tf",
               signatures=classifier._signatures(model, transform_output, cfg))
    loaded = tf.saved_model.load(export)
    from_examples = loaded.signatures["serving_default"](examples=tf.constant(serialized[:3]))
    # the maps of equal-sized micrographs, stacked: no tf.Example in between
    from_maps = loaded.signatures["serving_maps"](
        deviation_z=tf.constant(np.stack([m.deviation_z for m in micrographs[:3]])),
        mask_pseudo=tf.constant(np.stack([m.mask_pseudo for m in micrographs[:3]])))
    probabilities = from_examples["probabilities"].numpy()
    assert probabilities.shape == (3, len(vocabulary))
    np.testing.assert_allclose(from_maps["probabilities"].numpy(), probabilities, atol=1e-5)
    np.testing.assert_array_equal(from_maps["label"].numpy(), from_examples["label"].numpy())
    # and the model itself on the Transform's outputs answers the same
    np.testing.assert_allclose(model.predict({k: v[:3] for k, v in x.items()}, verbose=0),
                               probabilities, atol=1e-5)
    # the teacher's evidence reaches the answer: an emptied mask changes it
    emptied = loaded.signatures["serving_maps"](
        deviation_z=tf.constant(np.stack([m.deviation_z for m in micrographs[:3]])),
        mask_pseudo=tf.constant(np.zeros_like(np.stack([m.mask_pseudo for m in micrographs[:3]]))))
    assert not np.allclose(emptied["probabilities"].numpy()[1:], probabilities[1:], atol=1e-6)
    features = loaded.signatures["transform_features"](examples=tf.constant(serialized[:3]))
    assert features[transform.TEACHER_XF].shape == (3, transform.TEACHER_SIZE)


class InMemoryDataAccessor:
    """The part of TFX's DataAccessor that run_fn uses, over transformed features in memory:
    shuffled with the options' seed as tfxio does, batched, the label split off."""

    def __init__(self, features, labels):
        self.features, self.labels = features, labels

    def tf_dataset_factory(self, file_pattern, options, schema):
        import tensorflow as tf

        dataset = tf.data.Dataset.from_tensor_slices((self.features, self.labels.reshape(-1, 1)))
        if options.shuffle:
            dataset = dataset.shuffle(len(self.labels), seed=options.shuffle_seed)
        return dataset.batch(options.batch_size)


def test_the_same_seed_trains_the_same_classifier_and_another_seed_another(tmp_path):
    import types

    import tensorflow as tf

    from components import contract

    rng = np.random.default_rng(1)
    labels = ["bulk", "vacancy", "stacking_fault", "vacancy", "bulk", "stacking_fault"]
    micrographs = [contract.Micrograph(
        image=rng.normal(size=(40, 40)).astype(np.float32), material="CdTe", label=label,
        pixel_size_pm=20.0, source=f"test_{n}",
        deviation_z=rng.normal(size=(40, 40)).astype(np.float32),
        mask_pseudo=np.zeros((len(classifier.DEFECT_CLASSES), 40, 40), np.uint8))
        for n, label in enumerate(labels)]
    custom = {"input_size": 32, "input_channels": ["deviation_z"] * 3, "teacher_features": True}
    transform_output = _transform_graph(tmp_path, micrographs, custom)
    transformed = transform_output.transform_raw_features(tf.io.parse_example(
        [contract.to_example(m).SerializeToString() for m in micrographs],
        transform_output.raw_feature_spec()))
    accessor = InMemoryDataAccessor(
        {name: transformed[name].numpy() for name in (transform.IMAGE_XF, transform.TEACHER_XF)},
        transformed[transform.LABEL_XF].numpy())

    vocabulary = [v.decode() for v in transform_output.vocabulary_by_name(transform.LABEL_VOCABULARY)]
    fn_args = types.SimpleNamespace(train_files=["unused"], eval_files=["unused"],
                                    data_accessor=accessor, base_model=None)

    def train(seed):
        cfg = classifier.TrainingConfig.from_custom_config(dict(
            custom, epochs=1, batch_size=2, seed=seed, augment_labels=["bulk", "vacancy"]))
        tf.random.set_seed(1000 + seed)  # whatever came before must not matter
        model, history, _ = classifier.train(fn_args, cfg, transform_output, vocabulary)
        return history.history, [w.numpy() for w in model.weights]

    history, weights = train(seed=3)
    again_history, again_weights = train(seed=3)
    assert again_history == history
    for ours, theirs in zip(again_weights, weights):
        np.testing.assert_array_equal(ours, theirs)
    other_history, other_weights = train(seed=4)
    assert other_history != history
    assert any(not np.array_equal(ours, theirs) for ours, theirs in zip(other_weights, weights))


def test_seed_must_be_a_non_negative_integer():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            classifier.TrainingConfig(seed=bad)
