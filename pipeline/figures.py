"""Figures the stages draw: thumbnails and the top-k retrieval grid (evaluate's, search's)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["figure", "thumbnail", "class_name", "plot_grid"]


def figure(width: float, height: float):
    from matplotlib.figure import Figure  # Agg canvas; no pyplot state, no display needed

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def thumbnail(data: bytes, size: int = 96) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        return np.asarray(im)


def class_name(labels: np.ndarray, classes: Sequence[str]) -> str:
    names = [classes[i] for i in np.flatnonzero(labels)]
    return "+".join(names[:2]) + ("+..." if len(names) > 2 else "") if names else "(none)"


def plot_grid(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Top-k retrieval grid (the paper's Fig. 15): a query per row, its results by rank;
    correct results framed green, wrong ones red with an X, unknown ones (``ok`` None) black.
    A row: ``{"query": image, "name": str, "results": [(image, ok, distance[, caption])]}``."""
    k = max(len(r["results"]) for r in rows)
    fig = figure(1.05 * (k + 1) + 0.6, 1.25 * len(rows) + 0.5)
    axes = np.atleast_2d(fig.subplots(len(rows), k + 1, squeeze=False))
    for i, row in enumerate(rows):
        cells = [(row["query"], None, None, f"query: {row['name']}")] + [
            (r[0], r[1], r[2], r[3] if len(r) > 3 else f"d={r[2]}") for r in row["results"]
        ]
        for j in range(k + 1):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(cells):
                ax.axis("off")
                continue
            img, ok, _, label = cells[j]
            ax.imshow(img)
            colour = "black" if ok is None else ("#2ca02c" if ok else "#d62728")
            for spine in ax.spines.values():
                spine.set_color(colour)
                spine.set_linewidth(1 if ok is None else 3)
            ax.set_xlabel(label, fontsize=6, color=colour)
            if ok is False:
                ax.text(0.5, 0.5, "X", transform=ax.transAxes, ha="center", va="center", color="#d62728", fontsize=22, fontweight="bold", alpha=0.8)
            if i == 0 and j > 0:
                ax.set_title(str(j), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path)
