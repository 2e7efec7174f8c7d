"""How visible are the point defects at all? An ideal observer on the simulator's own images.

    nice -n 19 .venv/bin/python benchmarks/detectability.py [--seed 6161] [--images 300]
        [--size 256] [--draws 200] [--disc-sigmas 3] [--out PATH]
    .venv/bin/python benchmarks/detectability.py --table-only [PATH]

Data: the simulator's default SimulationConfig (only --size can change), for every material
the labels bulk, vacancy, substitution and interstitial (those it declares), --images images
of each (material, label) pair in plan_dataset's balanced order, image i drawn from
seed_for(seed, i). The default seed is used by no pipeline profile nor other benchmark.

Signal and noise. The simulator draws an image's geometry (pixel size, dose, thickness,
rotation, lattice offset, background, scan distortions) from a stream that does not depend
on its label, so with noise off the same seed renders E1, the expected counts of the defect
image, and E0, those of the same crystal without its defects (render_pair). Delta = E1 - E0
is the defects' whole signal; the noise is Poisson plus Gaussian readout noise, variance
V = E0 + readout_noise**2 per pixel (Gaussian approximation, variance of the defect-free
hypothesis). The prewhitened matched filter of one defect column j, the signal known
exactly and its place known, has the signal-to-noise ratio

    d_j = sqrt(sum over a disc of Delta**2 / V),

the disc of --disc-sigmas probe sigmas (probe_sigma_pm / the image's pixel size) round the
column's place in the image (its specimen position moved by the scan line's shift). d_max
is the image's strongest defect column, the one a classifier has to see.

Ideal scanning observer. A defect can be at any of M candidate sites: the columns of the
class's candidate kinds (vacancy: SrTiO3 Sr and TiO, CdTe Cd and Te; substitution: the same;
interstitial: the interstitial sites, as many per cell as columns in both materials) inside
the simulator's defect margin, counted on each image. The observer computes each site's
statistic in the defect's direction (dimmer for a vacancy, dimmer or brighter for a
substitution as the substituent is lighter or heavier, brighter for an interstitial) and
decides on the largest: in a bulk image that is the maximum of M independent N(0, 1), in a
defect image the same with the defect columns' statistics moved up by their d_j. Monte
Carlo (numpy, one Generator seeded from --seed per material and class): --draws draws per
image; the threshold that maximises the balanced accuracy between the material's bulk
images (their own M) and the class's images is chosen on one set of draws and scored on
an independent second set. Reported per class: that balanced accuracy, the observer's false
alarm and detection rates, the share of defect images whose d_max lies below the threshold
(their strongest column is more likely missed than seen), and a strict bound: the same
balanced accuracy for an oracle that is told where the defects would be and what they look
like, mean Phi(sqrt(sum_j d_j**2) / 2) over the class's images. The maximum over sites is
the standard scanning detector, close to but not exactly the Bayes-optimal test for a
signal at an unknown one of M places.

Accuracy ceiling, per material, in the classifier's setting (each of the material's K labels
equally likely, applicable_labels): every class that cannot be confused with bulk is taken
as perfect, each point class c is confused with bulk at the observer's rate, so
accuracy <= 1 - (2 / K) * sum_c (1 - balanced_accuracy_c) (a classifier's false alarms
"c" on bulk images and its misses of c, summed over c, are at least the observers' balanced
errors times two; each image has prior 1 / K). It is an upper bound: extended defects,
confusions between defect classes and imperfect models only lower the accuracy. Given for
the scanning observer and for the oracle, beside the paper's accuracy, each with a 95 %
percentile interval over bootstrap resamples of the images (bulk images resampled once for
all classes of a material, thresholds kept), and the share of resamples whose scanning
ceiling exceeds the paper's accuracy.

Teacher. components.pseudo_labels.lattice.pseudo_labels on the noisy image of the same seed
(the default config): its detection rate of a class is the share of the class's images with
any detection of that class, its false-alarm rate the share of bulk images with one. Its
matched-filter Z (PseudoLabels.z) at each true defect column, in the defect's direction, is
set beside d_j; on the bulk images, its most extreme Z over the candidate sites beside the
observer's noise-only maximum.

By dose: the images in three log-spaced bins of the configured dose range (as
pseudo_label_quality.py), and the dose at which the share of a class's images with d_max at or
above the observer's threshold reaches 50 % and 90 %. For that, each image's d_j is recomputed
at every dose of a log grid (Delta and E0 scale with the dose, the readout noise does not;
everything else keeps its drawn value), so each point of the curve uses all images: the
curve is the detectability at that dose averaged over the other parameters' default ranges.
The grid spans 0.1x the lowest to 10x the highest configured dose; doses outside the
configured range are marked as such.

--table-only prints the Markdown tables (for the README) from an existing JSON file.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy loads BLAS

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy.special import ndtr, ndtri  # noqa: E402

from components.defects import BULK_LABEL  # noqa: E402
from components.materials import get_material  # noqa: E402
from components.pseudo_labels.lattice import PseudoLabelConfig, pseudo_labels  # noqa: E402
from components.synthesis.simulator import (  # noqa: E402
    SimulationConfig,
    applicable_labels,
    plan_dataset,
    seed_for,
    simulate_image,
)
from machine import (calibration, dose_bin, dose_edges, fmt, git_commit,  # noqa: E402  (benchmarks/machine.py)
                     print_tables, write_report)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "detectability.json")
MATERIALS = ("SrTiO3", "CdTe")
POINT_CLASSES = ("vacancy", "substitution", "interstitial")
PAPER_ACCURACY = {"SrTiO3": 0.94, "CdTe": 0.993}  # the paper's classifier test accuracy
DEFAULT_SEED = 6161  # no pipeline profile (20261125) nor other benchmark (4242, 5151) uses it
_MC_TAG = 0x49444F  # "IDO": keeps the observer's Monte Carlo apart from the image seeds
RATES = (0.5, 0.9)  # detection rates whose dose is reported
GRID_SPAN = 10.0  # the dose grid reaches this factor beyond each end of the dose range
BOOTSTRAP = 2000  # resamples of the images for the ceilings' 95 % intervals


# ------------------------------------------------------------------------------ signal


def render_pair(material: str, label: str, seed, config: SimulationConfig):
    """Noise-free (defect image, defect-free image) of one seed: E1 and E0 of one geometry."""
    quiet = dataclasses.replace(config, noise=False)
    return (simulate_image(material, label, seed, quiet),
            simulate_image(material, BULK_LABEL, seed, quiet))


def defect_discs(sim, config: SimulationConfig, disc_sigmas: float) -> list:
    """Boolean (H, W) disc round each defect of `sim` where it appears in the image.

    Scan line y shows the specimen shifted by scan_shift_px[y] along x, so a column at
    specimen (y0, x0) is centred on x0 + shift[y] in row y.
    """
    size = sim.image.shape[0]
    radius = disc_sigmas * config.probe_sigma_pm / sim.pixel_size_pm
    rows = np.arange(size, dtype=np.float64)[:, None]
    cols = np.arange(size, dtype=np.float64)[None, :]
    shift = np.asarray(sim.scan_shift_px)[:, None]
    return [(cols - shift - x0) ** 2 + (rows - y0) ** 2 <= radius**2
            for y0, x0 in sim.defect_positions]


def column_snr(delta, e0, readout_noise: float, discs, scale: float = 1.0) -> np.ndarray:
    """d_j = sqrt(sum_disc Delta^2 / V) per disc, V = E0 + readout^2; at `scale` x the dose.

    Delta and E0 grow with the dose, the readout noise does not: at k times the dose
    d_j^2 = sum (k Delta)^2 / (k E0 + r^2).
    """
    delta = np.asarray(delta, dtype=np.float64)
    e0 = np.asarray(e0, dtype=np.float64)
    return np.array([np.sqrt(np.sum((scale * delta[m]) ** 2
                                    / (scale * e0[m] + readout_noise**2))) for m in discs])


def snr_at_scale(pixels: list, readout_noise: float, scale) -> np.ndarray:
    """d_j at each of `scale` (array) times the rendered dose, from per-disc (Delta, E0)."""
    k = np.atleast_1d(np.asarray(scale, dtype=np.float64))[:, None]
    return np.stack([np.sqrt(np.sum((k * dl) ** 2 / (k * e + readout_noise**2), axis=1))
                     for dl, e in pixels], axis=1)  # (scales, defects)


def search_sites(bulk_sim, label: str, config: SimulationConfig) -> dict:
    """Candidate sites of a `label` defect in the image of `bulk_sim` (a defect-free render).

    all: bulk columns inside the image; search: the columns where the simulator can put a
    `label` defect (its candidate kinds, inside the defect margin). Interstitial sites are
    not in the simulator's output; both materials have as many per cell as columns, so
    their count is the columns' count inside the margin, scaled by that ratio.
    """
    crystal = get_material(bulk_sim.material)
    size = bulk_sim.image.shape[0]
    pos = np.asarray(bulk_sim.column_positions)
    inside = np.all((pos >= 0) & (pos <= size - 1), axis=1)
    lo, hi = config.defect_margin_px, size - 1 - config.defect_margin_px
    inner = np.all((pos >= lo) & (pos <= hi), axis=1)
    if label == "vacancy":
        search = int(np.sum(inner & np.isin(bulk_sim.column_names, crystal.vacancy_columns)))
    elif label == "substitution":
        kinds = [c for c, _ in crystal.substituents]
        search = int(np.sum(inner & np.isin(bulk_sim.column_names, kinds)))
    elif label == "interstitial":
        search = int(round(np.sum(inner) * len(crystal.interstitials) / len(crystal.columns)))
    else:
        raise ValueError(f"not a point-defect class: {label!r}")
    return {"all": int(np.sum(inside)), "search": search}


# ---------------------------------------------------------------------------- observer


def _max_of_nulls(n: np.ndarray, draws: int, rng) -> np.ndarray:
    """(len(n), draws) maxima of n[i] independent N(0, 1); -inf where n[i] is 0.

    Inverse CDF of the maximum: P(max < t) = Phi(t)^n, so max = -ndtri(1 - U^(1/n)),
    with 1 - U^(1/n) = -expm1(log(U) / n) to keep the far tail exact.
    """
    n = np.asarray(n, dtype=np.float64)[:, None]
    u = rng.random((n.shape[0], draws))
    with np.errstate(divide="ignore"):
        q = -np.expm1(np.log(u) / n)
        return np.where(n > 0, -ndtri(q), -np.inf)


def sample_statistic(sites, snrs, draws: int, rng) -> np.ndarray:
    """(images, draws) decision statistic: max over an image's `sites` unit-variance site
    statistics, of which those of its defects (`snrs[i]`, one d_j each; empty for a bulk
    image) are moved up by d_j."""
    sites = np.asarray(sites)
    counts = np.array([len(s) for s in snrs])
    if np.any(counts > sites):
        raise ValueError("more defects than sites")
    out = _max_of_nulls(sites - counts, draws, rng)
    for i, d in enumerate(snrs):
        if len(d):
            shifted = np.asarray(d, dtype=np.float64)[:, None] + rng.standard_normal(
                (len(d), draws))
            out[i] = np.maximum(out[i], shifted.max(axis=0))
    return out


def best_threshold(null: np.ndarray, alt: np.ndarray) -> tuple[float, float]:
    """(t, balanced accuracy) maximising (P(null < t) + P(alt >= t)) / 2 over samples.

    The accuracy is a step function of t, constant on (c[k-1], c[k]] between sorted sample
    values c. Where several steps tie (samples that separate completely), t is the lowest:
    the middle of the first best step, just above the null samples it has to beat, so the
    threshold is set by the noise and not by where the weakest defect happens to lie.
    """
    null, alt = np.sort(np.ravel(null)), np.sort(np.ravel(alt))
    cand = np.unique(np.concatenate([null, alt]))
    cand = cand[np.isfinite(cand)]
    if not len(cand):
        return 0.0, 0.5
    spec = np.searchsorted(null, cand, side="left") / len(null)
    sens = 1.0 - np.searchsorted(alt, cand, side="left") / len(alt)
    ba = 0.5 * (spec + sens)
    first = int(np.argmax(ba))
    t = cand[first] if first == 0 else 0.5 * (cand[first - 1] + cand[first])
    return float(t), float(ba[first])


def scanning_observer(null_sites, alt_sites, alt_snrs, draws: int, rng) -> dict:
    """The ideal scanning observer, bulk images (null_sites each) against defect images.

    The threshold is chosen on one set of `draws` draws per image and scored on a second,
    independent set; per_image_detection is each defect image's P(statistic >= t),
    per_bulk_image_false_alarm each bulk image's.
    """
    empty = [()] * len(null_sites)
    fit_null = sample_statistic(null_sites, empty, draws, rng)
    fit_alt = sample_statistic(alt_sites, alt_snrs, draws, rng)
    t, fit_ba = best_threshold(fit_null, fit_alt)
    null = sample_statistic(null_sites, empty, draws, rng)
    alt = sample_statistic(alt_sites, alt_snrs, draws, rng)
    per_bulk = np.mean(null >= t, axis=1)
    false_alarm = float(np.mean(per_bulk))
    per_image = np.mean(alt >= t, axis=1)
    return {
        "threshold": t,
        "balanced_accuracy": 0.5 * (1.0 - false_alarm + float(np.mean(per_image))),
        "balanced_accuracy_on_fit_draws": fit_ba,
        "false_alarm_rate": false_alarm,
        "detection_rate": float(np.mean(per_image)),
        "per_image_detection": per_image,
        "per_bulk_image_false_alarm": per_bulk,
        "null_max_median": float(np.median(null)),
    }


def oracle_per_image(snrs) -> np.ndarray:
    """Phi(|d| / 2) per image: bulk vs defect with places and signals known."""
    return np.array([ndtr(np.sqrt(np.sum(np.square(d))) / 2) for d in snrs])


def oracle_balanced_accuracy(snrs) -> float:
    """Mean Phi(|d| / 2) over the images: the oracle's balanced accuracy."""
    return float(np.mean(oracle_per_image(snrs)))


def bootstrap_ceiling(false_alarm: dict, detection: dict, oracle: dict, num_labels: int,
                      replicates: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Ceilings (scanning, oracle) of `replicates` bootstrap resamples of the images.

    false_alarm[c]: per bulk image (one bulk set, resampled once for all classes);
    detection[c], oracle[c]: per image of class c. The thresholds stay as chosen.
    """
    classes = list(detection)
    if not classes:
        return np.array([]), np.array([])
    nb = len(next(iter(false_alarm.values())))
    bulk = rng.integers(nb, size=(replicates, nb))
    scanning, best = np.zeros(replicates), np.zeros(replicates)
    for c in classes:
        pick = rng.integers(len(detection[c]), size=(replicates, len(detection[c])))
        ba = 0.5 * (1 - false_alarm[c][bulk].mean(axis=1) + detection[c][pick].mean(axis=1))
        scanning += 1 - ba
        best += 1 - oracle[c][pick].mean(axis=1)
    return 1 - 2 / num_labels * scanning, 1 - 2 / num_labels * best


def accuracy_ceiling(balanced_accuracies: dict, num_labels: int) -> float:
    """1 - (2 / K) sum_c (1 - BA_c): the best accuracy over K equally likely labels when each
    class c can be told from bulk no better than BA_c and everything else is perfect."""
    return 1.0 - 2.0 / num_labels * sum(1.0 - ba for ba in balanced_accuracies.values())


def dose_for_rate(doses: np.ndarray, rates: np.ndarray, target: float):
    """First dose of the (increasing) grid where `rates` reaches target, interpolated
    linearly in log dose between grid points; None when it never does."""
    above = np.flatnonzero(np.asarray(rates) >= target)
    if not len(above):
        return None
    k = int(above[0])
    if k == 0:
        return float(doses[0])
    r0, r1 = rates[k - 1], rates[k]
    f = (target - r0) / (r1 - r0)
    return float(np.exp(np.log(doses[k - 1]) + f * (np.log(doses[k]) - np.log(doses[k - 1]))))


# ------------------------------------------------------------------------------ teacher


def _z_at(z: np.ndarray, sim, y0: float, x0: float) -> float:
    """The teacher's Z at the image pixel where specimen point (y0, x0) appears."""
    size = z.shape[0]
    r = int(np.clip(np.rint(y0), 0, size - 1))
    c = int(np.clip(np.rint(x0 + sim.scan_shift_px[r]), 0, size - 1))
    return float(z[r, c])


def _teacher(image):
    try:
        return pseudo_labels(image, PseudoLabelConfig()), None
    except ValueError as exc:  # no lattice found: no detection
        return None, str(exc)


# -------------------------------------------------------------------------------- study


def measure(seed: int, images: int, config: SimulationConfig, materials, disc_sigmas: float,
            edges: np.ndarray, progress: bool = True) -> tuple[list, dict]:
    """Per-image records, and per defect image its disc pixels (Delta, E0) for the dose grid."""
    labels = (BULK_LABEL,) + POINT_CLASSES
    pairs = sum(len([lab for lab in applicable_labels(m) if lab in labels]) for m in materials)
    plan = plan_dataset(images * pairs, materials, seed, labels)
    records, pixels = [], {}
    start = time.perf_counter()
    for n, (index, material, label, _) in enumerate(plan):
        seq = seed_for(seed, index)
        e1, e0 = render_pair(material, label, seq, config)
        noisy = simulate_image(material, label, seq, config)
        result, error = _teacher(noisy.image)
        detections = [] if result is None else result.detections
        classes = [c for c in POINT_CLASSES if c in applicable_labels(material)]
        sites = {c: search_sites(e0, c, config) for c in classes}
        record = {
            "index": index,
            "seed": [seed, index],
            "material": material,
            "label": label,
            "dose": round(e1.dose, 1),
            "dose_bin": dose_bin(e1.dose, edges),
            "thickness_nm": round(e1.thickness_nm, 2),
            "pixel_size_pm": round(e1.pixel_size_pm, 3),
            "sites_all": sites[classes[0]]["all"],
            "sites_search": {c: s["search"] for c, s in sites.items()},
            "teacher_flagged": sorted({d[0] for d in detections}),
            "teacher_error": error,
        }
        if label == BULK_LABEL:
            # The teacher's most extreme Z over the candidate columns, in both directions.
            lo, hi = config.defect_margin_px, config.size - 1 - config.defect_margin_px
            pos = np.asarray(e0.column_positions)
            inner = np.all((pos >= lo) & (pos <= hi), axis=1)
            crystal = get_material(material)
            kinds = set(crystal.vacancy_columns) | {c for c, _ in crystal.substituents}
            zs = (np.array([_z_at(result.z, e0, y, x) for (y, x), name in
                            zip(pos[inner], np.asarray(e0.column_names)[inner]) if name in kinds])
                  if result is not None else np.array([]))
            record["teacher_site_z_min"] = round(float(zs.min()), 3) if len(zs) else None
            record["teacher_site_z_max"] = round(float(zs.max()), 3) if len(zs) else None
            record["teacher_site_count"] = int(len(zs))
            record["teacher_site_z_std"] = round(float(zs.std()), 4) if len(zs) > 1 else None
        else:
            assert (e1.dose, e1.pixel_size_pm) == (e0.dose, e0.pixel_size_pm)
            delta = e1.image.astype(np.float64) - e0.image.astype(np.float64)
            discs = defect_discs(e1, config, disc_sigmas)
            d = column_snr(delta, e0.image, config.readout_noise, discs)
            sign = np.array([np.sign(delta[m].sum()) or 1.0 for m in discs])
            z = ([sign[j] * _z_at(result.z, e1, *e1.defect_positions[j]) for j in range(len(d))]
                 if result is not None else [None] * len(d))
            record.update({
                "defects": len(d),
                "d": [round(float(v), 3) for v in d],
                "d_max": round(float(d.max()), 3),
                "brighter": [bool(s > 0) for s in sign],
                "teacher_z_at_defect": [None if v is None else round(v, 3) for v in z],
                "teacher_detected": label in record["teacher_flagged"],
                "delta_share_in_discs": round(float(
                    np.sum(delta[np.any(discs, axis=0)] ** 2) / max(np.sum(delta**2), 1e-300)),
                    5),
            })
            pixels[index] = (e1.dose, [(delta[m], e0.image[m].astype(np.float64)) for m in discs])
        records.append(record)
        if progress and (n + 1) % 100 == 0:
            print(f"  {n + 1}/{len(plan)} images, {time.perf_counter() - start:.0f} s", flush=True)
    return records, pixels


def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def analyse(records: list, pixels: dict, materials, config: SimulationConfig, seed: int,
            draws: int, edges: np.ndarray) -> dict:
    """Observer, teacher and ceiling per material and class (see the module docstring)."""
    grid = np.geomspace(config.dose[0] / GRID_SPAN, config.dose[1] * GRID_SPAN, 161)
    out = {}
    for mi, material in enumerate(materials):
        bulk = [r for r in records if r["material"] == material and r["label"] == BULK_LABEL]
        classes = [c for c in POINT_CLASSES if c in applicable_labels(material)]
        per_class, fa_images, det_images, oracle_images = {}, {}, {}, {}
        for c in classes:
            group = [r for r in records if r["material"] == material and r["label"] == c]
            if not group or not bulk:
                continue
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                [seed, _MC_TAG, mi, POINT_CLASSES.index(c)])))
            snrs = [r["d"] for r in group]
            obs = scanning_observer([r["sites_search"][c] for r in bulk],
                                    [r["sites_search"][c] for r in group], snrs, draws, rng)
            t = obs["threshold"]
            fa_images[c], det_images[c] = obs["per_bulk_image_false_alarm"], \
                obs["per_image_detection"]
            oracle_images[c] = oracle_per_image(snrs)
            for r, p in zip(group, obs["per_image_detection"]):
                r["ideal_detection_probability"] = round(float(p), 4)
            d_max = np.array([r["d_max"] for r in group])
            # the detectability curve over dose: every image at every grid dose
            curve = np.array([
                snr_at_scale(pixels[r["index"]][1], config.readout_noise,
                             grid / pixels[r["index"]][0]).max(axis=1) >= t
                for r in group]).mean(axis=0)
            dose_at = {}
            for rate in RATES:
                dose = dose_for_rate(grid, curve, rate)
                dose_at[f"{round(100 * rate)}%"] = {
                    "dose": dose,
                    "in_configured_range": None if dose is None
                    else bool(config.dose[0] <= dose <= config.dose[1]),
                }
            z_pairs = [(dj, zj) for r in group for dj, zj in zip(r["d"], r["teacher_z_at_defect"])
                       if zj is not None]
            strong = [zj / dj for dj, zj in z_pairs if dj >= 3]
            corr = (float(np.corrcoef(np.array(z_pairs).T)[0, 1]) if len(z_pairs) > 2 else None)
            by_dose = []
            for b in range(len(edges) - 1):
                part = [r for r in group if r["dose_bin"] == b]
                entry = {"dose_range": [float(edges[b]), float(edges[b + 1])],
                         "images": len(part)}
                if part:
                    det = float(np.mean([r["ideal_detection_probability"] for r in part]))
                    entry.update({
                        "d_max_median": _median([r["d_max"] for r in part]),
                        "share_below_threshold": float(np.mean([r["d_max"] < t for r in part])),
                        "ideal_detection_rate": det,
                        "ideal_balanced_accuracy": 0.5 * (1 - obs["false_alarm_rate"] + det),
                        "teacher_detection_rate": float(np.mean([r["teacher_detected"]
                                                                 for r in part])),
                    })
                by_dose.append(entry)
            per_class[c] = {
                "images": len(group),
                "bulk_images": len(bulk),
                "defects_per_image_mean": float(np.mean([r["defects"] for r in group])),
                "sites_search_median": _median([r["sites_search"][c] for r in group]),
                "d_max_median": float(np.median(d_max)),
                "d_max_quartiles": [float(q) for q in np.percentile(d_max, [25, 75])],
                "threshold": t,
                "share_below_threshold": float(np.mean(d_max < t)),
                "ideal_balanced_accuracy": obs["balanced_accuracy"],
                "ideal_balanced_accuracy_on_fit_draws": obs["balanced_accuracy_on_fit_draws"],
                "ideal_false_alarm_rate": obs["false_alarm_rate"],
                "ideal_detection_rate": obs["detection_rate"],
                "null_max_median": obs["null_max_median"],
                "oracle_balanced_accuracy": oracle_balanced_accuracy(snrs),
                "teacher_detection_rate": float(np.mean([r["teacher_detected"] for r in group])),
                "teacher_false_alarm_rate": float(np.mean([c in r["teacher_flagged"]
                                                           for r in bulk])),
                "teacher_z_over_d_median": _median(strong),
                "teacher_z_over_d_defects": len(strong),
                "teacher_z_d_correlation": corr,
                "delta_share_in_discs_min": float(min(r["delta_share_in_discs"] for r in group)),
                "dose_for_detection": dose_at,
                "by_dose": by_dose,
            }
        num_labels = len(applicable_labels(material))
        ideal = {c: v["ideal_balanced_accuracy"] for c, v in per_class.items()}
        oracle = {c: v["oracle_balanced_accuracy"] for c, v in per_class.items()}
        boot_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [seed, _MC_TAG, mi, len(POINT_CLASSES)])))
        boot, boot_oracle = bootstrap_ceiling(fa_images, det_images, oracle_images, num_labels,
                                              BOOTSTRAP, boot_rng)
        paper = PAPER_ACCURACY.get(material)

        def interval(values):
            return [float(v) for v in np.percentile(values, [2.5, 97.5])] if len(values) \
                else None

        out[material] = {
            "labels": list(applicable_labels(material)),
            "num_labels": num_labels,
            "accuracy_ceiling": accuracy_ceiling(ideal, num_labels) if ideal else None,
            "accuracy_ceiling_oracle": accuracy_ceiling(oracle, num_labels) if oracle else None,
            "accuracy_ceiling_95": interval(boot),
            "accuracy_ceiling_oracle_95": interval(boot_oracle),
            "bootstrap_share_ceiling_above_paper": None if paper is None or not len(boot)
            else float(np.mean(boot > paper)),
            "paper_accuracy": paper,
            "bulk_images": len(bulk),
            "teacher_bulk_site_z_min_median": _median([r["teacher_site_z_min"] for r in bulk]),
            "teacher_bulk_site_z_max_median": _median([r["teacher_site_z_max"] for r in bulk]),
            "teacher_bulk_site_count_median": _median([r["teacher_site_count"] for r in bulk]),
            "teacher_bulk_site_z_std_median": _median([r["teacher_site_z_std"] for r in bulk]),
            "sites_all_median": _median([r["sites_all"] for r in bulk]),
            "per_class": per_class,
        }
    return out


CEILING_NOTE = ("upper bound: extended defects, confusions between defect classes and "
                "imperfect models only lower it; 'scanning' uses the max-over-sites observer, "
                "'oracle' one told where the defects would be (strict under the Gaussian "
                "noise approximation)")


def build_report(seed, images, size, draws, disc_sigmas, bins=3, materials=MATERIALS,
                 progress=True) -> dict:
    config = SimulationConfig(size=size)
    edges = dose_edges(config, bins)
    started = time.perf_counter()
    before = calibration()
    records, pixels = measure(seed, images, config, tuple(materials), disc_sigmas, edges,
                              progress)
    by_material = analyse(records, pixels, tuple(materials), config, seed, draws, edges)
    report = {
        "description": "ideal-observer detectability of point defects in the simulator's "
                       "images, the accuracy ceiling it implies, and the teacher beside it",
        "settings": {
            "seed": seed,
            "image_seeds": "numpy SeedSequence([seed, index]), plan_dataset order",
            "monte_carlo_seeds": f"numpy SeedSequence([seed, {_MC_TAG}, material index, "
                                 f"class index])",
            "images_per_class": images,
            "materials": list(materials),
            "labels": [BULK_LABEL, *POINT_CLASSES],
            "size": size,
            "draws_per_image": draws,
            "bootstrap_resamples": BOOTSTRAP,
            "disc_radius_probe_sigmas": disc_sigmas,
            "dose_bin_edges": [float(e) for e in edges],
            "dose_grid": [float(config.dose[0] / GRID_SPAN), float(config.dose[1] * GRID_SPAN)],
            "simulation_config": dataclasses.asdict(config),
            "pseudo_label_config": dataclasses.asdict(PseudoLabelConfig()),
            **git_commit(),
        },
        "ceiling_note": CEILING_NOTE,
        "calibration_before": before,
        "by_material": by_material,
        "calibration_after": calibration(),
    }
    report["wall_s"] = time.perf_counter() - started
    report["images"] = records
    return report


# ------------------------------------------------------------------------------- tables


def _dose(entry) -> str:
    if entry["dose"] is None:
        return "never"
    text = f"{entry['dose']:.0f}"
    return text if entry["in_configured_range"] else f"({text})"


def tables(report: dict) -> str:
    s = report["settings"]
    sc = s["simulation_config"]
    lines = [
        f"Ideal-observer detectability: {s['images_per_class']} images per material and label "
        f"(bulk and the point defects), {s['size']} x {s['size']}, the simulator's default "
        f"ranges (dose {sc['dose'][0]:.0f}–{sc['dose'][1]:.0f} e/Å² log-uniform, thickness "
        f"{sc['thickness_nm'][0]:g}–{sc['thickness_nm'][1]:g} nm), seed {s['seed']}. "
        f"d_max: the strongest defect column's matched-filter SNR, sqrt(sum (E1 - E0)² / "
        f"(E0 + readout²)) over a disc of {s['disc_radius_probe_sigmas']:g} probe sigmas, "
        f"E1 and E0 the noise-free renders of one seed with and without the defects. The "
        f"scanning observer takes the largest of M unit-variance site statistics (M: the "
        f"class's candidate sites inside the defect margin), the defects' moved up by their "
        f"d; its threshold maximises the balanced accuracy against the material's bulk "
        f"images (chosen on {s['draws_per_image']} Monte Carlo draws per image, scored on as "
        f"many others). Below: share of images whose d_max is under that threshold. Oracle: "
        f"told where the defects would be. Teacher: the lattice pseudo-labeller on the noisy "
        f"image of the same seed (any detection of the class; false alarms on bulk images).",
        "",
        "| material | class | M | median d_max | below | scanning BA | oracle BA "
        "| observer FA / det | teacher FA / det | teacher Z / d |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for material, m in report["by_material"].items():
        for c, v in m["per_class"].items():
            lines.append(
                f"| {material} | {c} | {v['sites_search_median']:.0f} | "
                f"{v['d_max_median']:.1f} | {fmt(v['share_below_threshold'], 3)} | "
                f"{fmt(v['ideal_balanced_accuracy'], 3)} | {fmt(v['oracle_balanced_accuracy'], 3)}"
                f" | {fmt(v['ideal_false_alarm_rate'], 3)} / {fmt(v['ideal_detection_rate'], 3)}"
                f" | {fmt(v['teacher_false_alarm_rate'], 3)} / "
                f"{fmt(v['teacher_detection_rate'], 3)} | {fmt(v['teacher_z_over_d_median'])} |")
    lines += ["", "Accuracy ceiling per material (K equally likely labels; every class not "
              "confusable with bulk taken as perfect, each point class c confused with bulk at "
              "the observer's rate: 1 - (2/K) Σ_c (1 - BA_c)). An " + CEILING_NOTE + ". 95 %: "
              f"percentile interval over {s['bootstrap_resamples']} bootstrap resamples of the "
              "images "
              "(thresholds kept); P(ceiling > paper): share of the resamples above the "
              "paper's accuracy.", "",
              "| material | K | ceiling (scanning) | 95 % | ceiling (oracle) | 95 % | paper "
              "| P(ceiling > paper) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def interval(v):
        return "–" if v is None else f"{v[0]:.3f}–{v[1]:.3f}"

    for material, m in report["by_material"].items():
        lines.append(f"| {material} | {m['num_labels']} | {fmt(m['accuracy_ceiling'], 3)} | "
                     f"{interval(m['accuracy_ceiling_95'])} | "
                     f"{fmt(m['accuracy_ceiling_oracle'], 3)} | "
                     f"{interval(m['accuracy_ceiling_oracle_95'])} | "
                     f"{fmt(m['paper_accuracy'], 3)} | "
                     f"{fmt(m['bootstrap_share_ceiling_above_paper'])} |")
    edges = s["dose_bin_edges"]
    lines += ["", "By dose (e/Å²): median d_max, share below the threshold, the observer's "
              "detection rate at its one threshold, the teacher's detection rate; and the dose "
              "at which 50 % and 90 % of the class's images have d_max at or above the "
              "threshold (each image recomputed at every dose of a grid, the other parameters "
              "as drawn; in parentheses: outside the configured dose range).", "",
              "| material | class | " + " | ".join(
                  f"{lo:.0f}–{hi:.0f}: d / below / det / teacher"
                  for lo, hi in zip(edges[:-1], edges[1:])) + " | dose 50 % | dose 90 % |",
              "| --- | --- | " + " | ".join("---" for _ in edges[:-1]) + " | --- | --- |"]
    for material, m in report["by_material"].items():
        for c, v in m["per_class"].items():
            cells = []
            for b in v["by_dose"]:
                if not b["images"]:
                    cells.append("–")
                    continue
                cells.append(f"{b['d_max_median']:.1f} / {b['share_below_threshold']:.2f} / "
                             f"{b['ideal_detection_rate']:.2f} / {b['teacher_detection_rate']:.2f}")
            dose = v["dose_for_detection"]
            lines.append(f"| {material} | {c} | " + " | ".join(cells)
                         + f" | {_dose(dose['50%'])} | {_dose(dose['90%'])} |")
    lines += ["", "Noise alone: median over bulk images of the observer's largest site "
              "statistic, and of the teacher's most extreme Z over the vacancy/substitution "
              "candidate columns (min / max) and the standard deviation of its Z over them (1 "
              "for a unit-variance statistic).", "",
              "| material | M (all columns) | observer max (vacancy sites) | teacher Z min / max "
              "| teacher Z std |",
              "| --- | --- | --- | --- | --- |"]
    for material, m in report["by_material"].items():
        vac = m["per_class"].get("vacancy", {})
        lines.append(f"| {material} | {m['sites_all_median']:.0f} | "
                     f"{fmt(vac.get('null_max_median'))} | "
                     f"{fmt(m['teacher_bulk_site_z_min_median'])} / "
                     f"{fmt(m['teacher_bulk_site_z_max_median'])} | "
                     f"{fmt(m['teacher_bulk_site_z_std_median'])} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--images", type=int, default=300,
                        help="images per (material, label) pair, bulk included")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--draws", type=int, default=200,
                        help="Monte Carlo draws per image (twice: threshold, then score)")
    parser.add_argument("--disc-sigmas", type=float, default=3.0,
                        help="radius of the matched-filter disc, in probe sigmas")
    parser.add_argument("--dose-bins", type=int, default=3,
                        help="log-spaced bins over the simulator's dose range")
    parser.add_argument("--materials", nargs="+", default=list(MATERIALS))
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--table-only", nargs="?", const=RESULTS, default=None, metavar="PATH",
                        help="print the Markdown tables from an existing JSON and exit")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if args.table_only is not None:
        return print_tables(args.table_only, tables)
    if args.images < 1 or args.draws < 1 or args.dose_bins < 1 or args.disc_sigmas <= 0:
        parser.error("--images, --draws, --dose-bins and --disc-sigmas must be positive")

    report = build_report(args.seed, args.images, args.size, args.draws, args.disc_sigmas,
                          args.dose_bins, args.materials, progress=not args.quiet)
    write_report(report, args.out)
    if not args.quiet:
        print(tables(report))
        print(f"\nwall time {report['wall_s']:.1f} s; results in {args.out}")
    return report


if __name__ == "__main__":
    main()
