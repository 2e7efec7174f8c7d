import numpy as np
import pytest

from modules import classifier


def config(**changes):
    return classifier.TrainingConfig(input_size=32, **changes)


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
    augment = classifier.orientation_augmenter([1])
    tf.random.set_seed(0)
    seen = {augment(image, tf.constant(1, tf.int64))[0].numpy().tobytes() for _ in range(40)}
    assert len(seen) == 8  # the square's full symmetry group
    for _ in range(10):
        np.testing.assert_array_equal(augment(image, tf.constant(0, tf.int64))[0].numpy(), image.numpy())


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="epochz"):
        classifier.TrainingConfig.from_custom_config({"epochz": 3})
