"""Figures written by the Trainer modules (the paper's Figure 1: loss and accuracy per epoch)."""

from __future__ import annotations

import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(history: Dict[str, List[float]], path: str, title: str) -> str:
    """Loss and every other metric, training against validation, one panel each."""
    metrics = [name for name in history if not name.startswith("val_")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for axis, name in zip(axes[0], metrics):
        epochs = range(1, len(history[name]) + 1)
        axis.plot(epochs, history[name], "o-", label="training", markersize=3)
        if f"val_{name}" in history:
            axis.plot(epochs, history[f"val_{name}"], "s-", label="validation", markersize=3)
        axis.set_xlabel("epoch")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
