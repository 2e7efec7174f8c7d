"""Figures of a clustering, as PNG files (matplotlib, Agg backend; heatmaps.py's conventions).

- `silhouette_figure`: the silhouette score per k with the chosen k marked (and, if given,
  the k-means inertia beside it: the elbow a reader may want to compare with).
- `tsne_figure`: the t-SNE map coloured by cluster, and beside it by known class.
- `gallery_figure`: a row per cluster of the images nearest its centre, so a reader sees what
  each cluster means.

Clusters are coloured tab10 by cluster number; known classes by the example sheet's class
colours (tab10 by channel index of `DEFECT_CLASSES`), bulk in grey.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from components.defects import BULK_LABEL, DEFECT_CLASSES  # noqa: E402
from components.segmentation.heatmaps import (  # noqa: E402
    Path,
    _bare,
    _display_range,
    _factor,
    _reduce,
    _save,
    class_colour,
)

GALLERY_PIXELS = 256  # longest side an image is shown at in the gallery
_OTHER_LABEL_COLOURS = [plt.get_cmap("tab10")(i) for i in (6, 8, 9)] \
    + [plt.get_cmap("Dark2")(i) for i in range(8)]


def cluster_colour(cluster_id: int, k: int):
    return plt.get_cmap("tab10" if k <= 10 else "tab20")(cluster_id % 20)


def _label_colours(labels: Sequence[str]) -> dict:
    """A defect class keeps its channel's colour, bulk is grey, any other label (e.g. mixed)
    takes the next free colour."""
    colours, others = {}, itertools.cycle(_OTHER_LABEL_COLOURS)
    for label in sorted(set(labels)):
        if label in DEFECT_CLASSES:
            colours[label] = class_colour(DEFECT_CLASSES.index(label))
        elif label == BULK_LABEL:
            colours[label] = plt.get_cmap("tab10")(7)
        else:
            colours[label] = next(others)
    return colours


def silhouette_figure(k_values: Sequence[int], silhouette: Sequence[float], chosen_k: int,
                      path: Path, inertia: Optional[Sequence[float]] = None,
                      title: Optional[str] = None) -> Path:
    """Silhouette per k, the chosen k starred; gaps where a k had no score."""
    k_values = np.asarray(k_values, dtype=int)
    scores = np.asarray(silhouette, dtype=np.float64)
    panels = 1 if inertia is None else 2
    fig, axes = plt.subplots(1, panels, squeeze=False, figsize=(5.2 * panels, 3.8),
                             layout="constrained")
    axis = axes[0, 0]
    axis.plot(k_values, scores, marker="o", color="tab:blue")
    chosen = scores[k_values == chosen_k]
    axis.axvline(chosen_k, color="tab:red", linestyle="--", linewidth=1)
    if chosen.size and np.isfinite(chosen[0]):
        axis.plot([chosen_k], chosen, marker="*", markersize=16, color="tab:red",
                  label=f"chosen k = {chosen_k} (silhouette {chosen[0]:.3f})")
        axis.legend(fontsize=8, loc="best")
    axis.set_xticks(k_values)
    axis.set_xlabel("number of clusters k")
    axis.set_ylabel("silhouette score (higher: better separated)")
    axis.set_title("silhouette per k", fontsize=10)
    axis.grid(alpha=0.3)
    if inertia is not None:
        axis = axes[0, 1]
        axis.plot(k_values, np.asarray(inertia, dtype=np.float64), marker="o", color="tab:gray")
        axis.axvline(chosen_k, color="tab:red", linestyle="--", linewidth=1)
        axis.set_xticks(k_values)
        axis.set_xlabel("number of clusters k")
        axis.set_ylabel("k-means inertia (standardised units)")
        axis.set_title("inertia per k (elbow)", fontsize=10)
        axis.grid(alpha=0.3)
    fig.suptitle(title or "choice of the number of clusters", fontsize=11)
    return _save(fig, path)


def _scatter(axis, coords: np.ndarray, keys: Sequence, colours: dict, names: dict,
             order: np.ndarray) -> None:
    """All points in one call, in a fixed shuffled order so that no group hides another,
    with one legend entry per group."""
    point_colours = np.array([colours[key] for key in keys])
    axis.scatter(coords[order, 0], coords[order, 1], c=point_colours[order], s=7,
                 alpha=0.75, linewidths=0, rasterized=True)
    counts = {key: 0 for key in colours}
    for key in keys:
        counts[key] += 1
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[key], markersize=6,
                      label=f"{names[key]} ({counts[key]})") for key in colours]
    axis.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.04),
                ncol=min(3, len(handles)), frameon=False)
    axis.set_xlabel("t-SNE 1", fontsize=9)
    axis.set_ylabel("t-SNE 2", fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])


def tsne_figure(coords: np.ndarray, clusters: Sequence[int], path: Path,
                true_labels: Optional[Sequence[str]] = None,
                title: Optional[str] = None) -> Path:
    """The t-SNE map coloured by cluster and, with `true_labels`, beside it by known class."""
    coords = np.asarray(coords, dtype=np.float64)
    clusters = np.asarray(clusters).astype(int)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != clusters.size:
        raise ValueError(f"coords must be (n, 2) for the {clusters.size} cluster numbers, "
                         f"got shape {coords.shape}")
    if true_labels is not None and len(true_labels) != clusters.size:
        raise ValueError(f"{len(true_labels)} true labels for {clusters.size} points")
    order = np.random.default_rng(0).permutation(clusters.size)
    panels = 1 if true_labels is None else 2
    fig, axes = plt.subplots(1, panels, squeeze=False, figsize=(5.6 * panels, 6.0),
                             layout="constrained")
    ids = sorted(set(clusters.tolist()))
    k = max(ids) + 1 if ids else 1
    _scatter(axes[0, 0], coords, clusters.tolist(), {c: cluster_colour(c, k) for c in ids},
             {c: f"cluster {c}" for c in ids}, order)
    axes[0, 0].set_title("coloured by cluster", fontsize=10)
    if true_labels is not None:
        labels = [str(label) for label in true_labels]
        colours = _label_colours(labels)
        _scatter(axes[0, 1], coords, labels, colours, {label: label for label in colours}, order)
        axes[0, 1].set_title("coloured by known class", fontsize=10)
    fig.suptitle(title or f"t-SNE of {clusters.size} image descriptors", fontsize=11)
    return _save(fig, path)


def gallery_figure(images: Dict[int, List[np.ndarray]], path: Path,
                   captions: Optional[Dict[int, List[str]]] = None,
                   title: Optional[str] = None) -> Path:
    """A row per cluster (in cluster order) of its images nearest the centre, each in grey
    with its own robust contrast (0.5th to 99.5th percentile), a caption under it if given."""
    if not images:
        raise ValueError("gallery_figure needs images of at least one cluster")
    captions = captions or {}
    cluster_ids = sorted(images)
    columns = max(1, max(len(images[c]) for c in cluster_ids))
    panel = 2.2
    fig, axes = plt.subplots(len(cluster_ids), columns, squeeze=False, layout="constrained",
                             figsize=(panel * columns + 0.6, (panel + 0.35) * len(cluster_ids)
                                      + 0.4))
    for row, cluster_id in enumerate(cluster_ids):
        members = images[cluster_id]
        texts = captions.get(cluster_id, [])
        for column, axis in enumerate(axes[row]):
            _bare(axis)
            if column >= len(members):
                axis.set_frame_on(False)
                if not members and column == 0:
                    axis.text(0.5, 0.5, "no members", ha="center", va="center", fontsize=9,
                              transform=axis.transAxes)
                continue
            image = np.asarray(members[column], dtype=np.float32)
            if image.ndim != 2:
                raise ValueError(f"gallery images must be 2-D, cluster {cluster_id} image "
                                 f"{column} has shape {image.shape}")
            shown = _reduce(image, _factor(image.shape, GALLERY_PIXELS), "mean")
            low, high = _display_range(shown)
            axis.imshow(shown, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            if column < len(texts):
                axis.set_xlabel(texts[column], fontsize=8)
        axes[row, 0].set_ylabel(f"cluster {cluster_id}", fontsize=10,
                                color=cluster_colour(cluster_id, max(cluster_ids) + 1))
    fig.suptitle(title or "images nearest each cluster centre (nearest first)", fontsize=11)
    return _save(fig, path)
