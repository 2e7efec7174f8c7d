"""Heat maps of a segmentation, as PNG figures (matplotlib, Agg backend).

- `combined_figure`: the paper's Figure 2, the input beside the input overlaid with the
  combined defect probability (the largest over the classes at each pixel), with a colour bar.
- `per_class_figure`: the paper's Figure 3, one panel per class with its probability (0 to 1,
  one colour bar shared by all panels) over the faint input, the class name as the title.
- `overlay_png`: one picture, the input with each class in its own colour where its
  probability exceeds 0.5 (filled and outlined), and a legend of the classes present.

`probabilities` is (C, H, W) with channels in the order of `DEFECT_CLASSES`, as
`components.segmentation.tiling.predict_tiled` returns it. A frame larger than a figure can show
is reduced for display by whole-pixel blocks: the image by the block's mean, probabilities by
the block's maximum, so a defect a few pixels wide in a 4096 x 4096 frame stays visible. The
class colours are those of the example sheet (`pipeline/reports.py`: tab10 by channel index).

`path` may be a file name (its folder is made) or a binary file object open for writing.
"""

from __future__ import annotations

import os
from typing import IO, Optional, Sequence, Tuple, Union

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from components.defects import DEFECT_CLASSES  # noqa: E402

Path = Union[str, os.PathLike, IO[bytes]]

THRESHOLD = 0.5
HEAT_CMAP = "inferno"
# Longest side, in pixels, a frame is shown at in a panel of the multi-panel figures, and in
# the overlay (which shows the frame alone, at up to this size).
PANEL_PIXELS = 1024
OVERLAY_PIXELS = 2048
OVERLAY_MIN_PIXELS = 640  # a small frame is enlarged (nearest pixel) so the legend fits
DPI = 110


def class_colour(channel: int):
    """The colour of a class channel: the example sheet's, tab10 by channel index."""
    return plt.get_cmap("tab10")(channel % 10)


def _check(image: np.ndarray, probabilities: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    probabilities = np.asarray(probabilities)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image (H, W), got shape {image.shape}")
    if probabilities.ndim == 2:
        probabilities = probabilities[None]
    if probabilities.ndim != 3 or probabilities.shape[1:] != image.shape:
        raise ValueError(f"probabilities must be (C, H, W) with (H, W) = {image.shape}, "
                         f"got shape {probabilities.shape}")
    return image, probabilities


def _factor(shape: Sequence[int], limit: int) -> int:
    return max(1, -(-max(shape) // limit))  # ceil


def _reduce(array: np.ndarray, factor: int, how: str) -> np.ndarray:
    """Block mean or max over the last two axes by `factor` (edges padded by repetition)."""
    array = np.asarray(array, dtype=np.float32)
    if factor == 1:
        return array
    height, width = array.shape[-2:]
    pad_h, pad_w = -height % factor, -width % factor
    if pad_h or pad_w:
        pad = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
        array = np.pad(array, pad, mode="edge")
    # factor**2 strided passes: much faster than a reduction over a reshaped block axis.
    out = np.array(array[..., 0::factor, 0::factor], dtype=np.float32)
    for i in range(factor):
        for j in range(factor):
            if i or j:
                part = array[..., i::factor, j::factor]
                if how == "max":
                    np.maximum(out, part, out=out)
                else:
                    out += part
    return out if how == "max" else out / np.float32(factor * factor)


def _display_range(image: np.ndarray) -> Tuple[float, float]:
    """Robust grey levels: the 0.5th to 99.5th percentiles (a hot pixel does not set them)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [0.5, 99.5])
    return (float(low), float(high)) if high > low else (float(low), float(low) + 1.0)


def _for_display(image: np.ndarray, probabilities: np.ndarray,
                 limit: int) -> Tuple[np.ndarray, np.ndarray, int]:
    factor = _factor(image.shape, limit)
    return _reduce(image, factor, "mean"), _reduce(probabilities, factor, "max"), factor


def _save(fig, path: Path) -> Path:
    if isinstance(path, (str, os.PathLike)):
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def _bare(axis) -> None:
    axis.set_xticks([])
    axis.set_yticks([])


def _heat_alpha(probability: np.ndarray) -> np.ndarray:
    """Opacity of the heat over the image: faint where nothing is found, 0.8 at 1 (the lattice
    stays visible under a planar defect)."""
    return np.clip(0.15 + 0.65 * probability, 0.0, 0.8)


def _shape_note(image_shape, factor: int) -> str:
    note = f"{image_shape[0]} x {image_shape[1]} px"
    return note + (f", shown reduced {factor}x" if factor > 1 else "")


def combined_figure(image: np.ndarray, probabilities: np.ndarray, path: Path,
                    title: Optional[str] = None) -> Path:
    """Figure 2: the input, and the input under the combined defect probability (max over
    classes) with a colour bar from 0 to 1."""
    image, probabilities = _check(image, probabilities)
    shown, heat, factor = _for_display(image, probabilities, PANEL_PIXELS)
    combined = heat.max(axis=0)
    low, high = _display_range(shown)
    aspect = shown.shape[0] / shown.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.0 * min(max(aspect, 0.1), 2.0) + 1.0),
                             layout="constrained")
    axes[0].imshow(shown, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    axes[0].set_title(f"input ({_shape_note(image.shape, factor)})", fontsize=9)
    axes[1].imshow(shown, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    heat_image = axes[1].imshow(combined, cmap=HEAT_CMAP, vmin=0.0, vmax=1.0,
                                alpha=_heat_alpha(combined), interpolation="nearest")
    fraction = float((probabilities.max(axis=0) > THRESHOLD).mean())
    axes[1].set_title(f"combined defect probability (max over classes)\n"
                      f"{100 * fraction:.2f}% of the frame above {THRESHOLD}", fontsize=9)
    for axis in axes:
        _bare(axis)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=heat_image.norm, cmap=heat_image.cmap),
                       ax=axes[1], shrink=0.85)
    bar.set_label("defect probability")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def per_class_figure(image: np.ndarray, probabilities: np.ndarray, path: Path,
                     class_names: Sequence[str] = DEFECT_CLASSES,
                     title: Optional[str] = None) -> Path:
    """Figure 3: one panel per class, its probability (0 to 1, one shared colour bar) over
    the faint input, titled with the class name and its largest probability."""
    image, probabilities = _check(image, probabilities)
    if len(class_names) != probabilities.shape[0]:
        raise ValueError(f"{len(class_names)} class names for {probabilities.shape[0]} channels")
    shown, heat, factor = _for_display(image, probabilities, PANEL_PIXELS // 2)
    low, high = _display_range(shown)
    count = len(class_names)
    columns = min(3, count)
    rows = -(-count // columns)
    aspect = shown.shape[0] / shown.shape[1]
    panel = 3.0
    panel_height = 0.92 * panel * min(max(aspect, 0.1), 2.0) + 0.35
    fig, axes = plt.subplots(rows, columns, squeeze=False, layout="constrained",
                             figsize=(panel * columns + 0.9, panel_height * rows + 0.4))
    norm = mcolors.Normalize(0.0, 1.0)
    for channel, axis in enumerate(axes.ravel()):
        _bare(axis)
        if channel >= count:
            axis.set_axis_off()
            continue
        axis.imshow(shown, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        axis.imshow(heat[channel], cmap=HEAT_CMAP, norm=norm, alpha=_heat_alpha(heat[channel]),
                    interpolation="nearest")
        peak = float(probabilities[channel].max())
        axis.set_title(f"{class_names[channel]} (max {peak:.2f})", fontsize=9)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=HEAT_CMAP), ax=axes.ravel().tolist(),
                       shrink=0.8)
    bar.set_label("probability")
    suptitle = title or "probability per defect class"
    fig.suptitle(f"{suptitle} ({_shape_note(image.shape, factor)})", fontsize=10)
    return _save(fig, path)


def overlay_png(image: np.ndarray, probabilities: np.ndarray, path: Path,
                class_names: Sequence[str] = DEFECT_CLASSES) -> Path:
    """The input with each class in its own colour where its probability exceeds 0.5 (where
    several do, the most probable one's), outlined, and a legend with each class's area."""
    image, probabilities = _check(image, probabilities)
    if len(class_names) != probabilities.shape[0]:
        raise ValueError(f"{len(class_names)} class names for {probabilities.shape[0]} channels")
    shown, heat, factor = _for_display(image, probabilities, OVERLAY_PIXELS)
    low, high = _display_range(shown)
    grey = np.clip((shown - low) / (high - low), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    del grey
    # The most probable class above the threshold at each pixel (-1: none), channel by channel
    # so that no (C, H, W) temporary is made.
    label = np.full(shown.shape, -1, np.int8)
    best = np.full(shown.shape, THRESHOLD, np.float32)
    present = []
    for channel in range(len(class_names)):
        wins = heat[channel] > best
        if wins.any():
            present.append(channel)
        label[wins] = channel
        best[wins] = heat[channel][wins]
    del best
    palette = np.array([class_colour(c)[:3] for c in range(len(class_names))], np.float32)
    flagged = label >= 0
    # Outline: a flagged pixel with a 4-neighbour of another label (or unflagged) is drawn in
    # the solid class colour, the inside of a region blended with the image.
    edge = np.zeros_like(flagged)
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[:-1] != label[1:]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge &= flagged
    inside = flagged & ~edge
    rgb[inside] = 0.45 * rgb[inside] + 0.55 * palette[label[inside]]
    rgb[edge] = palette[label[edge]]
    rgb = (rgb * 255 + 0.5).astype(np.uint8)  # matplotlib resamples uint8 without float copies
    del label, flagged, edge, inside

    height, width = shown.shape
    scale = max(1.0, OVERLAY_MIN_PIXELS / max(height, width))
    fig = plt.figure(figsize=(width * scale / DPI, height * scale / DPI))
    axis = fig.add_axes([0, 0, 1, 1])
    axis.imshow(rgb, interpolation="nearest")
    handles = []
    for channel, name in enumerate(class_names):
        if channel in present or (probabilities[channel] > THRESHOLD).any():
            area = float((probabilities[channel] > THRESHOLD).mean())
            handles.append(Patch(color=class_colour(channel), label=f"{name} {100 * area:.2f}%"))
    axis.set_axis_off()
    note = _shape_note(image.shape, factor)
    if handles:
        axis.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.8,
                    title=f"p > {THRESHOLD}, area", title_fontsize=8)
    axis.text(0.01, 0.99, note if handles else f"{note}: no class above {THRESHOLD}",
              transform=axis.transAxes, va="top", ha="left", fontsize=8,
              bbox=dict(facecolor="white", alpha=0.7, edgecolor="none", pad=2))
    return _save(fig, path)
