"""Read one microscope file into a 2-D intensity image and its pixel size; check, resample, tile.

Plain NumPy, SciPy, scikit-image, tifffile, Pillow and rosettasciio (no TensorFlow), so the
same functions serve the Beam executor, tests and notebooks. Every way a file can be unfit
raises `BadMicrograph` with a short `reason` code (what the quarantine report counts) and a
`detail` that says what was found.

Formats: Digital Micrograph (.dm3, .dm4), EMD (.emd: Velox and Berkeley/NCEM), TIA (.ser)
through rosettasciio; TIFF through tifffile, whose tags rosettasciio's TIFF reader leaves
unread (an ImageJ `unit`, metric resolution units; vendor tags are still asked of
rosettasciio when tifffile finds no calibration); PNG through Pillow (PNG holds no pixel
size a microscope writes). TIA writes each acquisition as `name.emi` (metadata only) and
`name_1.ser`, `name_2.ser` ... (the signals, with their calibration): the .ser is read on its
own (rosettasciio's .ser reader does not open the .emi), and `ser_files_by_emi` pairs each
.emi with its .ser files so that a folder reader can tell a companion from a lone .emi.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from components.defects import IMAGE_CLASSES, MIXED_LABEL

RSCIIO_EXTENSIONS = (".dm3", ".dm4", ".emd", ".ser")
TIFF_EXTENSIONS = (".tif", ".tiff")
PNG_EXTENSIONS = (".png",)
EXTENSIONS = RSCIIO_EXTENSIONS + TIFF_EXTENSIONS + PNG_EXTENSIONS
TIA_METADATA_EXTENSION = ".emi"  # no image: the metadata of the .ser files beside it

# Reasons a file is set aside (the quarantine report counts them).
UNSUPPORTED = "unsupported_type"  # no micrograph extension
UNREADABLE = "unreadable"  # truncated, corrupt, or not the format its name says
NOT_AN_IMAGE = "not_an_image"  # a spectrum, diffraction pattern, complex FFT, text ...
NOT_2D = "not_2d"  # a stack or series where one 2-D image is expected
NON_FINITE = "non_finite"  # NaN or infinite pixels
CONSTANT = "constant"  # every pixel the same: nothing to see
ABSURD_PIXEL_SIZE = "absurd_pixel_size"  # outside the configured plausible range
NO_PIXEL_SIZE = "no_pixel_size"  # none in the file, none estimated, no fallback
TOO_SMALL = "too_small"  # under min_size pixels after resampling
TOO_LARGE = "too_large"  # over max_frame_pixels after resampling
EMI_WITHOUT_SER = "emi_without_ser"  # a TIA .emi (metadata) without the .ser holding its image
REASONS = (UNSUPPORTED, UNREADABLE, NOT_AN_IMAGE, NOT_2D, NON_FINITE, CONSTANT,
           ABSURD_PIXEL_SIZE, NO_PIXEL_SIZE, TOO_SMALL, TOO_LARGE, EMI_WITHOUT_SER)

LABEL_SOURCES = ("folder", "pattern")
UNKNOWN_LABEL = "unknown"
# Labels the schema's `label` domain holds; a folder or pattern label is mapped onto them.
KNOWN_LABELS = IMAGE_CLASSES + (MIXED_LABEL,)

# Picometres per unit, for the spellings microscope software writes.
_PM_PER_UNIT = {
    "pm": 1.0, "picometer": 1.0, "picometers": 1.0, "picometre": 1.0, "picometres": 1.0,
    "nm": 1e3, "nanometer": 1e3, "nanometers": 1e3, "nanometre": 1e3, "nanometres": 1e3,
    "å": 100.0, "a": 100.0, "ang": 100.0, "angstrom": 100.0, "angstroms": 100.0,
    "ångström": 100.0,
    "µm": 1e6, "μm": 1e6, "um": 1e6, "micron": 1e6, "microns": 1e6, "micrometer": 1e6,
    "micrometers": 1e6, "micrometre": 1e6, "micrometres": 1e6, "\\u00b5m": 1e6,
    "mm": 1e9, "millimeter": 1e9, "millimeters": 1e9,
    "cm": 1e10, "centimeter": 1e10, "centimeters": 1e10,
    "m": 1e12, "meter": 1e12, "meters": 1e12, "metre": 1e12, "metres": 1e12,
}
_NO_UNIT = ("", "<undefined>", "undefined", "none", "px", "pixel", "pixels")
# TIFF ResolutionUnit values that are lengths a microscope calibrates in (tifffile.RESUNIT).
_TIFF_RESOLUTION_UNITS = {3: "cm", 4: "mm", 5: "um"}
# Resampling is skipped when the file's pixel size is this close to the target (relative):
# interpolating for a fraction of a pixel over the frame would only blur it.
RESAMPLE_TOLERANCE = 0.01


class BadMicrograph(Exception):
    """A file that cannot become examples: `reason` (one of REASONS) and what was found."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class RawMicrograph:
    """One file's image as stored, before any resampling."""

    image: np.ndarray  # float32 (H, W)
    pixel_size_pm: Optional[Tuple[float, float]]  # (row, col) from the metadata, or None
    notes: Tuple[str, ...] = ()  # what a person should know (several datasets, ignored dpi ...)


def unit_to_pm(unit) -> Optional[float]:
    """Picometres per `unit`; None when the unit says "uncalibrated". Reciprocal units mean a
    diffraction pattern or FFT; any other unit is not a length: both raise BadMicrograph."""
    text = "" if unit is None else str(unit).strip()
    key = text.lower().replace(" ", "")
    if key in _NO_UNIT:
        return None
    if key.startswith("1/") or "^-1" in key or key.endswith("-1"):
        raise BadMicrograph(NOT_AN_IMAGE, f"axis unit {text!r} is reciprocal space (a diffraction "
                                          f"pattern or FFT), not a real-space image")
    try:
        return _PM_PER_UNIT[key]
    except KeyError:
        raise BadMicrograph(NOT_AN_IMAGE, f"axis unit {text!r} is not a length") from None


def to_intensity(array: np.ndarray) -> np.ndarray:
    """2-D float32 intensity. RGB(A) (H, W, 3|4) or a structured RGB(A) array becomes the mean
    of its colour channels (alpha ignored); singleton axes are dropped."""
    array = np.asarray(array)
    if array.dtype.names:
        if not {"R", "G", "B"} <= set(array.dtype.names):
            raise BadMicrograph(NOT_AN_IMAGE, f"record data with fields {array.dtype.names}")
        array = np.mean([array[c].astype(np.float32) for c in "RGB"], axis=0)
    if np.iscomplexobj(array):
        raise BadMicrograph(NOT_AN_IMAGE, "complex data (an FFT or a phase image)")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise BadMicrograph(NOT_AN_IMAGE, f"data of type {array.dtype}")
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4) and min(array.shape[:2]) > 4:
        array = array[..., :3].astype(np.float32).mean(axis=-1)
    if array.ndim != 2:
        kind = "a stack or series" if array.ndim > 2 else "not an image"
        raise BadMicrograph(NOT_2D, f"data of shape {array.shape} is {kind}; expected one 2-D "
                                    f"image (H, W) or RGB(A) (H, W, 3|4)")
    return array.astype(np.float32, copy=False)


def check_pixels(image: np.ndarray) -> None:
    """Refuse NaN or infinite pixels and constant images."""
    finite = np.isfinite(image)
    if not finite.all():
        bad = int(image.size - np.count_nonzero(finite))
        raise BadMicrograph(NON_FINITE, f"{bad} of {image.size} pixels are NaN or infinite")
    low, high = float(image.min()), float(image.max())
    if low == high:
        raise BadMicrograph(CONSTANT, f"every pixel is {low:g}")


def check_pixel_size(pixel_size_pm: float, plausible_pm: Tuple[float, float], origin: str) -> None:
    low, high = plausible_pm
    if not (np.isfinite(pixel_size_pm) and low <= pixel_size_pm <= high):
        raise BadMicrograph(ABSURD_PIXEL_SIZE, f"{origin} pixel size {pixel_size_pm:.6g} pm lies "
                                               f"outside the plausible {low:g} to {high:g} pm")


# ----------------------------------------------------------------------------- reading


def read_micrograph(path: str) -> RawMicrograph:
    """One file's image and calibration; BadMicrograph when it is no readable 2-D image."""
    stem, extension = os.path.splitext(os.path.basename(path))
    extension = extension.lower()
    if extension == TIA_METADATA_EXTENSION:
        raise BadMicrograph(EMI_WITHOUT_SER, f"a TIA .emi holds only metadata; the image is in "
                                             f"{stem}_1.ser ({stem}_<n>.ser for further "
                                             f"signals): read that file")
    if extension not in EXTENSIONS:
        raise BadMicrograph(UNSUPPORTED, f"extension {extension or '(none)'!r} is not one of "
                                         f"{', '.join(EXTENSIONS)}")
    reader = (_read_tiff if extension in TIFF_EXTENSIONS else
              _read_png if extension in PNG_EXTENSIONS else _read_rsciio)
    try:
        array, pixel_size, notes = reader(path)
    except BadMicrograph:
        raise
    except Exception as error:  # noqa: BLE001 - any parser failure means the file is unreadable
        message = str(error).replace("\n", " ") or "no message"
        raise BadMicrograph(UNREADABLE, f"{type(error).__name__}: {message}") from None
    image = to_intensity(array)
    return RawMicrograph(image=image, pixel_size_pm=pixel_size, notes=tuple(notes))


def _pixel_size_from_axes(axes: Sequence[dict]) -> Optional[Tuple[float, float]]:
    """(row, col) pixel size in pm of the last two axes of a rosettasciio signal, or None."""
    if len(axes) < 2:
        return None
    sizes = []
    for axis in axes[-2:]:
        per_unit = unit_to_pm(axis.get("units"))
        if per_unit is None:
            return None
        sizes.append(float(axis.get("scale", 1.0)) * per_unit)
    return sizes[0], sizes[1]


def _read_rsciio(path: str):
    extension = os.path.splitext(path)[1].lower()
    if extension in (".dm3", ".dm4"):
        from rsciio.digitalmicrograph import file_reader
    elif extension == ".emd":
        from rsciio.emd import file_reader
    else:
        from rsciio.tia import file_reader
    signals = [s for s in file_reader(path) if np.ndim(s["data"]) >= 2]
    if not signals:
        raise BadMicrograph(NOT_AN_IMAGE, "the file holds no image (spectra only?)")
    notes = []
    chosen = signals[0]
    if len(signals) > 1:
        titles = [str(s.get("metadata", {}).get("General", {}).get("title", "")) for s in signals]
        haadf = [i for i, title in enumerate(titles) if "haadf" in title.lower()]
        chosen = signals[haadf[0] if haadf else 0]
        notes.append(f"{len(signals)} images in the file ({', '.join(titles)}); took "
                     f"{titles[haadf[0] if haadf else 0] or 'the first'}")
    axes = sorted(chosen["axes"], key=lambda a: a.get("index_in_array", 0))
    data = np.asarray(chosen["data"])
    if data.ndim != 2 and not data.dtype.names:
        raise BadMicrograph(NOT_2D, f"data of shape {data.shape} is a stack or series; "
                                    f"expected one 2-D image")
    return data, _pixel_size_from_axes(axes), notes


def _read_tiff(path: str):
    import tifffile

    notes = []
    with tifffile.TiffFile(path) as tif:
        array = tif.series[0].asarray()
        pixel_size = _tiff_pixel_size(tif, notes)
    if pixel_size is None:
        pixel_size = _rsciio_tiff_pixel_size(path)
    return array, pixel_size, notes


def _tiff_pixel_size(tif, notes: List[str]) -> Optional[Tuple[float, float]]:
    """From FEI/Thermo tags, an ImageJ unit, or a metric ResolutionUnit; dpi is a display
    setting, not a calibration, and is ignored (with a note)."""
    fei = tif.fei_metadata
    if fei and "PixelWidth" in fei.get("Scan", {}):
        scan = fei["Scan"]
        return (float(scan.get("PixelHeight", scan["PixelWidth"])) * 1e12,
                float(scan["PixelWidth"]) * 1e12)
    tags = tif.pages[0].tags
    if "XResolution" not in tags:
        return None
    x_per_unit = _rational(tags["XResolution"].value)
    y_per_unit = _rational(tags["YResolution"].value) if "YResolution" in tags else x_per_unit
    imagej = tif.imagej_metadata or {}
    if imagej.get("unit"):
        unit = imagej["unit"]
    else:
        code = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
        unit = _TIFF_RESOLUTION_UNITS.get(code)
        if unit is None:
            if (x_per_unit, y_per_unit) != (1.0, 1.0):
                notes.append(f"TIFF resolution {x_per_unit:g} per inch (or unitless) is a display "
                             f"setting, not a pixel size; ignored")
            return None
    per_unit = unit_to_pm(unit)
    if per_unit is None or not (x_per_unit > 0 and y_per_unit > 0):
        return None
    return per_unit / y_per_unit, per_unit / x_per_unit


def _rational(value) -> float:
    if isinstance(value, tuple):
        numerator, denominator = value
        return numerator / denominator if denominator else 0.0
    return float(value)


def _rsciio_tiff_pixel_size(path: str) -> Optional[Tuple[float, float]]:
    """Vendor TIFF calibrations tifffile does not decode (DM export, Zeiss, Olympus ...)."""
    from rsciio.tiff import file_reader

    try:
        signals = file_reader(path)
        return _pixel_size_from_axes(
            sorted(signals[0]["axes"], key=lambda a: a.get("index_in_array", 0)))
    except Exception:  # noqa: BLE001 - an optional second opinion; tifffile read the pixels
        return None


def _read_png(path: str):
    from PIL import Image

    with Image.open(path) as picture:
        picture.load()
        if picture.mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
            picture = picture.convert("RGBA" if "A" in picture.mode or
                                      "transparency" in picture.info else "RGB")
        if picture.mode == "LA":
            picture = picture.getchannel("L")
        array = np.asarray(picture)
    return array, None, []


def ser_files_by_emi(relative_paths: Iterable[str]) -> Dict[str, List[str]]:
    """{every .emi among the `/`-separated paths: the .ser files of its acquisition, sorted}; an
    empty list means the acquisition's image is missing. TIA names them `name.emi` and
    `name_<n>.ser` in one folder; rosettasciio's .emi reader pairs them by the same rule
    (globbing `name_[0-9].ser`; any number is taken here, since each .ser is read anyway)."""
    paths = sorted(relative_paths)
    sers: Dict[Tuple[str, str], List[str]] = {}
    for path in paths:
        folder, name = posixpath.split(path)
        base, extension = os.path.splitext(name)
        signal = re.fullmatch(r"(.+)_\d+", base)
        if extension.lower() == ".ser" and signal:
            sers.setdefault((folder, signal.group(1)), []).append(path)
    found = {}
    for path in paths:
        folder, name = posixpath.split(path)
        stem, extension = os.path.splitext(name)
        if extension.lower() == TIA_METADATA_EXTENSION:
            found[path] = sers.get((folder, stem), [])
    return found


# ------------------------------------------------------------------- resampling, tiling


def resample(image: np.ndarray, pixel_size_pm: Tuple[float, float],
             target_pm: float) -> Tuple[np.ndarray, float]:
    """The image at `target_pm` per pixel on both axes, and its exact pixel size (rounding the
    shape to whole pixels moves it by under half a pixel over the frame). Shrinking is
    anti-aliased; within RESAMPLE_TOLERANCE of the target the image is kept as it is."""
    row_pm, col_pm = pixel_size_pm
    if max(abs(row_pm / target_pm - 1), abs(col_pm / target_pm - 1)) <= RESAMPLE_TOLERANCE:
        return image, (row_pm + col_pm) / 2
    from skimage.transform import resize

    height, width = image.shape
    shape = (max(1, round(height * row_pm / target_pm)), max(1, round(width * col_pm / target_pm)))
    shrinking = shape[0] < height or shape[1] < width
    resampled = resize(image, shape, order=3, mode="reflect", anti_aliasing=shrinking,
                       preserve_range=True).astype(np.float32)
    exact = (height * row_pm / shape[0] + width * col_pm / shape[1]) / 2
    return resampled, exact


def resampled_shape(shape: Tuple[int, int], pixel_size_pm: Tuple[float, float],
                    target_pm: float) -> Tuple[int, int]:
    """The shape `resample` will give, without resampling (to refuse huge frames first)."""
    row_pm, col_pm = pixel_size_pm
    if max(abs(row_pm / target_pm - 1), abs(col_pm / target_pm - 1)) <= RESAMPLE_TOLERANCE:
        return tuple(shape)
    return (max(1, round(shape[0] * row_pm / target_pm)),
            max(1, round(shape[1] * col_pm / target_pm)))


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Starts of tiles of `tile` pixels covering `length`, neighbours overlapping by at least
    `overlap`; the last tile ends flush with the edge. One start (0) when it fits whole."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def cut_tiles(image: np.ndarray, tile_size: int,
              overlap: int) -> List[Tuple[Tuple[int, int], np.ndarray]]:
    """((row, col) origin, tile) pairs; an axis no longer than tile_size is kept whole."""
    height, width = image.shape
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    return [((row, col), image[row:row + tile_h, col:col + tile_w])
            for row in tile_starts(height, tile_size, overlap)
            for col in tile_starts(width, tile_size, overlap)]


# ---------------------------------------------------------------------------- labels


def normalise_label(text: str) -> str:
    """A folder or file-name label as the contract spells it: `Vacancy`, `Stacking fault` and
    `twin-boundary` become `vacancy`, `stacking_fault`, `twin_boundary`. Text that names no
    known image class is kept as written, so that ExampleValidator reports it (the label
    domain of schema/schema.pbtxt) rather than this reader guessing."""
    key = re.sub(r"[\s\-]+", "_", text.strip()).lower()
    return key if key in KNOWN_LABELS else text.strip()


def label_for(relative_path: str, label_source: Optional[str],
              label_pattern: Optional[re.Pattern]) -> Tuple[str, Optional[str]]:
    """(label, note): from the file's folder or its name, normalised; UNKNOWN_LABEL with a
    note saying why when the source gives none."""
    if label_source is None:
        return UNKNOWN_LABEL, None
    if label_source == "folder":
        folder = os.path.basename(os.path.dirname(relative_path))
        if not folder:
            return UNKNOWN_LABEL, "the file lies in the root folder, which names no label"
        return normalise_label(folder), None
    stem = os.path.splitext(os.path.basename(relative_path))[0]
    match = label_pattern.search(stem)
    if match is None:
        return UNKNOWN_LABEL, (f"file name {stem!r} does not match label_pattern "
                               f"{label_pattern.pattern!r}")
    found = match.group("label") if "label" in label_pattern.groupindex else match.group(1)
    if not found:
        return UNKNOWN_LABEL, f"label_pattern matched {stem!r} with an empty label"
    return normalise_label(found), None
