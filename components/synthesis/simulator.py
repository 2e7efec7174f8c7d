"""HAADF-STEM image simulator for crystals with point defects.

Incoherent imaging model: every atomic column scatters onto the annular detector in
proportion to sum(atoms * Z**n) (n ~ 1.7), and the image is that column map convolved with
the probe. No multislice, no channelling: fast enough to synthesise training sets, and the
contrast that matters for defect detection (Z and occupancy of single columns) is kept.

Detector model: with dose D (e/A^2) and pixel size p (A) each scan position sees D*p^2
electrons. A reference column, the material's brightest bulk column, isolated under the
probe scatters REFERENCE fraction (default 5 %) of them onto the detector; other columns
scale by their Z**n weight. Counts are Poisson, plus Gaussian readout noise.

Randomness: one SeedSequence per image, split into three independent streams (geometry,
defects, noise). A bulk image and a defect image from the same seed therefore share
pixel size, dose, lattice rotation, offset and background, and differ only at the defects.
"""

from dataclasses import dataclass

import numpy as np

from components.defects import BULK_LABEL, DEFECT_CLASSES, IMAGE_CLASSES, class_index
from components.materials import Column, get_material, species

_GEOMETRY, _DEFECTS, _NOISE = range(3)  # child stream keys of an image's SeedSequence
_PLAN_TAG = 0x504C414E  # "PLAN": keeps plan_dataset's stream apart from seed_for's
_RENDER_MARGIN_SIGMAS = 5.0  # columns farther than this from the field add < exp(-12.5)


@dataclass(frozen=True)
class SimulationConfig:
    """Ranges are (low, high) and drawn per image; equal ends fix the value."""

    size: int = 256  # image is size x size pixels
    pixel_size_pm: tuple[float, float] = (18.0, 22.0)  # uniform; nominal 20 pm
    dose: tuple[float, float] = (2e3, 2e4)  # electrons / A^2, log-uniform
    z_exponent: float = 1.7  # HAADF intensity ~ Z**n
    probe_sigma_pm: float = 40.0  # Gaussian probe core (FWHM 94 pm)
    probe_tail_weight: float = 0.05  # share of probe current in a wide tail ...
    probe_tail_scale: float = 4.0  # ... whose sigma is this many times the core's
    reference_fraction: float = 0.05  # detected fraction on the reference column
    readout_noise: float = 0.5  # Gaussian detector noise, counts
    noise: bool = True  # False: the image is the expected counts (for tests)
    background: tuple[float, float] = (0.0, 0.1)  # amorphous layer, x reference peak
    background_tilt: float = 0.5  # background varies up to +-this across the field
    rotation: bool = True  # random in-plane rotation of the lattice
    defects_per_image: tuple[int, int] = (1, 3)  # defect columns in a defect image
    vacancy_occupancy: tuple[float, float] = (0.0, 0.3)  # what a vacancy column keeps
    substitution_fraction: tuple[float, float] = (0.6, 1.0)  # host atoms replaced
    interstitial_occupancy: tuple[float, float] = (0.5, 1.0)  # of a full interstitial column
    mask_radius_pm: float = 60.0  # ~0.6 probe FWHM; < half the shortest column spacing
    defect_margin_px: int = 16  # defects sit at least this far inside the image

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"size must be an int >= 16, got {self.size!r}")
        for name in (
            "pixel_size_pm",
            "dose",
            "background",
            "defects_per_image",
            "vacancy_occupancy",
            "substitution_fraction",
            "interstitial_occupancy",
        ):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")
        for name in ("pixel_size_pm", "dose"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("z_exponent", "probe_sigma_pm", "probe_tail_scale", "reference_fraction",
                     "mask_radius_pm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("probe_tail_weight", "reference_fraction", "background_tilt"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("vacancy_occupancy", "substitution_fraction", "interstitial_occupancy"):
            low, high = getattr(self, name)
            if low < 0 or high > 1:
                raise ValueError(f"{name} must lie in [0, 1], got {(low, high)}")
        if self.background[0] < 0:
            raise ValueError(f"background must be >= 0, got {self.background}")
        if self.readout_noise < 0:
            raise ValueError(f"readout_noise must be >= 0, got {self.readout_noise}")
        if self.defects_per_image[0] < 1:
            raise ValueError(f"defects_per_image must be >= 1, got {self.defects_per_image}")
        if not 0 <= self.defect_margin_px < self.size // 2:
            raise ValueError(
                f"defect_margin_px must be in [0, size/2), got {self.defect_margin_px}"
            )


@dataclass
class SimulatedImage:
    image: np.ndarray  # float32 (H, W), detector counts
    mask: np.ndarray  # uint8 (len(DEFECT_CLASSES), H, W)
    defect_classes: np.ndarray  # int64 multi-hot over DEFECT_CLASSES
    material: str
    label: str  # BULK_LABEL or a defect class
    pixel_size_pm: float
    dose: float  # electrons / A^2
    rotation_deg: float
    seed_entropy: tuple[int, ...]  # SeedSequence(seed_entropy, spawn_key=seed_spawn_key)
    seed_spawn_key: tuple[int, ...]  # rebuilds the seed
    column_positions: np.ndarray  # float64 (N, 2), pixel (y, x); may lie outside the image
    column_intensities: np.ndarray  # float64 (N,), sum(atoms * Z**n * occupancy)
    column_names: np.ndarray  # str (N,), Column.name
    defect_positions: np.ndarray  # float64 (D, 2), pixel (y, x) of the defect columns


def seed_for(base_seed: int, index: int) -> np.random.SeedSequence:
    """Seed of image `index`: depends on nothing else, so any worker count gives the same data."""
    return np.random.SeedSequence([base_seed, index])


def plan_dataset(
    num_images: int, materials, labels, base_seed: int
) -> list[tuple[int, str, str]]:
    """(index, material, label) for each image.

    Every block of len(materials) * len(labels) images holds each pair once, in a shuffled
    order, so any prefix is balanced to within one image per pair and not periodic.
    """
    materials, labels = tuple(materials), tuple(labels)
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if not materials or not labels:
        raise ValueError("need at least one material and one label")
    if len(set(materials)) != len(materials) or len(set(labels)) != len(labels):
        raise ValueError(f"duplicate materials or labels: {materials}, {labels}")
    for material in materials:
        get_material(material)
    for label in labels:
        _check_label(label)
    pairs = [(m, lab) for m in materials for lab in labels]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([base_seed, 0, _PLAN_TAG])))
    plan = []
    while len(plan) < num_images:
        for k in rng.permutation(len(pairs))[: num_images - len(plan)]:
            plan.append((len(plan), *pairs[k]))
    return plan


def simulate_image(
    material: str,
    label: str,
    seed: int | np.random.SeedSequence,
    config: SimulationConfig = SimulationConfig(),
) -> SimulatedImage:
    """One image of `material` showing `label`; same arguments give the same bytes."""
    crystal = get_material(material)
    _check_label(label)
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    geometry_rng, defect_rng, noise_rng = (
        np.random.Generator(
            np.random.PCG64(
                np.random.SeedSequence(
                    seq.entropy, spawn_key=tuple(seq.spawn_key) + (key,), pool_size=seq.pool_size
                )
            )
        )
        for key in (_GEOMETRY, _DEFECTS, _NOISE)
    )
    size, n = config.size, config.z_exponent

    # Geometry: always the same draws, whatever the config switches, so streams stay aligned.
    pixel_pm = geometry_rng.uniform(*config.pixel_size_pm)
    dose = float(np.exp(geometry_rng.uniform(*np.log(config.dose))))
    angle = geometry_rng.uniform(0.0, 2 * np.pi) * config.rotation
    offset = geometry_rng.uniform(0.0, 1.0, size=2)
    background = geometry_rng.uniform(*config.background)
    tilt = geometry_rng.uniform(0.0, config.background_tilt)
    tilt_angle = geometry_rng.uniform(0.0, 2 * np.pi)

    pixel_a = pixel_pm / 100.0
    sigma_px = config.probe_sigma_pm / pixel_pm
    tail_sigma_px = sigma_px * config.probe_tail_scale
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.full(2, (size - 1) / 2)
    # Lattice frame (x', y') in pixels -> image (x, y); the random offset shifts the lattice.
    cell_px = np.asarray(crystal.cell) / pixel_a
    origin = centre + rotation @ (offset * cell_px)
    margin = _RENDER_MARGIN_SIGMAS * max(sigma_px, tail_sigma_px)

    xy, index = _lattice(crystal.columns, cell_px, rotation, origin, size, margin)
    positions = xy[:, ::-1]  # (y, x)
    weights = np.array([_weight(c.atoms, n) for c in crystal.columns])[index]
    names = np.array([c.name for c in crystal.columns])[index]

    defect_positions = np.zeros((0, 2))
    if label != BULK_LABEL:
        positions, weights, names, defect_positions = _add_defects(
            crystal, label, positions, weights, names, cell_px, rotation, origin, size,
            margin, n, config, defect_rng,
        )

    # Probe: core + tail, both normalised to their integrated share, then to a unit peak.
    amplitudes = np.array(
        [(1 - config.probe_tail_weight) / sigma_px**2, config.probe_tail_weight / tail_sigma_px**2]
    )
    amplitudes /= amplitudes.sum()
    columns_map = sum(
        _render(positions, weights * amp, size, sig)
        for amp, sig in zip(amplitudes, (sigma_px, tail_sigma_px))
        if amp > 0
    ).astype(np.float64)
    reference = max(_weight(c.atoms, n) for c in crystal.columns)
    yy, xx = (np.linspace(-1.0, 1.0, size),) * 2
    background_map = background * (
        1 + tilt * (np.cos(tilt_angle) * xx[None, :] + np.sin(tilt_angle) * yy[:, None])
    )
    electrons = dose * pixel_a**2
    expected = electrons * config.reference_fraction * (columns_map / reference + background_map)

    if config.noise:
        readout = noise_rng.normal(0.0, config.readout_noise, expected.shape)
        counts = noise_rng.poisson(expected) + readout
    else:
        counts = expected

    mask = np.zeros((len(DEFECT_CLASSES), size, size), dtype=np.uint8)
    defect_classes = np.zeros(len(DEFECT_CLASSES), dtype=np.int64)
    if label != BULK_LABEL:
        channel = class_index(label)
        mask[channel] = _discs(defect_positions, config.mask_radius_pm / pixel_pm, size)
        defect_classes[channel] = 1

    return SimulatedImage(
        image=counts.astype(np.float32),
        mask=mask,
        defect_classes=defect_classes,
        material=material,
        label=label,
        pixel_size_pm=float(pixel_pm),
        dose=dose,
        rotation_deg=float(np.degrees(angle)),
        seed_entropy=tuple(np.atleast_1d(seq.entropy).tolist()),
        seed_spawn_key=tuple(seq.spawn_key),
        column_positions=positions,
        column_intensities=weights,
        column_names=names,
        defect_positions=defect_positions,
    )


def _check_label(label: str) -> None:
    if label not in IMAGE_CLASSES:
        raise ValueError(f"unknown label {label!r}; known labels: {', '.join(IMAGE_CLASSES)}")


def _weight(atoms, n: float) -> float:
    """HAADF scattering weight of a column: sum of atoms * Z**n."""
    return sum(count * species(symbol).z ** n for symbol, count in atoms)


def _lattice(columns: tuple[Column, ...], cell_px, rotation, origin, size, margin):
    """(x, y) pixel positions of all columns within the image plus margin, and column index."""
    # Bound the cell indices by mapping the corners of the padded field into the lattice frame.
    lo, hi = -margin, size - 1 + margin
    corners = np.array([[lo, lo], [lo, hi], [hi, lo], [hi, hi]]) - origin
    frac = corners @ rotation / cell_px  # rows: rotation.T @ corner, then per cell edge
    start = np.floor(frac.min(axis=0)) - 1
    stop = np.ceil(frac.max(axis=0)) + 1
    i, j = np.meshgrid(np.arange(start[0], stop[0]), np.arange(start[1], stop[1]), indexing="ij")
    cells = np.stack([i.ravel(), j.ravel()], axis=1)
    uv = np.array([c.position for c in columns])
    lattice = (cells[:, None, :] + uv[None, :, :]) * cell_px  # (cells, columns, 2)
    xy = lattice.reshape(-1, 2) @ rotation.T + origin
    index = np.tile(np.arange(len(columns)), len(cells))
    inside = np.all((xy >= lo) & (xy <= hi), axis=1)
    return xy[inside], index[inside]


def _add_defects(crystal, label, positions, weights, names, cell_px, rotation, origin, size,
                 margin, n, config, rng):
    """Apply `label` to 1-3 columns away from the border; returns the new column set."""
    inner = config.defect_margin_px

    def away_from_border(yx):
        return np.all((yx >= inner) & (yx <= size - 1 - inner), axis=1)

    if label == "interstitial":
        xy, index = _lattice(crystal.interstitials, cell_px, rotation, origin, size, margin)
        sites = xy[:, ::-1]
        candidates = np.flatnonzero(away_from_border(sites))
    elif label == "vacancy":
        candidates = np.flatnonzero(
            away_from_border(positions) & np.isin(names, crystal.vacancy_columns)
        )
    else:  # substitution
        candidates = np.flatnonzero(
            away_from_border(positions) & np.isin(names, [c for c, _ in crystal.substituents])
        )
    count = rng.integers(config.defects_per_image[0], config.defects_per_image[1] + 1)
    if len(candidates) < count:
        raise ValueError(
            f"{crystal.name}: only {len(candidates)} candidate columns for {count} {label} "
            f"defects; enlarge size or reduce defect_margin_px"
        )
    chosen = rng.choice(candidates, size=count, replace=False)
    weights = weights.copy()

    if label == "interstitial":
        occupancy = rng.uniform(*config.interstitial_occupancy, size=count)
        added = np.array([_weight(crystal.interstitials[k].atoms, n) for k in index[chosen]])
        new_names = np.array([crystal.interstitials[k].name for k in index[chosen]])
        positions = np.concatenate([positions, sites[chosen]])
        weights = np.concatenate([weights, added * occupancy])
        names = np.concatenate([names, new_names])
        return positions, weights, names, sites[chosen]

    columns_by_name = {c.name: c for c in crystal.columns}
    if label == "vacancy":
        weights[chosen] *= rng.uniform(*config.vacancy_occupancy, size=count)
    else:
        fraction = rng.uniform(*config.substitution_fraction, size=count)
        for k, f in zip(chosen, fraction):
            column = columns_by_name[names[k]]
            host = column.host
            atoms = sum(c for s, c in column.atoms if s == host)
            substituent = species(crystal.substituent(column.name)).z
            weights[k] += f * atoms * (substituent**n - species(host).z ** n)
    return positions, weights, names, positions[chosen]


def _render(positions, weights, size, sigma):
    """sum_k w_k exp(-|r - r_k|^2 / 2 sigma^2) on the pixel grid, as Gy^T diag(w) Gx.

    Exact because an isotropic Gaussian factorises into y and x profiles. Only columns
    within the render margin of this Gaussian enter; float32 halves the cost and its
    1e-7 relative error is far below shot noise.
    """
    margin = _RENDER_MARGIN_SIGMAS * sigma
    near = np.all((positions >= -margin) & (positions <= size - 1 + margin), axis=1)
    yx = positions[near].astype(np.float32)
    grid = np.arange(size, dtype=np.float32)
    scale = np.float32(-0.5 / sigma**2)
    gy = np.exp(scale * (grid[None, :] - yx[:, :1]) ** 2)
    gx = np.exp(scale * (grid[None, :] - yx[:, 1:]) ** 2)
    return gy.T @ (weights[near, None].astype(np.float32) * gx)


def _discs(centres, radius, size):
    grid = np.arange(size)
    d2 = (grid[None, :, None] - centres[:, None, None, 0]) ** 2 + (
        grid[None, None, :] - centres[:, None, None, 1]
    ) ** 2
    return np.any(d2 <= radius**2, axis=0).astype(np.uint8)
