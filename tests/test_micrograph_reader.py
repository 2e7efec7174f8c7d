"""Reading real microscope files (components/micrographs/reader.py, pixel_size.py).

Every format is written here with a known pixel size and read back: TIFF with tifffile
(ImageJ unit, metric resolution unit) and with rosettasciio's TIFF writer, PNG with Pillow,
Berkeley EMD with rosettasciio's writer. rosettasciio cannot write Digital Micrograph
(.dm3/.dm4), Velox EMD or TIA (.ser, .emi) files, so minimal valid files of those formats are
written byte by byte below, after the formats' published layouts, and read back through
rosettasciio's own readers. The helpers are imported by test_micrograph_component.py.
"""

import json
import struct

import numpy as np
import pytest

from components.micrographs import reader
from components.micrographs.pixel_size import PixelSizeUnknown, estimate_pixel_size
from components.synthesis import simulator


def lattice_image(material="SrTiO3", pixel_size_pm=20.0, size=128, seed=0, label="bulk"):
    """A simulated HAADF image at an exact pixel size (float32 counts)."""
    config = simulator.SimulationConfig(size=size, pixel_size_pm=(pixel_size_pm, pixel_size_pm))
    return simulator.simulate_image(material, label, seed, config).image


# ------------------------------------------------------------------- file writers


def write_tiff_imagej(path, image, pixel_size_pm, unit="nm"):
    import tifffile

    per_unit = {"nm": 1e3, "micron": 1e6, "angstrom": 100.0, "m": 1e12}[unit]
    pixels_per_unit = per_unit / pixel_size_pm
    tifffile.imwrite(path, image.astype(np.float32), imagej=True,
                     resolution=(pixels_per_unit, pixels_per_unit), metadata={"unit": unit})


def write_tiff_metric(path, image, pixel_size_pm):
    """Resolution tags in pixels per centimetre, no ImageJ metadata."""
    import tifffile

    per_cm = 1e10 / pixel_size_pm
    tifffile.imwrite(path, image.astype(np.float32), resolution=(per_cm, per_cm),
                     resolutionunit="CENTIMETER")


def _signal(image, pixel_size_pm, unit="nm"):
    scale = pixel_size_pm / {"nm": 1e3, "Å": 100.0}[unit]
    return {"data": image, "metadata": {"General": {"title": "HAADF"}, "Signal": {}},
            "original_metadata": {},
            "axes": [{"name": name, "size": size, "scale": scale, "offset": 0.0, "units": unit,
                      "navigate": False} for name, size in zip(("y", "x"), image.shape)]}


def write_tiff_rsciio(path, image, pixel_size_pm):
    from rsciio.tiff import file_writer

    file_writer(str(path), _signal(image.astype(np.float32), pixel_size_pm, "Å"))


def write_emd_ncem(path, image, pixel_size_pm):
    """Berkeley (NCEM) EMD: the only EMD flavour rosettasciio writes."""
    from rsciio.emd import file_writer

    file_writer(str(path), _signal(image.astype(np.float32), pixel_size_pm, "nm"))


def write_emd_velox(path, image, pixel_size_pm):
    """Velox EMD (HDF5): a Version record, and per image its Data (H, W, frames) and its
    Metadata (JSON as uint8), pixel size in metres, as Velox writes them."""
    import h5py

    metadata = {
        "BinaryResult": {"PixelSize": {"width": repr(pixel_size_pm * 1e-12),
                                       "height": repr(pixel_size_pm * 1e-12)},
                         "PixelUnitX": "m", "PixelUnitY": "m", "Offset": {"x": "0", "y": "0"},
                         "DetectorIndex": "0"},
        "Detectors": {"Detector-0": {"DetectorName": "HAADF"}},
        "Scan": {},
        "Acquisition": {"AcquisitionStartDatetime": {"DateTime": "1700000000"}},
    }
    with h5py.File(path, "w") as handle:
        handle["Version"] = np.array([json.dumps({"format": "Velox", "version": "11"}).encode()])
        group = handle.create_group("Data/Image/9b0e4f2c6a1d4e8f9a7b3c5d1e2f4a6b")
        group["Data"] = image.astype(np.float32)[:, :, None]
        group["Metadata"] = np.frombuffer(json.dumps(metadata).encode(), np.uint8)[:, None]


def _dm_value(value):
    """(info array, little-endian bytes) of a DM tag value."""
    if isinstance(value, bool):
        return [8], struct.pack("<?", value)
    if isinstance(value, int):
        return [3], struct.pack("<i", value)  # long
    if isinstance(value, float):
        return [6], struct.pack("<f", value)  # float
    if isinstance(value, str):  # DM strings are arrays of 2-byte characters
        return [20, 4, len(value)], value.encode("utf-16-le")
    array = np.ascontiguousarray(value, dtype="<f4")
    return [20, 6, array.size], array.tobytes()


def _dm_tag(name, value, version):
    size = ">I" if version == 3 else ">Q"
    if isinstance(value, (dict, list)):
        items = list(value.items()) if isinstance(value, dict) else [("", v) for v in value]
        body = struct.pack(">BB", 0, 1) + struct.pack(size, len(items))
        body += b"".join(_dm_tag(key, item, version) for key, item in items)
        tag_id = 20
    else:
        info, data = _dm_value(value)
        body = b"%%%%" + struct.pack(size, len(info))
        body += b"".join(struct.pack(size, entry) for entry in info) + data
        tag_id = 21
    encoded = name.encode("latin-1")
    header = struct.pack(">BH", tag_id, len(encoded)) + encoded
    if version == 4:
        header += struct.pack(">Q", len(body))
    return header + body


def write_dm(path, image, pixel_size_pm, version=3, unit="nm"):
    """A minimal Digital Micrograph file (DM3 or DM4): one float32 image in ImageList with
    its spatial calibration (X first, as DM stores dimensions)."""
    scale = pixel_size_pm / {"nm": 1e3, "Å": 100.0, "µm": 1e6}[unit]
    height, width = image.shape
    calibration = {"Origin": 0.0, "Scale": scale, "Units": unit}
    tree = {"ImageList": [{
        "ImageData": {
            "Calibrations": {"Brightness": {"Origin": 0.0, "Scale": 1.0, "Units": "counts"},
                             "Dimension": [calibration, dict(calibration)],
                             "DisplayCalibratedUnits": True},
            "Data": image.astype(np.float32).ravel(),
            "DataType": 2,  # float32
            "Dimensions": [width, height],
            "PixelDepth": 4,
        },
        "ImageTags": {},
        "Name": "HAADF",
    }]}
    size = ">I" if version == 3 else ">Q"
    root = struct.pack(">BB", 1, 0) + struct.pack(size, len(tree))
    root += b"".join(_dm_tag(key, value, version) for key, value in tree.items())
    body = root + b"\0" * 8
    header = struct.pack(">I", version) + struct.pack(size, len(body)) + struct.pack(">I", 1)
    with open(path, "wb") as handle:
        handle.write(header + body)


def write_ser(path, image, pixel_size_pm):
    """A minimal TIA .ser file: one 2-D float32 element, calibration in metres, rows stored
    bottom-up as TIA does."""
    height, width = image.shape
    header = struct.pack("<HHHIIII", 0x4949, 0x0197, 0x0210, 0x4122, 0x4152, 1, 1)
    dimension = struct.pack("<IddIII", 1, 0.0, 1.0, 0, 0, 0)  # one element, no text
    offsets_at = len(header) + 8 + len(dimension)
    data_at = offsets_at + 8
    metre = pixel_size_pm * 1e-12
    element = struct.pack("<ddIddIHII", 0.0, metre, 0, 0.0, metre, 0, 7, width, height)
    element += np.ascontiguousarray(image[::-1], dtype="<f4").tobytes()
    tag_at = data_at + len(element)
    with open(path, "wb") as handle:
        handle.write(header + struct.pack("<II", offsets_at, 1) + dimension)
        handle.write(struct.pack("<II", data_at, tag_at) + element + struct.pack("<HHI", 0x4152, 0, 0))


def write_emi(path, mode="STEM HAADF Image"):
    """A minimal TIA .emi: binary, holding the acquisition's metadata as one XML
    `<ObjectInfo>` per signal, the only part rosettasciio's .emi reader parses (no whitespace
    between tags, which it would take for values)."""
    xml = ("<ObjectInfo><AcquireDate>Mon Jan 08 10:00:00 2024</AcquireDate>"
           "<ExperimentalDescription><Root><Data><Label>Mode</Label>"
           f"<Value>{mode}</Value><Unit></Unit></Data></Root></ExperimentalDescription>"
           "<AcquireInfo><DwellTimePath>1e-05</DwellTimePath></AcquireInfo></ObjectInfo>")
    with open(path, "wb") as handle:
        handle.write(struct.pack("<HHI", 0x4949, 0x0197, 0) + xml.encode() + b"\0" * 8)


def to_uint8(image):
    scaled = (image - image.min()) / (image.max() - image.min()) * 255
    return np.round(scaled).astype(np.uint8)


def write_png(path, image, mode="L"):
    from PIL import Image

    grey = to_uint8(image)
    if mode == "L":
        array = grey
    elif mode == "RGB":
        array = np.stack([grey] * 3, axis=-1)
    else:  # RGBA, alpha opaque
        array = np.stack([grey] * 3 + [np.full_like(grey, 255)], axis=-1)
    Image.fromarray(array, mode=mode).save(path)


# Writer, file name, whether the file keeps float32 exactly, pixel size recovered.
FORMATS = {
    "dm3": (lambda p, im, px: write_dm(p, im, px, 3), "image.dm3"),
    "dm4": (lambda p, im, px: write_dm(p, im, px, 4, unit="Å"), "image.dm4"),
    "emd_velox": (write_emd_velox, "velox.emd"),
    "emd_ncem": (write_emd_ncem, "berkeley.emd"),
    "ser": (write_ser, "image_1.ser"),
    "tif_imagej_nm": (write_tiff_imagej, "imagej.tif"),
    "tif_imagej_micron": (lambda p, im, px: write_tiff_imagej(p, im, px, "micron"), "um.tiff"),
    "tif_metric": (write_tiff_metric, "metric.tif"),
    "tif_rsciio": (write_tiff_rsciio, "rsciio.tif"),
}


# ------------------------------------------------------------------ every format


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_every_format_gives_the_image_and_its_pixel_size(tmp_path, kind):
    writer, name = FORMATS[kind]
    image = np.random.default_rng(1).normal(100, 10, (48, 80)).astype(np.float32)
    writer(tmp_path / name, image, 23.5)
    raw = reader.read_micrograph(str(tmp_path / name))
    assert raw.image.dtype == np.float32 and raw.image.shape == (48, 80)
    np.testing.assert_allclose(raw.image, image, rtol=1e-6)
    assert raw.pixel_size_pm == pytest.approx((23.5, 23.5), rel=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_png_grey_rgb_and_rgba_become_one_intensity_channel_without_pixel_size(tmp_path, mode):
    image = lattice_image(size=64)
    write_png(tmp_path / "a.png", image, mode)
    raw = reader.read_micrograph(str(tmp_path / "a.png"))
    assert raw.image.shape == (64, 64) and raw.pixel_size_pm is None
    np.testing.assert_array_equal(raw.image, to_uint8(image).astype(np.float32))


def test_rgba_tiff_averages_the_colours_and_ignores_alpha(tmp_path):
    import tifffile

    rgba = np.zeros((32, 40, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 30, 60, 90, 7
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    raw = reader.read_micrograph(str(tmp_path / "rgba.tif"))
    assert raw.image.shape == (32, 40)
    np.testing.assert_array_equal(raw.image, 60.0)


def test_a_dpi_resolution_is_a_display_setting_not_a_pixel_size(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "dpi.tif", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64),
                     resolution=(72, 72), resolutionunit="INCH")
    raw = reader.read_micrograph(str(tmp_path / "dpi.tif"))
    assert raw.pixel_size_pm is None
    assert any("display setting" in note for note in raw.notes)


@pytest.mark.parametrize("unit, pm", [("pm", 1), ("nm", 1e3), ("Å", 100), ("\u212b", 100),
                                      ("A", 100), ("µm", 1e6), ("μm", 1e6), ("micron", 1e6),
                                      ("m", 1e12), ("meters", 1e12)])
def test_units_convert_to_picometres(unit, pm):
    assert reader.unit_to_pm(unit) == pm


@pytest.mark.parametrize("unit", [None, "", "<undefined>", "px"])
def test_missing_units_mean_no_pixel_size(unit):
    assert reader.unit_to_pm(unit) is None


@pytest.mark.parametrize("unit", ["1/nm", "nm^-1", "eV", "s"])
def test_reciprocal_and_non_length_units_are_not_images(unit):
    with pytest.raises(reader.BadMicrograph) as caught:
        reader.unit_to_pm(unit)
    assert caught.value.reason == reader.NOT_AN_IMAGE and unit in caught.value.detail


# ------------------------------------------------------------------ broken files


def _reason(path):
    """The reason a file is refused, by reading it and checking its pixels."""
    try:
        raw = reader.read_micrograph(str(path))
        reader.check_pixels(raw.image)
    except reader.BadMicrograph as error:
        assert error.detail, error
        return error.reason
    return None


def write_broken_corpus(folder):
    """{file name: reason} of a broken file of every kind, written into `folder`."""
    import tifffile

    image = lattice_image(size=64)
    write_tiff_imagej(folder / "whole.tif", image, 20.0)
    data = (folder / "whole.tif").read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 2])
    (folder / "text.tif").write_text("not a TIFF, a note someone named .tif\n")
    (folder / "notes.txt").write_text("sample 12, session 3\n")
    write_dm(folder / "whole.dm3", image, 20.0)
    (folder / "truncated.dm3").write_bytes((folder / "whole.dm3").read_bytes()[:300])
    (folder / "empty.emd").write_bytes(b"")
    write_emi(folder / "lone.emi")  # its lone_1.ser is missing
    nan = image.copy()
    nan[3, 5] = np.nan
    write_tiff_imagej(folder / "nan.tif", nan, 20.0)
    inf = image.copy()
    inf[0, 0] = np.inf
    write_dm(folder / "inf.dm4", inf, 20.0, version=4)
    write_tiff_imagej(folder / "constant.tif", np.full((64, 64), 7.0, np.float32), 20.0)
    tifffile.imwrite(folder / "stack.tif", np.stack([image] * 3), imagej=True,
                     resolution=(50.0, 50.0), metadata={"unit": "nm", "axes": "ZYX"})
    (folder / "whole.tif").unlink()
    (folder / "whole.dm3").unlink()
    return {
        "truncated.tif": reader.UNREADABLE,
        "text.tif": reader.UNREADABLE,
        "notes.txt": reader.UNSUPPORTED,
        "truncated.dm3": reader.UNREADABLE,
        "empty.emd": reader.UNREADABLE,
        "lone.emi": reader.EMI_WITHOUT_SER,
        "nan.tif": reader.NON_FINITE,
        "inf.dm4": reader.NON_FINITE,
        "constant.tif": reader.CONSTANT,
        "stack.tif": reader.NOT_2D,
    }


def test_every_broken_file_is_refused_with_its_reason(tmp_path):
    expected = write_broken_corpus(tmp_path)
    assert {name: _reason(tmp_path / name) for name in expected} == expected


def test_absurd_pixel_sizes_are_refused_with_the_value():
    reader.check_pixel_size(20.0, (2.0, 200.0), "metadata")
    for value in (1e12, 0.01, float("nan")):
        with pytest.raises(reader.BadMicrograph) as caught:
            reader.check_pixel_size(value, (2.0, 200.0), "metadata")
        assert caught.value.reason == reader.ABSURD_PIXEL_SIZE and "metadata" in caught.value.detail


def test_stacks_of_several_images_are_not_2d_but_singleton_axes_are_dropped():
    assert reader.to_intensity(np.ones((1, 8, 9, 1))).shape == (8, 9)
    with pytest.raises(reader.BadMicrograph) as caught:
        reader.to_intensity(np.ones((5, 8, 9)))
    assert caught.value.reason == reader.NOT_2D and "(5, 8, 9)" in caught.value.detail


# ------------------------------------------------------------------ TIA .emi/.ser


def test_the_emi_written_here_is_one_rosettasciio_pairs_with_its_ser(tmp_path):
    """The fixture is a real pair: rosettasciio's .emi reader opens `a_1.ser` and `a_2.ser`
    (not `ab_1.ser`, nor the .ser of another folder) and fills in the .emi's metadata; the
    pairing of ser_files_by_emi agrees."""
    from rsciio.tia import file_reader

    image = np.random.default_rng(2).normal(100, 10, (24, 40)).astype(np.float32)
    (tmp_path / "sub").mkdir()
    for name in ("a_1.ser", "a_2.ser", "ab_1.ser", "sub/a_1.ser"):
        write_ser(tmp_path / name, image, 20.0)
    write_emi(tmp_path / "a.emi")
    signals = file_reader(str(tmp_path / "a.emi"))
    opened = sorted(s["metadata"]["General"]["original_filename"] for s in signals)
    assert opened == ["a_1.ser", "a_2.ser"]
    assert signals[0]["original_metadata"]["ObjectInfo"]["ExperimentalDescription"]["Mode"] == (
        "STEM HAADF Image")
    np.testing.assert_allclose(signals[0]["data"], image)
    paths = ["a.emi", "a_1.ser", "a_2.ser", "ab_1.ser", "sub/a_1.ser"]
    assert reader.ser_files_by_emi(paths) == {"a.emi": opened}


def test_every_emi_is_paired_with_the_ser_files_of_its_folder_and_stem():
    paths = ["x/scan.emi", "x/scan_1.ser", "x/scan_12.ser", "x/scan_1_1.ser", "x/scan_1.emi",
             "x/scan_a.ser", "y/scan_2.ser", "y/lone.emi", "SHOUT.EMI", "SHOUT_1.SER",
             "scan_1.ser", "x/scan.tif"]
    assert reader.ser_files_by_emi(paths) == {
        "x/scan.emi": ["x/scan_1.ser", "x/scan_12.ser"],
        "x/scan_1.emi": ["x/scan_1_1.ser"],
        "y/lone.emi": [],
        "SHOUT.EMI": ["SHOUT_1.SER"],
    }


def test_an_emi_read_on_its_own_is_refused_naming_its_ser(tmp_path):
    write_emi(tmp_path / "scan.emi")
    with pytest.raises(reader.BadMicrograph) as caught:
        reader.read_micrograph(str(tmp_path / "scan.emi"))
    assert caught.value.reason == reader.EMI_WITHOUT_SER and "scan_1.ser" in caught.value.detail


def test_a_ser_is_read_alike_with_its_emi_broken_or_missing(tmp_path):
    """rosettasciio's .ser reader does not open the .emi: a broken one (which its .emi reader
    refuses) changes nothing in the image or its calibration."""
    from rsciio.tia import file_reader

    image = np.random.default_rng(3).normal(100, 10, (32, 48)).astype(np.float32)
    write_ser(tmp_path / "scan_1.ser", image, 23.5)
    alone = reader.read_micrograph(str(tmp_path / "scan_1.ser"))
    (tmp_path / "scan.emi").write_bytes(b"\x49\x49\x97\x01<ObjectInfo><AcquireDate>trunc")
    with pytest.raises(Exception):
        file_reader(str(tmp_path / "scan.emi"))
    beside = reader.read_micrograph(str(tmp_path / "scan_1.ser"))
    np.testing.assert_array_equal(beside.image, alone.image)
    np.testing.assert_allclose(beside.image, image, rtol=1e-6)
    assert beside.pixel_size_pm == alone.pixel_size_pm == pytest.approx((23.5, 23.5), rel=1e-5)


# ------------------------------------------------------------ resampling, tiling


def test_resampling_reaches_the_target_and_keeps_the_lattice_spacing():
    image = lattice_image(pixel_size_pm=30.0, size=128)
    resampled, exact = reader.resample(image, (30.0, 30.0), 20.0)
    assert resampled.shape == (192, 192) and resampled.dtype == np.float32
    assert exact == pytest.approx(20.0)
    assert estimate_pixel_size(resampled, "SrTiO3").pixel_size_pm == pytest.approx(20.0, rel=0.02)


def test_resampling_follows_each_axis_and_skips_pixel_sizes_already_on_target():
    image = np.random.default_rng(0).random((100, 60)).astype(np.float32)
    stretched, _ = reader.resample(image, (10.0, 40.0), 20.0)
    assert stretched.shape == reader.resampled_shape(image.shape, (10.0, 40.0), 20.0) == (50, 120)
    kept, exact = reader.resample(image, (20.1, 20.1), 20.0)
    assert kept is image and exact == pytest.approx(20.1)


def test_tiles_cover_the_frame_with_at_least_the_overlap_and_end_flush():
    for length in (256, 257, 600, 1000):
        starts = reader.tile_starts(length, 256, 64)
        assert starts[0] == 0 and starts[-1] == max(0, length - 256)
        assert all(b - a <= 256 - 64 for a, b in zip(starts, starts[1:]))
    tiles = reader.cut_tiles(np.zeros((600, 300), np.float32), 256, 64)
    assert [origin for origin, _ in tiles] == [(0, 0), (0, 44), (192, 0), (192, 44),
                                               (344, 0), (344, 44)]
    assert all(tile.shape == (256, 256) for _, tile in tiles)


def test_small_frames_stay_whole():
    image = np.zeros((64, 100), np.float32)
    ((origin, tile),) = reader.cut_tiles(image, 256, 64)
    assert origin == (0, 0) and tile.shape == (64, 100)
    (_, strip), *_ = reader.cut_tiles(np.zeros((80, 700), np.float32), 256, 64)
    assert strip.shape == (80, 256)


# ------------------------------------------------------------------------ labels


def test_labels_from_the_folder_or_the_file_name_are_normalised_to_class_names():
    import re

    pattern = re.compile(r"^(?P<label>.+?)_\d+$")
    assert reader.label_for("Vacancy/a.tif", "folder", pattern) == ("vacancy", None)
    assert reader.label_for("x/Stacking fault/a.tif", "folder", pattern) == ("stacking_fault", None)
    assert reader.label_for("Vacancy_12.tif", "pattern", pattern) == ("vacancy", None)
    assert reader.label_for("s/twin-boundary_3.dm4", "pattern", pattern) == ("twin_boundary", None)
    # not a class name: kept as written, for ExampleValidator to flag against the label domain
    assert reader.label_for("Vacancy_cluster_2.tif", "pattern", pattern) == ("Vacancy_cluster", None)
    label, note = reader.label_for("a.tif", "folder", pattern)
    assert label == reader.UNKNOWN_LABEL and "root folder" in note
    label, note = reader.label_for("sample.tif", "pattern", pattern)
    assert label == reader.UNKNOWN_LABEL and "'sample'" in note
    assert reader.label_for("Vacancy/a.tif", None, pattern) == (reader.UNKNOWN_LABEL, None)


# ---------------------------------------------------------------- pixel size from FFT


@pytest.mark.parametrize("material, label, pixel_size_pm", [
    ("SrTiO3", "bulk", 14.0), ("SrTiO3", "vacancy", 22.0), ("SrTiO3", "dislocation", 31.0),
    ("CdTe", "bulk", 16.0), ("CdTe", "twin_boundary", 20.0), ("CdTe", "substitution", 27.0),
])
def test_pixel_size_is_estimated_within_a_few_percent(material, label, pixel_size_pm):
    image = lattice_image(material, pixel_size_pm, size=160, seed=3, label=label)
    estimate = estimate_pixel_size(image, material)
    assert estimate.pixel_size_pm == pytest.approx(pixel_size_pm, rel=0.03)
    assert estimate.shape_error < 0.05


def test_a_lattice_of_another_shape_or_none_gives_no_estimate():
    with pytest.raises(PixelSizeUnknown, match="does not match CdTe"):
        estimate_pixel_size(lattice_image("SrTiO3", 20.0, size=128), "CdTe")
    with pytest.raises(PixelSizeUnknown, match="no lattice"):
        estimate_pixel_size(np.random.default_rng(0).normal(size=(128, 128)), "SrTiO3")
