"""Defect clustering science (no TFX): descriptors with known answers, k-means with k by
silhouette, agreement, t-SNE, and the figures."""

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from components.clustering import descriptors, figures, grouping
from components.defects import DEFECT_CLASSES

TWO = ("a", "b")


def named(vector, classes=TWO):
    return dict(zip(descriptors.descriptor_names(classes), vector))


def two_blob_maps():
    """Class a: two 3 x 3 blobs of probability 1 in a 32 x 32 frame, 20 columns apart;
    class b: empty."""
    maps = np.zeros((2, 32, 32), np.float32)
    maps[0, 4:7, 4:7] = 1.0
    maps[0, 4:7, 24:27] = 1.0
    return maps


# --- descriptors ---------------------------------------------------------------------------

def test_names_are_unique_stable_and_match_the_vector():
    names = descriptors.descriptor_names(DEFECT_CLASSES)
    assert len(names) == len(set(names))
    assert names[0] == "vacancy_area_fraction" and names[-1].startswith("deviation_")
    maps = np.zeros((len(DEFECT_CLASSES), 16, 16), np.float32)
    assert descriptors.describe(maps, None, DEFECT_CLASSES).shape == (len(names),)


def test_two_blobs_give_two_regions_exact_area_and_spread():
    d = named(descriptors.describe(two_blob_maps(), None, TWO, pixel_size_pm=20.0))
    pixels = 32 * 32
    assert d["a_region_count"] == 2
    assert d["a_area_fraction"] == pytest.approx(18 / pixels)
    assert d["a_mean_probability"] == pytest.approx(18 / pixels)
    assert d["a_max_probability"] == 1.0
    assert d["a_region_mean_size_fraction"] == pytest.approx(9 / pixels)
    assert d["a_region_max_size_fraction"] == pytest.approx(9 / pixels)
    assert d["a_region_size_std_fraction"] == pytest.approx(0.0)
    # centroids (5, 5) and (5, 25): each 10 px from their mean
    assert d["a_region_spread"] == pytest.approx(10 / np.hypot(32, 32))
    assert d["a_largest_region_elongation"] == pytest.approx(0.0, abs=1e-9)  # a square
    pixel_nm2 = 0.02 ** 2
    assert d["a_region_mean_area_nm2"] == pytest.approx(9 * pixel_nm2)
    assert d["a_region_density_per_nm2"] == pytest.approx(2 / (pixels * pixel_nm2))
    assert all(value == 0 for name, value in d.items() if name.startswith("b_"))


def test_diagonal_neighbours_join_a_region_and_a_line_is_elongated():
    maps = np.zeros((2, 32, 32), np.float32)
    maps[0, 2:5, 2:5] = 0.9
    maps[0, 5:8, 5:8] = 0.9  # touches the first blob at one corner only
    maps[1, 20, 3:13] = 0.9  # a one-pixel-wide line
    d = named(descriptors.describe(maps, None, TWO))
    assert d["a_region_count"] == 1 and d["a_region_spread"] == 0.0
    assert d["b_region_count"] == 1
    assert d["b_largest_region_elongation"] == pytest.approx(1.0)


def test_empty_maps_and_missing_deviation_give_zeros():
    vector = descriptors.describe(np.zeros((2, 20, 30), np.float32), None, TWO,
                                  pixel_size_pm=15.0)
    d = named(vector)
    assert np.all(vector[[n != "a_region_density_per_nm2" for n in d]] == 0)
    assert d["deviation_available"] == 0


def test_full_maps_and_constant_deviation_stay_finite():
    maps = np.ones((2, 24, 24), np.float32)
    vector = descriptors.describe(maps, np.full((24, 24), 2.0), TWO)
    d = named(vector)
    assert np.all(np.isfinite(vector))
    assert d["a_area_fraction"] == 1 and d["a_region_count"] == 1
    assert d["a_p95_probability"] == 1 and d["a_p99_probability"] == 1
    assert d["a_region_spread"] == 0 and d["a_largest_region_elongation"] == pytest.approx(0)
    assert d["deviation_available"] == 1 and d["deviation_mean_abs_z"] == pytest.approx(2)
    assert d["deviation_std_z"] == pytest.approx(0) and d["deviation_max_abs_z"] == 2
    assert d["deviation_fraction_abs_z_above_3"] == 0
    assert d["deviation_sign_balance_abs_z_above_3"] == 0


def test_deviation_outliers_and_their_sign_balance():
    z = np.zeros((32, 32))
    z[0, :3] = 5.0   # three bright outliers
    z[1, 0] = -4.0   # one dark
    z[2, 0] = np.nan  # ignored
    d = named(descriptors.describe(np.zeros((2, 32, 32), np.float32), z, TWO))
    finite = 32 * 32 - 1
    assert d["deviation_fraction_abs_z_above_3"] == pytest.approx(4 / finite)
    assert d["deviation_sign_balance_abs_z_above_3"] == pytest.approx(0.5)
    assert d["deviation_max_abs_z"] == 5.0
    assert d["deviation_mean_abs_z"] == pytest.approx(19 / finite)


@pytest.mark.parametrize("maps, deviation, message", [
    (np.zeros((3, 8, 8)), None, "3 channels but 2 classes"),
    (np.zeros((8, 8)), None, "(C, H, W)"),
    (np.zeros((2, 8, 8)), np.zeros((8, 9)), "deviation_z has shape (8, 9)"),
    (np.full((2, 8, 8), 1.5), None, "expected sigmoid outputs in [0, 1]"),
    (np.full((2, 8, 8), np.nan), None, "expected sigmoid outputs in [0, 1]"),
])
def test_bad_inputs_raise_with_a_clear_message(maps, deviation, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        descriptors.describe(maps, deviation, TWO)


def test_describe_many_stacks_rows_and_checks_lengths():
    maps = [two_blob_maps(), np.zeros((2, 16, 16), np.float32)]
    matrix = descriptors.describe_many(maps, [None, None], TWO)
    assert matrix.shape == (2, len(descriptors.descriptor_names(TWO)))
    assert named(matrix[0])["a_region_count"] == 2 and named(matrix[1])["a_region_count"] == 0
    with pytest.raises(ValueError, match="one each per image"):
        descriptors.describe_many(maps, [None], TWO)


# --- clustering ----------------------------------------------------------------------------

def blobs(per_blob=100, dimensions=6, seed=1):
    """Three unit-variance Gaussian blobs whose centres differ by ~10 sigma in every axis."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.array([[0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1]],
                              dtype=np.float64)[:, :dimensions]
    truth = np.repeat(np.arange(3), per_blob)
    return centres[truth] + rng.normal(size=(truth.size, dimensions)), truth


def test_standardise_handles_constant_columns():
    X = np.column_stack([np.arange(10.0), np.full(10, 0.1), np.linspace(-5, 5, 10) ** 2])
    Z, mean, scale = grouping.standardise(X)
    assert scale[1] == 1.0 and np.all(Z[:, 1] == 0)
    assert np.allclose(Z[:, [0, 2]].mean(axis=0), 0) and np.allclose(Z[:, [0, 2]].std(axis=0), 1)
    assert np.allclose(Z * scale + mean, X)


def test_cluster_recovers_three_blobs():
    X, truth = blobs()
    result = grouping.cluster(X, k_range=(2, 6))
    assert result.chosen_k == 3 and result.k_values == [2, 3, 4, 5, 6]
    assert int(np.argmax(result.silhouette)) == 1
    assert result.method["algorithm"] == "kmeans"
    assert grouping.agreement(truth, result.labels)["ari"] > 0.95
    assert result.centers.shape == (3, 6) and result.distance_to_center.shape == (300,)
    text = json.dumps(result.to_dict(include_assignments=True), allow_nan=False)
    assert len(json.loads(text)["labels"]) == 300
    assert "labels" not in result.to_dict()


def test_one_far_outlier_does_not_take_a_cluster_of_its_own():
    """Clipped at 3 sigma, an image 50 sigma out on one descriptor joins the nearest blob; without
    the clip it is k-means' fourth cluster, alone, and the silhouette picks that k."""
    X, truth = blobs()
    X[0, 0] += 1000.0
    clipped = grouping.cluster(X, k_range=(2, 6))
    assert clipped.chosen_k == 3 and min(clipped.cluster_sizes()) > 90
    assert clipped.method["outlier_clip"] == grouping.OUTLIER_CLIP
    assert grouping.agreement(truth, clipped.labels)["ari"] > 0.95
    unclipped = grouping.cluster(X, k_range=(2, 6), clip=None)
    assert unclipped.chosen_k == 4 and min(unclipped.cluster_sizes()) == 1
    with pytest.raises(ValueError, match="clip must be a positive number"):
        grouping.standardise(X, clip=0.0)


def test_minibatch_path_recovers_three_blobs():
    X, truth = blobs()
    result = grouping.cluster(X, k_range=(2, 5), minibatch_above=100)
    assert result.method["algorithm"] == "minibatch_kmeans"
    assert result.chosen_k == 3 and grouping.agreement(truth, result.labels)["ari"] > 0.95


def test_silhouette_is_scored_on_the_fixed_sample(monkeypatch):
    seen = []

    def recording(Z, labels, **kwargs):
        seen.append(Z.copy())
        return real(Z, labels, **kwargs)

    real = grouping.silhouette_score
    monkeypatch.setattr(grouping, "silhouette_score", recording)
    X, _ = blobs()
    result = grouping.cluster(X, k_range=(2, 4), silhouette_sample=50)
    assert result.method["silhouette_sample"] == 50
    assert [z.shape[0] for z in seen] == [50, 50, 50]
    assert all(np.array_equal(z, seen[0]) for z in seen)  # the same rows for every k


def test_cluster_is_reproducible_for_a_seed():
    X, _ = blobs()
    first, second = (grouping.cluster(X, k_range=(2, 4), seed=3) for _ in range(2))
    assert np.array_equal(first.labels, second.labels)
    assert first.silhouette == second.silhouette


def test_rows_with_nan_or_inf_are_refused_by_count():
    X, _ = blobs()
    X[7, 2], X[42, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match="2 of 300 descriptor rows hold NaN or inf"):
        grouping.cluster(X)


def test_k_range_is_checked_and_clipped_for_few_rows():
    X = np.arange(10.0).reshape(5, 2) ** 2
    result = grouping.cluster(X, k_range=(2, 8))
    assert result.k_values == [2, 3, 4] and "clipped" in result.method["k_range_note"]
    with pytest.raises(ValueError, match="2 <= k_min"):
        grouping.cluster(X, k_range=(1, 3))
    with pytest.raises(ValueError, match="need more than 5 rows"):
        grouping.cluster(X, k_range=(5, 6))
    with pytest.raises(ValueError, match="identical"):
        grouping.cluster(np.ones((10, 3)))


def test_agreement_ignores_cluster_numbering():
    truth = ["vacancy", "vacancy", "bulk", "bulk", "twin_boundary"]
    assert grouping.agreement(truth, [2, 2, 0, 0, 1]) == {"ari": 1.0, "nmi": 1.0}
    assert grouping.agreement(truth, [0, 1, 0, 1, 0])["ari"] < 0.5
    with pytest.raises(ValueError, match="5 true labels for 4"):
        grouping.agreement(truth, [0, 0, 1, 1])


def test_nearest_to_centers_lists_members_nearest_first():
    X, _ = blobs()
    result = grouping.cluster(X, k_range=(3, 3))
    nearest = grouping.nearest_to_centers(result, per_cluster=4)
    assert sorted(nearest) == [0, 1, 2]
    for cluster_id, rows in nearest.items():
        assert len(rows) == 4 and np.all(result.labels[rows] == cluster_id)
        distances = result.distance_to_center[rows]
        assert np.all(np.diff(distances) >= 0)
        assert distances[0] == result.distance_to_center[result.labels == cluster_id].min()


def test_embed_samples_rows_and_keeps_blobs_apart():
    X, truth = blobs()
    Z, _, _ = grouping.standardise(X)
    indices, coords = grouping.embed(Z, sample=120)
    assert indices.shape == (120,) and len(set(indices.tolist())) == 120
    assert np.all(np.diff(indices) > 0) and indices.max() < 300
    assert coords.shape == (120, 2) and np.all(np.isfinite(coords))
    distances = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    neighbour = truth[indices][distances.argmin(axis=1)]
    assert np.mean(neighbour == truth[indices]) > 0.95
    small_indices, small = grouping.embed(Z[:10], perplexity=30)  # perplexity clipped to 3
    assert grouping.effective_perplexity(10, 30) == 3.0
    assert small.shape == (10, 2) and np.all(np.isfinite(small))
    assert small_indices.tolist() == list(range(10))


# --- defect-like maps ----------------------------------------------------------------------

def defect_like_maps(kind, rng, size=64, channel="stacking_fault"):
    """U-Net-like maps with low background probability and, in one channel, either a few
    point-like blobs or a band across the frame (same channel: only the shape differs)."""
    maps = rng.uniform(0.0, 0.15, size=(len(DEFECT_CLASSES), size, size)).astype(np.float32)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "points":
        bump = np.zeros((size, size))
        for _ in range(rng.integers(3, 7)):
            r, c = rng.uniform(6, size - 6, size=2)
            bump = np.maximum(bump, np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * 1.5 ** 2)))
    else:
        angle = rng.uniform(0, np.pi)
        r, c = rng.uniform(size / 3, 2 * size / 3, size=2)
        distance = (rows - r) * np.cos(angle) - (cols - c) * np.sin(angle)
        bump = np.exp(-distance ** 2 / (2 * 2.0 ** 2))
    k = DEFECT_CLASSES.index(channel)
    maps[k] = np.maximum(maps[k], 0.95 * bump)
    deviation = rng.normal(size=(size, size)) + 4.0 * bump
    return maps, deviation


def test_points_and_bands_are_told_apart_without_labels():
    rng = np.random.default_rng(5)
    kinds = ["points", "band"] * 15
    made = [defect_like_maps(kind, rng) for kind in kinds]
    X = descriptors.describe_many([m for m, _ in made], [z for _, z in made], DEFECT_CLASSES,
                                  pixel_sizes_pm=[20.0] * len(made))
    result = grouping.cluster(X, k_range=(2, 4))
    assert result.chosen_k == 2
    assert grouping.agreement(kinds, result.labels)["ari"] == pytest.approx(1.0)


# --- figures -------------------------------------------------------------------------------

def png_shape(path):
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path).shape


def test_figures_write_png_files(tmp_path):
    silhouette = figures.silhouette_figure([2, 3, 4, 5], [0.4, 0.7, float("nan"), 0.5], 3,
                                           tmp_path / "silhouette.png", inertia=[9, 4, 3, 2.5])
    assert png_shape(silhouette)[1] > 800  # two panels
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(60, 2))
    clusters = np.repeat([0, 1, 2], 20)
    one = png_shape(figures.tsne_figure(coords, clusters, tmp_path / "tsne1.png"))
    two = png_shape(figures.tsne_figure(coords, clusters, tmp_path / "tsne2.png",
                                        true_labels=["bulk", "vacancy", "mixed"] * 20))
    assert two[1] > 1.5 * one[1]  # the known-class panel is there
    images = {0: [rng.normal(size=(64, 64)), rng.normal(size=(600, 500))], 1: [], 2: [np.eye(8)]}
    gallery = figures.gallery_figure(images, tmp_path / "sub" / "gallery.png",
                                     captions={0: ["SrTiO3 vacancy", "CdTe bulk"]})
    assert png_shape(gallery)[0] > 3 * 200  # a row per cluster
    with pytest.raises(ValueError, match="2-D"):
        figures.gallery_figure({0: [np.zeros((4, 4, 3))]}, tmp_path / "bad.png")
