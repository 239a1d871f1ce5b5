"""What evaluate writes for DVC: the scalar metrics (named as in MLflow), the curve data of the
DVC plots and the query codes, each file written atomically. A rate that is a count over a total
(P@N, precision of a top-k list) is stored as that fraction, so it prints as its exact decimal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import metric_values, write_atomic, write_json_atomic
from .runkey import RunKey

__all__ = ["P_AT", "p_at_name", "count_rate", "exact_rates", "flat_metrics", "write_plots", "write_dvc_outputs"]

P_AT = (10, 100, 500, 1000)  # P@N values reported as scalars (those within the curve)


def count_rate(rates: Any, totals: Any) -> np.ndarray:
    """``rates`` that are counts over ``totals`` (e.g. P@N: relevant items among the N x queries
    returned) as count / total exactly: the mean of per-query shares is off by an ulp or so
    (0.4413000000000001), the fraction is not (0.4413). A rate whose count is not a whole
    number (it is no count) is kept as it is."""
    rates, totals = np.asarray(rates, dtype=np.float64), np.asarray(totals, dtype=np.float64)
    counts = rates * totals
    whole = np.round(counts)
    return np.where(np.abs(counts - whole) < 1e-3, whole / np.maximum(totals, 1), rates)


def exact_rates(report: dict[str, Any]) -> dict[str, Any]:
    """The curves of :func:`dpfah.metrics.retrieval_report` whose precision is a count over a
    total, as :func:`count_rate`: P@N (relevant among min(N, database) x queries) and the
    precision of the top-k lists (k x queries)."""
    nq, ndb = report["n_queries"], report["n_db"]
    pn, rank = report["p_at_n"], report["pr_by_rank"]
    return {
        "p_at_n": {**pn, "precision": count_rate(pn["precision"], np.minimum(pn["n"], ndb) * nq)},
        "pr_by_rank": {**rank, "precision": count_rate(rank["precision"], np.asarray(rank["ranks"]) * nq)},
    }


def p_at_name(n: int) -> str:
    """The metric of P@n: N zero-padded to four digits (``query_p_at_0010`` ...
    ``query_p_at_1000``), so that the runs table and ``dvc metrics show`` sort them by N."""
    return f"query_p_at_{n:04d}"


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics, named as they are in the metrics file and in MLflow."""
    out = {
        "query_map": float(report["map"]),
        "query_map_tie_aware": float(report["map_tie_aware"]),
        "query_zero_relevant_share": float(report["zero_relevant_share"]),
        "query_precision_within_radius": float(report["precision_within_radius"]),
        "query_empty_ball_share": float(report["empty_share"]),
    }
    ns, precision = report["p_at_n"]["n"], exact_rates(report)["p_at_n"]["precision"]
    for n in P_AT:
        if n <= len(ns):
            out[p_at_name(n)] = float(precision[n - 1])
    return out


def _csv(path: Path, header: Sequence[str], columns: Sequence[np.ndarray]) -> None:
    lines = [",".join(header)]
    for row in zip(*columns):
        lines.append(",".join(repr(float(v)) if isinstance(v, (float, np.floating)) else str(int(v)) for v in row))
    write_atomic(path, "\n".join(lines) + "\n")


def write_plots(key: RunKey, root, report: dict[str, Any]) -> dict[str, Path]:
    """The curve data of ``key``, one CSV per curve (``plots/<curve>/<stem>.csv``)."""
    exact = exact_rates(report)
    pr, pn, rank = report["pr_by_radius"], exact["p_at_n"], exact["pr_by_rank"]
    files = {
        "pr_radius": (("radius", "precision", "recall"), (pr["radius"], pr["precision"], pr["recall"])),
        "pr_rank": (("rank", "precision", "recall"), (rank["ranks"], rank["precision"], rank["recall"])),
        "p_at_n": (("n", "precision"), (pn["n"], pn["precision"])),
    }
    assert tuple(files) == RunKey.CURVES
    for curve, (header, columns) in files.items():
        _csv(key.plot_file(curve, root), header, columns)
    return {curve: key.plot_file(curve, root) for curve in files}


def write_dvc_outputs(
    root, key: RunKey, doc: dict[str, Any], report: dict[str, Any], query_table
) -> tuple[Path, dict[str, Path]]:
    """The files DVC tracks, each written atomically: the curve data, the query codes (a
    :func:`codes_table`), the evaluation record (``doc`` but its ``query_*`` numbers), then
    the metrics file (those numbers only). Returns (metrics file, curve files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    plots = write_plots(key, root, report)
    sink = pa.BufferOutputStream()
    pq.write_table(query_table, sink)
    write_atomic(key.query_codes_file(root), sink.getvalue().to_pybytes())
    metrics = metric_values(doc)
    write_json_atomic(key.evaluation_file(root), {k: v for k, v in doc.items() if k not in metrics})
    return write_json_atomic(key.metrics_file(root), metrics), plots
