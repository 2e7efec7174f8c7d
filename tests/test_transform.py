import numpy as np
import pytest
import tensorflow as tf

from modules import transform


def dominant_period(profile: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(profile - profile.mean()))
    return len(profile) / np.argmax(spectrum)


def test_non_square_image_is_cut_to_its_central_square():
    image = np.zeros((64, 96), np.float32)
    image[:, 16:80] = 1.0  # the central 64 x 64 square
    out = transform.square_and_resize(tf.constant(image), 32).numpy()
    assert out.shape == (32, 32, 1)
    assert out.min() == pytest.approx(1.0)


def test_resize_keeps_the_lattice_square():
    y, x = np.mgrid[0:64, 0:96].astype(np.float32)
    lattice = np.cos(2 * np.pi * x / 8) + np.cos(2 * np.pi * y / 8)  # square cell, 8 px
    out = transform.square_and_resize(tf.constant(lattice), 32).numpy()[..., 0]
    period_x = dominant_period(out.mean(axis=0))
    period_y = dominant_period(out.mean(axis=1))
    assert period_x == pytest.approx(4.0) and period_y == pytest.approx(4.0)


def test_small_patch_is_enlarged_without_error():
    out = transform.square_and_resize(tf.random.normal([20, 24]), 64)
    assert out.shape == (64, 64, 1)


def test_standardise_removes_dose_and_gain():
    rng = np.random.default_rng(0)
    image = rng.poisson(500, (1, 16, 16, 1)).astype(np.float32)[0]
    out = transform.standardise(tf.constant(image)).numpy()
    assert out.mean() == pytest.approx(0.0, abs=1e-5) and out.std() == pytest.approx(1.0, abs=1e-3)
    brighter = transform.standardise(tf.constant(3 * image + 40)).numpy()
    np.testing.assert_allclose(brighter, out, atol=1e-4)


def test_decode_inputs_stacks_the_configured_channels():
    rng = np.random.default_rng(0)
    images = [rng.normal(5.0, 2.0, size=(40, 50)).astype(np.float32) for _ in range(3)]
    deviations = [np.full((40, 50), 30.0, np.float32) for _ in range(3)]  # beyond the clip
    features = {
        "image": tf.constant([[tf.io.serialize_tensor(im).numpy()] for im in images]),
        "deviation_z": tf.constant([[tf.io.serialize_tensor(d).numpy()] for d in deviations]),
    }
    out = transform.decode_inputs(features, 32, ("image", "deviation_z", "image")).numpy()
    assert out.shape == (3, 32, 32, 3)
    assert out[..., 0].mean() == pytest.approx(0.0, abs=1e-4)  # standardised intensities
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    expected = transform.DEVIATION_CLIP / transform.DEVIATION_SCALE
    np.testing.assert_allclose(out[..., 1], expected, rtol=1e-5)


def test_unknown_channel_source_is_refused():
    with pytest.raises(ValueError, match="input_channels"):
        transform.input_channels({"input_channels": ["image", "phase", "image"]})
    assert transform.input_channels(None) == transform.DEFAULT_CHANNELS
