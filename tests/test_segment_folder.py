"""The folder command, with an injected predictor (no model), and the SavedModel loader."""

import csv
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from components.defects import DEFECT_CLASSES
from components.segmentation.tiling import predict_tiled
from pipeline import segment_folder

C = len(DEFECT_CLASSES)
TILE = ["--tile", "64", "--overlap", "16", "--batch-size", "4"]


def fake_predictor(tiles):
    """Class c is 'found' where the standardised intensity exceeds c / 2: every class has
    pixels above 0.5 on a random image, fewer for later classes."""
    steps = np.arange(C, dtype=np.float32) / 2
    return (1 / (1 + np.exp(-8 * (tiles[..., None] - steps)))).astype(np.float32)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    tifffile.imwrite(root / "a.tif", rng.integers(0, 4000, (90, 70), dtype=np.uint16))
    rgb = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "sub" / "b.png")
    np.save(root / "c.npy", rng.normal(size=(40, 130)).astype(np.float32))
    (root / "broken.tif").write_bytes(b"this is not a TIFF file")
    (root / "notes.txt").write_text("not a micrograph")
    return root


def read_summary(path):
    with open(path, newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def test_the_command_writes_maps_overlays_and_a_summary_and_lists_a_broken_file(folder, capsys):
    output = folder / "out"  # inside the input folder: its outputs must not be read back
    argv = ["--input", str(folder), "--output", str(output)] + TILE
    assert segment_folder.main(argv, predictor=fake_predictor) == 1  # one file failed
    captured = capsys.readouterr()
    assert "broken.tif" in captured.err and "going on" in captured.err
    assert "3 of 4 micrographs segmented" in captured.out

    for stem, shape in [("a", (90, 70)), (os.path.join("sub", "b"), (50, 80)),
                        ("c", (40, 130))]:
        maps = np.load(output / f"{stem}_maps.npy")
        assert maps.dtype == np.float16 and maps.shape == (C,) + shape
        assert 0 <= maps.min() and maps.max() <= 1
        overlay = Image.open(output / f"{stem}_overlay.png")
        assert overlay.format == "PNG" and min(overlay.size) > 0
    assert not (output / "broken_maps.npy").exists()
    assert not (output / "broken_overlay.png").exists()

    rows = read_summary(output / "summary.csv")
    assert set(rows) == {"a.tif", os.path.join("sub", "b.png"), "c.npy", "broken.tif"}
    columns = list(next(iter(rows.values())))
    assert columns[:4] == ["path", "height", "width", "seconds"] and columns[-1] == "error"
    for name in DEFECT_CLASSES:
        assert f"{name}_area_fraction" in columns and f"{name}_max_probability" in columns
    good = rows["a.tif"]
    assert (good["height"], good["width"], good["error"]) == ("90", "70", "")
    maps = np.load(output / "a_maps.npy").astype(np.float32)
    for channel, name in enumerate(DEFECT_CLASSES):
        assert float(good[f"{name}_area_fraction"]) == pytest.approx(
            (maps[channel] > 0.5).mean(), abs=0.01)  # the CSV is computed before float16
        assert float(good[f"{name}_max_probability"]) == pytest.approx(
            maps[channel].max(), abs=2e-3)
    assert float(good["vacancy_area_fraction"]) > float(good["twin_boundary_area_fraction"])
    assert float(good["seconds"]) >= 0
    broken = rows["broken.tif"]
    assert broken["error"] and broken["height"] == "" and broken["vacancy_area_fraction"] == ""

    # Nothing is overwritten: the command stops before doing anything, naming the file.
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    assert segment_folder.main(argv, predictor=fake_predictor) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and str(output) in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before

    # --overwrite replaces them, and the outputs in the input tree were not taken as inputs.
    assert segment_folder.main(argv + ["--overwrite"], predictor=fake_predictor) == 1
    assert len(read_summary(output / "summary.csv")) == 4


def test_rgb_png_becomes_the_mean_of_its_colour_channels(folder):
    rgb = np.asarray(Image.open(folder / "sub" / "b.png"))
    image = segment_folder.read_micrograph(str(folder / "sub" / "b.png"))
    np.testing.assert_allclose(image, rgb.astype(np.float32).mean(axis=-1), atol=1e-4)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba).save(folder / "rgba.png")
    np.testing.assert_allclose(segment_folder.read_micrograph(str(folder / "rgba.png")), image)


def test_tiff_maps_and_heatmaps(folder, tmp_path):
    output = tmp_path / "tiff_out"
    argv = ["--input", str(folder), "--output", str(output), "--format", "tiff",
            "--heatmaps"] + TILE
    assert segment_folder.main(argv, predictor=fake_predictor) == 1
    with tifffile.TiffFile(output / "c_maps.tif") as tiff:
        assert len(tiff.pages) == C
        maps = tiff.asarray()
    assert maps.dtype == np.float32 and maps.shape == (C, 40, 130)
    for name in ("combined", "per_class", "overlay"):
        assert Image.open(output / f"a_{name}.png").format == "PNG"


def test_a_single_existing_output_is_named_and_nothing_is_written(folder, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "c_overlay.png").write_bytes(b"keep me")
    argv = ["--input", str(folder), "--output", str(output)] + TILE
    assert segment_folder.main(argv, predictor=fake_predictor) == 2
    assert sorted(p.name for p in output.iterdir()) == ["c_overlay.png"]
    assert (output / "c_overlay.png").read_bytes() == b"keep me"


def test_inputs_sharing_a_stem_get_their_extension_in_the_output_names(tmp_path):
    jobs = segment_folder.plan(["/in/a.tif", "/in/a.npy", "/in/b.png"], "/in", "/out", "npy",
                               heatmaps=False)
    assert [job.outputs["maps"] for job in jobs] == ["/out/a_tif_maps.npy", "/out/a_npy_maps.npy",
                                                     "/out/b_maps.npy"]


def test_a_predictor_with_the_wrong_classes_stops_the_command(folder, tmp_path, capsys):
    argv = ["--input", str(folder), "--output", str(tmp_path / "out")] + TILE
    assert segment_folder.main(argv, predictor=lambda tiles: tiles[..., None]) == 1
    assert "does not fit" in capsys.readouterr().err


def test_load_predictor_calls_the_serving_standardised_signature(tmp_path, capsys):
    tf = pytest.importorskip("tensorflow")

    class Model(tf.Module):
        """Two signatures that answer differently, so the one called shows."""

        @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32,
                                                    name="images")])
        def as_given(self, images):
            steps = tf.range(C, dtype=tf.float32) / 2
            return {"probabilities": tf.sigmoid(8 * (images[..., None] - steps))}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32,
                                                    name="images")])
        def per_tile(self, images):
            mean, variance = tf.nn.moments(images, axes=[1, 2], keepdims=True)
            return self.as_given((images - mean) / tf.sqrt(variance + 1e-6))

    model = Model()
    tf.saved_model.save(model, str(tmp_path / "model"),
                        signatures={"serving_standardised": model.as_given,
                                    "serving_images": model.per_tile})
    predict_batch = segment_folder.load_predictor(str(tmp_path / "model"))
    tiles = (np.random.default_rng(4).normal(size=(3, 64, 64)) * 0.5 + 1).astype(np.float32)
    np.testing.assert_allclose(predict_batch(tiles), fake_predictor(tiles), atol=1e-5)
    assert capsys.readouterr().err == ""

    # An older export without it: its per-tile signature, with a warning that says so.
    tf.saved_model.save(model, str(tmp_path / "old"), signatures={"serving_images": model.per_tile})
    predict_batch = segment_folder.load_predictor(str(tmp_path / "old"))
    standardised = (tiles - tiles.mean(axis=(1, 2), keepdims=True)) / tiles.std(axis=(1, 2),
                                                                                 keepdims=True)
    np.testing.assert_allclose(predict_batch(tiles), fake_predictor(standardised), atol=1e-4)
    assert "serving_standardised" in capsys.readouterr().err

    tf.saved_model.save(model, str(tmp_path / "other"), signatures={"other": model.as_given})
    with pytest.raises(ValueError, match="serving_standardised"):
        segment_folder.load_predictor(str(tmp_path / "other"))


@pytest.mark.parametrize("inputs", [("image",), ("image", "deviation_z")])
def test_an_exported_unet_sees_tiles_of_one_standardised_frame(tmp_path, inputs):
    """Through load_predictor the tiles of a frame (and of its deviation map, for a model
    that reads one) reach the U-Net as cut from the frame standardised once, so the tiled
    answer is the whole frame's answer (up to the tile borders' context); the per-tile
    `serving_images` rescales each tile and is far off."""
    tf = pytest.importorskip("tensorflow")
    from components.segmentation import serving
    from modules import segmenter
    from modules.transform import scale_deviation

    config = segmenter.SegmenterConfig(
        tile_size=32, base_filters=4, depth=2, input_stride=2, inputs=inputs,
        contrast_split=["substitution"] if "deviation_z" in inputs else [])
    model = segmenter.build_unet(C, config)
    tf.saved_model.save(model, str(tmp_path / "unet"), signatures=segmenter._signatures(model, config))
    rng = np.random.default_rng(6)
    # Tiles of a frame with a strong gradient have very different means and spreads.
    frame = (np.add.outer(np.linspace(0, 40, 160), np.linspace(0, 20, 128))
             + rng.normal(size=(160, 128))).astype(np.float32)
    deviation = (rng.normal(size=frame.shape) * 4).astype(np.float32) if len(inputs) > 1 else None
    standardised = (frame - frame.mean()) / frame.std()
    channels = [standardised] + ([scale_deviation(deviation).numpy()] if len(inputs) > 1 else [])
    whole = segmenter.served_probabilities(  # as the export answers
        model, tf.constant(np.stack(channels, -1)[None]), config).numpy()[0]
    whole = np.moveaxis(whole, -1, 0)
    predictor = segment_folder.load_predictor(str(tmp_path / "unet"))
    assert predictor.needs_deviation == (len(inputs) > 1)
    tiled = predict_tiled(frame, predictor, tile=64, overlap=32, batch_size=4, deviation=deviation)
    per_tile_model = tf.saved_model.load(str(tmp_path / "unet")).signatures["serving_images"]

    def per_tile_predictor(tiles, deviation_tiles=None):
        arguments = serving.signature_arguments(per_tile_model, tiles, deviation_tiles)
        return per_tile_model(**arguments)["probabilities"].numpy()

    per_tile = predict_tiled(frame, per_tile_predictor, tile=64, overlap=32, batch_size=4,
                             deviation=deviation)
    inner = (slice(None), slice(16, -16), slice(16, -16))
    error = np.abs(tiled - whole)[inner].mean()
    per_tile_error = np.abs(per_tile - whole)[inner].mean()
    assert error < 0.2 * per_tile_error, (error, per_tile_error)


def test_a_model_that_reads_the_deviation_map_gets_the_teachers_map_of_each_frame(tmp_path):
    from components.segmentation.tiling import deviation_map
    from components.synthesis.simulator import SimulationConfig, seed_for, simulate_image

    root = tmp_path / "in"
    root.mkdir()
    image = simulate_image("SrTiO3", "vacancy", seed_for(5, 0), SimulationConfig(size=160)).image
    np.save(root / "lattice.npy", image)
    seen = []

    def predictor(tiles, deviation_tiles):
        seen.append(deviation_tiles)
        return fake_predictor(deviation_tiles)

    predictor.needs_deviation = True
    assert segment_folder.main(["--input", str(root), "--output", str(tmp_path / "out")] + TILE,
                               predictor=predictor) == 0
    maps = np.load(tmp_path / "out" / "lattice_maps.npy").astype(np.float32)
    expected = predict_tiled(deviation_map(image), lambda t: fake_predictor(t), tile=64, overlap=16,
                             standardise=False)
    np.testing.assert_allclose(maps, expected, atol=2e-3)  # float16 maps
    assert seen and np.abs(np.concatenate(seen)).max() > 3  # the vacancies stand out
