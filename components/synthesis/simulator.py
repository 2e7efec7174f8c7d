"""HAADF-STEM image simulator for crystals with point, line and planar defects.

Incoherent imaging model: every atomic column scatters onto the annular detector in
proportion to sum(atoms * Z**n) (n ~ 1.7), and the image is that column map convolved with
the probe. No multislice, no channelling: fast enough to synthesise training sets, and the
contrast that matters for defect detection (Z, occupancy and position of single columns) is
kept. Atoms per column = thickness / (the material's repeat along the beam) times the
column's atoms per repeat, so intensity is linear in thickness and occupancy.

Detector model: with dose D (e/A^2) and pixel size p (A) each scan position sees D*p^2
electrons. A reference column, the material's brightest bulk column at the reference
thickness, isolated under the probe scatters REFERENCE fraction (default 5 %) of them onto
the detector; other columns scale by their weight. Counts are Poisson, plus Gaussian readout
noise.

Scan distortions: scan line y shows the specimen shifted by s_y along the fast-scan axis x,
s_y = drift * (y / (size - 1) - 1/2) + jitter_y (slow drift shear plus line jitter). The
image and every mask are evaluated at the same distorted coordinates; column and defect
positions are reported in the undistorted specimen frame.

Extended defects: planar defects split the crystal into slabs along their plane normal, each
a perfect lattice moved by the stacking-fault shifts and twin rotations above it; an edge
dislocation then displaces every site by its isotropic-elastic (Volterra) field.

Randomness: one SeedSequence per image, split into three independent streams (geometry,
defects, noise). A bulk image and a defect image from the same seed therefore share
pixel size, dose, thickness, scan distortions, lattice rotation, offset and background, and
differ only at the defects.
"""

from dataclasses import dataclass

import numpy as np

from components.defects import (
    BULK_LABEL,
    DEFECT_CLASSES,
    IMAGE_CLASSES,
    MIXED_LABEL,
    class_index,
)
from components.materials import Material, get_material, species

_GEOMETRY, _DEFECTS, _NOISE = range(3)  # child stream keys of an image's SeedSequence
_PLAN_TAG = 0x504C414E  # "PLAN": keeps plan_dataset's stream apart from seed_for's
# A probe component is dropped where it is below exp(-12.5) of a column's peak: 5 sigma for
# the core, less for a faint tail.
_TRUNCATION = 12.5
_BLOCK = 32  # _render works on blocks of about _BLOCK x _BLOCK pixels ...
_CHUNK = 32768  # ... a few at a time: about this many factor entries, to stay in cache
_PLANAR = ("stacking_fault", "twin_boundary")


@dataclass(frozen=True)
class SimulationConfig:
    """Ranges are (low, high) and drawn per image; equal ends fix the value."""

    size: int = 256  # image is size x size pixels
    pixel_size_pm: tuple[float, float] = (18.0, 22.0)  # uniform; nominal 20 pm
    dose: tuple[float, float] = (2e3, 2e4)  # electrons / A^2, log-uniform
    thickness_nm: tuple[float, float] = (5.0, 25.0)  # uniform; intensity is linear in it
    reference_thickness_nm: float = 10.0  # thickness at which reference_fraction holds
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
    line_jitter_px: float = 0.3  # std of the random x shift of each scan line
    drift_px: tuple[float, float] = (-2.0, 2.0)  # x shift of the last line vs the first
    defects_per_image: tuple[int, int] = (1, 3)  # columns per point-defect class
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
            "thickness_nm",
            "background",
            "drift_px",
            "defects_per_image",
            "vacancy_occupancy",
            "substitution_fraction",
            "interstitial_occupancy",
        ):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")
        for name in ("pixel_size_pm", "dose", "thickness_nm"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("z_exponent", "probe_sigma_pm", "probe_tail_scale", "reference_fraction",
                     "mask_radius_pm", "reference_thickness_nm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("probe_tail_weight", "reference_fraction", "background_tilt"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("vacancy_occupancy", "substitution_fraction", "interstitial_occupancy"):
            low, high = getattr(self, name)
            if low < 0 or high > 1:
                raise ValueError(f"{name} must lie in [0, 1], got {(low, high)}")
        if self.probe_sigma_pm < 0.5 * self.pixel_size_pm[1]:
            raise ValueError(
                f"probe_sigma_pm must be >= half the largest pixel size (else the probe is "
                f"undersampled), got {self.probe_sigma_pm} for {self.pixel_size_pm}"
            )
        if self.background[0] < 0:
            raise ValueError(f"background must be >= 0, got {self.background}")
        if self.readout_noise < 0:
            raise ValueError(f"readout_noise must be >= 0, got {self.readout_noise}")
        if self.line_jitter_px < 0:
            raise ValueError(f"line_jitter_px must be >= 0, got {self.line_jitter_px}")
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
    label: str  # BULK_LABEL, a defect class, or MIXED_LABEL for several classes
    pixel_size_pm: float
    dose: float  # electrons / A^2
    thickness_nm: float
    rotation_deg: float
    seed_entropy: tuple[int, ...]  # SeedSequence(seed_entropy, spawn_key=seed_spawn_key)
    seed_spawn_key: tuple[int, ...]  # rebuilds the seed
    scan_shift_px: np.ndarray  # float64 (H,), x shift of each scan line in the image
    column_positions: np.ndarray  # float64 (N, 2), specimen pixel (y, x); may lie outside
    column_intensities: np.ndarray  # float64 (N,), atoms along the beam * Z**n * occupancy
    column_names: np.ndarray  # str (N,), Column.name
    defect_positions: np.ndarray  # float64 (D, 2), specimen pixel (y, x), see defect_labels
    defect_labels: np.ndarray  # str (D,): the class of each defect position
    # float64 (D, 2): unit (y, x) normal of a planar defect, pointing to the side that is
    # shifted or twinned; zero for other defects. A planar defect's position is the point
    # of its plane nearest the image centre; a dislocation's is its core.
    defect_normals: np.ndarray


def seed_for(base_seed: int, index: int) -> np.random.SeedSequence:
    """Seed of image `index`: depends on nothing else, so any worker count gives the same data."""
    return np.random.SeedSequence([base_seed, index])


def applicable_labels(material: str) -> tuple[str, ...]:
    """Image labels a material can be drawn with: bulk plus its defect classes."""
    return (BULK_LABEL,) + get_material(material).defect_classes


def plan_dataset(
    num_images: int, materials, base_seed: int, labels=None
) -> list[tuple[int, str, str, int]]:
    """(index, material, label, occurrence) for each image.

    labels None: every label applicable to each material; else those of `labels` that apply.
    Every block of len(pairs) images holds each (material, label) pair once, in a shuffled
    order, so any prefix is balanced to within one image per pair and not periodic.
    occurrence counts the earlier images of the same pair (it is the block number).
    """
    materials = tuple(materials)
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if not materials:
        raise ValueError("need at least one material")
    if len(set(materials)) != len(materials):
        raise ValueError(f"duplicate materials: {materials}")
    if labels is not None:
        labels = tuple(labels)
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct and not empty, got {labels}")
        for label in labels:
            if label not in IMAGE_CLASSES:
                raise ValueError(
                    f"unknown label {label!r}; known labels: {', '.join(IMAGE_CLASSES)}"
                )
    pairs = []
    for material in materials:
        own = applicable_labels(material)
        chosen = own if labels is None else tuple(lab for lab in labels if lab in own)
        if not chosen:
            raise ValueError(
                f"no label of {labels} applies to {material}; its labels: {', '.join(own)}"
            )
        pairs += [(material, label) for label in chosen]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([base_seed, 0, _PLAN_TAG])))
    plan = []
    block = 0
    while len(plan) < num_images:
        for k in rng.permutation(len(pairs))[: num_images - len(plan)]:
            plan.append((len(plan), *pairs[k], block))
        block += 1
    return plan


def simulate_image(
    material: str,
    defects: str | tuple[str, ...],
    seed: int | np.random.SeedSequence,
    config: SimulationConfig = SimulationConfig(),
) -> SimulatedImage:
    """One image of `material`; same arguments give the same bytes.

    defects: an image label (bulk or one defect class) or a tuple of defect classes to put
    in one image (label MIXED_LABEL when there are several).
    """
    crystal = get_material(material)
    classes, label = _resolve(crystal, defects)
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
    thickness_nm = geometry_rng.uniform(*config.thickness_nm)
    drift = geometry_rng.uniform(*config.drift_px)
    jitter = geometry_rng.standard_normal(size) * config.line_jitter_px
    shift = drift * (np.arange(size) / (size - 1) - 0.5) + jitter

    pixel_a = pixel_pm / 100.0
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # Fractional cell coordinates -> image pixel (x, y); the random offset shifts the lattice.
    basis = rotation * (np.asarray(crystal.cell) / pixel_a)
    origin = np.full(2, (size - 1) / 2) + basis @ offset
    profile = _probe_profile(config, pixel_pm)
    margin = max(reach for _, _, reach in profile) + np.abs(shift).max()
    box = (-margin, size - 1 + margin)
    atoms_per_repeat = thickness_nm * 10.0 / crystal.repeat

    scene = _Scene(crystal, basis, origin, rotation, pixel_a, box, config, classes)
    scene.place_extended(defect_rng)
    xy, index = scene.sites(crystal.columns)
    positions = xy[:, ::-1]  # (y, x)
    weights = atoms_per_repeat * np.array([_weight(c.atoms, n) for c in crystal.columns])[index]
    names = np.array([c.name for c in crystal.columns])[index]
    positions, weights, names = scene.add_point_defects(
        positions, weights, names, atoms_per_repeat, defect_rng
    )

    reference = config.reference_thickness_nm * 10.0 / crystal.repeat * max(
        _weight(c.atoms, n) for c in crystal.columns
    )
    columns_map = _render(positions, weights / reference, profile, shift, size)
    yy, xx = (np.linspace(-1.0, 1.0, size, dtype=np.float32),) * 2
    background_map = np.float32(background) * (
        1 + np.float32(tilt) * (np.float32(np.cos(tilt_angle)) * xx[None, :]
                                + np.float32(np.sin(tilt_angle)) * yy[:, None])
    )
    electrons = dose * pixel_a**2
    expected = (columns_map + background_map) * np.float32(electrons * config.reference_fraction)

    if config.noise:
        counts = noise_rng.poisson(expected).astype(np.float32)
        counts += noise_rng.standard_normal(expected.shape, dtype=np.float32) * np.float32(
            config.readout_noise
        )
    else:
        counts = expected

    mask = scene.masks(shift, size)
    defect_classes = np.array([c in classes for c in DEFECT_CLASSES], dtype=np.int64)
    return SimulatedImage(
        image=counts,
        mask=mask,
        defect_classes=defect_classes,
        material=material,
        label=label,
        pixel_size_pm=float(pixel_pm),
        dose=dose,
        thickness_nm=float(thickness_nm),
        rotation_deg=float(np.degrees(angle)),
        seed_entropy=tuple(np.atleast_1d(seq.entropy).tolist()),
        seed_spawn_key=tuple(seq.spawn_key),
        scan_shift_px=shift,
        column_positions=positions,
        column_intensities=weights,
        column_names=names,
        defect_positions=np.array([d[1][::-1] for d in scene.defects]).reshape(-1, 2),
        defect_labels=np.array([d[0] for d in scene.defects], dtype=str),
        defect_normals=np.array([d[2][::-1] for d in scene.defects]).reshape(-1, 2),
    )


def _resolve(crystal: Material, defects) -> tuple[tuple[str, ...], str]:
    """(defect classes in channel order, image label), or a ValueError that says why not."""
    if isinstance(defects, str):
        if defects == BULK_LABEL:
            classes = ()
        elif defects in DEFECT_CLASSES:
            classes = (defects,)
        else:
            raise ValueError(
                f"unknown label {defects!r}; known labels: {', '.join(IMAGE_CLASSES)}"
            )
    else:
        classes = tuple(defects)
        if not classes:
            raise ValueError(f"no defect classes given; use {BULK_LABEL!r} for a defect-free image")
        for name in classes:
            class_index(name)
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate defect classes: {classes}")
    missing = [c for c in classes if c not in crystal.defect_classes]
    if missing:
        raise ValueError(
            f"{crystal.name} has no {', '.join(missing)} defects; its defect classes: "
            f"{', '.join(crystal.defect_classes)}"
        )
    classes = tuple(c for c in DEFECT_CLASSES if c in classes)
    if not classes:
        return classes, BULK_LABEL
    return classes, classes[0] if len(classes) == 1 else MIXED_LABEL


def _weight(atoms, n: float) -> float:
    """HAADF scattering weight of a column per repeat: sum of atoms * Z**n."""
    return sum(count * species(symbol).z ** n for symbol, count in atoms)


def _probe_profile(config: SimulationConfig, pixel_pm: float):
    """(peak amplitude, sigma px, reach px) of the probe's Gaussians; amplitudes sum to 1."""
    sigma = config.probe_sigma_pm / pixel_pm
    sigmas = np.array([sigma, sigma * config.probe_tail_scale])
    amplitudes = np.array([1 - config.probe_tail_weight, config.probe_tail_weight]) / sigmas**2
    amplitudes /= amplitudes.sum()
    return [
        (amp, sig, sig * np.sqrt(2 * (_TRUNCATION + np.log(amp))))
        for amp, sig in zip(amplitudes, sigmas)
        if amp > np.exp(-_TRUNCATION)
    ]


def _lattice(columns, basis, origin, box):
    """Pixel (x, y) of every copy of `columns` inside the square box, and the column index.

    basis maps fractional cell coordinates to pixels (its columns are the cell edges).
    """
    lo, hi = box
    corners = np.array([[lo, lo], [lo, hi], [hi, lo], [hi, hi]]) - origin
    frac = corners @ np.linalg.inv(basis).T
    start = np.floor(frac.min(axis=0)) - 1
    stop = np.ceil(frac.max(axis=0)) + 1
    i, j = np.meshgrid(np.arange(start[0], stop[0]), np.arange(start[1], stop[1]), indexing="ij")
    cells = np.stack([i.ravel(), j.ravel()], axis=1)
    uv = np.array([c.position for c in columns])
    xy = (cells[:, None, :] + uv[None, :, :]).reshape(-1, 2) @ basis.T + origin
    index = np.tile(np.arange(len(columns)), len(cells))
    inside = np.all((xy >= lo) & (xy <= hi), axis=1)
    return xy[inside], index[inside]


def _edge_displacement(xy, core, burgers, nu, cut):
    """Displacement of an edge dislocation along the beam, isotropic elasticity.

    Volterra field (Hirth & Lothe eq. 3-45) in the frame x || b; the log term is zero at
    r = |b|. It jumps by b across the half-line from the core along `cut`, so points must
    not sit on the core.
    """
    length = np.hypot(*burgers)
    e = burgers / length
    p = np.array([-e[1], e[0]])
    d = xy - core
    x, y = d @ e, d @ p
    r2 = x * x + y * y
    across, along = cut @ p, cut @ e
    # A cut along -b (a plain dislocation's) has `across` 0 in exact arithmetic, but the dot
    # product leaves a last-bit residue whose sign depends on the BLAS kernel: -0 gives
    # phi = -pi, every site then jumps by -b and the core lands a Burgers vector away from
    # its mask (half the dislocation images with OpenBLAS's AVX-512 kernel). +0 keeps pi.
    if abs(across) <= 1e-9 * np.hypot(*cut):
        across = 0.0
    phi = np.arctan2(across, along)
    theta = np.arctan2(y, x)
    theta -= 2 * np.pi * (theta > phi)  # in (phi - 2 pi, phi]
    k = length / (2 * np.pi)
    ux = k * (theta + x * y / (2 * (1 - nu) * r2))
    uy = -k * ((1 - 2 * nu) / (4 * (1 - nu)) * np.log(r2 / length**2)
               + (x * x - y * y) / (4 * (1 - nu) * r2))
    return np.stack([ux * e[0] + uy * p[0], ux * e[1] + uy * p[1]], axis=1)


class _Scene:
    """Where the defects of one image are, in pixel (x, y) of the specimen frame.

    Planar defects of one image share a plane variant; each cut applies its operation
    (shift or twin rotation) to everything above it. Applying them from the top cut down,
    each one meets perfect crystal at its own cut, so slab k is the perfect lattice mapped
    by ops[0] o ... o ops[k-1]. The dislocation then displaces every site.
    """

    def __init__(self, crystal, basis, origin, rotation, pixel_a, box, config, classes):
        self.crystal, self.basis, self.origin = crystal, basis, origin
        self.rotation, self.pixel_a, self.box = rotation, pixel_a, box
        self.config, self.classes = config, classes
        size = config.size
        self.inner = (config.defect_margin_px, size - 1 - config.defect_margin_px)
        self.extra = 0.0  # sites are generated this far beyond the box, then displaced
        self.cuts = []  # (label, n of the cut, affine op (A, t))
        self.normal = None
        self.spacing = None
        self.dislocation = None  # (core, burgers, poisson ratio, cut direction)
        self.defects = []  # (label, xy, normal xy)

    def _inside(self, xy):
        return np.all((xy >= self.inner[0]) & (xy <= self.inner[1]), axis=1)

    def _in_extended(self, xy):
        """True where a point lies in an extended defect's mask region (see masks)."""
        hit = np.zeros(len(xy), dtype=bool)
        if self.dislocation is not None:
            core, burgers, nu, cut = self.dislocation
            hit |= np.hypot(*(xy - core).T) <= np.hypot(*burgers)
            xy = xy - _edge_displacement(xy, core, burgers, nu, cut)
        for _, c, _ in self.cuts:
            hit |= np.abs(xy @ self.normal - c) <= self.spacing
        return hit

    def place_extended(self, rng):
        """Draw the planar defects (on one plane variant) and the dislocation core."""
        crystal, planar = self.crystal, [c for c in self.classes if c in _PLANAR]
        if planar:
            planes = crystal.stacking_planes[rng.integers(len(crystal.stacking_planes))]
            self.normal = self.rotation @ np.asarray(planes.normal)
            self.spacing = planes.spacing / self.pixel_a
            tangent = np.array([-self.normal[1], self.normal[0]])
            xy, index = _lattice(crystal.columns, self.basis, self.origin, self.box)
            names = np.array([c.name for c in crystal.columns])[index]
            layer = xy[names == planes.layer_column]
            n_layer = layer @ self.normal
            chosen = []
            for label in planar:
                cut = planes.fault_cut if label == "stacking_fault" else planes.twin_cut
                cuts = n_layer + cut * self.spacing
                ok = self._inside(layer)
                for c in chosen:  # keep the mask bands of two planar defects apart
                    ok &= np.abs(cuts - c) >= 2 * self.spacing
                if not ok.any():
                    raise ValueError(
                        f"{crystal.name}: no room for a {label} inside the image; enlarge size "
                        f"or reduce defect_margin_px"
                    )
                k = rng.choice(np.flatnonzero(ok))
                chosen.append(cuts[k])
                if label == "stacking_fault":
                    op = (np.eye(2), self.rotation @ np.asarray(planes.partial) / self.pixel_a)
                else:
                    # Axis: a layer column of the first layer above the cut.
                    above = np.abs(n_layer - n_layer[k] - self.spacing) < 1e-3 * self.spacing
                    axis = layer[above][np.argmin(np.hypot(*(layer[above] - layer[k]).T))]
                    reflect = np.eye(2) - 2 * np.outer(tangent, tangent)
                    op = (reflect, 2 * np.outer(tangent, tangent) @ axis)
                self.cuts.append((label, cuts[k], op))
                centre = np.full(2, (self.config.size - 1) / 2)
                point = centre + (cuts[k] - centre @ self.normal) * self.normal
                self.defects.append((label, point, self.normal))
            self.cuts.sort(key=lambda cut: cut[1])
        if "dislocation" in self.classes:
            sites, _ = self.sites(crystal.interstitials)
            ok = self._inside(sites) & ~self._in_extended(sites)
            if not ok.any():
                raise ValueError(
                    f"{crystal.name}: no room for a dislocation inside the image; enlarge size "
                    f"or reduce defect_margin_px"
                )
            core = sites[rng.choice(np.flatnonzero(ok))]
            # b is a lattice vector of the slab round the core: turned as its lattice is.
            burgers = self.basis @ np.asarray(crystal.burgers)
            for _, c, (a, _) in self.cuts[::-1]:
                if core @ self.normal > c:
                    burgers = a @ burgers
            # The cut where the field jumps by b runs along the planes, never across them.
            cut = -burgers if self.normal is None else np.array([-self.normal[1], self.normal[0]])
            self.dislocation = (core, burgers, crystal.poisson_ratio, cut)
            self.defects.append(("dislocation", core, np.zeros(2)))
            self.extra = 2 * np.hypot(*burgers)  # more than any displacement in the field

    def sites(self, columns):
        """Pixel (x, y) and column index of `columns` in the defected crystal, inside the box."""
        bounds = [-np.inf] + [c for _, c, _ in self.cuts] + [np.inf]
        lo, hi = self.box
        wide = (lo - self.extra, hi + self.extra)
        a, t = np.eye(2), np.zeros(2)
        parts = []
        for k in range(len(bounds) - 1):
            if k:
                a_k, t_k = self.cuts[k - 1][2]
                a, t = a @ a_k, a @ t_k + t
            xy, index = _lattice(columns, a @ self.basis, a @ self.origin + t, wide)
            if self.cuts:
                n = xy @ self.normal
                keep = (n > bounds[k]) & (n <= bounds[k + 1])
                xy, index = xy[keep], index[keep]
            parts.append((xy, index))
        xy = np.concatenate([p[0] for p in parts])
        index = np.concatenate([p[1] for p in parts])
        if self.dislocation is not None:
            core, burgers, nu, cut = self.dislocation
            away = np.hypot(*(xy - core).T) > 1e-6
            xy, index = xy[away], index[away]
            xy = xy + _edge_displacement(xy, core, burgers, nu, cut)
        inside = np.all((xy >= lo) & (xy <= hi), axis=1)
        return xy[inside], index[inside]

    def add_point_defects(self, positions, weights, names, atoms_per_repeat, rng):
        """Apply the point-defect classes, each to its own columns; returns the new column set."""
        crystal, config, n = self.crystal, self.config, self.config.z_exponent
        positions, weights = positions.copy(), weights.copy()
        free = self._inside(positions[:, ::-1]) & ~self._in_extended(positions[:, ::-1])
        for label in ("vacancy", "substitution", "interstitial"):
            if label not in self.classes:
                continue
            if label == "interstitial":
                xy, index = self.sites(crystal.interstitials)
                candidates = np.flatnonzero(self._inside(xy) & ~self._in_extended(xy))
            else:
                allowed = (crystal.vacancy_columns if label == "vacancy"
                           else [c for c, _ in crystal.substituents])
                candidates = np.flatnonzero(free & np.isin(names, allowed))
            count = rng.integers(config.defects_per_image[0], config.defects_per_image[1] + 1)
            if len(candidates) < count:
                raise ValueError(
                    f"{crystal.name}: only {len(candidates)} candidate columns for {count} "
                    f"{label} defects; enlarge size or reduce defect_margin_px"
                )
            chosen = rng.choice(candidates, size=count, replace=False)
            if label == "interstitial":
                occupancy = rng.uniform(*config.interstitial_occupancy, size=count)
                added = np.array(
                    [_weight(crystal.interstitials[k].atoms, n) for k in index[chosen]])
                positions = np.concatenate([positions, xy[chosen, ::-1]])
                weights = np.concatenate([weights, atoms_per_repeat * added * occupancy])
                names = np.concatenate(
                    [names, [crystal.interstitials[k].name for k in index[chosen]]]
                )
                centres = xy[chosen]
            else:
                free[chosen] = False
                if label == "vacancy":
                    weights[chosen] *= rng.uniform(*config.vacancy_occupancy, size=count)
                else:
                    columns = {c.name: c for c in crystal.columns}
                    fraction = rng.uniform(*config.substitution_fraction, size=count)
                    for k, f in zip(chosen, fraction):
                        column = columns[names[k]]
                        host = column.host
                        atoms = sum(c for s, c in column.atoms if s == host)
                        substituent = species(crystal.substituent(column.name)).z
                        weights[k] += (atoms_per_repeat * f * atoms
                                       * (substituent**n - species(host).z ** n))
                centres = positions[chosen, ::-1]
            for centre in centres:
                self.defects.append((label, centre, np.zeros(2)))
        return positions, weights, names

    def masks(self, shift, size):
        """uint8 (classes, H, W) masks, evaluated at the scan-distorted coordinates.

        Point defects: discs of mask_radius_pm. Dislocation: the core region, a disc of
        radius |b|, where the strain b/(2 pi r) exceeds ~16 % and the elastic field is no
        small perturbation. Planar defects: the band within one plane spacing of the plane,
        which holds the layers on both sides whose stacking differs from the bulk.
        """
        mask = np.zeros((len(DEFECT_CLASSES), size, size), dtype=np.uint8)
        radius = self.config.mask_radius_pm / (self.pixel_a * 100)
        for label, xy, _ in self.defects:
            if label in _PLANAR:
                continue
            r = np.hypot(*self.dislocation[1]) if label == "dislocation" else radius
            rows = np.arange(max(0, int(np.ceil(xy[1] - r))), min(size, int(xy[1] + r) + 1))
            if len(rows) == 0:
                continue
            x0 = max(0, int(np.floor(xy[0] + shift[rows].min() - r)))
            x1 = min(size, int(np.ceil(xy[0] + shift[rows].max() + r)) + 1)
            dx = np.arange(x0, x1)[None, :] - shift[rows][:, None] - xy[0]
            disc = dx**2 + (rows[:, None] - xy[1]) ** 2 <= r**2
            mask[class_index(label), rows[0]:rows[-1] + 1, x0:x1] |= disc.astype(np.uint8)
        if self.cuts:
            x = np.arange(size)[None, :] - shift[:, None]
            y = np.arange(size, dtype=np.float64)[:, None]
            n = x * self.normal[0] + y * self.normal[1]
            if self.dislocation is not None:
                # First-order inverse of the displacement: where the pixel sat before it.
                core, burgers, nu, cut = self.dislocation
                grid = np.stack(np.broadcast_arrays(x, y), axis=-1).reshape(-1, 2)
                u = _edge_displacement(grid, core, burgers, nu, cut)
                n -= (u @ self.normal).reshape(n.shape)
            for label, c, _ in self.cuts:
                mask[class_index(label)] |= np.abs(n - c) <= self.spacing
        return mask


def _render(positions, weights, profile, shift, size):
    """Expected column map: row y is sum_k w_k P(y - y_k, x - shift[y] - x_k), float32.

    P is the probe, a sum of Gaussians g, each cut off at its reach. With shift = q + f
    (q integer, |f| <= 1/2) row y is J(y, x - q), and on a block of rows and columns with
    centre column c, J factorises exactly into a small matrix product:
    J(y, x) = e^(f (x-c) / s^2 - f^2 / 2s^2) sum_k [w_k g(y - y_k) e^(-f (x_k-c) / s^2)] g(x - x_k)
    over the columns within reach of the block. Blocks keep the products small (no work on
    far columns), the exponents bounded (float32 is safe) and, taken a few at a time, the
    temporaries in cache.
    """
    q = np.rint(shift).astype(np.intp)
    x0, x1 = -int(q.max()), size - int(q.min())  # J's x range
    nb, nx = (max(1, round(n / _BLOCK)) for n in (size, x1 - x0))
    height, width = -(-size // nb), -(-(x1 - x0) // nx)  # block shape, about _BLOCK
    by, bx = np.divmod(np.arange(nb * nx), nx)  # block row and column of each block
    f = np.append(shift - q, np.zeros(nb * height - size)).reshape(nb, height)[by]
    rows = np.arange(height, dtype=np.float32) - np.float32(0.5 * (height - 1))
    cols = np.arange(width, dtype=np.float32) - np.float32(0.5 * (width - 1))
    out = np.zeros((nb * nx, height, width), dtype=np.float32)
    for amplitude, sigma, reach in profile:
        near = (positions[:, 0] >= -reach) & (positions[:, 0] <= size - 1 + reach)
        near &= (positions[:, 1] >= x0 - reach) & (positions[:, 1] <= x1 - 1 + reach)
        y, x, w = positions[near, 0], positions[near, 1], amplitude * weights[near]
        block, k = _blocks((y - reach) / height, (y + reach) / height,
                           (x - reach - x0) / width, (x + reach - x0) / width, nb, nx)
        # (blocks, K) columns of each block, padded with a zero-weight column.
        count = np.bincount(block, minlength=nb * nx)
        slot = np.arange(len(k)) - np.repeat(np.cumsum(count) - count, count)
        index = np.full((nb * nx, max(1, count.max())), len(y))
        index[block, slot] = k
        # Offsets from each block's centre: small, so float32 keeps them exact enough.
        dy = np.append(y, 0.0)[index] - (height * by + 0.5 * (height - 1))[:, None]
        dx = np.append(x, 0.0)[index] - (x0 + width * bx + 0.5 * (width - 1))[:, None]
        dy, dx = dy.astype(np.float32), dx.astype(np.float32)
        wk = np.append(w, 0.0)[index].astype(np.float32)
        fs = (f / sigma**2).astype(np.float32)
        half = np.float32(-0.5 / sigma**2)
        offset = (half * f**2).astype(np.float32)
        step = max(1, _CHUNK // (max(height, width) * index.shape[1]))
        for b in range(0, nb * nx, step):
            c = slice(b, b + step)
            a = np.subtract(rows[None, :, None], dy[c, None, :])
            np.square(a, out=a)
            a *= half
            a -= fs[c, :, None] * dx[c, None, :]
            np.exp(a, out=a)
            a *= wk[c, None, :]
            g = np.subtract(cols[None, None, :], dx[c, :, None])
            np.square(g, out=g)
            g *= half
            np.exp(g, out=g)
            part = np.matmul(a, g)
            scale = fs[c, :, None] * cols
            scale += offset[c, :, None]
            part *= np.exp(scale, out=scale)
            out[c] += part
    out = out.reshape(nb, nx, height, width).transpose(0, 2, 1, 3).reshape(nb * height, -1)
    image = np.empty((size, size), dtype=np.float32)
    for value in np.unique(q):
        lines = q == value
        image[lines] = out[:size][lines, -value - x0:-value - x0 + size]
    return image


def _blocks(y_lo, y_hi, x_lo, x_hi, nb, nx):
    """(block, item) pairs: every block of the (nb, nx) grid that each item's box touches.

    The box bounds are in block units.
    """
    b0, b1 = (np.clip(np.floor(v), 0, nb - 1).astype(np.intp) for v in (y_lo, y_hi))
    c0, c1 = (np.clip(np.floor(v), 0, nx - 1).astype(np.intp) for v in (x_lo, x_hi))
    width = c1 - c0 + 1
    count = (b1 - b0 + 1) * width
    item = np.repeat(np.arange(len(count)), count)
    j = np.arange(len(item)) - np.repeat(np.cumsum(count) - count, count)
    block = (b0[item] + j // width[item]) * nx + c0[item] + j % width[item]
    order = np.argsort(block, kind="stable")
    return block[order], item[order]
