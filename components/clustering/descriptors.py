"""One fixed-length vector per image from its defect maps, for clustering images without labels.

An image is summarised by what the segmentation U-Net found in it, one block per defect class
(channel order of `probabilities` = `classes`), then by its deviation from the perfect
lattice:

- per class: the area above the threshold, the probability's mean, max and upper quantiles
  (a faint class leaves a trace there before any pixel passes the threshold), and the
  connected regions above the threshold (8-connectivity): how many, their sizes, how far
  apart they lie, and how elongated the largest one is. Points, lines and bands differ in
  these even within one class channel.
- sizes are fractions of the frame so that frames of any size compare; with the pixel size
  the mean region area (nm^2) and the region density (per nm^2) are also given in physical
  units (0 when the pixel size is not known: give it for every frame or for none, as a
  constant column carries no weight after standardisation).
- the deviation map (`deviation_z`, noise-sigma units): its spread and its outliers beyond
  3 sigma, and the sign balance of those (extra intensity from an interstitial or heavier
  substitution against missing intensity from a vacancy). A frame without a lattice has no
  deviation map (None): its deviation descriptors are 0 and `deviation_available` is 0.

Every descriptor is finite for every valid input; an empty map gives zeros.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
from scipy import ndimage

# Beyond this many noise sigmas a deviation counts as an outlier.
Z_OUTLIER = 3.0

_CLASS_DESCRIPTORS = (
    "area_fraction",              # pixels above the threshold / all pixels
    "mean_probability",
    "max_probability",
    "p95_probability",
    "p99_probability",
    "region_count",               # connected regions above the threshold (8-connectivity)
    "region_mean_size_fraction",  # region sizes as fractions of the frame
    "region_max_size_fraction",
    "region_size_std_fraction",
    "region_spread",              # RMS distance of region centroids from their mean / diagonal
    "largest_region_elongation",  # 1 - sqrt(minor / major variance) of the largest region
    "region_mean_area_nm2",       # 0 without a pixel size
    "region_density_per_nm2",     # regions per nm^2 of frame; 0 without a pixel size
)

_DEVIATION_DESCRIPTORS = (
    "deviation_available",        # 1 with a deviation map, 0 without (all below are then 0)
    "deviation_mean_abs_z",
    "deviation_std_z",
    "deviation_p99_abs_z",
    "deviation_max_abs_z",
    "deviation_fraction_abs_z_above_3",
    "deviation_sign_balance_abs_z_above_3",  # (positive - negative) / outliers; 0 without any
)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def descriptor_names(classes: Sequence[str]) -> list[str]:
    """Names of `describe`'s vector, in its order: per class block, then the deviation block."""
    return [f"{cls}_{name}" for cls in classes for name in _CLASS_DESCRIPTORS] \
        + list(_DEVIATION_DESCRIPTORS)


def _check_inputs(probabilities: np.ndarray, deviation_z: Optional[np.ndarray],
                  classes: Sequence[str], threshold: float,
                  pixel_size_pm: Optional[float]) -> np.ndarray:
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 3:
        raise ValueError(f"probabilities must be (C, H, W), one map per class, got shape "
                         f"{probabilities.shape}")
    if probabilities.shape[0] != len(classes):
        raise ValueError(f"probabilities have {probabilities.shape[0]} channels but "
                         f"{len(classes)} classes were named ({', '.join(classes)})")
    if min(probabilities.shape[1:]) < 1:
        raise ValueError(f"probabilities hold an empty map: shape {probabilities.shape}")
    if deviation_z is not None and np.shape(deviation_z) != probabilities.shape[1:]:
        raise ValueError(f"deviation_z has shape {np.shape(deviation_z)} but the maps are "
                         f"{probabilities.shape[1:]}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    if pixel_size_pm is not None and not (np.isfinite(pixel_size_pm) and pixel_size_pm > 0):
        raise ValueError(f"pixel_size_pm must be a positive number or None, got {pixel_size_pm}")
    return probabilities


def _regions(above: np.ndarray):
    """Sizes (pixels), centroids (row, col) and labelled pixel coordinates of the connected
    regions of `above`, from its set pixels only (no full-frame coordinate grids)."""
    labels, count = ndimage.label(above, structure=_EIGHT_CONNECTED)
    rows, cols = np.nonzero(labels)
    region_of = labels[rows, cols] - 1
    sizes = np.bincount(region_of, minlength=count).astype(np.float64)
    centroids = np.stack([np.bincount(region_of, weights=rows, minlength=count),
                          np.bincount(region_of, weights=cols, minlength=count)],
                         axis=1).astype(np.float64)  # (an empty bincount is int)
    centroids /= np.maximum(sizes, 1.0)[:, None]
    return sizes, centroids, rows, cols, region_of


def _elongation(rows: np.ndarray, cols: np.ndarray) -> float:
    """0 for a round (or one-pixel) region, towards 1 for a line: from the principal variances
    of its pixel coordinates."""
    if rows.size < 2:
        return 0.0
    variances = np.linalg.eigvalsh(np.cov(np.stack([rows, cols]).astype(np.float64)))
    major = variances[-1]
    return 0.0 if major <= 0 else float(1.0 - np.sqrt(max(variances[0], 0.0) / major))


def _class_block(channel: np.ndarray, threshold: float,
                 pixel_area_nm2: Optional[float]) -> list[float]:
    height, width = channel.shape
    pixels = float(height * width)
    above = channel > threshold
    p95, p99 = np.percentile(channel, [95, 99])
    sizes, centroids, rows, cols, region_of = _regions(above)
    count = sizes.size
    if count:
        largest = int(np.argmax(sizes))
        in_largest = region_of == largest
        elongation = _elongation(rows[in_largest], cols[in_largest])
        fractions = sizes / pixels
        mean_size, max_size, size_std = fractions.mean(), fractions.max(), fractions.std()
    else:
        elongation = mean_size = max_size = size_std = 0.0
    if count >= 2:
        offsets = centroids - centroids.mean(axis=0)
        spread = np.sqrt((offsets ** 2).sum(axis=1).mean()) / np.hypot(height, width)
    else:
        spread = 0.0
    if pixel_area_nm2 is None:
        mean_area_nm2 = density = 0.0
    else:
        mean_area_nm2 = sizes.mean() * pixel_area_nm2 if count else 0.0
        density = count / (pixels * pixel_area_nm2)
    return [above.sum() / pixels, channel.mean(dtype=np.float64), channel.max(), p95, p99,
            count, mean_size, max_size, size_std, spread, elongation, mean_area_nm2, density]


def _deviation_block(deviation_z: Optional[np.ndarray]) -> list[float]:
    if deviation_z is None:
        return [0.0] * len(_DEVIATION_DESCRIPTORS)
    z = np.asarray(deviation_z, dtype=np.float64)
    z = z[np.isfinite(z)]  # a map with holes is summarised over its finite pixels
    if z.size == 0:
        return [0.0] * len(_DEVIATION_DESCRIPTORS)
    magnitude = np.abs(z)
    outliers = magnitude > Z_OUTLIER
    n_outliers = int(outliers.sum())
    balance = float(np.sign(z[outliers]).sum()) / n_outliers if n_outliers else 0.0
    return [1.0, magnitude.mean(), z.std(), np.percentile(magnitude, 99), magnitude.max(),
            n_outliers / z.size, balance]


def describe(probabilities: np.ndarray, deviation_z: Optional[np.ndarray],
             classes: Sequence[str], threshold: float = 0.5,
             pixel_size_pm: Optional[float] = None) -> np.ndarray:
    """The descriptor vector (float64, in `descriptor_names(classes)` order) of one image.

    `probabilities` is (C, H, W) in [0, 1], one sigmoid map per class; `deviation_z` is
    (H, W) or None for a frame without a lattice. Anything else raises ValueError saying what
    is wrong, rather than giving a vector that would silently distort the clustering.
    """
    probabilities = _check_inputs(probabilities, deviation_z, classes, threshold, pixel_size_pm)
    pixel_area_nm2 = None if pixel_size_pm is None else (pixel_size_pm / 1000.0) ** 2
    values = []
    for cls, channel in zip(classes, probabilities):
        low, high = channel.min(), channel.max()
        if not (0.0 <= low and high <= 1.0):  # also catches NaN
            raise ValueError(f"probabilities of {cls!r} span [{low}, {high}]: expected sigmoid "
                             f"outputs in [0, 1] (logits, or a NaN from the model?)")
        values += _class_block(channel, threshold, pixel_area_nm2)
    values += _deviation_block(deviation_z)
    return np.asarray(values, dtype=np.float64)


def describe_many(probability_maps: Iterable[np.ndarray],
                  deviations: Iterable[Optional[np.ndarray]], classes: Sequence[str],
                  threshold: float = 0.5,
                  pixel_sizes_pm: Optional[Iterable[Optional[float]]] = None) -> np.ndarray:
    """(N, D) descriptors of N images: `describe` row by row (maps may differ in size)."""
    probability_maps, deviations = list(probability_maps), list(deviations)
    pixel_sizes_pm = [None] * len(probability_maps) if pixel_sizes_pm is None \
        else list(pixel_sizes_pm)
    if not len(probability_maps) == len(deviations) == len(pixel_sizes_pm):
        raise ValueError(f"{len(probability_maps)} probability maps, {len(deviations)} "
                         f"deviation maps and {len(pixel_sizes_pm)} pixel sizes: one each per image")
    rows = [describe(p, z, classes, threshold, s)
            for p, z, s in zip(probability_maps, deviations, pixel_sizes_pm)]
    return np.stack(rows) if rows else np.zeros((0, len(descriptor_names(classes))))
