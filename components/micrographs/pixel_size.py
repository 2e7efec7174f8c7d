"""The pixel size of a micrograph without one, from its lattice and the material's cell.

The Bragg peaks of the image's Fourier transform give the projected lattice in pixels
(`components.pseudo_labels.lattice.estimate_lattice`: any rotation, refined by local
phases); the material registry gives the same lattice in angstrom. Their primitive cell
areas give the pixel size, and the two must have the same shape (ratio of the reduced basis
lengths, angle between them) before the answer is believed: a lattice of another material,
zone axis or a wrong sublattice is refused rather than turned into a wrong pixel size.

Limit: a lattice whose shape is the same at two scales (a square one against its centred
square sublattice, 1/sqrt2 smaller) is told apart only by which Bragg peaks the image shows:
if a perovskite's A and B columns looked alike, the estimate would be off by sqrt2.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from components.materials import Material, get_material
from components.pseudo_labels.lattice import estimate_lattice

# The lattice is estimated on a central crop at most this many pixels square: enough cells
# for the Bragg peaks, and the time stays that of one tile whatever the frame size.
MAX_CROP = 512
_PM_PER_ANGSTROM = 100.0


class PixelSizeUnknown(ValueError):
    """No pixel size could be estimated from the image; the message says why."""


@dataclass(frozen=True)
class PixelSizeEstimate:
    pixel_size_pm: float
    # Shape mismatch between the image's lattice and the material's: the larger of the
    # relative difference of the basis-length ratios and the difference of |cos(angle)|.
    shape_error: float
    lattice_px: Tuple[Tuple[float, float], Tuple[float, float]]  # reduced basis, (y, x) rows


def _same_column(a, b) -> bool:
    return a.atoms == b.atoms


def _centring(material: Material) -> list:
    """Fractional translations inside the cell that map every column onto an equal one."""
    positions = np.array([c.position for c in material.columns])
    first = material.columns[0]
    found = []
    for column, position in zip(material.columns, positions):
        shift = (position - positions[0]) % 1.0
        if not _same_column(column, first) or np.allclose(shift, 0.0):
            continue
        maps = all(
            any(_same_column(c, d) and np.allclose(((p + shift - q + 0.5) % 1.0) - 0.5, 0.0,
                                                   atol=1e-6)
                for d, q in zip(material.columns, positions))
            for c, p in zip(material.columns, positions)
        )
        if maps and not any(np.allclose(shift, f) for f in found):
            found.append(shift)
    return found


def projected_lattice(material: Material) -> np.ndarray:
    """Reduced primitive basis (rows, angstrom, |a1| <= |a2|) of the columns' translation
    lattice: the cell, or a smaller one when the cell is centred (CdTe [110])."""
    ax, ay = material.cell
    shifts = [np.zeros(2)] + _centring(material)
    points = np.array([((i + s[0]) * ax, (j + s[1]) * ay)
                       for i, j in itertools.product(range(-2, 3), repeat=2) for s in shifts])
    lengths = np.hypot(*points.T)
    order = np.argsort(lengths)
    points, lengths = points[order], lengths[order]
    points, lengths = points[lengths > 1e-9], lengths[lengths > 1e-9]
    a1 = points[0]
    # In 2-D the two shortest independent lattice vectors are a basis of the lattice.
    independent = np.abs(points[:, 0] * a1[1] - points[:, 1] * a1[0]) > 1e-9 * lengths * lengths[0]
    a2 = points[np.argmax(independent)]
    return np.stack([a1, a2])


def _shape(basis: np.ndarray) -> Tuple[float, float]:
    """(|a2| / |a1|, |cos angle|) of a reduced basis: its shape, free of scale and rotation."""
    l1, l2 = np.hypot(*basis.T)
    return l2 / l1, abs(float(basis[0] @ basis[1])) / (l1 * l2)


def estimate_pixel_size(image: np.ndarray, material: str,
                        tolerance: float = 0.08) -> PixelSizeEstimate:
    """Pixel size in pm of `image` showing `material` down its registry zone axis.

    tolerance: the largest shape_error accepted. Raises PixelSizeUnknown when the image shows
    no lattice or one of another shape.
    """
    crystal = get_material(material)
    height, width = image.shape
    top, left = max(0, (height - MAX_CROP) // 2), max(0, (width - MAX_CROP) // 2)
    crop = np.asarray(image[top:top + MAX_CROP, left:left + MAX_CROP], dtype=np.float64)
    try:
        found = estimate_lattice(crop).vectors
    except (ValueError, np.linalg.LinAlgError) as error:
        raise PixelSizeUnknown(f"no lattice in the Fourier transform ({error})") from None
    expected = projected_lattice(crystal)
    (ratio, cosine), (ratio_0, cosine_0) = _shape(found), _shape(expected)
    error = max(abs(ratio / ratio_0 - 1), abs(cosine - cosine_0))
    if not error <= tolerance:
        raise PixelSizeUnknown(
            f"the image's lattice (basis length ratio {ratio:.3f}, |cos angle| {cosine:.3f}) "
            f"does not match {material} {crystal.zone_axis} ({ratio_0:.3f}, {cosine_0:.3f})")
    area_px = abs(float(np.linalg.det(found)))
    area_a2 = abs(float(np.linalg.det(expected)))
    pixel_size = float(np.sqrt(area_a2 / area_px)) * _PM_PER_ANGSTROM
    return PixelSizeEstimate(pixel_size_pm=pixel_size, shape_error=float(error),
                             lattice_px=tuple(tuple(float(v) for v in row) for row in found))
