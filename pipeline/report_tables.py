"""The report's inputs and tables: the evaluated trainings of a dataset read from the DVC-tracked
files, the 95 % t intervals over seeds, Table 6 and Table 5 (its steps paired by seed).
See docs/report.md."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import paper
from .config import Params
from .errors import PipelineError
from .runkey import RunKey

__all__ = [
    "MAP_KEY",
    "ABLATION",
    "RADIUS_KEY",
    "ReportError",
    "metric",
    "t_quantile",
    "Cell",
    "interval",
    "Member",
    "CURVES",
    "collect",
    "members_of",
    "table6",
    "table6_md",
    "ablation_bits",
    "table5",
    "table5_md",
    "csv_text",
    "cell_columns",
    "CELL_HEADER",
]

#: The metrics the report reads from a metrics file (one place, should they be renamed).
MAP_KEY = "query_map"
RADIUS_KEY = "query_precision_within_radius"

#: Table 5's rows, in order (params.yaml's variants and DPFAH), and its reference row.
ABLATION = ("resnet18", "resnet18-pfa", "dpfah")
ABLATION_STEPS = ("+ PFA", "+ L2/L3")
ABLATION_REFERENCE = "dbdh-alexnet"


class ReportError(PipelineError):
    """The report cannot be made from what is there (a missing or unreadable input)."""


def metric(doc: dict[str, Any], key: str, where: str | os.PathLike = "") -> float:
    """Metric ``key`` of a metrics file's content; an error naming the file when absent."""
    try:
        return float(doc[key])
    except (KeyError, TypeError, ValueError):
        raise ReportError(f"{where}: no metric {key!r} (has: {', '.join(sorted(doc))})") from None


# ----------------------------------------------------------------------------- statistics


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class Cell:
    """Mean of ``values`` and its 95 % t interval (``half`` None with one value)."""

    values: tuple[float, ...]
    mean: float
    half: float | None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def low(self) -> float:
        return self.mean - (self.half or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half or 0.0)

    def text(self, digits: int = 4, signed: bool = False) -> str:
        sign = "+" if signed else ""
        if self.half is None:
            return f"{self.mean:{sign}.{digits}f} (n = 1)"
        return f"{self.mean:{sign}.{digits}f} ± {self.half:.{digits}f}"


def interval(values: Sequence[float], level: float = 0.95) -> Cell:
    """Mean and the two-sided ``level`` t interval's half-width over ``values``."""
    v = tuple(float(x) for x in values)
    mean = sum(v) / len(v)
    if len(v) < 2:
        return Cell(v, mean, None)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    return Cell(v, mean, t_quantile(0.5 + level / 2, len(v) - 1) * sd / math.sqrt(len(v)))


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Member:
    """One evaluated training: its metrics, curves, query codes and validation mAP."""

    method: str
    bits: int
    seed: int
    metrics: dict[str, Any]
    curves: dict[str, dict[str, np.ndarray]]  # pr_radius, pr_rank, p_at_n -> column -> values
    codes_path: Path
    val_map: float
    run_id: str | None = None  # the run record's MLflow run (the report fetches its retrieval grid)


CURVES = {"pr_radius": ("recall", "precision"), "pr_rank": ("recall", "precision"), "p_at_n": ("n", "precision")}


def read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    return {name: np.array([float(r[i]) for r in body]) for i, name in enumerate(header)}


def _members(params: Params) -> list[tuple[str, int, int]]:
    return [(m, b, s) for m in params.train.methods for b in params.bits for s in params.train.seeds]


def collect(params: Params, dataset: str, root: str | os.PathLike = ".") -> list[Member]:
    """Every (method, bits, seed) of the matrix with its DVC-tracked files; a
    :class:`ReportError` naming each member whose files are missing or unreadable."""
    params.dataset(dataset)
    missing, members = [], []
    for method, bits, seed in _members(params):
        key = RunKey(dataset, bits, method, seed)
        files = [key.metrics_file(root), key.query_codes_file(root), key.run_file(root)]
        files += [key.plot_file(name, root) for name in CURVES]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            missing.append(f"(method {method}, {bits} bits, seed {seed}): {', '.join(absent)}")
            continue
        try:
            doc = json.loads(files[0].read_text())
            metric(doc, MAP_KEY, files[0])
            record = json.loads(files[2].read_text())
            curves = {name: read_csv(f) for name, f in zip(CURVES, files[3:])}
        except (OSError, ValueError, IndexError) as e:
            raise ReportError(
                f"(method {method}, {bits} bits, seed {seed}): unreadable input ({type(e).__name__}: {e})"
            ) from None
        val = record.get("best_val_map")
        val = float("nan") if val is None else float(val)
        members.append(Member(method, bits, seed, doc, curves, files[1], val, record.get("run_id")))
    if missing:
        command = f"dvc repro train (or python -m pipeline.matrix --dataset {dataset})"
        raise ReportError(
            f"{len(missing)} of {len(_members(params))} evaluated trainings of {dataset} are missing; "
            f"run {command}:\n  " + "\n  ".join(missing)
        )
    return members


# ----------------------------------------------------------------------------- tables


def members_of(members: Sequence[Member], method: str, bits: int) -> list[Member]:
    return sorted((m for m in members if m.method == method and m.bits == bits), key=lambda m: m.seed)


def base_method(params: Params, entry: str) -> str:
    variant = params.variants.get(entry)
    return variant.method if variant is not None else entry


def table6(
    params: Params, dataset: str, members: Sequence[Member]
) -> tuple[list[dict[str, Any]], dict[int, str | None]]:
    """Rows (method, bits, cell, paper value, best mark) and, per code length, the method
    marked best (None: no interval separates the top from the next)."""
    rows, best = [], {}
    for bits in params.bits:
        cells = {
            m: interval([metric(x.metrics, MAP_KEY) for x in members_of(members, m, bits)])
            for m in params.train.methods
        }
        ranked = sorted(cells, key=lambda m: -cells[m].mean)
        top = ranked[0]
        separated = (
            len(ranked) > 1
            and cells[top].half is not None
            and cells[ranked[1]].half is not None
            and cells[top].low > cells[ranked[1]].high
        )
        best[bits] = top if separated else None
        for m in params.train.methods:
            p = paper.table6_value(dataset, m, bits) if m in paper.TABLE6.get(dataset, {}) else None
            rows.append({"method": m, "bits": bits, "cell": cells[m], "paper": p, "best": best[bits] == m})
    return rows, best


def table6_md(params: Params, rows: list[dict[str, Any]], map_label: str) -> list[str]:
    bits = list(params.bits)
    head = "| method | " + " | ".join(f"{b} bits | {b} bits, paper†" for b in bits) + " |"
    lines = [head, "|---" * (2 * len(bits) + 1) + "|"]
    for m in params.train.methods:
        cells = []
        for b in bits:
            r = next(r for r in rows if r["method"] == m and r["bits"] == b)
            text = r["cell"].text()
            cells += [f"**{text}**" if r["best"] else text, "" if r["paper"] is None else f"{r['paper']:.4f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def ablation_bits(params: Params) -> int:
    """Table 5's code length: the paper's 48 bits when run, else the longest."""
    return paper.TABLE5_BITS if paper.TABLE5_BITS in params.bits else max(params.bits)


def table5(params: Params, dataset: str, members: Sequence[Member]) -> tuple[int, list[dict[str, Any]]] | None:
    """The ablation at 48 bits (else the longest code length): each row's mean and
    interval, and each step's paired difference; None when the variants are not all run."""
    if not all(m in params.train.methods for m in ABLATION):
        return None
    bits = ablation_bits(params)
    on_paper = dataset == "cifar10" and bits == paper.TABLE5_BITS
    entries = ([ABLATION_REFERENCE] if ABLATION_REFERENCE in params.train.methods else []) + list(ABLATION)
    rows = []
    for m in entries:
        values = [metric(x.metrics, MAP_KEY) for x in members_of(members, m, bits)]
        rows.append({"row": m, "kind": "mAP", "cell": interval(values), "paper": paper.TABLE5[m] if on_paper else None})
    for step, (a, b) in zip(ABLATION_STEPS, zip(ABLATION, ABLATION[1:])):
        xa, xb = members_of(members, a, bits), members_of(members, b, bits)
        diffs = [
            metric(y.metrics, MAP_KEY) - metric(x.metrics, MAP_KEY) for x, y in zip(xa, xb)
        ]  # same seeds, same order
        reference = paper.TABLE5[b] - paper.TABLE5[a] if on_paper else None
        rows.append(
            {"row": f"{step} ({a} -> {b})", "kind": "paired difference", "cell": interval(diffs), "paper": reference}
        )
    return bits, rows


def table5_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| row | what | ours | paper† |", "|---|---|---|---|"]
    for r in rows:
        diff = r["kind"] != "mAP"
        paper_text = "" if r["paper"] is None else (f"{r['paper']:+.4f}" if diff else f"{r['paper']:.4f}")
        lines.append(f"| {r['row']} | {r['kind']} | {r['cell'].text(signed=diff)} | {paper_text} |")
    return lines


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def cell_columns(c: Cell) -> list[Any]:
    half = "" if c.half is None else f"{c.half:.6f}"
    low = "" if c.half is None else f"{c.low:.6f}"
    high = "" if c.half is None else f"{c.high:.6f}"
    return [c.n, f"{c.mean:.6f}", half, low, high, ";".join(f"{v:.6f}" for v in c.values)]


CELL_HEADER = ["n", "mean", "half_width_95", "low_95", "high_95", "values_by_seed"]
