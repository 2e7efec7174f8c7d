"""k-means over image descriptors with k chosen by the silhouette score, and its read-outs.

Descriptors are standardised first (they mix counts, fractions and sigmas, and k-means
measures plain Euclidean distance), and each standardised value is clipped to +-`clip`
(OUTLIER_CLIP): k-means pays for a distance squared, so one image far out on one
descriptor otherwise earns a cluster of its own (the paper run of session 12: 1 of 2,000
images at 20-44 sigma on four descriptors took the eighth of k = 8; with k up to 14 the
silhouette kept rising to k = 14, ARI 0.75; clipped at 3 it peaked at k = 8 with no
cluster under 53 images, ARI 0.88). A class's own signature stays: a descriptor that only
1 image in 14 has lies about 3.6 sigma out. For each k of the range, k-means runs exactly (Lloyd,
several starts) up to `minibatch_above` rows and as mini-batch k-means beyond. Mini-batch is
cheaper but can settle in a worse partition: in benchmarks/clustering_scale.py (100,000 rows)
exact k-means took ~30 s for k = 2..10 on 2 cores and recovered all 7 generating components,
the mini-batch path ~4 s and merged them into 4. The silhouette, quadratic in the rows it sees,
is scored on one fixed random sample for every k, so scores of different k compare. The k with
the highest silhouette wins; on a tie the smaller k (the simpler description).

Every random step takes `seed`: the same descriptors in the same order give the same result.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import sklearn
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from components.progress import Progress

MINIBATCH_SIZE = 4096  # rows per mini-batch step: large enough for stable centres
# Exact k-means up to this many rows: at 100,000 it took ~50 s for k = 2..10 on 2 cores and
# found the generating k, where mini-batch merged clusters (benchmarks/clustering_scale.py).
MINIBATCH_ABOVE = 200_000
# Distance-matrix chunk for the silhouette. scikit-learn's default (1 GiB) made a 10,000-row
# silhouette peak at ~870 MB and run 3x slower than 128 MiB chunks did.
SILHOUETTE_WORKING_MEMORY_MIB = 128
OUTLIER_CLIP = 3.0  # standardised descriptor values are clipped to +- this; None: no clip


def _finite_matrix(X, what: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty (N, D) matrix, got shape {X.shape}")
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad.size:
        raise ValueError(f"{bad.size} of {X.shape[0]} {what} rows hold NaN or inf "
                         f"(first: rows {bad[:5].tolist()})")
    return X


def standardise(X: np.ndarray, clip: Optional[float] = OUTLIER_CLIP
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Z, mean, scale) with Z = (X - mean) / scale per column, clipped to +-`clip` (None: not
    clipped). A column with no spread (to rounding) gets scale 1 and Z exactly 0: it cannot
    tell rows apart, and dividing rounding noise by ~0 would make it the loudest column."""
    if clip is not None and not float(clip) > 0:
        raise ValueError(f"clip must be a positive number of standard deviations or None, got {clip!r}")
    X = _finite_matrix(X, "descriptor")
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    flat = scale <= 1e-12 * np.maximum(1.0, np.abs(mean))
    scale[flat] = 1.0
    Z = (X - mean) / scale
    Z[:, flat] = 0.0
    if clip is not None:
        np.clip(Z, -clip, clip, out=Z)
    return Z, mean, scale


@dataclasses.dataclass
class ClusteringResult:
    """The chosen partition and the evidence for its k.

    `centers` are in standardised, clipped units (`centers * scale + mean` gives descriptor
    units, short of what the clipped outliers pulled);
    `silhouette[i]` is NaN where k-means found fewer than two clusters in the sample.
    `seconds` holds the wall time of each stage, per k where it runs per k.
    """

    chosen_k: int
    k_values: list
    silhouette: list
    inertia: list
    labels: np.ndarray
    centers: np.ndarray
    distance_to_center: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    method: dict
    seconds: dict

    def cluster_sizes(self) -> list:
        return np.bincount(self.labels, minlength=self.chosen_k).tolist()

    def to_dict(self, include_assignments: bool = False) -> dict:
        """Strict-JSON-ready summary (NaN as None); per-row labels and distances only if
        asked, as they grow with the data."""
        out: dict[str, Any] = {
            "chosen_k": int(self.chosen_k),
            "k_values": [int(k) for k in self.k_values],
            "silhouette": [None if not np.isfinite(s) else float(s) for s in self.silhouette],
            "inertia": [float(i) for i in self.inertia],
            "cluster_sizes": self.cluster_sizes(),
            "centers_standardised": self.centers.tolist(),
            "standardisation": {"mean": self.mean.tolist(), "scale": self.scale.tolist()},
            "method": self.method,
            "seconds": self.seconds,
        }
        if include_assignments:
            out["labels"] = self.labels.tolist()
            out["distance_to_center"] = self.distance_to_center.tolist()
        return out


def _k_values(k_range: Sequence[int], n_rows: int) -> Tuple[list, Optional[str]]:
    k_min, k_max = (int(k) for k in k_range)
    if k_min < 2 or k_max < k_min:
        raise ValueError(f"k_range must be (k_min, k_max) with 2 <= k_min <= k_max, "
                         f"got {tuple(k_range)}")
    if n_rows <= k_min:
        raise ValueError(f"{n_rows} descriptors cannot be split into k >= {k_min} clusters "
                         f"with a silhouette: need more than {k_min} rows")
    if k_max > n_rows - 1:
        note = (f"k_range {k_min}..{k_max} clipped to {k_min}..{n_rows - 1}: the silhouette "
                f"needs fewer clusters than the {n_rows} descriptors")
        return list(range(k_min, n_rows)), note
    return list(range(k_min, k_max + 1)), None


def cluster(X: np.ndarray, k_range: Tuple[int, int] = (2, 8), seed: int = 0,
            silhouette_sample: int = 10000, minibatch_above: int = MINIBATCH_ABOVE,
            n_init: int = 4, clip: Optional[float] = OUTLIER_CLIP) -> ClusteringResult:
    """Standardise `X` (N, D) (clipped to +-`clip`, see `standardise`), run k-means for every k in `k_range` (inclusive) and keep the
    partition of the k with the best silhouette. Raises ValueError on NaN/inf rows, a k range
    below 2, or too few rows for k_min; a k_max of N or more is clipped to N - 1 (`method`
    says so)."""
    started = time.perf_counter()
    Z, mean, scale = standardise(X, clip)
    n_rows = Z.shape[0]
    if not Z.any():
        raise ValueError(f"all {n_rows} descriptor rows are identical: nothing to cluster")
    k_values, clip_note = _k_values(k_range, n_rows)
    seconds: dict[str, Any] = {"standardise": time.perf_counter() - started, "fit": [],
                               "silhouette": []}
    minibatch = n_rows > minibatch_above
    rng = np.random.default_rng(seed)
    sample_size = min(int(silhouette_sample), n_rows)
    if sample_size < 2:
        raise ValueError(f"silhouette_sample must be at least 2, got {silhouette_sample}")
    sample = np.sort(rng.choice(n_rows, size=sample_size, replace=False)) \
        if sample_size < n_rows else np.arange(n_rows)

    silhouettes, inertias, best = [], [], None
    sweep = Progress(f"k-means over k = {k_values[0]}..{k_values[-1]} ({n_rows} rows)",
                     len(k_values), "values of k")
    for k in k_values:
        tick = time.perf_counter()
        if minibatch:
            model = MiniBatchKMeans(n_clusters=k, n_init=n_init, random_state=seed,
                                    batch_size=MINIBATCH_SIZE)
        else:
            model = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
        labels = model.fit_predict(Z)
        seconds["fit"].append(time.perf_counter() - tick)
        tick = time.perf_counter()
        sample_labels = labels[sample]
        if 2 <= np.unique(sample_labels).size < sample_size:
            with sklearn.config_context(working_memory=SILHOUETTE_WORKING_MEMORY_MIB):
                score = silhouette_score(Z[sample], sample_labels)
        else:
            score = float("nan")
        seconds["silhouette"].append(time.perf_counter() - tick)
        silhouettes.append(float(score))
        inertias.append(float(model.inertia_))
        if np.isfinite(score) and (best is None or score > best[0]):  # ties keep the smaller k
            best = (score, k, labels, model.cluster_centers_)
        sweep.advance()
    if best is None:
        raise ValueError(f"k-means found fewer than two clusters for every k in {k_values}: "
                         f"the descriptors hold too few distinct rows")
    _, chosen_k, labels, centers = best
    method = {
        "algorithm": "minibatch_kmeans" if minibatch else "kmeans",
        "minibatch_above": int(minibatch_above),
        "batch_size": MINIBATCH_SIZE if minibatch else None,
        "n_init": int(n_init),
        "seed": int(seed),
        "rows": int(n_rows),
        "dimensions": int(Z.shape[1]),
        "constant_columns": int((Z == 0).all(axis=0).sum()),
        "silhouette_sample": int(sample_size),
        "k_choice": "highest silhouette, ties to the smaller k",
        "outlier_clip": None if clip is None else float(clip),
        "k_range_requested": [int(k) for k in k_range],
        "k_range_note": clip_note,
    }
    distance = np.linalg.norm(Z - centers[labels], axis=1)
    seconds["total"] = time.perf_counter() - started
    return ClusteringResult(chosen_k=int(chosen_k), k_values=k_values, silhouette=silhouettes,
                            inertia=inertias, labels=labels.astype(np.int64), centers=centers,
                            distance_to_center=distance, mean=mean, scale=scale, method=method,
                            seconds=seconds)


def agreement(true_labels: Sequence, assignments) -> dict:
    """How well clusters match known classes, whatever the cluster numbering: adjusted Rand
    index (0 for chance, 1 for identical) and normalised mutual information."""
    true_labels, assignments = list(true_labels), list(np.asarray(assignments).tolist())
    if len(true_labels) != len(assignments):
        raise ValueError(f"{len(true_labels)} true labels for {len(assignments)} assignments")
    return {"ari": float(adjusted_rand_score(true_labels, assignments)),
            "nmi": float(normalized_mutual_info_score(true_labels, assignments))}


def effective_perplexity(n_rows: int, perplexity: float = 30.0) -> float:
    """The t-SNE perplexity used for `n_rows` points: at most (n - 1) / 3, as each point needs
    about 3 x perplexity neighbours, and at least 1."""
    return float(max(1.0, min(float(perplexity), (n_rows - 1) / 3.0)))


def embed(X_standardised: np.ndarray, seed: int = 0, sample: int = 5000,
          perplexity: float = 30.0) -> Tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE map of at most `sample` rows (a fixed random subset: t-SNE grows faster than
    linearly); returns the sorted row indices and their (n, 2) coordinates."""
    Z = _finite_matrix(X_standardised, "standardised descriptor")
    n_rows = Z.shape[0]
    if n_rows < 2:
        raise ValueError(f"t-SNE needs at least 2 rows, got {n_rows}")
    size = min(int(sample), n_rows)
    if size < 2:
        raise ValueError(f"t-SNE sample must be at least 2, got {sample}")
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(n_rows, size=size, replace=False)) if size < n_rows \
        else np.arange(n_rows)
    tsne = TSNE(n_components=2, perplexity=effective_perplexity(size, perplexity), init="pca",
                random_state=seed)
    return indices, tsne.fit_transform(Z[indices])


def nearest_to_centers(result: ClusteringResult, per_cluster: int = 4) -> dict:
    """{cluster: up to `per_cluster` row indices of its members, nearest its centre first}:
    the typical members to show for a cluster."""
    nearest = {}
    for cluster_id in range(result.chosen_k):
        members = np.flatnonzero(result.labels == cluster_id)
        order = np.argsort(result.distance_to_center[members], kind="stable")
        nearest[cluster_id] = members[order[:per_cluster]].tolist()
    return nearest
