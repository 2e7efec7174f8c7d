"""Pseudo-labels from deviations against the bulk lattice (the weak-supervision teacher).

The paper has no pixel labels: it derives pseudo ground truth from local intensity
deviations relative to bulk lattice regions. This module does that from the image alone
(no ground truth, no pixel size; of the material at most the sign of its substituents'
contrast, `substitution_sign`), with NumPy and SciPy only.

    result = pseudo_labels(image)   # PseudoLabels: deviation, mask (C, H, W), lattice, noise

Method
------
1. Lattice (`estimate_lattice`). Bragg peaks of the Hann-windowed power spectrum, 30
   medians above its floor. The reciprocal lattice is the one the peaks generate: of the
   pairs of peaks or peak differences, those indexing the most peak power (within 10 %),
   then the smallest cell; the three strongest peaks must be low-order (|index| <= 2),
   which rejects a finer lattice fitted to two twin domains at once. Least-squares refined
   over all indexed peaks, then by the median local frequency (step 2). Works for any
   material and any rotation.
2. Local cell coordinates (geometric phase analysis). Low-order reflections are
   Bragg-filtered with a Gaussian window (real-space sigma `gpa_cells` times the longest
   plane spacing; the image tapered and zero-padded so nothing wraps; the envelopes kept
   on a coarse grid). The two that form a reciprocal basis and are present together over
   the largest area are kept; the phase of each, over 2 pi, is the pixel's fractional
   coordinate in the unit cell. Slow distortions (scan drift, a dislocation's far field,
   strain) move with the phases, so the bulk model follows them; sudden ones (a core, a
   fault, a twin) do not. Where either amplitude falls below half its healthy level the
   lattice fit has broken down (another orientation, amorphous material).
3. Bulk reconstruction (`reconstruct_bulk`). The unit-cell template is the mean of the
   pixels binned by cell coordinate (bins of about half a pixel, bilinear splatting),
   where the lattice fit holds, sharpened by one Jacobi step on its least-squares fit (the
   splatting and sampling blur); a quadratic background is fitted to the residual.
   bulk = template(cell coordinate) + background; deviation = image - bulk. A second pass
   leaves the first pass's defect candidates out of the template and re-runs step 2 on
   the image with them painted over by the bulk (a bright interstitial pulls the phases).
4. Noise (`noise_level`; a model inside `pseudo_labels`). The variance of the deviation is
   alpha * bulk + beta + gamma_x gx^2 + gamma_y gy^2 (shot noise, readout noise, scan-line
   jitter along and across the lines), fitted to the squared deviations (clipped at
   5 sigma); the third cumulant of shot noise comes with it. Thresholds are in these
   units, further divided by a local robust scale where the model is measurably worse
   than it claims (image edges, strained regions; _local_scale).
5. Detection. A matched filter (a Gaussian of the column width sigma_c, fitted on the
   template) turns the deviation into Z = filtered deviation / its standard deviation,
   the jitter's share of that counted line by line (_filtered_variance).
   Local extrema with |Z| above k_site (at a bulk column site) or k_free (off the sites),
   each moved for the local skew of shot noise, are candidates, classified by where they
   sit and how much the column changed. Rules and thresholds: PseudoLabelConfig and
   `pseudo_labels`. Masks are discs of 1.5 sigma_c (point defects), of |b| (dislocation
   cores) and bands of +-1 plane spacing (planar defects), as the simulator draws them.

Limits (left for later): partial dislocations bounding a fault are not labelled (a phase
singularity on a fault band is taken as the fault's); point defects inside a twin domain
or a fault band are not searched (the bulk model is that of the matrix); a planar defect
seen only in an image corner, or a twin domain thinner than about one lattice period, is
usually missed; only one planar defect is labelled per image.

The ground-truth mask is never an input: every function takes only the image (and what
was derived from it).
"""

import functools
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.optimize import nnls

from components.defects import DEFECT_CLASSES, class_index

_TWO_PI = 2.0 * np.pi


@dataclass(frozen=True)
class PseudoLabelConfig:
    """Rules of the teacher. Thresholds are in units of the image's own noise or lattice.

    k_site, k_free: a matched-filter extremum is a defect candidate when |Z| exceeds k_site
        on a bulk column site, or Z exceeds k_free off every site (Z is the column-shaped
        filtered deviation over its own noise standard deviation; each threshold is then
        moved for the local skew of shot noise, see _skewed). A 256 x 256 image has some
        700 column sites (two-sided Gaussian rate at 4.5: 7e-6, 0.005 false alarms per
        image) and 1300 independent positions off them (one-sided at 5: 3e-7); the margin
        is for the heavier-than-Gaussian tails of model error (scan jitter, template).
    vacancy_fraction: a dimmer column that lost more than this fraction of its bulk
        intensity is a vacancy; a smaller significant change (brighter, or dimmer by less)
        is a substitution. 0.6 sits between partial vacancies (most of the column gone) and
        the largest Z-contrast loss of a lighter substituent (heavy -> lighter element of the
        same column, typically 30-55 %).
    on_site_sigma: a candidate within this many column sigmas of a bulk column site belongs
        to that column.
    interstitial_bulk_fraction: off-site extra intensity is an interstitial where the bulk
        rises above its floor by less than this fraction of the brightest column (the bulk
        has "almost nothing" there).
    mask_radius_sigma: point-defect masks are discs of this many column sigmas (1.5 sigma =
        0.64 FWHM, the size the simulator labels).
    gpa_cells: real-space sigma of the Bragg filter, in lattice periods.
    min_amplitude: where the local Bragg amplitude of either reflection falls below this
        fraction of its healthy level (75th percentile), the lattice fit has broken down.
    dislocation_absorb: point-defect candidates within this many Burgers-vector lengths of
        a dislocation core are part of the core, not separate defects.
    min_displaced_extrema: a cluster of this many candidates of both signs, two of them off
        every column site, is a dislocation core whose phase singularity was not seen.
    planar_level: a pixel deviates (for planar defects) where the mean of Z^2 over half a
        lattice period exceeds this (an rms Z of 2).
    planar_fraction, planar_core_fraction: a line along a lattice plane belongs to a planar
        defect where more than planar_fraction of its pixels deviate; at least one line of
        the band must deviate along planar_core_fraction of its length.
    planar_dip: a stacking fault needs a reflection whose line-mean Bragg amplitude dips
        below this fraction of its healthy level inside the band (theory: 0.5 where two
        halves 2 pi / 3 apart in phase overlap).
    twin_margin: a twin needs lines where the mirrored reflection's amplitude exceeds the
        matrix reflection's by this fraction of the healthy level.
    """

    k_site: float = 4.5
    k_free: float = 5.0
    vacancy_fraction: float = 0.6
    on_site_sigma: float = 1.25
    interstitial_bulk_fraction: float = 0.25
    mask_radius_sigma: float = 1.5
    gpa_cells: float = 1.0
    min_amplitude: float = 0.5
    dislocation_absorb: float = 1.5
    min_displaced_extrema: int = 4
    planar_level: float = 4.0
    planar_fraction: float = 0.5
    planar_core_fraction: float = 0.8
    planar_dip: float = 0.6
    twin_margin: float = 0.25


@dataclass
class LatticeModel:
    """A 2D lattice in pixel coordinates; all vectors are (y, x).

    vectors: rows a1, a2, a reduced primitive basis (|a1| <= |a2|), pixels.
    reflections: rows g1, g2 (cycles / pixel), a reciprocal basis of the same lattice: the
        two Bragg reflections whose local phases give the cell coordinates.
    origin: a pixel position where both phases are zero (the template's origin), the one
        nearest the image centre.
    template, columns, column_sigma: filled in by reconstruction: the unit-cell average over
        the cell coordinates (fraction along cell_vectors), the fractional positions (K, 2)
        of its columns and their Gaussian width (pixels).
    """

    vectors: np.ndarray
    reflections: np.ndarray
    origin: np.ndarray
    template: np.ndarray | None = None
    columns: np.ndarray | None = None
    column_sigma: float | None = None

    @property
    def cell_vectors(self) -> np.ndarray:
        """Rows: the real-space basis dual to `reflections` (cell coordinates run along it)."""
        return np.linalg.inv(self.reflections).T


@dataclass
class PseudoLabels:
    deviation: np.ndarray  # float32 (H, W): image - bulk
    mask: np.ndarray  # uint8 (len(DEFECT_CLASSES), H, W)
    lattice: LatticeModel
    noise: float  # typical noise standard deviation of a pixel (median of the noise model)
    bulk: np.ndarray  # float32 (H, W): the defect-free reconstruction
    z: np.ndarray  # float32 (H, W): matched-filter deviation in (locally scaled) noise sigmas
    # One entry per labelled defect: (class name, y, x, Z, relative change of the column).
    detections: list = field(default_factory=list)


# ----------------------------------------------------------------------------- lattice


def _power_spectrum(image):
    h, w = image.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    x = (image - image.mean()) * window
    return np.abs(sfft.fft2(x)) ** 2


def _spectrum_peaks(power, max_peaks=40):
    """(k (n, 2) cycles/px, power (n,)) of Bragg peaks, one of each +-k pair."""
    h, w = power.shape
    fy, fx = sfft.fftfreq(h), sfft.fftfreq(w)
    kmag = np.hypot(fy[:, None] * h, fx[None, :] * w)  # in bins
    usable = kmag > 3.5  # off the DC lobe and the background's slow variation
    floor = np.median(power[usable])
    is_peak = power == ndimage.maximum_filter(power, size=5, mode="wrap")
    # exponential noise power: 30 medians is exceeded by chance with p ~ 1e-9 per bin
    is_peak &= usable & (power > 30.0 * floor)
    # one of each Friedel pair: upper half plane
    iy, ix = np.nonzero(is_peak)
    ky, kx = fy[iy] * h, fx[ix] * w  # signed bins
    half = (ky > 0) | ((ky == 0) & (kx > 0))
    iy, ix, ky, kx = iy[half], ix[half], ky[half], kx[half]
    p = power[iy, ix]
    order = np.argsort(p)[::-1][:max_peaks]
    iy, ix, ky, kx, p = iy[order], ix[order], ky[order], kx[order], p[order]
    # sub-bin position: parabola through the log power along each axis
    lp = np.log(np.maximum(power, 1e-300))
    c = lp[iy, ix]

    def vertex(m, q):
        curv = m - 2 * c + q
        return np.where(curv < 0, 0.5 * (m - q) / np.where(curv < 0, curv, -1.0), 0.0)

    dy = vertex(lp[(iy - 1) % h, ix], lp[(iy + 1) % h, ix])
    dx = vertex(lp[iy, (ix - 1) % w], lp[iy, (ix + 1) % w])
    k = np.stack([(ky + np.clip(dy, -0.5, 0.5)) / h, (kx + np.clip(dx, -0.5, 0.5)) / w], axis=1)
    return k, p


def _reduce(b1, b2):
    """Lagrange-Gauss reduction of a 2D basis: shortest pair spanning the same lattice."""
    b1, b2 = np.array(b1, float), np.array(b2, float)
    if b1 @ b1 > b2 @ b2:
        b1, b2 = b2, b1
    for _ in range(100):
        m = np.round((b1 @ b2) / (b1 @ b1))
        b2 = b2 - m * b1
        if b2 @ b2 >= b1 @ b1:
            break
        b1, b2 = b2, b1
    return b1, b2


def _index(basis, k):
    """Real-valued Miller indices of vectors k in a reciprocal basis (rows)."""
    return k @ np.linalg.inv(basis)


def _lattice_basis(k, p, tol=0.12):
    """Reciprocal basis generated by the peaks; least-squares refined."""
    strong = min(len(k), 12)
    cand = [k[:strong]]
    for i in range(min(strong, 8)):
        cand.append(k[:strong] - k[i])
        cand.append(k[:strong] + k[i])
    cand = np.concatenate(cand)
    # canonical sign, drop near-zero and duplicate vectors
    flip = (cand[:, 0] < 0) | ((cand[:, 0] == 0) & (cand[:, 1] < 0))
    cand[flip] *= -1
    length = np.hypot(*cand.T)
    kmin = 0.5 * np.hypot(*k[: max(1, strong)].T).min()
    cand = cand[length > kmin]
    cand = cand[np.argsort(np.hypot(*cand.T))]
    keep = []
    for c in cand:
        if keep:
            kept = np.array(keep)
            near = np.minimum(np.hypot(*(kept - c).T), np.hypot(*(kept + c).T))
            if near.min() <= 0.3 * kmin:
                continue
        keep.append(c)
        if len(keep) >= 16:
            break
    cand = np.array(keep)
    i, j = np.triu_indices(len(cand), k=1)
    pairs = np.stack([cand[i], cand[j]], axis=1)  # (P, 2, 2), rows are the basis vectors
    area = np.abs(np.linalg.det(pairs))
    lengths = np.hypot(*cand.T)
    ok_pair = area > 0.3 * lengths[i] * lengths[j]  # not nearly collinear
    if not ok_pair.any():
        raise ValueError("no lattice found: fewer than two independent Bragg peaks")
    pairs, area = pairs[ok_pair], area[ok_pair]
    hk = np.einsum("nc,pcd->pnd", k, np.linalg.inv(pairs))
    indexed = np.all(np.abs(hk - np.round(hk)) < tol, axis=2)
    score = indexed @ p / p.sum()
    # The strongest peaks are low-order reflections: a lattice that indexes one of the
    # three strongest with an index above 2 is a finer lattice fitted to several domains.
    top = min(3, len(k))
    high = np.any(indexed[:, :top] & (np.abs(np.round(hk[:, :top])).max(axis=2) > 2), axis=1)
    if (~high).any():
        score = np.where(high, 0.0, score)
    # the most indexed power (within 10 %), then the smallest cell: the generated lattice
    eligible = score >= 0.9 * score.max()
    pick = np.flatnonzero(eligible)[np.argmin(area[eligible])]
    best = (None, pairs[pick])
    b1, b2 = _reduce(*best[1])
    basis = np.stack([b1, b2])
    # least squares over the indexed peaks, weighted by sqrt(power)
    hk = _index(basis, k)
    ok = np.all(np.abs(hk - np.round(hk)) < tol, axis=1)
    hk = np.round(hk[ok])
    wt = np.sqrt(p[ok])[:, None]
    if np.linalg.matrix_rank(hk) == 2:
        basis = np.linalg.lstsq(hk * wt, k[ok] * wt, rcond=None)[0]
    return basis, hk, p[ok]


def _candidate_reflections(basis, k, p, max_count=5):
    """Low-order reflections (|h|, |k| <= 2) with at least a tenth of the strongest one's
    power: integer indices (n, 2), vectors (n, 2) and powers, strongest first."""
    hk = np.round(_index(basis, k)).astype(int)
    power = {}
    for (h, l), q in zip(hk, p):
        key = (h, l) if (h, l) > (0, 0) else (-h, -l)
        if max(abs(h), abs(l)) <= 2 and key != (0, 0):
            power[key] = max(power.get(key, 0.0), q)
    if not power:
        return np.eye(2, dtype=int), basis.copy(), np.ones(2)
    strongest = max(power.values())
    keys = sorted((key for key in power if power[key] >= 0.1 * strongest),
                  key=lambda key: -power[key])[:max_count]
    if len(keys) < 2:
        keys = [(1, 0), (0, 1)]
    index = np.array(keys, int)
    return index, index @ basis, np.array([power.get(key, 0.0) for key in keys])


def _choose_pair(index, vectors, ok):
    """Two reflections that form a reciprocal basis and are present together.

    ok: bool (n, H, W), where each reflection's local amplitude is healthy. The pair seen
    together over the largest area (within 10 %) wins, then the shortest. In a twinned image
    a reflection of one domain is absent from the other, so a pair from one domain wins and
    the other domain shows up as a region where the lattice fit breaks down.
    """
    best, best_key = None, None
    area = {}
    for i in range(len(index)):
        for j in range(i + 1, len(index)):
            if abs(int(np.linalg.det(np.stack([index[i], index[j]])).round())) != 1:
                continue
            area[(i, j)] = np.mean(ok[i] & ok[j])
    if not area:
        return 0, 1
    top = max(area.values())
    for (i, j), a in area.items():
        if a < 0.75 * top:
            continue
        key = np.hypot(*vectors[i]) + np.hypot(*vectors[j])
        if best_key is None or key < best_key:
            best, best_key = (i, j), key
    return best


def _gpa_sigma(reflections):
    """Real-space sigma of the Bragg filter per gpa_cell: the lattice's longest plane spacing
    (1 / the shortest reciprocal vector), so neighbouring reflections stay apart."""
    return 1.0 / np.hypot(*_reduce(*reflections)[0])


_APODIZE = 2.0  # edge taper width, in filter sigmas


def _taper(n, width):
    """1D weights rising smoothly (sin^2) from the ends over `width` pixels."""
    d = np.minimum(np.arange(n), np.arange(n)[::-1]) + 0.5
    if width <= 0:
        return np.ones(n)
    return np.sin(0.5 * np.pi * np.minimum(1.0, d / width)) ** 2


@functools.lru_cache(maxsize=16)
def _edge_window(n, sigma):
    """Taper, coverage and centre-of-mass offset of the Bragg filter along an axis of n px."""
    taper = _taper(n, _APODIZE * sigma)
    cover, offset = _window_moments(taper, sigma)
    return taper, cover, offset


def _window_moments(weights, sigma):
    """Coverage (weighted fraction of the Gaussian inside) and centre-of-mass offset, 1D."""
    n = len(weights)
    t = np.arange(n, dtype=np.float64)
    d = t[None, :] - t[:, None]
    g = np.exp(-0.5 * (d / sigma) ** 2) * weights[None, :]
    total = g.sum(axis=1)
    return total / (np.sqrt(2 * np.pi) * sigma), (g * d).sum(axis=1) / total


@dataclass
class _Envelopes:
    """Local Bragg coefficients of some reflections (geometric phase analysis).

    The coefficient of reflection i at pixel r is env_i(r) exp(2 pi i carrier_i . r): the
    envelope is smooth (the filter's real-space sigma is a lattice period), so it is kept
    on a coarse grid, sample (j, k) at pixel (j step, k step), and interpolated bilinearly.
    """

    env: np.ndarray  # (n, mh, mw) complex64
    carrier: np.ndarray  # (n, 2) frequencies on the FFT grid, cycles / px, (y, x)
    step: int
    shape: tuple  # (H, W) of the image

    def full(self, i):
        """Envelope i at every pixel (bilinear)."""
        (y0, fy), (x0, fx) = (_interp_axis(n, self.step, m)
                              for n, m in zip(self.shape, self.env.shape[1:]))
        e = self.env[i]
        rows = e[y0] * (1 - fy)[:, None] + e[y0 + 1] * fy[:, None]
        return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx

    def cycles(self, i, full=None):
        """Phase of coefficient i in cycles, mod 1: the pixel's cell coordinate along i."""
        full = self.full(i) if full is None else full
        h, w = self.shape
        g = self.carrier[i]
        # the carrier's own phase mod 1 first, so float32 keeps its precision
        carrier = ((g[0] * np.arange(h)) % 1.0)[:, None] + ((g[1] * np.arange(w)) % 1.0)[None, :]
        phase = np.angle(full).astype(np.float32)
        phase *= np.float32(1 / _TWO_PI)
        phase += carrier.astype(np.float32)
        return phase % np.float32(1.0)

    def frequency(self):
        """Local frequency (n, 2, mh, mw), cycles / px: carrier + envelope phase gradient."""
        e, q = self.env, self.step
        fy = np.angle(e[:, 1:] * np.conj(e[:, :-1])) / (_TWO_PI * q)
        fx = np.angle(e[:, :, 1:] * np.conj(e[:, :, :-1])) / (_TWO_PI * q)
        fy = np.concatenate([fy, fy[:, -1:]], axis=1) + self.carrier[:, 0, None, None]
        fx = np.concatenate([fx, fx[:, :, -1:]], axis=2) + self.carrier[:, 1, None, None]
        return np.stack([fy, fx], axis=1)


@functools.lru_cache(maxsize=16)
def _interp_axis(n, step, m):
    """Lower sample index and weight of each of n pixels on a grid of m samples, step apart
    (the last few pixels past the last sample are extrapolated)."""
    pos = np.arange(n) / step
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, max(0, m - 2))
    return i0, (pos - i0).astype(np.float32)


def _envelopes(image, reflections, sigma, correct=True):
    """Bragg-filter the image around each reflection (Gaussian window, real-space sigma).

    The image is tapered smoothly to zero at its edges and zero-padded (a cut window would
    leak the other reflections in, and the FFT would wrap); near an edge the coefficient is
    renormalised by the window's covered weight and (correct=True) its phase, that of the
    window's centre of mass, is moved back to the pixel with the local frequency.
    """
    h, w = image.shape
    step = int(max(1, min(4, sigma // 4)))
    pad = int(np.ceil(3 * sigma))
    shape = tuple(step * sfft.next_fast_len(-(-(n + pad) // step)) for n in (h, w))
    ty, cover_y, offset_y = _edge_window(h, float(sigma))
    tx, cover_x, offset_x = _edge_window(w, float(sigma))
    x = np.zeros(shape, np.complex64)
    x[:h, :w] = (image - image.mean()) * ty[:, None] * tx[None, :]
    spectrum = sfft.fft2(x, overwrite_x=True)
    m = (shape[0] // step, shape[1] // step)
    qy = np.rint(sfft.fftfreq(m[0]) * m[0]).astype(np.intp)
    qx = np.rint(sfft.fftfreq(m[1]) * m[1]).astype(np.intp)
    mh, mw = (h - 1) // step + 1, (w - 1) // step + 1
    rows, cols = np.arange(mh) * step, np.arange(mw) * step
    cover = (cover_y[rows, None] * cover_x[None, cols]).astype(np.float32)
    s2 = 2 * (np.pi * sigma) ** 2
    env = np.empty((len(reflections), mh, mw), np.complex64)
    carrier = np.empty((len(reflections), 2))
    for i, g in enumerate(reflections):
        by, bx = int(np.rint(g[0] * shape[0])), int(np.rint(g[1] * shape[1]))
        carrier[i] = by / shape[0], bx / shape[1]
        wy = np.exp(-s2 * ((by + qy) / shape[0] - g[0]) ** 2).astype(np.float32)
        wx = np.exp(-s2 * ((bx + qx) / shape[1] - g[1]) ** 2).astype(np.float32)
        block = spectrum[np.ix_((by + qy) % shape[0], (bx + qx) % shape[1])]
        small = sfft.ifft2(block * wy[:, None] * wx[None, :], overwrite_x=True)
        env[i] = small[:mh, :mw] / (step * step) / cover
    out = _Envelopes(env, carrier, step, (h, w))
    if correct:
        _correct_phases(out, reflections, offset_y[rows], offset_x[cols])
    return out


def _correct_phases(envs, reflections, offset_y, offset_x):
    """Move each sample's phase from its window's centre of mass back to it, in place."""
    dg = envs.frequency() - np.asarray(reflections)[:, :, None, None]
    shift = dg[:, 0] * offset_y[None, :, None] + dg[:, 1] * offset_x[None, None, :]
    envs.env *= np.exp(np.complex64(-1j * _TWO_PI) * shift.astype(np.float32))


def _healthy(amplitudes):
    """Healthy-lattice level of each amplitude map: its 75th percentile."""
    return np.percentile(amplitudes.reshape(len(amplitudes), -1), 75, axis=1)


def estimate_lattice(image, gpa_cells: float = 1.0) -> LatticeModel:
    """Lattice of an atomic-resolution image from its Bragg peaks, refined by local phases."""
    image = np.asarray(image, dtype=np.float64)
    lattice, _ = _estimate_lattice(image, gpa_cells)
    return lattice


def _estimate_lattice(image, gpa_cells):
    k, p = _spectrum_peaks(_power_spectrum(image))
    if len(k) < 2:
        raise ValueError("no lattice found: fewer than two Bragg peaks above the noise")
    basis, _, _ = _lattice_basis(k, p)
    index, vectors, _ = _candidate_reflections(basis, k, p)
    sigma = gpa_cells * _gpa_sigma(basis)
    envs = _envelopes(image, vectors, sigma, correct=False)
    amp = np.abs(envs.env)
    ok = amp > 0.5 * _healthy(amp)[:, None, None]
    i, j = _choose_pair(index, vectors, ok)
    reflections = vectors[[i, j]]
    envs = _Envelopes(envs.env[[i, j]], envs.carrier[[i, j]], envs.step, envs.shape)
    h, w = image.shape
    rows, cols = np.arange(envs.env.shape[1]) * envs.step, np.arange(envs.env.shape[2]) * envs.step
    _correct_phases(envs, reflections, _edge_window(h, float(sigma))[2][rows],
                    _edge_window(w, float(sigma))[2][cols])
    # refine: the median local frequency over the healthy interior
    good = ok[i] & ok[j]
    margin = int(min(sigma, h / 4, w / 4)) // envs.step + 1
    weight = np.zeros_like(good)
    weight[margin:-margin, margin:-margin] = good[margin:-margin, margin:-margin]
    if weight.sum() > 16:
        freq = envs.frequency()
        reflections = np.stack([[np.median(f[0][weight]), np.median(f[1][weight])] for f in freq])
    # origin: where both global phases vanish, the lattice point nearest the centre
    phase0 = np.zeros(2)
    if weight.any():
        ry, rx = rows[:, None].astype(float), cols[None, :].astype(float)
        for n in range(2):
            d = envs.carrier[n] - reflections[n]
            rotate = np.exp(1j * _TWO_PI * (d[0] * ry + d[1] * rx))
            phase0[n] = np.angle(np.sum((envs.env[n] * rotate)[weight]))
    cell = np.linalg.inv(reflections).T  # rows: real-space dual basis
    origin = np.linalg.solve(reflections, -phase0 / _TWO_PI)
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    n = np.round(np.linalg.solve(cell.T, centre - origin))
    origin = origin + n @ cell
    a1, a2 = _reduce(*cell)
    if a1 @ a1 > a2 @ a2:
        a1, a2 = a2, a1
    lattice = LatticeModel(vectors=np.stack([a1, a2]), reflections=reflections, origin=origin)
    return lattice, envs


# ----------------------------------------------------------------------- reconstruction


@dataclass
class _Geometry:
    """What the local lattice phases give, shared by both passes; internal."""

    envs: _Envelopes  # of the two lattice reflections
    cell: np.ndarray  # (2, H, W) fractional cell coordinates in [0, 1)
    amplitude: np.ndarray  # (2, H, W) local Bragg amplitude / healthy level
    healthy: np.ndarray  # (2,) the healthy levels
    lattice_ok: np.ndarray  # bool (H, W): both amplitudes above min_amplitude
    bins: tuple
    splat: tuple


def _geometry(image, lattice, envs, gpa_cells, min_amplitude):
    if envs is None:
        envs = _envelopes(image, lattice.reflections, gpa_cells * _gpa_sigma(lattice.reflections))
    healthy = _healthy(np.abs(envs.env))
    full = [envs.full(i) for i in range(2)]
    cell = np.stack([envs.cycles(i, f) for i, f in enumerate(full)])
    amplitude = np.stack([np.abs(f) / max(r, 1e-300) for f, r in zip(full, healthy)])
    lattice_ok = np.all(amplitude > min_amplitude, axis=0)
    bins = _bins(lattice, image.shape)
    return _Geometry(envs, cell, amplitude, healthy, lattice_ok, bins, _splat(cell, bins))


def _bins(lattice, shape):
    """Template bins along the two cell vectors: about half a pixel, >= 16 pixels a bin."""
    lengths = np.hypot(*lattice.cell_vectors.T)
    cells = shape[0] * shape[1] / abs(np.linalg.det(lattice.cell_vectors))
    per_px = min(2.0, np.sqrt(cells / 16.0))
    return tuple(int(max(8, np.ceil(per_px * n))) for n in lengths)


def _splat(cell, bins):
    """Bilinear weights of each pixel onto the periodic template bins: (index, weight) x 4."""
    n1, n2 = bins
    u = cell[0].ravel() * np.float32(n1)
    v = cell[1].ravel() * np.float32(n2)
    i0, j0 = u.astype(np.intp), v.astype(np.intp)  # cell is in [0, 1): truncation is floor
    u -= i0
    v -= j0
    i0 %= n1
    j0 %= n2
    i1 = i0 + 1
    i1[i1 == n1] = 0
    j1 = j0 + 1
    j1[j1 == n2] = 0
    i0 *= n2
    i1 *= n2
    gu, gv = 1 - u, 1 - v
    return ((i0 + j0, gu * gv), (i1 + j0, u * gv), (i0 + j1, gu * v), (i1 + j1, u * v))


def _template(values, geo, use):
    """Mean of `values` over the pixels `use`, binned by cell coordinate (bilinear splat)."""
    n = geo.bins[0] * geo.bins[1]
    u = use.ravel()
    v = values.ravel()[u]
    num, den = np.zeros(n), np.zeros(n)
    for index, weight in geo.splat:
        w = weight[u]
        num += np.bincount(index[u], w * v, minlength=n)
        den += np.bincount(index[u], w, minlength=n)
    filled = den > 1e-9
    t = np.where(filled, num / np.where(filled, den, 1.0), np.nan)
    if not filled.all():  # bins no used pixel reached (tiny images): the mean
        t[~filled] = np.nanmean(t) if filled.any() else 0.0
    return t.reshape(geo.bins)


def _sample(template, geo):
    flat = template.ravel()
    return sum(flat[index] * weight for index, weight in geo.splat).reshape(geo.cell.shape[1:])


def _quadratic_background(residual, use):
    """Least-squares quadratic surface through the residual, 4-sigma clipped, subsampled."""
    h, w = residual.shape
    step = max(1, min(h, w) // 64)
    y, x = np.mgrid[0:h:step, 0:w:step]
    y, x = y / h - 0.5, x / w - 0.5
    r = residual[::step, ::step]
    base = use[::step, ::step]
    u = base.copy()
    basis = np.stack([np.ones_like(y), y, x, y * y, x * y, x * x], axis=-1)
    coef = np.zeros(6)
    for _ in range(3):
        if u.sum() < 12:
            break
        coef = np.linalg.lstsq(basis[u], r[u], rcond=None)[0]
        dev = r - basis @ coef
        # rms, not a median: at low counts the residual is skewed, and a median-based clip
        # would cut one tail and bias the level
        spread = np.sqrt(np.mean(dev[u] ** 2)) + 1e-12
        u = base & (np.abs(dev) < 4 * spread)
    yy = (np.arange(h) / h - 0.5)[:, None]
    xx = (np.arange(w) / w - 0.5)[None, :]
    return (coef[0] + coef[1] * yy + coef[2] * xx
            + coef[3] * yy * yy + coef[4] * xx * yy + coef[5] * xx * xx)


@dataclass
class _Fit:
    template: np.ndarray  # (n1, n2), including the mean background
    background: np.ndarray  # (H, W), the background's variation about its mean
    bulk: np.ndarray  # (H, W)


def _fit(image, geo, exclude=None):
    use = geo.lattice_ok if exclude is None else geo.lattice_ok & ~exclude
    if use.sum() < 0.1 * use.size:  # the fit broke down almost everywhere: use it all
        use = np.ones_like(use) if exclude is None else ~exclude
    template = _template(image, geo, use)
    # The bin means are the image blurred by splatting, and sampling blurs them again
    # (bilinear twice: 0.3 pixel rms with half-pixel bins), which shaves a few percent off
    # every column's peak: a deviation at every site. A Jacobi step on the least-squares
    # template takes most of the blur out of the bulk model. The template the lattice's
    # columns, width and floor are read from stays the plain mean, which the step would
    # make noisier.
    sharp = template + _template(image - _sample(template, geo), geo, use)
    sampled = _sample(sharp, geo)
    # every bin samples the whole field, so the template holds the mean background and the
    # residual's smooth part is the background's variation
    background = _quadratic_background(image - sampled, use)
    return _Fit(template, background, sampled + background)


def reconstruct_bulk(image, lattice: LatticeModel | None = None, gpa_cells: float = 1.0):
    """Defect-free reconstruction: the unit-cell average placed by the local lattice phases.

    Robust to a few defects (each is a small share of every template bin); `pseudo_labels`
    refits with its candidate defects left out.
    """
    image = np.asarray(image, dtype=np.float64)
    envs = None
    if lattice is None:
        lattice, envs = _estimate_lattice(image, gpa_cells)
    geo = _geometry(image, lattice, envs, gpa_cells, 0.5)
    return _fit(image, geo).bulk.astype(np.float32)


# -------------------------------------------------------------------------------- noise


def noise_level(image, bulk=None) -> float:
    """Robust noise standard deviation of an image.

    With `bulk` (a defect-free reconstruction): 1.4826 x the median absolute deviation of
    image - bulk. Without: the same of a high-pass residual (Immerkaer's 3x3 kernel, which
    cancels locally quadratic signals), over the kernel's norm (6); sharp columns still
    leak some signal into it, so there it is an upper bound.
    """
    image = np.asarray(image, dtype=np.float64)
    if bulk is not None:
        d = image - bulk
        return float(1.4826 * np.median(np.abs(d - np.median(d))))
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], float)
    r = ndimage.convolve(image, kernel, mode="reflect")[1:-1, 1:-1]
    return float(1.4826 * np.median(np.abs(r - np.median(r))) / 6.0)


@dataclass
class _Noise:
    """The per-pixel noise model of a deviation map: its white part (shot and readout noise)
    and the scan-line jitter terms, kept apart because they add up differently under a
    filter (`_filtered_variance`)."""
    white: np.ndarray  # alpha * (bulk - min) + beta + floor
    gx: np.ndarray  # the bulk's gradient along x (scan lines) ...
    gy: np.ndarray  # ... and along y
    cumulant3: np.ndarray  # third cumulant (the skew of shot noise)
    coef: np.ndarray  # (alpha, beta, gamma_x, gamma_y)

    @property
    def variance(self) -> np.ndarray:
        return self.white + self.coef[2] * self.gx * self.gx + self.coef[3] * self.gy * self.gy


def _variance_model(deviation, bulk, floor_var, coef=None) -> _Noise:
    """Per-pixel variance alpha * (bulk - min) + beta + gamma_x gx^2 + gamma_y gy^2 (gx, gy
    the bulk's gradient), fitted; given coef, only evaluated.

    Shot noise, readout noise and scan-line jitter (each scan line shifted as a whole along
    x by a random amount of variance gamma_x, along y by gamma_y), fitted to the squared
    deviations (weighted, 5-sigma clipped, one pixel in 16).
    """
    gy, gx = np.gradient(bulk.astype(np.float32))
    b = (bulk - bulk.min()).astype(np.float32)
    gx2, gy2 = gx * gx, gy * gy
    if coef is None:
        s = (slice(1, None, 4), slice(2, None, 4))
        features = np.stack([b[s].ravel(), np.ones(b[s].size), gx2[s].ravel(),
                             gy2[s].ravel()], axis=1)
        target = (deviation[s] ** 2).ravel()
        use = np.ones(len(target), bool)
        coef = np.array([0.0, np.mean(target), 0.0, 0.0])
        for _ in range(3):
            scale = features[use] @ coef + floor_var  # weights ~ 1 / var: chi-square target
            coef, _ = nnls(features[use] / scale[:, None], target[use] / scale)
            use = target < 25.0 * (features @ coef + floor_var)
    shot = coef[0] * b + coef[1]
    # Third cumulant, for the skew of shot noise: counts N scaled by a gain alpha have
    # variance alpha (alpha N) and third cumulant alpha^2 (alpha N). The constant term is
    # taken as shot noise too (an unknown offset), which errs towards more skew.
    return _Noise(shot + floor_var, gx, gy, coef[0] * shot, coef)


def _filtered_variance(noise: _Noise, sigma):
    """Variance of the Gaussian-filtered (sigma) deviation, zero-padded like the filter.

    The white part (shot and readout noise) adds up pixel by pixel. Scan-line jitter does
    not: a whole line moves by s, so its error, -s b' + (s^2 - E s^2) b'' / 2 along the
    line (b the bulk, which as an average over lines is already blurred by the jitter), is
    correlated along the line. The first-order part cancels across a column's symmetric
    profile, the second does not and peaks there; for Gaussian s, Var(s^2) / 4 = gamma^2 / 2.
    Their variance is that of each line's x-filtered derivatives, summed over the lines
    with the squared y weights.
    """
    white = ndimage.gaussian_filter(noise.white.astype(np.float32), sigma / np.sqrt(2),
                                    mode="constant") / (4 * np.pi * sigma * sigma)
    lines = np.zeros_like(noise.gx)
    for gamma, axis, first in ((noise.coef[2], 1, noise.gx), (noise.coef[3], 0, noise.gy)):
        if gamma <= 0:
            continue
        second = np.gradient(first, axis=axis)
        for weight, derivative in ((gamma, first), (0.5 * gamma * gamma, second)):
            lines += weight * ndimage.gaussian_filter1d(derivative, sigma, axis=1,
                                                        mode="constant") ** 2
    lines = ndimage.gaussian_filter1d(lines, sigma / np.sqrt(2), axis=0,
                                      mode="constant") / (2 * np.sqrt(np.pi) * sigma)
    return white + lines


# ---------------------------------------------------------------------------- template


def _bin_offsets(shape, cell_vectors, i0, j0):
    """Pixel (y, x) offsets (n1, n2, 2) of every template bin from bin (i0, j0), wrapped."""
    n1, n2 = shape
    di = ((np.arange(n1) - i0 + n1 // 2) % n1 - n1 // 2) / n1
    dj = ((np.arange(n2) - j0 + n2 // 2) % n2 - n2 // 2) / n2
    return di[:, None, None] * cell_vectors[0] + dj[None, :, None] * cell_vectors[1]


def _column_sigma(template, cell_vectors, shortest):
    """Gaussian sigma (pixels) of the brightest template column.

    Least squares of B + A exp(-d^2 / 2 s^2) over the bins within a quarter of the shortest
    lattice vector of its peak, for s on a log grid (A and B linear for each): the local
    level B takes up the tails of the neighbouring columns.
    """
    i0, j0 = np.unravel_index(np.argmax(template), template.shape)
    d2 = np.sum(_bin_offsets(template.shape, cell_vectors, i0, j0) ** 2, axis=-1)
    near = d2 < (0.25 * shortest) ** 2
    x, v = d2[near], template[near]
    fallback = 0.1 * shortest
    if len(x) < 6:
        return float(fallback)
    # for every trial sigma, the closed-form least squares of v = B + A e (e the profile)
    trial = np.geomspace(0.5, 0.25 * shortest, 40)
    e = np.exp(-0.5 * x[:, None] / (trial[None, :] ** 2))  # (points, trials)
    n = len(x)
    se, sv, see, sev = e.sum(0), v.sum(), (e * e).sum(0), (e * v[:, None]).sum(0)
    det = n * see - se * se
    amp = (n * sev - se * sv) / np.where(det > 0, det, np.inf)
    level = (sv - amp * se) / n
    err = ((level[None, :] + amp[None, :] * e - v[:, None]) ** 2).sum(0)
    err[(amp <= 0) | (det <= 0)] = np.inf
    if not np.isfinite(err).any():
        return float(fallback)
    return float(trial[int(np.argmin(err))])


def _template_columns(template, cell_vectors, sigma, min_height):
    """Fractional positions (K, 2) and heights above the floor of the template's columns."""
    n1, n2 = template.shape
    lengths = np.hypot(*cell_vectors.T)
    size = tuple(2 * max(1, int(round(sigma * n / length))) + 1
                 for n, length in zip((n1, n2), lengths))
    floor = template.min()
    peak = template == ndimage.maximum_filter(template, size=size, mode="wrap")
    peak &= template > floor + min_height
    positions, heights = [], []
    for i, j in zip(*np.nonzero(peak)):
        ii, jj = np.arange(i - 1, i + 2) % n1, np.arange(j - 1, j + 2) % n2
        w = np.maximum(template[np.ix_(ii, jj)] - floor, 0)
        total = max(w.sum(), 1e-12)
        du = np.sum(w.sum(axis=1) * np.array([-1, 0, 1])) / total
        dv = np.sum(w.sum(axis=0) * np.array([-1, 0, 1])) / total
        positions.append([((i + du) / n1) % 1.0, ((j + dv) / n2) % 1.0])
        heights.append(template[i, j] - floor)
    order = np.argsort(heights)[::-1]
    return np.array(positions).reshape(-1, 2)[order], np.array(heights)[order]


def _nearest_site(cell_at, columns, cell_vectors):
    """(distance px, pixel (y, x) offset from the site) of a point's nearest column site."""
    d = (cell_at[None, :] - columns + 0.5) % 1.0 - 0.5  # (K, 2) fractional
    offsets = d @ cell_vectors  # (K, 2) pixels
    dist = np.hypot(*offsets.T)
    k = int(np.argmin(dist))
    return dist[k], offsets[k]


# ------------------------------------------------------------------------------ defects


def _windings(coeff):
    """Phase winding (integer) of each 2x2 plaquette; plaquette (i, j) is centred at +0.5."""
    dx = np.angle(coeff[:, 1:] * np.conj(coeff[:, :-1]))
    dy = np.angle(coeff[1:, :] * np.conj(coeff[:-1, :]))
    curl = dx[:-1, :] + dy[:, 1:] - dx[1:, :] - dy[:, :-1]
    return np.rint(curl / _TWO_PI).astype(np.int64)


def _dislocations(geo, lattice, min_amplitude):
    """Cores (y, x) and Burgers-vector lengths (px): net windings of the local Bragg phases.

    A Burgers circuit in phase: around an edge dislocation the phase of reflection g turns
    by 2 pi g.b, so b = sum_i n_i a_i from the windings n_i of the two basis reflections
    (a_i the dual cell vectors). Singular points of both reflections within two lattice
    periods are one core; singularities where the lattice fit broke down (median amplitude
    on a ring of radii |b| .. 2|b| below min_amplitude) are not counted.
    """
    # on the envelopes' coarse grid: the carrier is gone, the phase is smooth
    step = geo.envs.step
    w = np.stack([_windings(e) for e in geo.envs.env])
    points = np.argwhere(np.any(w != 0, axis=0))
    if len(points) == 0:
        return []
    cell_vectors = lattice.cell_vectors
    reach = 2.0 * np.hypot(*lattice.vectors[1])
    # single-linkage groups of singular points
    group = np.arange(len(points))
    d = step * np.hypot(*(points[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
    for i in range(len(points)):
        near = np.flatnonzero(d[i] < reach)
        group[np.isin(group, group[near])] = group[i]
    h, wd = geo.amplitude.shape[1:]
    amp = geo.amplitude.min(axis=0)
    out = []
    for g in np.unique(group):
        members = points[group == g]
        n = w[:, members[:, 0], members[:, 1]].sum(axis=1)
        if not n.any():
            continue
        b = np.hypot(*(n @ cell_vectors))
        centre = (members.mean(axis=0) + 0.5) * step
        y0, y1 = max(0, int(centre[0] - 2 * b)), min(h, int(centre[0] + 2 * b) + 1)
        x0, x1 = max(0, int(centre[1] - 2 * b)), min(wd, int(centre[1] + 2 * b) + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        r = np.hypot(yy - centre[0], xx - centre[1])
        ring = (r > b) & (r < 2 * b)
        if not ring.any() or np.median(amp[y0:y1, x0:x1][ring]) < min_amplitude:
            continue
        out.append((centre, float(b)))
    return out


def _planar(image, z, geo, lattice, config):
    """Planar defects seen edge-on: (label, unit normal (y, x), offset c, spacing d, side,
    (s_low, s_high) of the deviating run of lines); side is +-1 towards a twin, else 0.

    A planar defect is a straight band parallel to a low-index lattice plane along which the
    lattice model fails. For each plane family n (the two reflections, their sum and
    difference) and each line s = r.n (one-pixel bins, lines shorter than
    max(4 periods, 0.4 x image) ignored): the fraction of pixels whose local mean Z^2 (over
    half a lattice period) exceeds planar_level, and the mean local amplitude of each
    reflection. Runs of lines where the fraction exceeds planar_fraction are candidates;
    the run that explains the most deviating pixels wins. Point defects and dislocation
    cores cover a small share of a line and never pass. The deviation alone is not enough:
    the Bragg amplitudes must show what kind of plane it is.

    - twin_boundary: beyond the band the crystal is the mirror image of the matrix across
      the plane (in projection the twin flips the component along the plane trace t): on
      some lines the line-mean amplitude of a mirrored reflection m = g - 2 (g.t) t (not a
      matrix reflection) exceeds that of g by twin_margin of g's healthy level. The
      boundary is the first line, coming from the matrix, where g has fallen to half its
      healthy level.
    - stacking_fault: no mirrored lattice, but a reflection dips inside the band (line-mean
      below planar_dip): the two sides are the same lattice shifted by a non-lattice vector;
      where their Bragg phases (2 pi g.R apart) overlap, the filtered amplitude drops. The
      plane is the centroid of the band's deviation.
    The mask is the band within one plane spacing d = 1 / |g| of the plane: the layers on
    both sides whose stacking differs from the bulk.
    """
    h, w = z.shape
    shortest = np.hypot(*lattice.vectors[0])
    energy = ndimage.gaussian_filter((z * z).astype(np.float32), 0.5 * shortest, truncate=2.5)
    hot = energy > config.planar_level
    if hot.mean() < 0.01:
        return []
    g1, g2 = lattice.reflections
    yy = np.arange(h, dtype=np.float64)[:, None]
    xx = np.arange(w, dtype=np.float64)[None, :]
    min_line = max(4.0 * np.hypot(*lattice.vectors[1]), 0.4 * min(h, w))
    best = None
    for g in (g1, g2, g1 + g2, g1 - g2):
        n = g / np.hypot(*g)
        s = yy * n[0] + xx * n[1]
        s0 = s.min()
        b = np.floor(s - s0).astype(np.intp).ravel()
        count = np.bincount(b)
        hits = np.bincount(b, hot.ravel(), minlength=len(count))
        valid = count >= min_line
        on = valid & (hits > config.planar_fraction * count)
        on[1:-1] |= on[:-2] & on[2:] & valid[1:-1]  # close one-line gaps
        edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(np.int8), [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            if np.max(hits[start:stop] / count[start:stop]) < config.planar_core_fraction:
                continue
            score = np.sum(2 * hits[start:stop] - count[start:stop])
            if score > 0 and (best is None or score > best[0]):
                best = (score, g, n, s0, b, count, hits, valid, start, stop)
    if best is None:
        return []
    _, g, n, s0, b, count, hits, valid, start, stop = best
    d = 1.0 / np.hypot(*g)
    nb = len(count)
    lines = np.flatnonzero(valid)
    first, last = lines[0], lines[-1]
    profile = np.stack([np.bincount(b, a.ravel(), minlength=nb) / np.maximum(count, 1)
                        for a in geo.amplitude])
    # twin: across the plane lies the mirror image of the lattice (in projection, the twin
    # flips the component along the plane trace t). Its reflections m = g - 2 (g.t) t,
    # absent from the matrix, are strong beyond the boundary, and the matrix reflection is
    # weak there.
    t = np.array([-n[1], n[0]])
    sigma = _gpa_sigma(lattice.reflections)
    inv = np.linalg.inv(lattice.reflections)
    for i, g in enumerate(lattice.reflections):
        m = g - 2 * (g @ t) * t
        hk = m @ inv
        if np.hypot(*(m - g)) < 0.2 * np.hypot(*g) or np.all(np.abs(hk - np.round(hk)) < 0.15):
            continue  # shared with the matrix, or the lattice is mirror-symmetric here
        # a twice narrower window in frequency keeps nearby matrix reflections out
        amp_m = np.abs(_envelopes(image, m[None], 2 * sigma, correct=False).full(0))
        amp_m /= geo.healthy[i]
        p_g = profile[i]
        p_m = np.bincount(b, amp_m.ravel(), minlength=nb) / np.maximum(count, 1)
        diff = np.where(valid, p_m - p_g, -np.inf)
        matrix = valid & (p_g > 1 - config.twin_margin) & (p_m < config.twin_margin)
        if diff.max() < config.twin_margin or not matrix.any():
            continue
        peak = int(np.argmax(diff))
        toward_high = peak > np.median(np.flatnonzero(matrix))
        order = lines[lines <= peak] if toward_high else lines[lines >= peak][::-1]
        # from the matrix side towards the twin: the first line where g has fallen to half
        # its healthy level (g's filter is the narrower one, so its step is the sharper)
        healthy = np.median(p_g[matrix])
        c_bin = order[int(np.argmax(p_g[order] < 0.5 * healthy))]
        c = s0 + c_bin + 0.5
        return [("twin_boundary", n, c, d, 1.0 if toward_high else -1.0,
                 (s0 + start, s0 + stop))]
    # stacking fault: no mirrored lattice beyond the band, but a reflection dips inside it
    if profile[:, start:stop][:, valid[start:stop]].min() >= config.planar_dip:
        return []
    run = hits[start:stop]
    c = s0 + start + 0.5 + np.sum(np.arange(stop - start) * run) / max(run.sum(), 1e-12)
    return [("stacking_fault", n, c, d, 0.0, (s0 + start, s0 + stop))]


def _band(shape, normal, c, d):
    h, w = shape
    s = np.arange(h)[:, None] * normal[0] + np.arange(w)[None, :] * normal[1]
    return np.abs(s - c) <= d


def _core(singularity, b, candidates):
    """Where the core is: the |Z|-weighted centroid of the deviation extrema (displaced
    columns) within 2 |b| of the phase singularity, which the filter's smoothing moves off
    the core by a good part of |b|; the singularity itself if there are fewer than two."""
    near = [(c, abs(z)) for _, c, z, _ in candidates if np.hypot(*(c - singularity)) < 2 * b]
    if len(near) < 2:
        return singularity
    weight = np.array([q[1] for q in near])
    return (np.array([q[0] for q in near]) * weight[:, None]).sum(axis=0) / weight.sum()


def _displaced_clusters(candidates, skip, lattice, config):
    """Dislocation cores the phases missed (a core near the image edge puts the phase
    singularity outside the image): clusters of displaced columns.

    A displaced column leaves a dip at its lattice site and a peak off it. A single-linkage
    cluster (links up to 3/4 of the shortest lattice vector) of at least
    min_displaced_extrema candidates of both signs, two or more of them off every column
    site, is a region where the lattice fit breaks down. The core is the |Z|-weighted
    centroid; the Burgers vector is taken as the shortest lattice vector.
    """
    pts = [(centre, zv, label) for label, centre, zv, _ in candidates if not skip(centre)]
    if len(pts) < config.min_displaced_extrema:
        return []
    shortest = float(np.hypot(*lattice.vectors[0]))
    xy = np.array([p[0] for p in pts])
    group = np.arange(len(pts))
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    for i in range(len(pts)):
        near = np.flatnonzero(d[i] < 0.75 * shortest)
        group[np.isin(group, group[near])] = group[i]
    out = []
    for g in np.unique(group):
        members = [pts[k] for k in np.flatnonzero(group == g)]
        zs = np.array([m[1] for m in members])
        off = sum(m[2] in (None, "interstitial") for m in members)
        if len(members) < config.min_displaced_extrema or off < 2 or zs.min() > 0 or zs.max() < 0:
            continue
        weight = np.abs(zs)
        centre = (np.array([m[0] for m in members]) * weight[:, None]).sum(axis=0) / weight.sum()
        out.append((centre, shortest))
    return out


def _disc(mask, centre, radius):
    h, w = mask.shape
    y0, y1 = max(0, int(np.floor(centre[0] - radius))), min(h, int(np.ceil(centre[0] + radius)) + 1)
    x0, x1 = max(0, int(np.floor(centre[1] - radius))), min(w, int(np.ceil(centre[1] + radius)) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    mask[y0:y1, x0:x1] |= (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


_CLIP = 9.0  # Z^2 is clipped here for the edge lines' and blocks' means
_CLIPPED_MEAN = 0.9950  # E[min(Z^2, 9)] for Z ~ N(0, 1)
_MEDIAN_CHI2 = 0.4549  # median of Z^2 for Z ~ N(0, 1)


@functools.lru_cache(maxsize=16)
def _interp_matrix(n, blocks, size):
    """(n, blocks) weights of linear interpolation between block centres, constant beyond."""
    pos = np.clip((np.arange(n) + 0.5) / size - 0.5, 0, blocks - 1)
    lo = np.minimum(pos.astype(np.intp), max(0, blocks - 2))
    hi = np.minimum(lo + 1, blocks - 1)
    m = np.zeros((n, blocks))
    np.add.at(m, (np.arange(n), lo), 1 - (pos - lo))
    np.add.at(m, (np.arange(n), hi), pos - lo)
    return m


def _inner(n, block):
    """Which of n lines lie a block or more from both ends."""
    index = np.arange(n)
    return (index >= block) & (index < n - block)


def _local_scale(z, block, sigma):
    """Robust scale (>= 1) of a noise-normalised map, where the model is measurably worse
    than the noise model says (image edges, strained regions): thresholds rise with it.

    Z^2 is compared with its value for pure noise: its median over the whole image, and
    its mean, clipped at 9 (a few defects barely move it), over square blocks and, within a
    block of the image's edges, along each row and column. A block's excess counts only
    beyond two standard errors (Z is correlated over about 4 pi sigma^2 pixels). The Bragg
    filter's window is cut off at the edges, so the lattice phases, and with them the bulk
    model, go wrong there, often along one side only (the first scan lines of a drifting
    scan): an edge line whose mean is two standard errors above the noise's gets its
    whole mean.
    """
    h, w = z.shape
    z2 = z * z
    overall = np.median(z2) / _MEDIAN_CHI2
    np.minimum(z2, _CLIP, out=z2)
    z2 /= _CLIPPED_MEAN
    correlated = np.sqrt(4 * np.pi) * sigma  # pixels along a line per independent Z
    rows, cols = z2.mean(axis=1), z2.mean(axis=0)
    rows[(rows < 1 + 2 * np.sqrt(2.0 * correlated / w)) | _inner(h, block)] = 0.0
    cols[(cols < 1 + 2 * np.sqrt(2.0 * correlated / h)) | _inner(w, block)] = 0.0
    scale2 = np.maximum(max(1.0, overall), np.maximum(rows[:, None], cols[None, :]))
    ny, nx = max(1, h // block), max(1, w // block)
    hb, wb = h // ny, w // nx
    tiles = z2[:ny * hb, :nx * wb].reshape(ny, hb, nx, wb)
    blocks = tiles.mean(axis=(1, 3))
    blocks -= 2 * np.sqrt(2.0 * 4 * np.pi * sigma * sigma / (hb * wb))
    # bilinear between block centres, constant beyond the outer ones
    scale2 = np.maximum(scale2, _interp_matrix(h, ny, hb) @ blocks @ _interp_matrix(w, nx, wb).T)
    return np.sqrt(scale2)


def _extrema(z, k, r):
    """Pixels (y, x) with |z| > k that are the maximum of z (peaks) or its minimum (dips)
    within the (2r + 1)^2 square around them."""
    ys, xs = np.nonzero(np.abs(z) > k)
    if len(ys) == 0:
        return np.zeros((0, 2), np.intp)
    h, w = z.shape
    d = np.arange(-r, r + 1)
    wy = np.clip(ys[:, None, None] + d[None, :, None], 0, h - 1)
    wx = np.clip(xs[:, None, None] + d[None, None, :], 0, w - 1)
    window = z[wy, wx].reshape(len(ys), -1)
    value = z[ys, xs]
    keep = np.where(value > 0, value >= window.max(axis=1), value <= window.min(axis=1))
    return np.stack([ys[keep], xs[keep]], axis=1)


def _smoothed_at(values, y, x, sigma):
    """Gaussian-weighted mean of `values` around pixel (y, x), zero-padded like the filter."""
    r = int(np.ceil(4 * sigma))
    h, w = values.shape
    y0, y1, x0, x1 = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
    gy = np.exp(-0.5 * ((np.arange(y0, y1) - y) / sigma) ** 2)
    gx = np.exp(-0.5 * ((np.arange(x0, x1) - x) / sigma) ** 2)
    norm = np.sum(np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)) ** 2
    return float(gy @ values[y0:y1, x0:x1] @ gx / norm)


def _skew_at(variance, cumulant3, y, x, sigma):
    """Skewness of the matched-filter output at (y, x): sum w^3 k3 / (sum w^2 k2)^(3/2)."""
    r = int(np.ceil(4 * sigma))
    h, w = variance.shape
    y0, y1, x0, x1 = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
    gy = np.exp(-0.5 * ((np.arange(y0, y1) - y) / sigma) ** 2)
    gx = np.exp(-0.5 * ((np.arange(x0, x1) - x) / sigma) ** 2)
    k2 = (gy ** 2) @ variance[y0:y1, x0:x1] @ (gx ** 2)
    k3 = (gy ** 3) @ cumulant3[y0:y1, x0:x1] @ (gx ** 3)
    return float(k3 / max(k2, 1e-300) ** 1.5)


def _skewed(k, sign, skew):
    """Gaussian threshold k moved to the same tail probability of a skewed statistic
    (Cornish-Fisher, first order): the long tail needs more, the short one less."""
    return max(0.5 * k, k + sign * skew * (k * k - 1) / 6.0)


@dataclass
class _Pass:
    fit: _Fit
    deviation: np.ndarray
    noise: _Noise
    z_model: np.ndarray  # matched-filter deviation / its standard deviation (noise model)
    z: np.ndarray  # z_model / the local robust scale of z_model: what thresholds apply to
    sigma: float
    columns: np.ndarray
    candidates: list  # (class or None, (y, x), Z, relative change)


def _analyse(image, lattice, geo, config, exclude=None, previous=None, classify=True):
    """One pass: bulk fit, noise model, matched filter, classified candidates (none when not
    `classify`: for a caller that needs only the deviation maps).

    previous: an earlier pass whose column width, column sites and noise model are reused.
    """
    fit = _fit(image, geo, exclude)
    cell_vectors = lattice.cell_vectors
    shortest = np.hypot(*lattice.vectors[0])
    deviation = image - fit.bulk
    template = fit.template
    floor = template.min()
    top = template.max() - floor
    if previous is None:
        sigma = _column_sigma(template, cell_vectors, shortest)
        rough = noise_level(image, fit.bulk)
        per_bin = image.size / template.size
        columns, _ = _template_columns(template, cell_vectors, sigma,
                                       max(0.05 * top, 5 * rough / np.sqrt(per_bin)))
    else:
        sigma, columns = previous.sigma, previous.columns
    noise = _variance_model(deviation, fit.bulk, (1e-4 * top) ** 2 + 1e-12,
                            None if previous is None else previous.noise.coef)
    # zero-padded, renormalised filters: exact noise normalisation up to the edges
    cover = np.outer(*(ndimage.gaussian_filter1d(np.ones(n), sigma, mode="constant")
                       for n in deviation.shape))
    filtered = ndimage.gaussian_filter(deviation.astype(np.float32), sigma, mode="constant")
    filtered /= cover
    z_model = filtered / np.sqrt(_filtered_variance(noise, sigma)) * cover
    variance = noise.variance
    block = int(max(32, round(1.5 * np.hypot(*lattice.vectors[1]))))
    z = z_model / _local_scale(z_model, block, sigma)
    above = fit.bulk - fit.background - floor  # the bulk's own signal above its floor

    k_site, k_free = config.k_site, config.k_free
    candidates = []
    extrema = _extrema(z, min(k_site, k_free), int(np.ceil(1.5 * sigma))) if classify else ()
    for y, x in extrema:
        zv = float(z[y, x])
        if len(columns):
            dist, offset = _nearest_site(geo.cell[:, y, x], columns, cell_vectors)
        else:
            dist, offset = np.inf, np.zeros(2)
        on_site = dist <= config.on_site_sigma * sigma
        k = k_site if on_site else k_free
        if abs(zv) <= _skewed(k, np.sign(zv), _skew_at(variance, noise.cumulant3, y, x, sigma)):
            continue
        if on_site:
            centre = np.array([y, x]) - offset
            rel = float(filtered[y, x] / max(_smoothed_at(above, y, x, sigma), 1e-12))
            label = "vacancy" if zv < 0 and rel <= -config.vacancy_fraction else "substitution"
        else:
            centre, rel = np.array([y, x], float), np.nan
            if zv > 0 and above[y, x] < config.interstitial_bulk_fraction * top:
                label = "interstitial"
            else:
                label = None  # unexplained: a displaced column, a fault, ...
        candidates.append((label, centre, zv, rel))
    return _Pass(fit, deviation, noise, z_model, z, sigma, columns, candidates)


def _two_passes(image, config: PseudoLabelConfig, classify: bool):
    """(image as float64, lattice, geometry, dislocations, final pass): the lattice, then a
    first pass, then a second that leaves the first's candidate defects and the dislocation
    cores out of the bulk fit. Without `classify` the final pass lists no candidates."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"need a 2D image, got shape {image.shape}")
    lattice, envs = _estimate_lattice(image, config.gpa_cells)
    geo = _geometry(image, lattice, envs, config.gpa_cells, config.min_amplitude)
    dislocations = _dislocations(geo, lattice, config.min_amplitude)
    first = _analyse(image, lattice, geo, config)
    # second pass: leave candidate defects out of the template and the background
    exclude = np.zeros(image.shape, bool)
    for _, centre, _, _ in first.candidates:
        _disc(exclude, centre, 2.5 * first.sigma)
    for centre, b in dislocations:
        _disc(exclude, centre, 2 * b)
    result = first
    if exclude.any():
        # the defects also pulled the local phases: refilter with them painted over
        painted = np.where(exclude, first.fit.bulk, image)
        envs = _envelopes(painted, lattice.reflections,
                          config.gpa_cells * _gpa_sigma(lattice.reflections))
        geo_clean = _geometry(image, lattice, envs, config.gpa_cells, config.min_amplitude)
        result = _analyse(image, lattice, geo_clean, config, exclude, previous=first,
                          classify=classify)
    return image, lattice, geo, dislocations, result


def deviation_z(image, config: PseudoLabelConfig = PseudoLabelConfig()) -> np.ndarray:
    """`pseudo_labels(image, config).z` (float32), without the labelling that follows it
    (planar bands, dislocation cores, masks): what a segmenter that reads the teacher's
    deviation map needs of a frame. Raises ValueError as `pseudo_labels` does."""
    return _two_passes(image, config, classify=False)[-1].z.astype(np.float32)


def pseudo_labels(image, config: PseudoLabelConfig = PseudoLabelConfig(),
                  substitution_sign: int = 0) -> PseudoLabels:
    """Pseudo ground truth of one image: deviation from the bulk lattice and defect masks.

    Rules (thresholds in units of the image's own noise, sizes in its own column width):
    - vacancy: a bulk column site whose matched-filter Z < -k_site and that lost more than
      vacancy_fraction of its bulk intensity;
    - substitution: a bulk column site with |Z| > k_site that is not a vacancy (brighter,
      or dimmer by less than vacancy_fraction); with `substitution_sign` +1 only a brighter
      one, with -1 only a dimmer one (`components.materials.Material.substitution_contrast`:
      CdTe's Zn and Se are lighter than the Cd and Te they replace, so a brighter CdTe
      column, such as two columns squeezed together in a dislocation's strain field, is
      none); 0 takes either;
    - interstitial: Z > k_free off every column site, where the bulk rises above its floor
      by less than interstitial_bulk_fraction of the brightest column;
    - dislocation: a net winding of the local Bragg phases (a Burgers circuit that does not
      close), with healthy lattice around it, the core placed among the displaced columns
      next to it (_core); or, where no winding is seen (a core near the edge), a cluster of
      displaced columns (see _displaced_clusters). The mask is the core region, a disc of
      radius |b| (where the strain |b| / (2 pi r) exceeds 1 / (2 pi));
      point-defect candidates within dislocation_absorb |b| are part of the core;
    - stacking_fault, twin_boundary: bands along lattice planes, see _planar.
    Point-defect masks are discs of mask_radius_sigma column sigmas around the column site
    (or the interstitial's position).

    detections: (class, y, x, Z, relative change of the column) per labelled defect; a
    planar defect's (y, x) is the point of its plane nearest the image centre. Raises
    ValueError for an image without a lattice (fewer than two Bragg peaks above the noise);
    the image should hold a few unit cells along each side.
    """
    if substitution_sign not in (-1, 0, 1):
        raise ValueError(f"substitution_sign must be -1, 0 or 1, got {substitution_sign!r}")
    image, lattice, geo, dislocations, result = _two_passes(image, config, classify=True)
    mask = np.zeros((len(DEFECT_CLASSES),) + image.shape, np.uint8)
    detections = []
    planes = _planar(image, result.z_model, geo, lattice, config)
    absorbed = np.zeros(image.shape, bool)  # point-defect candidates here are not labelled
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    for label, normal, c, d, side, (low, high) in planes:
        band = _band(image.shape, normal, c, d)
        mask[class_index(label)] |= band
        s = yy * normal[0] + xx * normal[1]
        # the band, the lines whose deviation the plane explains, and the far side of a
        # twin boundary (another orientation, which the bulk model does not describe)
        absorbed |= band | ((s >= low - d / 2) & (s <= high + d / 2))
        if side:
            absorbed |= side * (s - c) > 0
        # the point of the plane nearest the image centre
        middle = (np.array(image.shape) - 1) / 2.0
        point = middle + (c - middle @ normal) * np.asarray(normal)
        detections.append((label, float(point[0]), float(point[1]), np.nan, np.nan))

    def pixel(centre):
        return tuple(np.clip(np.round(centre).astype(int), 0, np.array(image.shape) - 1))

    def explained(centre, cores):
        near = any(np.hypot(*(centre - c)) < config.dislocation_absorb * b for c, b in cores)
        return near or bool(absorbed[pixel(centre)])

    # a phase singularity on a planar defect's band belongs to the plane (where the fault
    # meets the image edge the phases wind too); partial dislocations are left for later
    cores = [(_core(c, b, result.candidates), b) for c, b in dislocations
             if not absorbed[pixel(c)]]
    cores += _displaced_clusters(result.candidates, lambda c: explained(c, cores), lattice,
                                 config)
    for centre, b in cores:
        _disc(mask[class_index("dislocation")], centre, b)
        detections.append(("dislocation", float(centre[0]), float(centre[1]), np.nan, np.nan))
    radius = config.mask_radius_sigma * result.sigma
    for label, centre, zv, rel in result.candidates:
        if label is None or explained(centre, cores):
            continue
        if label == "substitution" and substitution_sign * zv < 0:
            continue  # a contrast the material's substituents cannot give
        _disc(mask[class_index(label)], centre, radius)
        detections.append((label, float(centre[0]), float(centre[1]), zv, rel))
    lattice = replace(lattice, template=result.fit.template, columns=result.columns,
                      column_sigma=result.sigma)
    return PseudoLabels(
        deviation=result.deviation.astype(np.float32),
        mask=mask,
        lattice=lattice,
        noise=float(np.sqrt(np.median(result.noise.variance))),
        bulk=result.fit.bulk.astype(np.float32),
        z=result.z.astype(np.float32),
        detections=detections,
    )


# ------------------------------------------------------------------------------ quality


def quality(pseudo_mask, true_mask) -> dict:
    """Pixel-wise precision, recall and IoU per defect class.

    Masks are (len(DEFECT_CLASSES), H, W), or stacks (N, C, H, W) whose pixels are pooled.
    A class with neither true nor predicted pixels scores nan throughout (nothing to
    measure); predictions without truth: precision 0, recall nan; truth without
    predictions: precision nan, recall 0. tp, fp, fn are returned for pooling.
    """
    p = np.asarray(pseudo_mask).astype(bool)
    t = np.asarray(true_mask).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    if p.ndim < 3 or p.shape[-3] != len(DEFECT_CLASSES):
        raise ValueError(f"need {len(DEFECT_CLASSES)} channels (C, H, W), got shape {p.shape}")
    axes = tuple(i for i in range(p.ndim) if i != p.ndim - 3)
    tp = np.sum(p & t, axis=axes)
    fp = np.sum(p & ~t, axis=axes)
    fn = np.sum(~p & t, axis=axes)
    out = {}
    for c, name in enumerate(DEFECT_CLASSES):
        a, b, m = int(tp[c]), int(fp[c]), int(fn[c])
        out[name] = {
            "precision": a / (a + b) if a + b else float("nan"),
            "recall": a / (a + m) if a + m else float("nan"),
            "iou": a / (a + b + m) if a + b + m else float("nan"),
            "tp": a,
            "fp": b,
            "fn": m,
        }
    return out
