"""Tests of the weak-supervision teacher: pseudo-labels from deviations against the bulk lattice.

Hand-built images (Gaussian columns on a lattice with Poisson noise) have exactly known
defects; simulator images check the teacher on the data the pipeline trains on. The teacher
only ever sees the image.
"""

import ast
import inspect
import math

import numpy as np
import pytest

from components.defects import DEFECT_CLASSES, class_index
from components.pseudo_labels import lattice as teacher
from components.pseudo_labels.lattice import (
    PseudoLabelConfig,
    estimate_lattice,
    noise_level,
    pseudo_labels,
    quality,
    reconstruct_bulk,
)
from components.synthesis.simulator import SimulationConfig, simulate_image

A = 18.0  # lattice constant of the hand-built images, pixels
SIGMA = 1.8  # their column width, pixels
# Bright columns at the cell corners, half as bright ones at the centres.
BASIS = (((0.0, 0.0), 1.0), ((0.5, 0.5), 0.5))
# High dose, fixed thickness and pixel size: every drawn defect is far above the noise.
STRONG = dict(dose=(2e4, 2e4), thickness_nm=(15.0, 15.0), pixel_size_pm=(20.0, 20.0))


def lattice_image(size=192, angle_deg=0.0, peak=80.0, background=4.0, seed=0, edit=None,
                  line_shift=None):
    """Poisson image of a square two-column lattice; returns (image, columns, weights).

    columns are (y, x) pixel positions; edit(columns, weights) may change them in place
    (a weight of 0 is a vacancy) and return extra (position, weight) columns. line_shift
    (size,): scan line y shows the specimen moved by line_shift[y] along x (scan jitter).
    """
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    centre = np.array([size / 2 + 0.3, size / 2 - 0.2])
    n = int(size / A) + 3
    cells = np.array([(i, j) for i in range(-n, n + 1) for j in range(-n, n + 1)], float)
    pos, wts = [], []
    for uv, w in BASIS:
        pos.append(centre + (cells + uv) @ (A * rot).T)
        wts.append(np.full(len(cells), w))
    pos, wts = np.concatenate(pos), np.concatenate(wts)
    inside = np.all((pos > -4 * SIGMA) & (pos < size + 4 * SIGMA), axis=1)
    pos, wts = pos[inside], wts[inside]
    extra = edit(pos, wts) if edit else []
    for p, w in extra:
        pos = np.vstack([pos, p])
        wts = np.append(wts, w)
    clean = np.full((size, size), float(background))
    yy, xx = np.mgrid[0:size, 0:size]
    if line_shift is not None:
        xx = xx - np.asarray(line_shift)[:, None]
    r = int(5 * SIGMA)
    for (y, x), w in zip(pos, wts):
        y0, y1 = max(0, int(y) - r), min(size, int(y) + r + 2)
        x0, x1 = max(0, int(x) - r), min(size, int(x) + r + 2)
        if y0 < y1 and x0 < x1:
            d2 = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2
            clean[y0:y1, x0:x1] += peak * w * np.exp(-0.5 * d2 / SIGMA**2)
    image = np.random.default_rng(seed).poisson(clean).astype(np.float32)
    return image, pos, wts


def central_column(pos, wts, weight=1.0):
    """Index of the column of the given weight nearest the image centre."""
    size = 192
    d = np.hypot(*(pos - size / 2).T)
    d[wts != weight] = np.inf
    return int(np.argmin(d))


def only_channels(mask, allowed):
    """Channels other than `allowed` that hold any pixel."""
    return [c for c in DEFECT_CLASSES if c not in allowed and mask[class_index(c)].any()]


def near(mask, centre, radius):
    """Fraction of the mask's pixels within `radius` of `centre`."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0.0
    return float(np.mean(np.hypot(ys - centre[0], xs - centre[1]) <= radius))


# --------------------------------------------------------------------------- lattice


def test_estimate_lattice_recovers_srtio3_cell():
    for seed in (1, 2):
        sim = simulate_image("SrTiO3", "bulk", seed)  # default: noise, rotation, distortions
        lattice = estimate_lattice(sim.image)
        expected = 3.905 / (sim.pixel_size_pm / 100.0)
        lengths = np.hypot(*lattice.vectors.T)
        assert np.allclose(lengths, expected, rtol=0.01), (lengths, expected)
        cos = lattice.vectors[0] @ lattice.vectors[1] / lengths.prod()
        assert abs(cos) < math.sin(math.radians(1.0))  # square cell, within scan shear
        # the vectors follow the drawn rotation (mod 90 degrees)
        angle = math.degrees(math.atan2(lattice.vectors[0][0], lattice.vectors[0][1]))
        off = (angle - sim.rotation_deg) % 90.0
        assert min(off, 90.0 - off) < 1.0, (angle, sim.rotation_deg)


def test_rotated_lattice_recovered_like_aligned_one():
    for angle in (0.0, 27.0, 63.5):
        image, _, _ = lattice_image(angle_deg=angle)
        lattice = estimate_lattice(image)
        lengths = np.hypot(*lattice.vectors.T)
        assert np.allclose(lengths, A, rtol=0.003), (angle, lengths)
        found = math.degrees(math.atan2(lattice.vectors[0][0], lattice.vectors[0][1]))
        # lattice_image puts the first cell vector along (y, x) = (cos, sin) of the angle
        t = math.radians(angle)
        drawn = math.degrees(math.atan2(math.cos(t), math.sin(t)))
        off = (found - drawn) % 90.0
        assert min(off, 90.0 - off) < 0.2, (angle, found)


def test_reconstruct_bulk_reproduces_a_perfect_lattice():
    image, _, _ = lattice_image(peak=400.0, angle_deg=12.0)
    bulk = reconstruct_bulk(image)
    assert bulk.shape == image.shape and bulk.dtype == np.float32
    residual = image - bulk
    # what is left is the Poisson noise: sqrt(counts) on average
    assert np.sqrt(np.mean(residual**2)) < 1.15 * np.sqrt(np.mean(image))


def test_noise_level_is_the_pixel_noise():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:128, 0:128]
    smooth = 50 + 10 * np.sin(xx / 15.0) + 0.1 * yy
    image = smooth + rng.normal(0, 3.0, smooth.shape)
    assert noise_level(image) == pytest.approx(3.0, rel=0.1)
    assert noise_level(image, bulk=smooth) == pytest.approx(3.0, rel=0.05)


# ------------------------------------------------------------------------- point defects


def test_missing_column_is_a_vacancy_there_and_nowhere_else():
    for angle in (0.0, 33.0):  # aligned and rotated: the same vacancy
        picked = {}

        def remove(pos, wts):
            picked["k"] = central_column(pos, wts)
            picked["at"] = pos[picked["k"]].copy()
            wts[picked["k"]] = 0.0
            return []

        image, _, _ = lattice_image(angle_deg=angle, edit=remove)
        result = pseudo_labels(image)
        vacancy = result.mask[class_index("vacancy")]
        assert vacancy.any(), angle
        assert near(vacancy, picked["at"], 2.5 * SIGMA) == 1.0, angle
        assert only_channels(result.mask, {"vacancy"}) == [], angle
        # about the simulator's disc: 1.5 column sigmas
        assert 0.5 * np.pi * (1.5 * SIGMA) ** 2 < vacancy.sum() < 2.0 * np.pi * (1.5 * SIGMA) ** 2
        labels = [d[0] for d in result.detections]
        assert labels == ["vacancy"]
        assert result.detections[0][4] < -0.9  # the column lost (nearly) all its intensity


def site_z(line_shift, seed):
    """The teacher's Z at the column sites of a defect-free hand-built image (bright,
    peak 600 counts: the bulk model's errors show above the shot noise)."""
    size = 192
    image, pos, _ = lattice_image(size=size, angle_deg=12.0, peak=600.0, seed=seed,
                                  line_shift=line_shift)
    result = pseudo_labels(image)
    inner = np.all((pos > 12) & (pos < size - 13), axis=1)
    rows = np.rint(pos[inner, 0]).astype(int)
    cols = np.rint(pos[inner, 1] + line_shift[rows]).astype(int)
    return result.z[rows, cols]


@pytest.mark.parametrize("seed", [3, 4])
def test_bulk_model_keeps_the_column_peaks(seed):
    """Binning the template and sampling it back blurs every column a little; unless the
    fit takes that out, every site of a perfect crystal reads brighter than its model."""
    z = site_z(np.zeros(192), seed)
    assert abs(z.mean()) < 0.3, z.mean()
    assert 0.8 < z.std() < 1.15, z.std()


@pytest.mark.parametrize("seed", [3, 4])
def test_scan_jitter_keeps_the_site_statistic_near_unit_variance(seed):
    """Every scan line shifted as a whole (0.3 px rms, the simulator's default): the error
    is correlated along the line and its first-order part cancels across a column's
    symmetric profile, so a per-pixel jitter variance would shrink the sites' Z."""
    shift = np.random.default_rng(11 + seed).normal(0.0, 0.3, 192)
    z = site_z(shift, seed)
    assert 0.75 < z.std() < 1.15, z.std()


def test_defect_free_images_get_almost_no_mask():
    for angle in (0.0, 41.0):
        image, _, _ = lattice_image(angle_deg=angle, seed=5)
        result = pseudo_labels(image)
        assert result.mask.any(axis=0).mean() < 0.001
    for material, seed in (("SrTiO3", 4), ("CdTe", 4), ("CdTe", 7)):
        sim = simulate_image(material, "bulk", seed)  # default config, noise on
        result = pseudo_labels(sim.image)
        assert result.mask.any(axis=0).mean() < 0.001, (material, seed)


def test_brighter_column_is_a_substitution_not_a_vacancy():
    for factor in (1.8, 0.5):  # a heavier substituent; a lighter one (loses half)
        picked = {}

        def scale(pos, wts):
            picked["k"] = central_column(pos, wts)
            picked["at"] = pos[picked["k"]].copy()
            wts[picked["k"]] *= factor
            return []

        image, _, _ = lattice_image(angle_deg=19.0, edit=scale, seed=2)
        result = pseudo_labels(image)
        sub = result.mask[class_index("substitution")]
        assert near(sub, picked["at"], 2.5 * SIGMA) == 1.0, factor
        assert not result.mask[class_index("vacancy")].any(), factor
        assert only_channels(result.mask, {"substitution"}) == [], factor
        rel = [d[4] for d in result.detections if d[0] == "substitution"]
        assert rel and abs(rel[0] - (factor - 1)) < 0.15, (factor, rel)


def test_substitution_sign_keeps_only_the_contrast_the_material_allows():
    """A heavier substituent brightens its column, a lighter one dims it (Z-contrast): with
    the material's sign given, a column changed the other way is no substitution, and the
    teacher labels nothing else in its place."""
    for factor, sign in ((1.8, 1), (0.5, -1)):
        picked = {}

        def scale(pos, wts):
            picked["k"] = central_column(pos, wts)
            wts[picked["k"]] *= factor
            return []

        image, _, _ = lattice_image(angle_deg=19.0, edit=scale, seed=2)
        assert pseudo_labels(image, substitution_sign=sign).mask[class_index("substitution")].any()
        refused = pseudo_labels(image, substitution_sign=-sign)
        assert not refused.mask.any(), factor
        assert [d[0] for d in refused.detections] == [], factor
    with pytest.raises(ValueError, match="substitution_sign must be -1, 0 or 1, got 2"):
        pseudo_labels(image, substitution_sign=2)


def test_extra_column_in_an_empty_channel_is_an_interstitial():
    picked = {}

    def add(pos, wts):
        k = central_column(pos, wts)
        # a quarter of the cell diagonal from a corner column: no bulk column is near
        t = math.radians(8.0)
        step = 0.25 * A * np.array([math.sin(t) + math.cos(t), math.cos(t) - math.sin(t)])
        picked["at"] = pos[k] + step
        return [(picked["at"], 0.7)]

    image, _, _ = lattice_image(angle_deg=8.0, edit=add, seed=4)
    result = pseudo_labels(image)
    inter = result.mask[class_index("interstitial")]
    assert near(inter, picked["at"], 2.5 * SIGMA) == 1.0
    assert only_channels(result.mask, {"interstitial"}) == []


@pytest.mark.parametrize("rotation", [False, True])
def test_simulated_vacancies_are_found_where_they_are(rotation):
    config = SimulationConfig(rotation=rotation, **STRONG)
    for material in ("SrTiO3", "CdTe"):
        sim = simulate_image(material, "vacancy", 11, config)
        result = pseudo_labels(sim.image)
        found = result.mask[class_index("vacancy")].astype(bool)
        truth = sim.mask[class_index("vacancy")].astype(bool)
        q = quality(result.mask, sim.mask)["vacancy"]
        assert q["recall"] > 0.8 and q["precision"] > 0.8, (material, rotation, q)
        for centre in sim.defect_positions:  # every vacancy is found
            y, x = np.round(centre).astype(int)
            assert found[y, x], (material, rotation, centre)
        assert not (found & ~truth).sum() > 0.3 * found.sum()
        assert only_channels(result.mask, {"vacancy"}) == [], (material, rotation)


def test_simulated_substitution_and_interstitial_get_their_channels():
    config = SimulationConfig(**STRONG)
    for material, label in (("SrTiO3", "substitution"), ("CdTe", "substitution"),
                            ("SrTiO3", "interstitial"), ("CdTe", "interstitial")):
        sim = simulate_image(material, label, 12, config)
        result = pseudo_labels(sim.image)
        q = quality(result.mask, sim.mask)[label]
        assert q["recall"] > 0.75 and q["precision"] > 0.75, (material, label, q)
        assert only_channels(result.mask, {label}) == [], (material, label)


# ----------------------------------------------------------------------- extended defects


def test_simulated_dislocation_cores_are_found():
    """One core per image, placed within about a Burgers vector (six images per material:
    where among the displaced columns the core lands varies from image to image)."""
    config = SimulationConfig(**STRONG)
    for material in ("SrTiO3", "CdTe"):
        offsets, ious = [], []
        for seed in range(3, 9):
            sim = simulate_image(material, "dislocation", seed, config)
            result = pseudo_labels(sim.image)
            cores = [np.array(d[1:3]) for d in result.detections if d[0] == "dislocation"]
            assert len(cores) == 1, (material, seed, result.detections)
            burgers = np.hypot(*result.lattice.vectors[0])
            offsets.append(np.hypot(*(cores[0] - sim.defect_positions[0])) / burgers)
            ious.append(quality(result.mask, sim.mask)["dislocation"]["iou"])
        assert max(offsets) < 1.5 and np.median(offsets) < 1.0, (material, offsets)
        assert np.mean(ious) > 0.35, (material, ious)


def test_simulated_planar_defects_are_bands_of_their_class():
    # The twin boundary is placed where the matrix reflection has fallen to half: a few
    # pixels into the twin, where its first mirrored columns stand (the simulator's plane
    # is the cut below them), hence the lower bar.
    for label, seed, bar in (("stacking_fault", 1, 0.8), ("twin_boundary", 2, 0.5)):
        sim = simulate_image("CdTe", label, seed)  # default config
        result = pseudo_labels(sim.image)
        q = quality(result.mask, sim.mask)[label]
        assert q["iou"] > bar, (label, q)
        other = "twin_boundary" if label == "stacking_fault" else "stacking_fault"
        assert not result.mask[class_index(other)].any(), label


# ---------------------------------------------------------------------------- contract


def test_result_types_and_shapes():
    image, _, _ = lattice_image(size=160)
    result = pseudo_labels(image)
    assert result.deviation.shape == image.shape and result.deviation.dtype == np.float32
    assert result.mask.shape == (len(DEFECT_CLASSES),) + image.shape
    assert result.mask.dtype == np.uint8 and set(np.unique(result.mask)) <= {0, 1}
    assert result.noise > 0 and math.isfinite(result.noise)
    assert np.allclose(result.deviation, image - result.bulk, atol=1e-3)
    assert result.lattice.template is not None and result.lattice.column_sigma > 0


@pytest.mark.parametrize("material,label,seed", [("SrTiO3", "vacancy", 5), ("CdTe", "dislocation", 3),
                                                 ("CdTe", "twin_boundary", 2), ("SrTiO3", "bulk", 1)])
def test_deviation_z_is_the_teachers_map_without_the_labelling(material, label, seed):
    # the shortcut a frame's segmenter input takes must not drift from what training saw
    image = simulate_image(material, label, seed).image
    z = teacher.deviation_z(image)
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z, pseudo_labels(image).z)


def test_deviation_z_refuses_an_image_without_a_lattice():
    noise = np.random.default_rng(0).poisson(5.0, (128, 128)).astype(float)
    with pytest.raises(ValueError):
        teacher.deviation_z(noise)


def test_the_teacher_never_sees_a_ground_truth_mask():
    # The API takes the image (the rules, and the sign of the material's substituents'
    # contrast), nothing else ...
    assert list(inspect.signature(pseudo_labels).parameters) == ["image", "config", "substitution_sign"]
    assert list(inspect.signature(estimate_lattice).parameters) == ["image", "gpa_cells"]
    # ... and the module imports nothing that could hand it one.
    tree = ast.parse(inspect.getsource(teacher))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"functools", "dataclasses", "numpy", "scipy", "scipy.optimize",
                        "components.defects"}, imported
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"mask_true", "true_mask_of", "SimulatedImage", "simulate_image"}
    # rejects anything but a 2D image
    with pytest.raises(ValueError):
        pseudo_labels(np.zeros((2, 64, 64)))


def test_config_thresholds_matter():
    picked = {}

    def scale(pos, wts):
        k = central_column(pos, wts)
        picked["at"] = pos[k].copy()
        wts[k] *= 0.3  # lost 70 %: a vacancy at the default split of 60 %
        return []

    image, _, _ = lattice_image(edit=scale, seed=6)
    assert [d[0] for d in pseudo_labels(image).detections] == ["vacancy"]
    loose = PseudoLabelConfig(vacancy_fraction=0.8)
    assert [d[0] for d in pseudo_labels(image, loose).detections] == ["substitution"]
    assert pseudo_labels(image, PseudoLabelConfig(k_site=1e3, k_free=1e3)).mask.sum() == 0


# ----------------------------------------------------------------------------- quality


def test_quality_per_class_precision_recall_iou():
    c = len(DEFECT_CLASSES)
    pred = np.zeros((c, 10, 10), np.uint8)
    true = np.zeros((c, 10, 10), np.uint8)
    v, s, i = class_index("vacancy"), class_index("substitution"), class_index("interstitial")
    true[v, 0:2, 0:5] = 1  # 10 px
    pred[v, 0:2, 2:7] = 1  # 10 px, 6 overlap
    pred[s, 5, 5] = 1  # prediction without truth
    true[i, 9, 0:4] = 1  # truth without prediction
    q = quality(pred, true)
    assert q["vacancy"]["precision"] == pytest.approx(0.6)
    assert q["vacancy"]["recall"] == pytest.approx(0.6)
    assert q["vacancy"]["iou"] == pytest.approx(6 / 14)
    assert q["substitution"]["precision"] == 0.0 and math.isnan(q["substitution"]["recall"])
    assert q["substitution"]["iou"] == 0.0
    assert q["interstitial"]["recall"] == 0.0 and math.isnan(q["interstitial"]["precision"])
    for name in ("dislocation", "stacking_fault", "twin_boundary"):  # empty: nothing to score
        assert all(math.isnan(q[name][k]) for k in ("precision", "recall", "iou"))
    # stacks pool their pixels
    stacked = quality(np.stack([pred, pred]), np.stack([true, true]))
    assert stacked["vacancy"]["tp"] == 12 and stacked["vacancy"]["iou"] == pytest.approx(6 / 14)
    with pytest.raises(ValueError):
        quality(pred[:3], true[:3])
