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


def test_decode_images_takes_a_batch_of_serialized_tensors():
    images = [np.random.default_rng(i).normal(size=(40, 50)).astype(np.float32) for i in range(3)]
    serialized = tf.constant([[tf.io.serialize_tensor(im).numpy()] for im in images])
    out = transform.decode_images(serialized, 32).numpy()
    assert out.shape == (3, 32, 32, 1)
