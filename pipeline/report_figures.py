"""The report's figures: PR and P@N curves per code length, P@H against the code length, the
t-SNE of query codes with its k-NN agreement, and the Grad-CAM pair. Each PNG names its curves in
its text (key ``Curves``). See docs/report.md."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import DEFAULT_METHOD, write_atomic
from .config import Params
from .figures import figure
from .precision_plots import EMPTY_BALL_RULE, mark_radii, precision_axis, radius_legend
from .report_tables import CURVES, RADIUS_KEY, Cell, Member, base_method, interval, members_of, metric

__all__ = [
    "TSNE_POINTS",
    "KNN",
    "figure_pr",
    "figure_p_at_n",
    "p_at_h_cells",
    "figure_p_at_h",
    "knn_agreement",
    "figure_tsne",
    "figure_gradcam",
]

TSNE_POINTS = 2000  # query codes in a t-SNE (a seeded subsample beyond this)
KNN = 10  # neighbours of the number beside the t-SNE


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


def figure_pr(params: Params, members: Sequence[Member], bits: int, path: Path, dataset: str, radius: int):
    """PR by Hamming radius (left: a curve per method with its radii r = 0..4 marked, as in the
    evaluation's figure; the empty-ball rule under the figure) and by rank (right), averaged
    over seeds, precision from 0 to 1. Returns the figure."""
    fig = figure(11.5, 4.6)
    left, right = fig.subplots(1, 2)
    for m in params.train.methods:
        group = members_of(members, m, bits)
        style = _style(params, m)
        x, y = _mean_curve(group, "pr_radius")
        left.plot(x, y, marker=".", markersize=2, **style)
        mark_radii(left, x, y, style["color"], radius)
        x, y = _mean_curve(group, "pr_rank")
        right.plot(x, y, marker=".", markersize=2, **style)
    left.set(xlabel="recall", ylabel="precision", title="by Hamming radius", xlim=(0, 1.02))
    right.set(xlabel="recall", ylabel="precision", title="by rank", xlim=(0, 1.02))
    for ax in (left, right):
        precision_axis(ax)
        ax.grid(alpha=0.3)
    handles = left.get_legend_handles_labels()[0] + radius_legend(radius)  # one legend: over neither curves nor caption
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle(f"PR curves, {dataset}, {bits} bits ({_seeds_note(params)})")
    fig.supxlabel(EMPTY_BALL_RULE, fontsize=7)
    _save(fig, path)
    return fig


def figure_p_at_n(params: Params, members: Sequence[Member], bits: int, path: Path, dataset: str) -> None:
    fig = figure(7.0, 4.2)
    ax = fig.subplots()
    for m in params.train.methods:
        x, y = _mean_curve(members_of(members, m, bits), "p_at_n")
        ax.plot(x, y, **_style(params, m))
    ax.set(
        xlabel="N (top-N returned)", ylabel="precision", title=f"P@N, {dataset}, {bits} bits ({_seeds_note(params)})"
    )
    precision_axis(ax)
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    _save(fig, path)


def p_at_h_cells(params: Params, members: Sequence[Member]) -> dict[tuple[str, int], Cell]:
    """P@H<=radius of each (method, code length): mean and 95 % t interval over the seeds."""
    return {
        (m, b): interval([metric(x.metrics, RADIUS_KEY) for x in members_of(members, m, b)])
        for m in params.train.methods
        for b in sorted(params.bits)
    }


def figure_p_at_h(params: Params, cells: dict[tuple[str, int], Cell], path: Path, dataset: str, radius: int) -> None:
    """P@H<=radius against the code length (Fig 11), one curve per method (error bars: the 95 %
    t interval where there are seeds to make one): drawn only with two or more code lengths."""
    bits = sorted(params.bits)
    fig = figure(7.0, 4.2)
    ax = fig.subplots()
    for m in params.train.methods:
        row = [cells[(m, b)] for b in bits]
        ax.errorbar(
            bits, [c.mean for c in row], yerr=[c.half or 0.0 for c in row], marker="o", capsize=3, **_style(params, m)
        )
    ax.set(
        xlabel="code length (bits)",
        ylabel=f"precision within Hamming radius {radius}",
        title=f"P@H<={radius}, {dataset} ({_seeds_note(params)})",
    )
    precision_axis(ax)
    ax.set_xticks(bits)
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    _save(fig, path)


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
    baselines = [m for m in params.train.methods if base_method(params, m) != DEFAULT_METHOD]
    if not baselines:
        return None, "no baseline in train.methods"
    scores = {
        m: np.nanmean([x.val_map for x in members_of(members, m, bits)])
        if any(not math.isnan(x.val_map) for x in members_of(members, m, bits))
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
    fig = figure(5.0 * len(shown), 4.8)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    out = {"bits": bits, "seed": seed, "baseline": baseline, "baseline_chosen_by": why, "knn": KNN, "agreement": {}}
    for ax, m in zip(axes, shown):
        member = next(x for x in members_of(members, m, bits) if x.seed == seed)
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
    fig = figure(6.6, 1.9 * n + 0.9)
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
        f"Grad-CAM of the hash layer (target sign(u)·u), {dataset}, {pair.bits} bits, seed {pair.seed}, "
        f"{pair.image_size} px",
        fontsize=9,
    )
    columns = ["query image", f"{pair.methods[0]} (without PFA)", f"{pair.methods[1]} (with PFA)"]
    _save(fig, path, {"Rows": " | ".join(pair.names), "Columns": " | ".join(columns)})
