"""The figure of ``pipeline.search --grid``: a row per query (its image, then its results by
rank), each image captioned in full within its cell (paths and keys wrapped, the end kept
when too long) with the class names the index knows, relevance framed when labels tell it."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .encoding import read_image_file
from .errors import DataError
from .index_format import Index

__all__ = ["CAPTION_CHARS", "caption_lines", "item_bytes", "grid_rows", "draw_grid"]

#: Characters of a caption line that fit under a grid cell (1.25 in at 8 pt).
CAPTION_CHARS = 17


def caption_lines(text: str, max_lines: int, width: int = CAPTION_CHARS) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken after a ``/`` where it can
    (else anywhere); when it needs more than ``max_lines``, its end is kept (the file name)
    and the first line starts with an ellipsis."""
    pieces = []
    for part in re.findall(r"[^/]*/|[^/]+$", text) or [text]:
        pieces += [part[i : i + width] for i in range(0, len(part), width)]
    lines, line = [], ""
    for piece in reversed(pieces):  # from the end: the file name stays whole
        if line and len(piece) + len(line) > width:
            lines.insert(0, line)
            line = ""
        line = piece + line
    lines.insert(0, line)
    if len(lines) > max_lines:
        dropped, lines = "".join(lines[:-max_lines]), lines[-max_lines:]
        mark = "\u2026/" if dropped.endswith("/") else "\u2026"
        lines[0] = mark + lines[0][max(0, len(mark) + len(lines[0]) - width) :]
    return lines


def item_bytes(index: Index, rows: Sequence[int]) -> dict[int, bytes]:
    """The encoded images of some rows, read from the index's source."""
    src = index.manifest["source"]
    keys = {int(r): index.key(r) for r in rows}
    if src["type"] == "split":
        from dpfah.data import ShardError, read_manifest, read_samples

        try:
            manifest = read_manifest(src["directory"])
            if manifest.sha256 != src["manifest_sha256"]:
                raise DataError(f"{src['directory']}: the prepared data changed since the index was built")
            got = read_samples(manifest, src["split"], [int(k) for k in keys.values()])
        except ShardError as e:
            raise DataError(str(e)) from None
        return {r: got[int(k)] for r, k in keys.items()}
    if src["type"] == "tar":
        from .sources import read_tar

        _, files = read_tar(Path(src["path"]), src["path"], progress=False)
        return {r: files[k] for r, k in keys.items()}
    base = Path(src["root"] if src["type"] == "list" else src["path"])
    try:
        return {r: read_image_file(base / k) for r, k in keys.items()}
    except OSError as e:
        raise DataError(f"{e.filename}: cannot read ({e.strerror or e}) to draw it") from None


def _classes(index: Index, labels: np.ndarray | None) -> list[str]:
    from .figures import class_name

    classes = index.manifest.get("classes") or []
    return caption_lines(class_name(labels, classes), 1) if labels is not None and classes else []


def grid_rows(
    index: Index, queries: Sequence[tuple[str, bytes, np.ndarray | None]], hits, images: dict[int, Any]
) -> list[dict[str, Any]]:
    """The rows :func:`pipeline.figures.plot_grid` draws: per query (its name, image bytes
    and labels, None for an image file) its image and caption (the name, a path wrapped in
    up to 3 lines; a key query's classes), and per result (``images``: row -> image) its
    image, relevance (None when the query has no labels), distance and caption (key, classes)."""
    from .figures import thumbnail

    rows = []
    for (name, data, labels), hit in zip(queries, hits):
        results = []
        for r, d in zip(hit.rows, hit.distances):
            known = index.labels is not None
            ok = None
            if labels is not None and known:
                ok = bool(np.any(labels.astype(bool) & index.labels[int(r)].astype(bool)))
            caption = caption_lines(index.key(r), 2) + (_classes(index, index.labels[int(r)]) if known else [])
            results.append((images[int(r)], ok, int(d), "\n".join(caption)))
        title = caption_lines(name, 3) + _classes(index, labels)
        rows.append({"query": thumbnail(data), "name": "\n".join(title), "results": results})
    return rows


def draw_grid(
    path: str | os.PathLike, index: Index, queries: Sequence[tuple[str, bytes, np.ndarray | None]], hits
) -> Path:
    """The figure of the queries and their results (``hits``: :class:`pipeline.search.Hit`
    per query) written to ``path``."""
    from .figures import plot_grid, thumbnail

    if not any(len(h.rows) for h in hits):
        raise DataError("nothing to draw: no query has a result")
    wanted = sorted({int(r) for h in hits for r in h.rows})
    images = {r: thumbnail(b) for r, b in item_bytes(index, wanted).items()}
    rows = grid_rows(index, queries, hits, images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = index.manifest
    plot_grid(
        path, rows, f"{index.directory.name}: {m['count']:,} items, {m['bits']} bits, {m['model']['uri']} (ties by key)"
    )
    return path
