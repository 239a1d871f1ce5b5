"""The precision figures of an evaluation (PR by radius and by rank, P@N) and the conventions the
report's figures share with them and with DVC's template (pipeline/dvc_plots/precision.json):
precision from 0 to 1, the radii r = 0..4 marked on a PR-by-radius curve, the empty-ball caption."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .figures import figure

__all__ = [
    "PRECISION_LIMITS",
    "RADIUS_MARKERS",
    "EMPTY_BALL_RULE",
    "precision_axis",
    "mark_radii",
    "radius_legend",
    "plot_pr",
    "plot_p_at_n",
]

#: The precision axis of every figure (DVC's template: the domain [0, 1]).
PRECISION_LIMITS = (0.0, 1.0)
#: One marker shape per radius r = 0, 1, 2, ... on a PR-by-radius curve (as many radii as shapes).
RADIUS_MARKERS = ("o", "s", "^", "D", "v")
#: The caption of every PR-by-radius panel: why its curve starts low at r = 0.
EMPTY_BALL_RULE = (
    "PR by Hamming radius: a query whose ball of radius r holds no database item counts as precision 0 "
    "(the empty-ball rule of P@H<=r), so the curve rises from r = 0 as the balls fill."
)


def precision_axis(ax) -> None:
    """Precision from 0 to 1 whatever the curves' height (a flat curve looks flat)."""
    ax.set_ylim(*PRECISION_LIMITS)


def mark_radii(
    ax, recall: Sequence[float], precision: Sequence[float], color: Any, radius: int | None = None, **legend: Any
) -> None:
    """The points r = 0 .. len(RADIUS_MARKERS) - 1 of a PR-by-radius curve, each its own shape
    (the P@H radius larger), drawn whole even at precision 1. ``legend``: a label per radius
    (``labels=[...]``) puts each point in the legend."""
    labels = legend.get("labels")
    for r, marker in enumerate(RADIUS_MARKERS[: len(precision)]):
        ax.scatter(
            [float(recall[r])],
            [float(precision[r])],
            s=90 if r == radius else 30,
            marker=marker,
            color=color,
            edgecolor="black",
            linewidth=0.6,
            zorder=3,
            clip_on=False,
            label=None if labels is None else labels[r],
        )


def radius_legend(radius: int | None) -> list[Any]:
    """Legend handles of the radius shapes (in black), for a figure with several curves."""
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], marker=m, linestyle="", color="0.3", markeredgecolor="black", label=f"r = {r}")
        for r, m in enumerate(RADIUS_MARKERS)
    ] + ([] if radius is None else [Line2D([], [], linestyle="", label=f"larger: r = {radius} (P@H<={radius})")])


def plot_pr(path: Path, report: dict[str, Any], title: str, radius: int = 2):
    """One evaluation's PR curves: by Hamming radius (left: the points r=0..4 named in the
    legend with their precision and recall, the radius of P@H<=radius larger; the empty-ball
    rule under the figure) and by rank (right). Returns the figure."""
    fig = figure(10.0, 4.6)
    left, right = fig.subplots(1, 2)
    pr = report["pr_by_radius"]
    left.plot(pr["recall"], pr["precision"], color="C0", linewidth=1, marker=".", markersize=3, label="r = 0 .. bits")
    labels = [
        f"r={r}: P {float(pr['precision'][r]):.3f}, R {float(pr['recall'][r]):.3f}"
        + (f"  (P@H<={radius})" if r == radius else "")
        for r in range(min(len(pr["radius"]), len(RADIUS_MARKERS)))
    ]
    mark_radii(left, pr["recall"], pr["precision"], "C0", radius, labels=labels)
    left.set(xlabel="recall", ylabel="precision", title="by Hamming radius r", xlim=(-0.02, 1.02))
    left.legend(loc="best", fontsize=7, framealpha=0.9)  # away from the points (a weak model has them low left)
    rank = report["pr_by_rank"]
    right.plot(rank["recall"], rank["precision"], marker=".", markersize=3)
    right.set(xlabel="recall", ylabel="precision", title="by rank (top-k lists, k = 1 .. database)", xlim=(0, 1.02))
    for ax in (left, right):
        precision_axis(ax)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.supxlabel(EMPTY_BALL_RULE, fontsize=7)
    fig.savefig(path)
    return fig


def plot_p_at_n(path: Path, report: dict[str, Any], title: str) -> None:
    """One evaluation's P@N curve."""
    fig = figure(5.0, 4.0)
    ax = fig.subplots()
    ax.plot(report["p_at_n"]["n"], report["p_at_n"]["precision"])
    ax.set(xlabel="N (top-N returned)", ylabel="precision", title=title)
    precision_axis(ax)
    ax.grid(alpha=0.3)
    fig.savefig(path)
