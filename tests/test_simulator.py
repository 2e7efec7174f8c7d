import itertools
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from components.defects import BULK_LABEL, DEFECT_CLASSES, IMAGE_CLASSES, class_index
from components.materials import ATOMIC_NUMBERS, MATERIALS, get_material
from components.synthesis.simulator import (
    SimulationConfig,
    plan_dataset,
    seed_for,
    simulate_image,
)

MATERIAL_NAMES = sorted(MATERIALS)

# Noise-free, axis-aligned, fixed 20 pm pixels, core-only probe: peaks are exact Gaussians.
CLEAN = SimulationConfig(
    pixel_size_pm=(20.0, 20.0),
    dose=(1e4, 1e4),
    noise=False,
    rotation=False,
    background=(0.0, 0.0),
    probe_tail_weight=0.0,
)


def _peaks(image, rel_threshold, border=6):
    """Sub-pixel (y, x) and height of local maxima above rel_threshold * max.

    Fits a parabola to the log image along y and x: exact for an isolated Gaussian column.
    """
    is_max = image == ndimage.maximum_filter(image, size=5)
    is_max &= image > rel_threshold * image.max()
    is_max[:border] = is_max[-border:] = False
    is_max[:, :border] = is_max[:, -border:] = False
    ys, xs = np.nonzero(is_max)
    log = np.log(np.maximum(image.astype(np.float64), 1e-30))
    centre = log[ys, xs]

    def vertex(minus, plus):
        curvature = minus - 2 * centre + plus
        return 0.5 * (minus - plus) / curvature, -((minus - plus) ** 2) / (8 * curvature)

    dy, hy = vertex(log[ys - 1, xs], log[ys + 1, xs])
    dx, hx = vertex(log[ys, xs - 1], log[ys, xs + 1])
    peaks, heights = np.stack([ys + dy, xs + dx], axis=1), np.exp(centre + hy + hx)
    # A column centred between pixels gives a two-pixel plateau: keep one maximum of it.
    d = np.hypot(*(peaks[:, None, :] - peaks[None, :, :]).transpose(2, 0, 1))
    unique = ~np.any(np.triu(d < 1.0, k=1), axis=0)
    return peaks[unique], heights[unique]


def _nearest_neighbour_vectors(points, size=256, margin=30):
    """Vector to the nearest other peak, for peaks far enough inside that it was detected."""
    d = points[None, :, :] - points[:, None, :]
    dist = np.hypot(d[..., 0], d[..., 1])
    np.fill_diagonal(dist, np.inf)
    vectors = d[np.arange(len(points)), dist.argmin(axis=1)]
    interior = np.all((points > margin) & (points < size - 1 - margin), axis=1)
    return vectors[interior], interior


# --- lattice geometry -------------------------------------------------------------------


def test_srtio3_sr_columns_are_a_apart():
    sim = simulate_image("SrTiO3", BULK_LABEL, 1, CLEAN)
    peaks, _ = _peaks(sim.image, 0.7)  # Sr only: TiO peaks are at 47 %
    assert len(peaks) > 100
    vectors, _ = _nearest_neighbour_vectors(peaks)
    spacing = np.hypot(vectors[:, 0], vectors[:, 1])
    expected = 3.905 / 0.20
    np.testing.assert_allclose(spacing, expected, rtol=2e-3)
    # No rotation: neighbours lie along the image axes.
    assert np.all(np.minimum(abs(vectors[:, 0]), abs(vectors[:, 1])) < 0.05)


def test_rotation_keeps_lattice_spacing():
    config = SimulationConfig(
        pixel_size_pm=(20.0, 20.0), noise=False, background=(0.0, 0.0), probe_tail_weight=0.0
    )
    sim = simulate_image("SrTiO3", BULK_LABEL, 3, config)
    assert 1.0 < sim.rotation_deg % 90 < 89.0
    vectors, _ = _nearest_neighbour_vectors(_peaks(sim.image, 0.7)[0])
    np.testing.assert_allclose(np.hypot(vectors[:, 0], vectors[:, 1]), 3.905 / 0.20, rtol=5e-3)
    angles = np.degrees(np.arctan2(vectors[:, 0], vectors[:, 1]))
    np.testing.assert_allclose((angles - sim.rotation_deg + 45) % 90 - 45, 0, atol=0.5)


def test_cdte_dumbbells_are_a_over_4_along_001_with_te_on_top():
    sim = simulate_image("CdTe", BULK_LABEL, 2, CLEAN)
    peaks, heights = _peaks(sim.image, 0.5)
    assert len(peaks) > 100
    vectors, interior = _nearest_neighbour_vectors(peaks)
    np.testing.assert_allclose(np.hypot(vectors[:, 0], vectors[:, 1]), 1.620 / 0.20, rtol=3e-3)
    assert np.all(abs(vectors[:, 1]) < 0.05)  # dumbbells along y = [001]
    # Te (Z=52) is the brighter end and sits at +y of its Cd (Z=48).
    d = (peaks[interior] + vectors)[:, None, :] - peaks[None, :, :]
    partner = np.hypot(d[..., 0], d[..., 1]).argmin(axis=1)
    heights, is_te = heights[interior], heights[interior] > heights[partner]
    np.testing.assert_array_equal(is_te, vectors[:, 0] < 0)
    ratio = heights[is_te].mean() / heights[~is_te].mean()
    np.testing.assert_allclose(ratio, (52 / 48) ** 1.7, rtol=0.01)


def test_cdte_registry_matches_projected_zinc_blende():
    cdte = get_material("CdTe")
    a = 6.481
    fcc = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    basis = {"Cd": np.zeros(3), "Te": np.full(3, 0.25)}
    np.testing.assert_allclose(cdte.cell, (a / np.sqrt(2), a), rtol=1e-4)
    for element, shift in basis.items():
        atoms = (fcc + shift) * a
        # x along [1-10], y along [001]; fractional in the projected cell.
        u = ((atoms[:, 0] - atoms[:, 1]) / np.sqrt(2) / cdte.cell[0]) % 1
        v = (atoms[:, 2] / cdte.cell[1]) % 1
        projected = {(round(x, 4) % 1, round(y, 4) % 1) for x, y in zip(u, v)}
        registry = {c.position for c in cdte.columns if c.name == element}
        assert projected == registry


@pytest.mark.parametrize("material", MATERIAL_NAMES)
def test_interstitial_sites_are_in_empty_channels(material):
    bulk = simulate_image(material, BULK_LABEL, 4, CLEAN)
    inter = simulate_image(material, "interstitial", 4, CLEAN)
    d = inter.defect_positions[:, None, :] - bulk.column_positions[None, :, :]
    nearest_a = np.hypot(d[..., 0], d[..., 1]).min(axis=1) * 0.20
    assert np.all(nearest_a > 1.3)


# --- intensities ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1.7, 1.0])
def test_column_peaks_follow_z_to_the_n(n):
    # 5 pm pixels sample the 40 pm probe finely: the nearest pixel is within 0.4 % of the peak.
    config = SimulationConfig(
        size=256, pixel_size_pm=(5.0, 5.0), dose=(1e4, 1e4), noise=False, rotation=False,
        background=(0.0, 0.0), probe_tail_weight=0.0, z_exponent=n,
    )
    sim = simulate_image("SrTiO3", BULK_LABEL, 5, config)
    inside = np.all((sim.column_positions > 3) & (sim.column_positions < 252), axis=1)

    def mean_peak(name):
        yx = np.round(sim.column_positions[inside & (sim.column_names == name)]).astype(int)
        assert len(yx) >= 2
        return sim.image[yx[:, 0], yx[:, 1]].mean()

    z = ATOMIC_NUMBERS
    np.testing.assert_allclose(mean_peak("Sr") / mean_peak("O"), (z["Sr"] / z["O"]) ** n, rtol=0.01)
    np.testing.assert_allclose(
        mean_peak("TiO") / mean_peak("Sr"), (z["Ti"] ** n + z["O"] ** n) / z["Sr"] ** n, rtol=0.01
    )


def test_reference_column_scatters_the_reference_fraction():
    sim = simulate_image("SrTiO3", BULK_LABEL, 6, CLEAN)
    electrons = sim.dose * (sim.pixel_size_pm / 100) ** 2
    _, heights = _peaks(sim.image, 0.7)
    np.testing.assert_allclose(heights, 0.05 * electrons, rtol=1e-3)


# --- defects ----------------------------------------------------------------------------

# Sign of (defect - bulk) at the defect columns.
EXPECTED_SIGN = {
    ("SrTiO3", "vacancy"): -1,
    ("SrTiO3", "substitution"): +1,  # La for Sr, Nb for Ti: heavier
    ("SrTiO3", "interstitial"): +1,
    ("CdTe", "vacancy"): -1,
    ("CdTe", "substitution"): -1,  # Zn for Cd, Se for Te: lighter
    ("CdTe", "interstitial"): +1,
}


@pytest.mark.parametrize("material,label", sorted(EXPECTED_SIGN))
@pytest.mark.parametrize("seed", [7, 8])
def test_defect_changes_only_its_own_columns(material, label, seed):
    config = SimulationConfig(noise=False)  # rotation, background and probe tail stay on
    bulk = simulate_image(material, BULK_LABEL, seed, config)
    defect = simulate_image(material, label, seed, config)
    diff = defect.image.astype(np.float64) - bulk.image
    peak = abs(diff).max()
    sign = EXPECTED_SIGN[material, label]

    assert peak > 0.1 * bulk.image.max()
    assert np.all(sign * diff > -1e-4 * peak)
    channel = defect.mask[class_index(label)].astype(bool)
    near = ndimage.binary_dilation(channel, structure=np.ones((3, 3)), iterations=4)
    assert not np.any((abs(diff) > 0.02 * peak) & ~near)
    for y, x in np.round(defect.defect_positions).astype(int):
        assert sign * diff[y, x] > 0.1 * peak
    if label != "interstitial":
        changed = np.flatnonzero(defect.column_intensities != bulk.column_intensities)
        assert len(changed) == len(defect.defect_positions)


@pytest.mark.parametrize("material", MATERIAL_NAMES)
@pytest.mark.parametrize("label", IMAGE_CLASSES)
def test_mask_and_classes_match_label(material, label):
    sim = simulate_image(material, label, 9)
    assert sim.mask.shape == (len(DEFECT_CLASSES), 256, 256) and sim.mask.dtype == np.uint8
    assert sim.defect_classes.dtype == np.int64
    assert sim.label == label and sim.material == material
    if label == BULK_LABEL:
        assert not sim.mask.any() and not sim.defect_classes.any()
        assert len(sim.defect_positions) == 0
        return
    k = class_index(label)
    np.testing.assert_array_equal(sim.defect_classes, np.eye(len(DEFECT_CLASSES), dtype=int)[k])
    assert not np.delete(sim.mask, k, axis=0).any()
    assert 1 <= len(sim.defect_positions) <= 3
    assert np.all((sim.defect_positions >= 16) & (sim.defect_positions <= 255 - 16))
    for y, x in np.round(sim.defect_positions).astype(int):
        assert sim.mask[k, y, x] == 1
    # Each disc has radius mask_radius_pm: area pi r^2 per defect (unless discs touch).
    radius_px = 60.0 / sim.pixel_size_pm
    _, n_discs = ndimage.label(sim.mask[k])
    assert abs(sim.mask[k].sum() / n_discs - np.pi * radius_px**2) < 2 * np.pi * radius_px + 2


# --- randomness -------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different_bytes():
    first = simulate_image("CdTe", "vacancy", seed_for(11, 3))
    np.random.seed(0)  # global state must not matter
    again = simulate_image("CdTe", "vacancy", seed_for(11, 3))
    other = simulate_image("CdTe", "vacancy", seed_for(11, 4))
    assert first.image.tobytes() == again.image.tobytes()
    assert first.mask.tobytes() == again.mask.tobytes()
    assert first.image.tobytes() != other.image.tobytes()
    assert first.mask.tobytes() != other.mask.tobytes()
    assert (first.seed_entropy, first.seed_spawn_key) == ((11, 3), ())


def test_a_seed_sequence_can_be_reused():
    seq = seed_for(12, 0)
    a = simulate_image("SrTiO3", "interstitial", seq)
    b = simulate_image("SrTiO3", "interstitial", seq)
    assert a.image.tobytes() == b.image.tobytes()


def test_shot_noise_is_poisson_and_snr_grows_with_dose():
    def residual(dose):
        base = dict(dose=(dose, dose), readout_noise=0.0)
        clean = simulate_image("SrTiO3", BULK_LABEL, 13, SimulationConfig(noise=False, **base))
        noisy = simulate_image("SrTiO3", BULK_LABEL, 13, SimulationConfig(**base))
        return clean.image.astype(np.float64), noisy.image - clean.image.astype(np.float64), noisy

    expected, r, noisy = residual(2e3)
    np.testing.assert_array_equal(noisy.image, np.round(noisy.image))  # counts are integers
    assert abs(r.mean()) < 4 * np.sqrt(expected.mean() / r.size)
    # Variance equals the mean, separately for bright (column) and dim (channel) pixels;
    # the estimate scatters by ~1.5 % between seeds, so 6 % is a 4-sigma bound.
    bright = expected > np.median(expected)
    for part in (bright, ~bright):
        np.testing.assert_allclose((r[part] ** 2).mean() / expected[part].mean(), 1.0, rtol=0.06)

    expected_hi, r_hi, _ = residual(2e4)
    np.testing.assert_allclose(expected_hi, 10 * expected, rtol=1e-5)
    snr_gain = (np.linalg.norm(r) / np.linalg.norm(expected)) / (
        np.linalg.norm(r_hi) / np.linalg.norm(expected_hi)
    )
    np.testing.assert_allclose(snr_gain, np.sqrt(10), rtol=0.05)


def test_readout_noise_adds_its_variance():
    base = dict(size=128, dose=(2e3, 2e3), readout_noise=2.0)
    clean = simulate_image("CdTe", BULK_LABEL, 14, SimulationConfig(noise=False, **base))
    noisy = simulate_image("CdTe", BULK_LABEL, 14, SimulationConfig(**base))
    r = noisy.image - clean.image.astype(np.float64)
    np.testing.assert_allclose((r**2).mean(), clean.image.mean() + 4.0, rtol=0.05)


def test_plan_is_balanced_deterministic_and_prefix_stable():
    materials, labels = MATERIAL_NAMES, list(IMAGE_CLASSES)
    plan = plan_dataset(21, materials, labels, base_seed=5)
    assert [i for i, _, _ in plan] == list(range(21))
    counts = Counter((m, lab) for _, m, lab in plan)
    assert set(counts) == set(itertools.product(materials, labels))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert plan == plan_dataset(21, materials, labels, base_seed=5)
    assert plan[:13] == plan_dataset(13, materials, labels, base_seed=5)
    assert plan != plan_dataset(21, materials, labels, base_seed=6)


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dose=(-1.0, 10.0)), "dose"),
        (dict(dose=(2e4, 2e3)), "low <= high"),
        (dict(pixel_size_pm=(0.0, 20.0)), "pixel_size_pm"),
        (dict(probe_sigma_pm=-5.0), "probe_sigma_pm"),
        (dict(readout_noise=-1.0), "readout_noise"),
        (dict(probe_tail_weight=1.5), "probe_tail_weight"),
        (dict(vacancy_occupancy=(0.0, 2.0)), "vacancy_occupancy"),
        (dict(size=8), "size"),
        (dict(defects_per_image=(0, 2)), "defects_per_image"),
        (dict(defect_margin_px=200), "defect_margin_px"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulationConfig(**kwargs)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="CdTe, SrTiO3"):
        simulate_image("GaAs", BULK_LABEL, 0)
    with pytest.raises(ValueError, match="bulk, vacancy"):
        simulate_image("CdTe", "dislocation", 0)
    with pytest.raises(ValueError, match="known labels"):
        plan_dataset(4, ["CdTe"], ["bulk", "grain"], 0)
