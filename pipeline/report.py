"""Stage `report`: the paper's tables and figures, regenerated from the evaluated runs.

    python -m pipeline.report --dataset cifar10 [--out DIR] [--no-mlflow] [--params FILE] [--set key=value ...]

Reads only what DVC tracks, for every (method, bits, seed) of the matrix train.methods x
bits x train.seeds: the metrics files (``metrics/<stem>.json``), the curve data
(``plots/<stem>/*.csv``), the packed query codes (``codes/<stem>/query.parquet``) and the run
records (``runs/<stem>.json``: the validation mAP), plus the tune stage's summary when there
is one. A member of the matrix without its files is an error naming it: nothing is dropped.
Nothing is selected on the query set: the t-SNE's baseline is the one with the best
validation mAP. The Grad-CAM figure (:mod:`pipeline.gradcam`) also loads two trained models
(the run records' MLflow models) and reads a few query images from the prepared shards;
when it cannot, the report says why in its place.

Writes ``reports/<dataset>/`` (replaced as a whole, atomically): ``report.md``; tables as
CSV (``table6.csv``, ``table5.csv``, ``p_at_h.csv``, ``tune_summary.csv``); figures as PNG
(``pr_<bits>.png``, ``p_at_n_<bits>.png``, ``p_at_h.png``, ``tsne_<bits>.png``,
``gradcam_<bits>.png``), each with
the curves it draws named in its PNG text (key ``Curves``). Then logs the folder to a
``report`` run in the dataset's MLflow experiment (with the table's cells as metrics).

Intervals: 95 % Student t over the training seeds (mean +- t(0.975, n-1) s / sqrt(n)); with
one seed the single value and "n = 1". Table 5's steps are paired differences (the same
seed on both sides).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import paper
from .artifacts import (
    DEFAULT_METHOD,
    metrics_file,
    not_replaceable,
    plots_dir,
    query_codes_file,
    report_dir,
    run_file,
    tune_dir,
    write_atomic,
)
from .config import Params, add_config_args, config_from_args
from .errors import ConfigError, PipelineError, run_main

__all__ = ["MAP_KEY", "RADIUS_KEY", "metric", "t_quantile", "interval", "Cell", "collect", "build_report", "main"]

#: The metrics the report reads from a metrics file (one place, should they be renamed).
MAP_KEY = "query_map"
RADIUS_KEY = "query_precision_within_radius"

#: Table 5's rows, in order (params.yaml's variants and DPFAH), and its reference row.
ABLATION = ("resnet18", "resnet18-pfa", "dpfah")
ABLATION_STEPS = ("+ PFA", "+ L2/L3")
ABLATION_REFERENCE = "dbdh-alexnet"
TSNE_POINTS = 2000  # query codes in a t-SNE (a seeded subsample beyond this)
KNN = 10  # neighbours of the number beside the t-SNE
#: What a report folder holds (report.md, its figures and tables): a folder with anything
#: else is not replaced (write_report)
REPORT_SUFFIXES = frozenset({".md", ".png", ".csv"})


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


CURVES = {"pr_radius": ("recall", "precision"), "pr_rank": ("recall", "precision"), "p_at_n": ("n", "precision")}


def _read_csv(path: Path) -> dict[str, np.ndarray]:
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
        which = {"method": method, "seed": seed}
        files = [
            metrics_file(dataset, bits, root, **which),
            query_codes_file(dataset, bits, root, **which),
            run_file(dataset, bits, root, **which),
        ]
        files += [plots_dir(dataset, bits, root, **which) / f"{name}.csv" for name in CURVES]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            missing.append(f"(method {method}, {bits} bits, seed {seed}): {', '.join(absent)}")
            continue
        try:
            doc = json.loads(files[0].read_text())
            metric(doc, MAP_KEY, files[0])
            record = json.loads(files[2].read_text())
            curves = {name: _read_csv(f) for name, f in zip(CURVES, files[3:])}
        except (OSError, ValueError, IndexError) as e:
            raise ReportError(
                f"(method {method}, {bits} bits, seed {seed}): unreadable input ({type(e).__name__}: {e})"
            ) from None
        val = record.get("best_val_map")
        members.append(Member(method, bits, seed, doc, curves, files[1], float("nan") if val is None else float(val)))
    if missing:
        command = (
            f"dvc repro evaluate (or python -m pipeline.evaluate --dataset {dataset} --bits B --method M --seed S)"
        )
        raise ReportError(
            f"{len(missing)} of {len(_members(params))} evaluated trainings of {dataset} are missing; run {command}:\n  "
            + "\n  ".join(missing)
        )
    return members


# ----------------------------------------------------------------------------- tables


def _by(members: Sequence[Member], method: str, bits: int) -> list[Member]:
    return sorted((m for m in members if m.method == method and m.bits == bits), key=lambda m: m.seed)


def _base_method(params: Params, entry: str) -> str:
    variant = params.variants.get(entry)
    return variant.method if variant is not None else entry


def table6(
    params: Params, dataset: str, members: Sequence[Member]
) -> tuple[list[dict[str, Any]], dict[int, str | None]]:
    """Rows (method, bits, cell, paper value, best mark) and, per code length, the method
    marked best (None: no interval separates the top from the next)."""
    rows, best = [], {}
    for bits in params.bits:
        cells = {m: interval([metric(x.metrics, MAP_KEY) for x in _by(members, m, bits)]) for m in params.train.methods}
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


def _table6_md(params: Params, rows: list[dict[str, Any]], map_label: str) -> list[str]:
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
        values = [metric(x.metrics, MAP_KEY) for x in _by(members, m, bits)]
        rows.append({"row": m, "kind": "mAP", "cell": interval(values), "paper": paper.TABLE5[m] if on_paper else None})
    for step, (a, b) in zip(ABLATION_STEPS, zip(ABLATION, ABLATION[1:])):
        xa, xb = _by(members, a, bits), _by(members, b, bits)
        diffs = [
            metric(y.metrics, MAP_KEY) - metric(x.metrics, MAP_KEY) for x, y in zip(xa, xb)
        ]  # same seeds, same order
        reference = paper.TABLE5[b] - paper.TABLE5[a] if on_paper else None
        rows.append(
            {"row": f"{step} ({a} -> {b})", "kind": "paired difference", "cell": interval(diffs), "paper": reference}
        )
    return bits, rows


def _table5_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| row | what | ours | paper† |", "|---|---|---|---|"]
    for r in rows:
        diff = r["kind"] != "mAP"
        paper_text = "" if r["paper"] is None else (f"{r['paper']:+.4f}" if diff else f"{r['paper']:.4f}")
        lines.append(f"| {r['row']} | {r['kind']} | {r['cell'].text(signed=diff)} | {paper_text} |")
    return lines


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _cell_columns(c: Cell) -> list[Any]:
    half = "" if c.half is None else f"{c.half:.6f}"
    low = "" if c.half is None else f"{c.low:.6f}"
    high = "" if c.half is None else f"{c.high:.6f}"
    return [c.n, f"{c.mean:.6f}", half, low, high, ";".join(f"{v:.6f}" for v in c.values)]


CELL_HEADER = ["n", "mean", "half_width_95", "low_95", "high_95", "values_by_seed"]


# ----------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: Path, text: dict[str, str] | None = None) -> None:
    """The PNG, with the labelled curves of every panel named in its text (``Curves``) and
    any other ``text`` entries."""
    panels = []
    for ax in fig.axes:
        labels = ax.get_legend_handles_labels()[1]
        if labels:
            panels.append(f"{ax.get_title() or 'plot'}: {', '.join(labels)}")
    buf = io.BytesIO()
    fig.savefig(
        buf, format="png", metadata={"Curves": " | ".join(panels), "Software": "pipeline.report", **(text or {})}
    )
    write_atomic(path, buf.getvalue())


def _style(params: Params, method: str) -> dict[str, Any]:
    """One look per method in every figure: ten colours, then the same colours dashed;
    DPFAH drawn thicker."""
    i = list(params.train.methods).index(method)
    return {
        "label": method,
        "color": f"C{i % 10}",
        "linestyle": "-" if i < 10 else "--",
        "linewidth": 2.2 if method == DEFAULT_METHOD else 1.3,
    }


def _legend(fig, ax) -> None:
    """The methods' legend beside the axes, never over the curves."""
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)


def _precision_axis(ax) -> None:
    """Precision from 0, up to a little above the highest curve (at most 1)."""
    ax.set_ylim(0, min(1.02, ax.get_ylim()[1] * 1.05))


def _mean_curve(members: Sequence[Member], name: str) -> tuple[np.ndarray, np.ndarray]:
    """The curve averaged over seeds, point by point (the seeds share the x grid: the same
    radii, ranks and N; a differing length is cut to the shortest)."""
    x_key, y_key = CURVES[name]
    n = min(len(m.curves[name][y_key]) for m in members)
    xs = np.mean([m.curves[name][x_key][:n] for m in members], axis=0)
    ys = np.mean([m.curves[name][y_key][:n] for m in members], axis=0)
    return xs, ys


def _seeds_note(params: Params) -> str:
    n = len(params.train.seeds)
    return f"mean over {n} seeds" if n > 1 else "one seed"


def figure_pr(params: Params, members: Sequence[Member], bits: int, path: Path, dataset: str) -> None:
    fig = _figure(11.5, 4.2)
    left, right = fig.subplots(1, 2)
    for m in params.train.methods:
        group = _by(members, m, bits)
        x, y = _mean_curve(group, "pr_radius")
        left.plot(x, y, marker="o", markersize=3, **_style(params, m))
        x, y = _mean_curve(group, "pr_rank")
        right.plot(x, y, marker=".", markersize=2, **_style(params, m))
    left.set(xlabel="recall", ylabel="precision", title="by Hamming radius", xlim=(0, 1.02))
    right.set(xlabel="recall", ylabel="precision", title="by rank", xlim=(0, 1.02))
    for ax in (left, right):
        _precision_axis(ax)
        ax.grid(alpha=0.3)
    _legend(fig, left)
    fig.suptitle(f"PR curves, {dataset}, {bits} bits ({_seeds_note(params)})")
    _save(fig, path)


def figure_p_at_n(params: Params, members: Sequence[Member], bits: int, path: Path, dataset: str) -> None:
    fig = _figure(7.0, 4.2)
    ax = fig.subplots()
    for m in params.train.methods:
        x, y = _mean_curve(_by(members, m, bits), "p_at_n")
        ax.plot(x, y, **_style(params, m))
    ax.set(
        xlabel="N (top-N returned)", ylabel="precision", title=f"P@N, {dataset}, {bits} bits ({_seeds_note(params)})"
    )
    _precision_axis(ax)
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    _save(fig, path)


def figure_p_at_h(params: Params, members: Sequence[Member], path: Path, dataset: str, radius: Any) -> list[list[Any]]:
    """P@H<=radius against the code length, one curve per method (error bars: the 95 % t
    interval where there are seeds to make one). Returns the CSV rows."""
    fig = _figure(7.0, 4.2)
    ax = fig.subplots()
    bits = sorted(params.bits)
    rows = []
    for m in params.train.methods:
        cells = [interval([metric(x.metrics, RADIUS_KEY) for x in _by(members, m, b)]) for b in bits]
        errors = [c.half or 0.0 for c in cells]
        ax.errorbar(bits, [c.mean for c in cells], yerr=errors, marker="o", capsize=3, **_style(params, m))
        rows += [[m, b, *_cell_columns(c)] for b, c in zip(bits, cells)]
    ax.set(
        xlabel="code length (bits)",
        ylabel=f"precision within Hamming radius {radius}",
        title=f"P@H<={radius}, {dataset} ({_seeds_note(params)})",
    )
    _precision_axis(ax)
    ax.set_xticks(bits)
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    _save(fig, path)
    return rows


def _query_codes(member: Member) -> tuple[np.ndarray, np.ndarray]:
    """(+1/-1 codes, label matrix) of a member's query split."""
    from .codefiles import load_codes

    packed, labels, _, _ = load_codes(member.codes_path)
    # dpfah.codes.unpack_codes' layout (little-endian words, bit i of the code = bit i), without its torch import
    bits01 = np.unpackbits(packed.astype("<u8").view(np.uint8).reshape(len(packed), -1), axis=1, bitorder="little")[
        :, : member.bits
    ]
    return bits01.astype(np.float32) * 2 - 1, labels


def knn_agreement(codes: np.ndarray, labels: np.ndarray, k: int = KNN) -> float:
    """Mean share of each query's k nearest other queries (Hamming distance, ties by index)
    that share a label with it: what a t-SNE picture of separated classes claims, as a number."""
    n, bits = codes.shape
    k = min(k, n - 1)
    dist = (bits - codes @ codes.T) / 2.0
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    shared = (labels.astype(np.int32) @ labels.T.astype(np.int32)) > 0
    return float(np.take_along_axis(shared, order, axis=1).mean())


def _tsne_choice(params: Params, members: Sequence[Member], bits: int) -> tuple[str | None, str]:
    """The strongest baseline by mean validation mAP (never the query set), and why."""
    baselines = [m for m in params.train.methods if _base_method(params, m) != DEFAULT_METHOD]
    if not baselines:
        return None, "no baseline in train.methods"
    scores = {
        m: np.nanmean([x.val_map for x in _by(members, m, bits)])
        if any(not math.isnan(x.val_map) for x in _by(members, m, bits))
        else -1.0
        for m in baselines
    }
    best = max(baselines, key=lambda m: scores[m])
    if scores[best] < 0:
        return best, "the first listed: no validation mAP recorded"
    return best, f"the best validation mAP among the baselines, {scores[best]:.4f}"


def figure_tsne(
    params: Params, members: Sequence[Member], bits: int, path: Path, dataset: str, classes: Sequence[str] | None
) -> dict[str, Any] | None:
    """t-SNE of the query codes of DPFAH and of the strongest baseline (first seed), each
    panel titled with its k-NN label agreement in Hamming space."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if DEFAULT_METHOD not in params.train.methods:
        return None
    baseline, why = _tsne_choice(params, members, bits)
    seed = min(params.train.seeds)
    shown = [DEFAULT_METHOD] + ([baseline] if baseline else [])
    fig = _figure(5.0 * len(shown), 4.8)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    out = {"bits": bits, "seed": seed, "baseline": baseline, "baseline_chosen_by": why, "knn": KNN, "agreement": {}}
    for ax, m in zip(axes, shown):
        member = next(x for x in _by(members, m, bits) if x.seed == seed)
        codes, labels = _query_codes(member)
        if len(codes) > TSNE_POINTS:  # the same queries in every panel
            keep = np.sort(np.random.default_rng(0).choice(len(codes), TSNE_POINTS, replace=False))
            codes, labels = codes[keep], labels[keep]
        agreement = knn_agreement(codes, labels)
        out["agreement"][m] = agreement
        perplexity = float(min(30.0, max(2.0, (len(codes) - 1) / 3.0)))
        # One OpenMP thread: sklearn's gradient threads spin, and on a busy machine that made
        # 30 points take 14 s instead of 0.2 (1000 points: 42 s against 16 s on 2 loaded cores).
        with threadpool_limits(limits=1, user_api="openmp"):
            xy = TSNE(
                n_components=2, metric="hamming", init="random", perplexity=perplexity, random_state=0
            ).fit_transform(codes)
        single = labels.sum(axis=1) == 1
        color = np.where(single, labels.argmax(axis=1), -1)
        for c in np.unique(color):
            sel = color == c
            name = "multi-label" if c < 0 else (classes[c] if classes and c < len(classes) else f"class {c}")
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, label=name)
        ax.set(title=f"{m}: {KNN}-NN label agreement {agreement:.3f}", xticks=[], yticks=[])
    if len(np.unique(color)) <= 21:
        axes[-1].legend(fontsize=6, markerscale=2, loc="best")
    fig.suptitle(f"t-SNE of query codes, {dataset}, {bits} bits, seed {seed}")
    _save(fig, path)
    return out


def figure_gradcam(pair, path: Path, dataset: str) -> None:
    """Fig. 3: a row per query image; its pixels as the network sees them, then the heat
    map without PFA and the one with PFA, overlaid (:mod:`pipeline.gradcam`)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from pytorch_grad_cam.utils.image import show_cam_on_image

    n = len(pair.images)
    fig = _figure(6.6, 1.9 * n + 0.9)
    axes = fig.subplots(n, 3, squeeze=False)
    heads = ["query image"] + [
        f"{m}: {what}\n{layer}" for m, what, layer in zip(pair.methods, ("without PFA", "with PFA"), pair.layers)
    ]
    for i in range(n):
        image = pair.images[i]
        cells = [image] + [
            show_cam_on_image(image.astype(np.float32) / 255.0, maps[i], use_rgb=True, image_weight=0.5)
            for maps in pair.maps
        ]
        for j, (ax, cell) in enumerate(zip(axes[i], cells)):
            ax.imshow(cell, interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            if i == 0:
                ax.set_title(heads[j], fontsize=8)
        axes[i, 0].set_ylabel(f"{pair.names[i]}\n(query {int(pair.indices[i])})", fontsize=8)
    fig.colorbar(
        ScalarMappable(Normalize(0, 1), "jet"),
        ax=axes[:, -1].tolist(),
        shrink=0.5,
        label="Grad-CAM, each map scaled to [0, 1]",
    )
    fig.suptitle(
        f"Grad-CAM of the hash layer (target sign(u)·u), {dataset}, {pair.bits} bits, seed {pair.seed}, {pair.image_size} px",
        fontsize=9,
    )
    columns = ["query image", f"{pair.methods[0]} (without PFA)", f"{pair.methods[1]} (with PFA)"]
    _save(fig, path, {"Rows": " | ".join(pair.names), "Columns": " | ".join(columns)})


def _gradcam_section(
    params: Params, dataset: str, members: Sequence[Member], out: Path, root: str | os.PathLike
) -> tuple[list[str], dict[str, Any]]:
    """Fig. 3 at Table 5's code length, or the sentence saying why it is not drawn."""
    from .codefiles import load_codes
    from .gradcam import compute

    bits = ablation_bits(params)
    print(f"Grad-CAM: {bits} bits", flush=True)
    first = _by(members, params.train.methods[0], bits)[0]
    _, labels, index, _ = load_codes(first.codes_path)  # the query split's labels, the same for every member
    pair = compute(params, dataset, bits, labels, index, root)
    if isinstance(pair, str):
        print(f"Grad-CAM: not drawn: {pair}", flush=True)
        return [f"Grad-CAM heat maps with and without PFA (Fig 3): not drawn: {pair}.", ""], {
            "bits": bits,
            "missing": pair,
        }
    name = f"gradcam_{bits}.png"
    figure_gradcam(pair, out / name, dataset)
    (without, runs0, layer0), (with_, runs1, layer1) = zip(pair.methods, pair.runs, pair.layers)
    lines = [
        f"Grad-CAM heat maps with and without PFA (Fig 3), {bits} bits, seed {pair.seed}: {len(pair.images)} query images "
        f"(the first of each class, in query order), then where in each the activations of {without} (without PFA, run {runs0}, {layer0}) and of "
        f"{with_} (with PFA, run {runs1}, {layer1}) push the hash layer towards the image's own code "
        "(Grad-CAM of sign(u)·u with the grad-cam package; each map scaled to [0, 1] on its own).",
        "",
        f"![Grad-CAM]({name})",
        "",
    ]
    return lines, {
        "bits": bits,
        "figure": name,
        "methods": pair.methods,
        "runs": pair.runs,
        "layers": pair.layers,
        "indices": pair.indices.tolist(),
    }


# ----------------------------------------------------------------------------- the report


def _tune_section(dataset: str, root: str | os.PathLike, out: Path) -> list[str]:
    summary = tune_dir(dataset, root) / "summary.md"
    table = tune_dir(dataset, root) / "summary.csv"
    if not summary.is_file():
        return [
            f"No search for {dataset} (tune/{dataset}/summary.md): `dvc exp run -S 'tune.datasets=[{dataset}]'` runs one.",
            "",
        ]
    text = summary.read_text()
    pivots = text.split("## Trials, best first")[0].split("\n## ", 1)
    body = ("## " + pivots[1]) if len(pivots) > 1 else text
    if table.is_file():
        shutil.copy(table, out / "tune_summary.csv")
    return [
        f"From the tune stage's `{summary}` (validation mAP; the query set is not used):",
        "",
        body.replace("## ", "### ").strip(),
        "",
    ]


def _classes(params: Params, dataset: str) -> list[str] | None:
    try:  # the manifest as JSON (dpfah.data would import torch); the shards are no dependency: names are a nicety
        return list(json.loads((Path(params.shards_dir(dataset)) / "manifest.json").read_text())["classes"]) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_report(params: Params, dataset: str, out: Path, root: str | os.PathLike = ".") -> dict[str, Any]:
    """Every table and figure into ``out`` (an empty directory); returns what was computed."""
    members = collect(params, dataset, root)
    map_label = f"mAP@{params.evaluate.map_at_label(dataset)}"
    radius = params.evaluate.radius
    methods, bits_list, seeds = params.train.methods, list(params.bits), params.train.seeds
    t0 = time.perf_counter()

    rows6, best = table6(params, dataset, members)
    write_atomic(
        out / "table6.csv",
        _csv_text(
            ["method", "bits", *CELL_HEADER, "paper", "best_separated"],
            [
                [
                    r["method"],
                    r["bits"],
                    *_cell_columns(r["cell"]),
                    "" if r["paper"] is None else r["paper"],
                    int(r["best"]),
                ]
                for r in rows6
            ],
        ),
    )
    ablation = table5(params, dataset, members)
    if ablation:
        write_atomic(
            out / "table5.csv",
            _csv_text(
                ["row", "kind", *CELL_HEADER, "paper"],
                [
                    [r["row"], r["kind"], *_cell_columns(r["cell"]), "" if r["paper"] is None else r["paper"]]
                    for r in ablation[1]
                ],
            ),
        )

    figures = []
    for b in bits_list:
        print(f"figures: {b} bits", flush=True)
        figure_pr(params, members, b, out / f"pr_{b}.png", dataset)
        figure_p_at_n(params, members, b, out / f"p_at_n_{b}.png", dataset)
        figures += [f"pr_{b}.png", f"p_at_n_{b}.png"]
    ph_rows = figure_p_at_h(params, members, out / "p_at_h.png", dataset, radius)
    write_atomic(out / "p_at_h.csv", _csv_text(["method", "bits", *CELL_HEADER], ph_rows))
    figures.append("p_at_h.png")
    tsne_bits = max(bits_list)
    print(f"t-SNE: {tsne_bits} bits", flush=True)
    tsne = figure_tsne(params, members, tsne_bits, out / f"tsne_{tsne_bits}.png", dataset, _classes(params, dataset))
    if tsne:
        figures.append(f"tsne_{tsne_bits}.png")

    n = len(seeds)
    lines = [
        f"# Report: {dataset}",
        "",
        f"Methods {', '.join(methods)}; code lengths {', '.join(map(str, bits_list))}; training seeds {', '.join(map(str, seeds))} "
        f"({len(members)} evaluated trainings). Query {map_label}; intervals are 95 % Student t over the seeds "
        f"(mean ± t(0.975, n-1)·s/√n, n = {n}){'' if n > 1 else ': with one seed there is no interval'}. Read from the DVC-tracked "
        "stage outputs (metrics, curve data, query codes, run records); nothing here is selected on the query set.",
        "",
        f"## Table 6: query {map_label} by method and code length",
        "",
        *_table6_md(params, rows6, map_label),
        "",
        f"† {paper.NOTE}; not comparable to these runs unless they used the paper profile and an ImageNet start. "
        "**Bold**: the best mean of a column, only where its interval lies wholly above the next method's"
        + (" (none can be with one seed)." if n < 2 else "."),
        "",
    ]
    unmarked = [str(b) for b, m in best.items() if m is None and len(methods) > 1]
    if unmarked and n > 1:
        lines += [f"No method is marked at {', '.join(unmarked)} bits: the top interval overlaps the next.", ""]
    lines += ["## Table 5: ablation", ""]
    if ablation:
        lines += [
            f"At {ablation[0]} bits; steps are paired differences over the same seeds.",
            "",
            *_table5_md(ablation[1]),
            "",
        ]
        if dataset != "cifar10" or ablation[0] != paper.TABLE5_BITS:
            lines += ["† The paper's Table 5 is CIFAR-10 at 48 bits: no paper values here.", ""]
    else:
        lines += [
            f"Not run: train.methods lacks {', '.join(m for m in ABLATION if m not in methods)} (`dvc exp run -S 'train.methods=[{','.join(ABLATION)}]'`).",
            "",
        ]
    lines += ["## Figures", ""]
    for b in bits_list:
        lines += [
            f"PR curves ({b} bits, paper Figs 8-10): ![pr {b}](pr_{b}.png)",
            "",
            f"P@N ({b} bits, Figs 12-14): ![p@n {b}](p_at_n_{b}.png)",
            "",
        ]
    lines += [f"P@H<={radius} against the code length (Fig 11): ![p@h](p_at_h.png)", ""]
    if tsne:
        agree = "; ".join(f"{m} {v:.3f}" for m, v in tsne["agreement"].items())
        lines += [
            f"t-SNE of the query codes (Fig 7), {tsne_bits} bits, seed {tsne['seed']}: DPFAH and {tsne['baseline'] or 'no baseline'}"
            + (f" (chosen as {tsne['baseline_chosen_by']})" if tsne["baseline"] else "")
            + f". {KNN}-NN label agreement in Hamming space (share of each query's {KNN} nearest other queries sharing a label): {agree}.",
            "",
            f"![t-SNE](tsne_{tsne_bits}.png)",
            "",
        ]
    else:
        lines += ["t-SNE: not drawn (DPFAH is not in train.methods).", ""]
    gradcam_lines, gradcam = _gradcam_section(params, dataset, members, out, root)
    if "figure" in gradcam:
        figures.append(gradcam["figure"])
    lines += gradcam_lines
    lines += ["## Tables 3-4: the tune grid", ""] + _tune_section(dataset, root, out)
    write_atomic(out / "report.md", "\n".join(lines))
    return {
        "members": len(members),
        "table6": rows6,
        "table5": ablation,
        "figures": figures,
        "tsne": tsne,
        "gradcam": gradcam,
        "seconds": time.perf_counter() - t0,
    }


def write_report(
    params: Params, dataset: str, out_dir: str | os.PathLike | None = None, root: str | os.PathLike = "."
) -> tuple[Path, dict[str, Any]]:
    """Build the report beside ``out_dir`` and swap it into place: a failure leaves the
    previous report as it was."""
    out = Path(out_dir) if out_dir is not None else report_dir(dataset, root)
    why = not_replaceable(
        out, lambda e: e.is_file() and e.suffix in REPORT_SUFFIXES, what="a report", marker="report.md"
    )
    if why:
        raise ConfigError(
            f"--out {out}: {why}; a report is written only to a new or empty folder or over a report (nothing else is replaced)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = build_report(params, dataset, tmp, root)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out, result


def log_report(params: Params, dataset: str, out: Path, result: dict[str, Any]) -> str:
    """The report folder as a ``report`` run of the dataset's experiment; returns its id."""
    import mlflow

    from .tracking import git_commit, tracked_run, tracking_uri

    name = f"report-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tracked_run(tracking_uri(params), f"{params.mlflow.experiment}-{dataset}", name) as run:
        mlflow.set_tags({"kind": "report", "dataset": dataset, "git_commit": git_commit()})
        mlflow.log_params(
            {
                "methods": ",".join(params.train.methods),
                "bits": ",".join(map(str, params.bits)),
                "seeds": ",".join(map(str, params.train.seeds)),
            }
        )
        mlflow.log_metrics({f"map.{r['method']}.{r['bits']}b": r["cell"].mean for r in result["table6"]})
        mlflow.log_artifacts(str(out), artifact_path="report")
        return run.info.run_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report",
        description="The paper's tables and figures from the evaluated trainings of a dataset (every method of "
        "train.methods x bits x train.seeds): Table 6 (query mAP, mean and 95 %% t interval over seeds, the paper's "
        "value beside), Table 5 (the ablation's paired steps), PR and P@N curves, P@H<=2 against the code length, a "
        "t-SNE of query codes, Grad-CAM heat maps with and without PFA, the tune grid. Writes reports/<dataset>/ and logs it to a report run in MLflow.",
        epilog="Reads the DVC-tracked outputs of evaluate (and train's run records, tune's summary); for the Grad-CAM "
        "figure also two trained models from MLflow and a few query images of the shards. A missing "
        "(method, bits, seed) is an error naming it: run `dvc repro` first.",
    )
    parser.add_argument("--dataset", required=True, help="dataset name from params.yaml")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="where the report goes (default: reports/<dataset>): new, empty, or a report, which is replaced; any other folder is refused, never deleted",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    if not args.no_mlflow:
        from .tracking import check_store, tracking_uri

        check_store(tracking_uri(params), create=True)  # seconds, before any work
    out, result = write_report(params, args.dataset, args.out)
    logged = "" if args.no_mlflow else f"; MLflow run {log_report(params, args.dataset, out, result)}"
    print(
        f"report of {result['members']} evaluated trainings: {out / 'report.md'} and {len(result['figures'])} figures{logged}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
