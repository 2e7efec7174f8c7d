import pytest

from modules import classifier


def config(**changes):
    return classifier.TrainingConfig(input_size=32, **changes)


def backbone_of(model):
    return next(layer for layer in model.layers if layer.name.startswith("mobilenetv2"))


def test_from_scratch_trains_every_layer():
    model = classifier.build_model(4, config())
    assert model.output_shape == (None, 4)
    assert all(layer.trainable for layer in backbone_of(model).layers)


def test_local_weights_are_loaded_and_only_the_last_layers_fine_tuned(tmp_path):
    source = classifier.build_model(4, config())
    weights = str(tmp_path / "mobilenet_v2_no_top.h5")
    backbone_of(source).save_weights(weights)

    model = classifier.build_model(4, config(weights_path=weights, fine_tune_layers=40))
    layers = backbone_of(model).layers
    assert [layer.trainable for layer in layers] == [False] * (len(layers) - 40) + [True] * 40
    first_kernel = next(w for w in backbone_of(model).weights if "kernel" in w.name)
    expected = next(w for w in backbone_of(source).weights if "kernel" in w.name)
    assert (first_kernel.numpy() == expected.numpy()).all()


def test_missing_weights_file_names_it_and_what_to_provide(tmp_path):
    missing = str(tmp_path / "nowhere.h5")
    with pytest.raises(FileNotFoundError, match="nowhere.h5") as error:
        classifier.build_model(4, config(weights_path=missing))
    assert "no_top.h5" in str(error.value) and "from scratch" in str(error.value)


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="epochz"):
        classifier.TrainingConfig.from_custom_config({"epochz": 3})
