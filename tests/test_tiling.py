"""Sliding-window prediction: coverage, no seams, weights that normalise, any frame size,
bounded memory."""

import tracemalloc

import numpy as np
import pytest

from components.segmentation.tiling import (PredictorOutputError, blend_window, deviation_map,
                                            frame_statistics, predict_tiled, tile_origins)


def mean3(frames):
    """3 x 3 mean of each frame (N, H, W), edges padded by repetition: translation-equivariant
    in the interior, wrong on the outermost pixel ring of whatever it is given."""
    padded = np.pad(frames, ((0, 0), (1, 1), (1, 1)), mode="edge")
    height, width = frames.shape[1:]
    return sum(padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)) / 9.0


def local_predictor(tiles):
    """Two local 'classes' per pixel: a 3 x 3 mean squashed to (0, 1), and a pointwise one."""
    smooth = mean3(tiles.astype(np.float64))
    return np.stack([1 / (1 + np.exp(-2 * smooth)), 1 / (1 + np.exp(tiles))],
                    axis=-1).astype(np.float32)


def whole_frame(image):
    """local_predictor on the whole standardised frame at once: the seamless reference."""
    standard = (image - image.mean()) / image.std()
    return np.moveaxis(local_predictor(standard[None])[0], -1, 0)


@pytest.mark.parametrize("shape, tile, overlap", [((100, 100), 32, 8), ((300, 257), 64, 16),
                                                  ((1000, 40), 48, 12), ((64, 64), 64, 16)])
def test_tile_origins_cover_the_frame_with_full_tiles_and_the_overlap(shape, tile, overlap):
    origins = tile_origins(shape, tile, overlap)
    covered = np.zeros(shape, int)
    for row, column in origins:
        assert 0 <= row and row + tile <= max(shape[0], tile)
        assert 0 <= column and column + tile <= max(shape[1], tile)
        covered[row:row + tile, column:column + tile] += 1
    assert covered.min() >= 1
    for axis in (0, 1):
        starts = sorted({origin[axis] for origin in origins})
        assert starts[0] == 0 and starts[-1] == max(shape[axis] - tile, 0)
        assert all(tile - overlap >= b - a > 0 for a, b in zip(starts, starts[1:]))
    assert len(origins) == len(set(origins))


def test_tile_origins_reject_bad_geometry():
    with pytest.raises(ValueError, match="overlap"):
        tile_origins((100, 100), 32, 32)
    with pytest.raises(ValueError, match="tile"):
        tile_origins((100, 100), 0, 0)


def test_blend_window_is_positive_flat_in_the_middle_and_falls_to_the_edges():
    window = blend_window(64, 16)
    assert window.dtype == np.float32 and window.shape == (64, 64)
    assert window.min() > 0 and window.max() == 1
    assert np.all(window[16:48, 16:48] == 1)
    assert np.all(np.diff(window[32, :17]) > 0) and np.all(np.diff(window[32, 47:]) < 0)
    # Complementary ramps: two tiles 48 apart add up to 1 over their 16-pixel overlap.
    profile = window[32]
    np.testing.assert_allclose(profile[48:] + profile[:16], 1.0, atol=1e-6)
    # A side on the frame's edge is not tapered.
    assert np.all(blend_window(64, 16, top=False, left=False)[0, :48] == 1)


def test_tiling_reproduces_the_whole_frame_result_without_seams():
    rng = np.random.default_rng(0)
    image = (rng.normal(size=(203, 331)) * 3 + 10).astype(np.float32)
    tiled = predict_tiled(image, local_predictor, tile=48, overlap=16, batch_size=5)
    reference = whole_frame(image.astype(np.float64))
    assert tiled.shape == (2, 203, 331) and tiled.dtype == np.float32
    inner = (slice(None), slice(1, -1), slice(1, -1))  # the reference's own edge ring differs
    error = np.abs(tiled - reference)[inner]
    # A tile's wrong outermost ring weighs sin^2(pi / 64) / 1 = 2.4e-3 at most against its
    # neighbour's; errors of the sigmoid are at most 1, so seams would show as errors ~ 1e-3.
    assert error.max() < 2.5e-3, error.max()
    assert np.median(error) < 1e-6
    # The pointwise class is exact everywhere, edges included.
    np.testing.assert_allclose(tiled[1], reference[1], atol=1e-6)

    # The check is sensitive: without overlap the tile borders are plain wrong.
    seamed = predict_tiled(image, local_predictor, tile=48, overlap=0)
    assert np.abs(seamed - reference)[inner].max() > 0.05


def test_a_constant_predictor_gives_that_constant_everywhere():
    def constant(tiles):
        return np.full(tiles.shape + (3,), 0.375, np.float32)

    for shape in [(128, 128), (129, 301), (17, 23), (500, 31), (1, 1), (65, 64)]:
        out = predict_tiled(np.random.default_rng(1).random(shape), constant, tile=64, overlap=24)
        assert out.shape == (3,) + shape
        np.testing.assert_allclose(out, 0.375, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (65, 200), (250, 9), (3, 2), (131, 97)])
def test_odd_small_and_non_square_frames_come_back_pixel_for_pixel(shape):
    image = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    out = predict_tiled(image, lambda tiles: tiles[..., None], tile=64, overlap=16,
                        batch_size=3, standardise=False)
    assert out.shape == (1,) + shape
    np.testing.assert_allclose(out[0], image, atol=1e-5)


def test_batches_are_lazy_and_bounded_by_batch_size():
    seen = []

    def record(tiles):
        seen.append(tiles.shape)
        assert tiles.dtype == np.float32
        return np.zeros(tiles.shape + (6,), np.float32)

    image = np.zeros((300, 200), np.uint16)
    predict_tiled(image, record, tile=64, overlap=16, batch_size=4, num_classes=6)
    count = len(tile_origins(image.shape, 64, 16))
    assert sum(shape[0] for shape in seen) == count
    assert all(shape[0] <= 4 and shape[1:] == (64, 64) for shape in seen)


def test_the_frame_is_standardised_as_a_whole_not_per_tile():
    ramp = np.add.outer(np.arange(200.0), np.arange(120.0)).astype(np.float32)
    means = []

    def record(tiles):
        means.extend(tiles.mean(axis=(1, 2)))
        return tiles[..., None]

    out = predict_tiled(ramp * 7 + 300, record, tile=64, overlap=16)
    mean, std = ramp.mean(), ramp.std()
    np.testing.assert_allclose(out[0], (ramp - mean) / std, atol=1e-4)
    assert max(means) - min(means) > 2  # tiles keep their place in the frame's intensity range
    # Whole-frame statistics agree with NumPy's; a constant frame is only shifted.
    np.testing.assert_allclose(frame_statistics(ramp), (mean, std), rtol=1e-6)
    flat = predict_tiled(np.full((70, 70), 5.0), lambda t: t[..., None], tile=64, overlap=16)
    np.testing.assert_allclose(flat, 0.0, atol=1e-6)


def test_errors_are_clear():
    image = np.zeros((80, 80), np.float32)
    with pytest.raises(PredictorOutputError, match="expected"):
        predict_tiled(image, lambda t: t, tile=64, overlap=16)
    with pytest.raises(PredictorOutputError, match="6"):
        predict_tiled(image, lambda t: t[..., None], tile=64, overlap=16, num_classes=6)
    with pytest.raises(ValueError, match="2-D"):
        predict_tiled(np.zeros((2, 80, 80)), lambda t: t[..., None])
    broken = image.copy()
    broken[40, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite.*row 40"):
        predict_tiled(broken, lambda t: t[..., None], tile=64, overlap=16)


def test_a_deviation_map_is_cut_into_the_same_tiles_and_left_as_it_is():
    image = np.random.default_rng(8).normal(size=(150, 130)).astype(np.float32)
    deviation = np.add.outer(np.arange(150.0), 1000 * np.arange(130.0)).astype(np.float32)
    calls = []

    def predictor(tiles, deviation_tiles):
        calls.append(deviation_tiles.shape)
        return np.stack([tiles, deviation_tiles], axis=-1)

    out = predict_tiled(image, predictor, tile=64, overlap=16, batch_size=3, deviation=deviation)
    np.testing.assert_allclose(out[0], (image - image.mean()) / image.std(), atol=1e-4)
    np.testing.assert_allclose(out[1], deviation, rtol=1e-6)  # unscaled, every pixel in place
    assert calls and all(shape[1:] == (64, 64) and shape[0] <= 3 for shape in calls)
    small = predict_tiled(image[:40, :50], predictor, tile=64, overlap=16,
                          deviation=deviation[:40, :50])  # padded alike, cropped alike
    np.testing.assert_allclose(small[1], deviation[:40, :50], rtol=1e-6)
    with pytest.raises(ValueError, match="deviation map's shape"):
        predict_tiled(image, predictor, tile=64, overlap=16, deviation=deviation[:100])


def test_the_teachers_deviation_map_of_a_frame_is_blended_from_blocks():
    from components.pseudo_labels.lattice import pseudo_labels
    from components.synthesis.simulator import SimulationConfig, seed_for, simulate_image

    sim = simulate_image("SrTiO3", "vacancy", seed_for(3, 0), SimulationConfig(size=384))
    whole = pseudo_labels(sim.image).z
    blended = deviation_map(sim.image, block=256, overlap=64)  # 2 x 2 blocks
    assert blended.shape == sim.image.shape and blended.dtype == np.float32
    # each block fits the lattice on its own, so the maps differ in detail but not in substance
    assert np.corrcoef(blended.ravel(), whole.ravel())[0, 1] > 0.8
    vacancy = sim.mask[0] > 0
    assert blended[vacancy].mean() < -3 and abs(np.median(blended)) < 1
    # no lattice (noise only): zeros, as the PseudoLabeler writes for such an image
    noise = np.random.default_rng(0).normal(size=(300, 300)).astype(np.float32)
    np.testing.assert_array_equal(deviation_map(noise, block=256, overlap=64), 0.0)
    noise[5, 7] = np.inf
    with pytest.raises(ValueError, match="non-finite.*row 5"):
        deviation_map(noise)


def test_the_deviation_map_is_the_same_on_any_number_of_workers():
    from components.pseudo_labels.lattice import pseudo_labels
    from components.synthesis.simulator import SimulationConfig, seed_for, simulate_image

    sim = simulate_image("CdTe", "dislocation", seed_for(4, 0), SimulationConfig(size=448))
    one = deviation_map(sim.image, block=256, overlap=64, workers=1)  # 2 x 2 blocks
    np.testing.assert_array_equal(deviation_map(sim.image, block=256, overlap=64, workers=3), one)
    # a block is the teacher's own map of it: the top-left corner, away from any blend
    corner = pseudo_labels(sim.image[:256, :256].astype(np.float32)).z
    np.testing.assert_array_equal(one[:192, :192], corner[:192, :192])
    with pytest.raises(ValueError, match="workers"):
        deviation_map(sim.image, workers=0)


def test_a_large_frame_runs_in_bounded_memory():
    size, classes, tile, batch = 2048, 6, 256, 8
    image = np.random.default_rng(3).random((size, size), dtype=np.float32)

    def trivial(tiles):
        return np.full(tiles.shape + (classes,), 0.25, np.float32)

    accumulators = (classes + 1) * size * size * 4  # weighted sum + weight sum, float32
    one_batch = batch * tile * tile * (classes + 1) * 4  # tiles and their answer
    # Room for a few batch-sized temporaries; far less than one more frame-sized set of class
    # maps (6 x 2048 x 2048 x 4 = 100 MB), let alone every tile's answer held at once
    # (121 tiles: 190 MB).
    bound = accumulators + 4 * one_batch + 8 * 2**20
    tracemalloc.start()
    try:
        out = predict_tiled(image, trivial, tile=tile, overlap=64, batch_size=batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (classes, size, size)
    assert float(out.min()) == pytest.approx(0.25) and float(out.max()) == pytest.approx(0.25)
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB >= bound {bound / 2**20:.0f} MiB"
