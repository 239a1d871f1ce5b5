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


_RIGHT, _WRONG = "#2ca02c", "#d62728"


def plot_grid(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Top-k retrieval grid (the paper's Fig. 15): a query per row (black frame), its results
    by rank, each framed green when it shares a label with the query, red when not and grey
    when unknown (``ok`` None), with its caption (class or key) and Hamming distance under
    it; a legend says so. A row: ``{"query": image, "name": str, "results": [(image, ok,
    distance[, caption])]}``."""
    from matplotlib.patches import Patch

    k = max(len(r["results"]) for r in rows)
    fig = figure(1.25 * (k + 1) + 0.4, 1.55 * len(rows) + 0.9)
    axes = np.atleast_2d(fig.subplots(len(rows), k + 1, squeeze=False))
    query = object()
    for i, row in enumerate(rows):
        cells = [(row["query"], query, f"query\n{row['name']}")] + [
            (r[0], r[1], f"{r[3]}\nd={r[2]}" if len(r) > 3 else f"d={r[2]}") for r in row["results"]
        ]
        for j in range(k + 1):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(cells):
                ax.axis("off")
                continue
            img, ok, label = cells[j]
            ax.imshow(img)
            colour = "black" if ok is query else ("0.6" if ok is None else (_RIGHT if ok else _WRONG))
            for spine in ax.spines.values():
                spine.set_color(colour)
                spine.set_linewidth(2 if ok is query else 4)
            ax.set_xlabel(
                label,
                fontsize=8,
                color="black" if ok is query or ok is None else colour,
                fontweight="bold" if ok is query else "normal",
                labelpad=2,
            )
            if i == 0:
                ax.set_title("query" if j == 0 else f"rank {j}", fontsize=8)
    known = any(r[1] is not None for row in rows for r in row["results"])
    handles = [Patch(facecolor="white", edgecolor="black", linewidth=2, label="query; d = Hamming distance to it")]
    if known:
        handles[:0] = [
            Patch(facecolor="white", edgecolor=_RIGHT, linewidth=3, label="relevant (shares a label with the query)"),
            Patch(facecolor="white", edgecolor=_WRONG, linewidth=3, label="not relevant"),
        ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
