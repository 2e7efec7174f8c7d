import dataclasses

import numpy as np
import pytest

from components import contract
from components.defects import DEFECT_CLASSES


def make_micrograph(**changes):
    rng = np.random.default_rng(0)
    fields = dict(
        image=rng.normal(100, 10, (48, 64)).astype(np.float32),
        material="SrTiO3",
        label="vacancy",
        pixel_size_pm=20.5,
        source="synthetic:seed=1:index=2",
        defect_classes=np.eye(len(DEFECT_CLASSES), dtype=np.int64)[0],
        mask_true=(rng.random((len(DEFECT_CLASSES), 48, 64)) > 0.9).astype(np.uint8),
        dose=5000.0,
    )
    fields.update(changes)
    return contract.Micrograph(**fields)


def test_round_trip_is_lossless():
    original = make_micrograph()
    decoded = contract.from_example(contract.to_example(original).SerializeToString())
    assert decoded.image.dtype == np.float32 and decoded.image.tobytes() == original.image.tobytes()
    assert decoded.mask_true.dtype == np.uint8
    np.testing.assert_array_equal(decoded.mask_true, original.mask_true)
    np.testing.assert_array_equal(decoded.defect_classes, original.defect_classes)
    assert (decoded.material, decoded.label, decoded.source) == (original.material, original.label, original.source)
    assert decoded.pixel_size_pm == pytest.approx(20.5)
    assert decoded.dose == pytest.approx(5000.0)


def test_real_micrograph_without_ground_truth_round_trips():
    original = make_micrograph(mask_true=None, defect_classes=None, dose=None, label="Vacancy_cluster")
    decoded = contract.from_example(contract.to_example(original))
    assert decoded.mask_true is None and decoded.defect_classes is None and decoded.dose is None
    assert decoded.label == "Vacancy_cluster"


def with_pseudo_labels(micrograph, **changes):
    rng = np.random.default_rng(1)
    fields = dict(
        deviation=rng.normal(0, 3, micrograph.image.shape).astype(np.float32),
        deviation_z=rng.normal(0, 1, micrograph.image.shape).astype(np.float32),
        mask_pseudo=(rng.random((len(DEFECT_CLASSES),) + micrograph.image.shape) > 0.95).astype(np.uint8),
        noise_sigma=2.5,
        pseudo_label_status="ok",
    )
    fields.update(changes)
    return dataclasses.replace(micrograph, **fields)


def test_pseudo_labels_round_trip_and_leave_the_other_features_unchanged():
    original = make_micrograph()
    labelled = with_pseudo_labels(original)
    example = contract.to_example(labelled)
    decoded = contract.from_example(example.SerializeToString())
    assert decoded.deviation.dtype == np.float32
    assert decoded.deviation.tobytes() == labelled.deviation.tobytes()
    assert decoded.deviation_z.tobytes() == labelled.deviation_z.tobytes()
    assert decoded.mask_pseudo.dtype == np.uint8
    np.testing.assert_array_equal(decoded.mask_pseudo, labelled.mask_pseudo)
    assert decoded.noise_sigma == pytest.approx(2.5)
    assert decoded.pseudo_label_status == "ok"
    plain = contract.to_example(original).features.feature
    assert set(example.features.feature) == set(plain) | set(contract.PSEUDO_LABEL_KEYS)
    for key in plain:
        assert example.features.feature[key] == plain[key], key


def test_micrograph_without_pseudo_labels_has_none_and_no_pseudo_label_features():
    example = contract.to_example(make_micrograph())
    assert not set(contract.PSEUDO_LABEL_KEYS) & set(example.features.feature)
    decoded = contract.from_example(example)
    assert decoded.deviation is None and decoded.deviation_z is None and decoded.mask_pseudo is None
    assert decoded.noise_sigma is None and decoded.pseudo_label_status is None


def test_no_lattice_status_round_trips():
    labelled = with_pseudo_labels(make_micrograph(), pseudo_label_status="no_lattice: too few peaks")
    decoded = contract.from_example(contract.to_example(labelled))
    assert decoded.pseudo_label_status == "no_lattice: too few peaks"


def test_serialized_array_matches_tensorflow():
    import tensorflow as tf

    image = make_micrograph().image
    assert contract.serialize_array(image) == tf.io.serialize_tensor(image).numpy()


@pytest.mark.parametrize("changes, message", [
    (dict(image=np.full((8, 8), np.nan, np.float32)), "NaN"),
    (dict(image=np.zeros((2, 8, 8), np.float32), mask_true=None), "2-D"),
    (dict(pixel_size_pm=0.0), "pixel size"),
    (dict(mask_true=np.zeros((1, 48, 64), np.uint8)), "mask shape"),
])
def test_bad_micrograph_names_source_and_problem(changes, message):
    with pytest.raises(ValueError, match=message) as error:
        contract.to_example(make_micrograph(**changes))
    assert "synthetic:seed=1:index=2" in str(error.value)


@pytest.mark.parametrize("changes, message", [
    (dict(deviation=np.zeros((48, 63), np.float32)), "deviation shape"),
    (dict(deviation_z=np.zeros((48, 63), np.float32)), "deviation_z shape"),
    (dict(mask_pseudo=np.zeros((len(DEFECT_CLASSES), 64, 48), np.uint8)), "mask_pseudo: mask shape"),
])
def test_bad_pseudo_labels_name_source_and_problem(changes, message):
    with pytest.raises(ValueError, match=message) as error:
        contract.to_example(with_pseudo_labels(make_micrograph(), **changes))
    assert "synthetic:seed=1:index=2" in str(error.value)
