import numpy as np
import pytest
import tensorflow as tf

from components import contract
from components.defects import DEFECT_CLASSES
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


def hand_made_mask() -> np.ndarray:
    """100 x 100, 6 classes: one vacancy pixel, a 10 x 10 dislocation patch, everything
    marked as stacking fault."""
    mask = np.zeros((len(DEFECT_CLASSES), 100, 100), np.uint8)
    mask[DEFECT_CLASSES.index("vacancy"), 50, 50] = 1
    mask[DEFECT_CLASSES.index("dislocation"), :10, :10] = 1
    mask[DEFECT_CLASSES.index("stacking_fault")] = 1
    return mask


def test_teacher_vector_of_a_hand_made_mask():
    area = np.zeros(len(DEFECT_CLASSES))
    area[DEFECT_CLASSES.index("vacancy")] = np.log1p(1.0) / np.log1p(1e4)  # fraction 1e-4
    area[DEFECT_CLASSES.index("dislocation")] = np.log1p(100.0) / np.log1p(1e4)  # 1e-2
    area[DEFECT_CLASSES.index("stacking_fault")] = 1.0
    expected = np.concatenate([area, (area > 0).astype(float)])
    assert transform.TEACHER_SIZE == len(expected)

    mask = hand_made_mask()
    out = transform.teacher_vector(tf.constant(mask)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    # batched masks (serving_maps), any nonzero value, float masks: the same vectors
    batch = np.stack([mask, 255 * mask, np.zeros_like(mask)])
    out = transform.teacher_vector(tf.constant(batch)).numpy()
    np.testing.assert_allclose(out[0], expected, rtol=1e-5)
    np.testing.assert_allclose(out[1], expected, rtol=1e-5)
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_allclose(transform.teacher_vector(tf.constant(mask, tf.float32)).numpy(),
                               expected, rtol=1e-5)


def test_decode_teacher_reads_serialized_masks_of_any_size():
    masks = [hand_made_mask(), np.zeros((len(DEFECT_CLASSES), 30, 40), np.uint8)]
    features = {contract.MASK_PSEUDO: tf.constant(
        [[contract.serialize_array(m)] for m in masks])}
    out = transform.decode_teacher(features).numpy()
    assert out.shape == (2, transform.TEACHER_SIZE)
    np.testing.assert_allclose(out[0], transform.teacher_vector(tf.constant(masks[0])).numpy())
    np.testing.assert_array_equal(out[1], 0.0)


def test_preprocessing_fn_writes_the_teacher_vector_only_when_configured(monkeypatch):
    # the vocabulary analyzer needs a Beam pipeline; here it is the identity
    monkeypatch.setattr(transform.tft, "compute_and_apply_vocabulary", lambda x, **_: x)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(100, 100)).astype(np.float32)
    inputs = {contract.LABEL: tf.constant([[b"vacancy"]]),
              contract.DEVIATION_Z: tf.constant([[contract.serialize_array(image)]]),
              contract.MASK_PSEUDO: tf.constant([[contract.serialize_array(hand_made_mask())]])}
    on = transform.preprocessing_fn(inputs, {"input_size": 32})
    assert set(on) == {transform.IMAGE_XF, transform.LABEL_XF, transform.TEACHER_XF}
    np.testing.assert_allclose(on[transform.TEACHER_XF].numpy()[0],
                               transform.teacher_vector(tf.constant(hand_made_mask())).numpy())
    off = transform.preprocessing_fn(inputs, {"input_size": 32, "teacher_features": False})
    assert set(off) == {transform.IMAGE_XF, transform.LABEL_XF}


def test_teacher_features_option_must_be_a_boolean():
    assert transform.teacher_features(None) is transform.DEFAULT_TEACHER_FEATURES
    assert transform.teacher_features({"teacher_features": False}) is False
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="teacher_features"):
            transform.teacher_features({"teacher_features": bad})
