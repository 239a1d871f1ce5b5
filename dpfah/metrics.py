"""Retrieval metrics for Hamming codes: mAP@R (index ties and tie-aware), P@H<=r, P@N, PR curves.

Codes are +1/-1 arrays (n, bits), labels 0/1 arrays (n, classes); an item is relevant to a query
when they share a label. The database is ranked by (Hamming distance, database index); a query
with nothing relevant in its top R scores 0 and counts; ``topk=None`` is R = ALL. Every metric
derives from one scan of the database (``dpfah.ranking_scan``: the C kernel ``_dpfah_ranking``
or a numpy fallback with identical results); ``ties="average"`` is ``dpfah.tie_aware``.
"""

from __future__ import annotations

import numpy as np

from . import kernels as _kernels
from .ranking_scan import Data, check_ties, prepare, resolve_ranks, resolve_topk, scan, threads
from .tie_aware import tie_aware_ap

# Optional compiled kernel (setup.py builds it where a compiler exists); None without it.
_ranking = _kernels.ranking

__all__ = [
    "mean_average_precision",
    "precision_within_radius",
    "precision_at_n",
    "pr_curve_by_radius",
    "pr_curve_by_rank",
    "retrieval_report",
    "backend",
]

#: Use the compiled kernel when it imported. Tests flip this to exercise the numpy fallback.
_USE_COMPILED = _ranking is not None


def backend() -> str:
    """``"c"`` when the compiled kernel is in use, else ``"numpy"``."""
    return "c" if (_USE_COMPILED and _ranking is not None) else "numpy"


#: The top-K scan (``_dpfah_ranking.scan_top``) serves mAP@R when R * _TOP_SHARE <= n_db: it
#: reads only the items of the distances up to the one that reaches rank R, so its histogram
#: stops there (all the index-tie and tie-aware AP@R use). Larger R: the full scan.
_TOP_SHARE = 4
#: Tests and benchmarks set this to False to take the full scan (the path before scan_top).
_USE_TOP = True


def _scan(data: Data, cutoffs=(), points=(), n_threads=None, *, top: bool = False):
    """``ranking_scan.scan`` with the kernel ``backend()`` names (the fallback announced once).

    ``top=True`` (mAP@R only): the C kernel's top-K scan, whose histogram is exact only up to
    the distance that reaches the largest cutoff; the numpy twin always gives the full one.
    """
    if _ranking is None:
        _kernels.announce_fallback()
    if backend() != "c":
        return scan(data, cutoffs, points, n_threads, kernel=None)
    kernel = _ranking.scan_top if top and _USE_TOP else _ranking.scan
    return scan(data, cutoffs, points, n_threads, kernel=kernel)


def mean_average_precision(
    query_codes,
    db_codes,
    query_labels,
    db_labels,
    topk=None,
    ties="index",
    *,
    return_per_query: bool = False,
    n_threads: int | None = None,
):
    """mAP@topk (topk=None: ALL) of Hamming ranking; queries with no relevant item score 0.

    ties="index": ranking by (distance, database index). ties="average": expected AP over all
    orders inside tie groups (closed form; exact hypergeometric sum for the group straddling
    rank topk). AP is normalised by the number of relevant items in the top R.

    Returns the mean as a float, or ``(mean, per_query_ap)`` with ``return_per_query=True``.
    """
    check_ties(ties)
    data = prepare(query_codes, db_codes, query_labels, db_labels)
    r = resolve_topk(topk, data.ndb)
    top = r * _TOP_SHARE <= data.ndb
    if ties == "index":
        sc = _scan(data, cutoffs=[r], n_threads=n_threads, top=top)
        per_q = _ap_from_sums(sc.ap_sum[:, 0], sc.nrel[:, 0])
    else:
        # tie_aware_ap reads the groups up to the one that rank r cuts: scan_top's histogram
        sc = _scan(data, cutoffs=[r] if top else (), n_threads=n_threads, top=top)
        per_q = tie_aware_ap(sc.hist_all, sc.hist_rel, r, n_threads=threads(n_threads))
    mean = float(per_q.mean())
    return (mean, per_q) if return_per_query else mean


def _ap_from_sums(ap_sum: np.ndarray, nrel: np.ndarray) -> np.ndarray:
    return np.where(nrel > 0, ap_sum / np.maximum(nrel, 1), 0.0)


def _ball(hist_all, hist_rel, radius: int):
    n = hist_all[:, : radius + 1].sum(axis=1)
    m = hist_rel[:, : radius + 1].sum(axis=1)
    prec = np.where(n > 0, m / np.maximum(n, 1), 0.0)
    return prec, n == 0


def _check_radius(radius) -> int:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    return int(radius)


def precision_within_radius(
    query_codes,
    db_codes,
    query_labels,
    db_labels,
    radius: int = 2,
    *,
    return_empty_share: bool = False,
    n_threads: int | None = None,
):
    """P@H<=radius: precision of the Hamming ball, 0 for an empty ball, mean over ALL queries.

    With ``return_empty_share=True`` returns ``(precision, empty_share)``, where empty_share is
    the fraction of queries whose ball holds no database item (report it beside the
    precision: at 64 bits most balls are empty).
    """
    radius = _check_radius(radius)
    data = prepare(query_codes, db_codes, query_labels, db_labels)
    sc = _scan(data, n_threads=n_threads)
    prec, empty = _ball(sc.hist_all, sc.hist_rel, radius)
    p = float(prec.mean())
    return (p, float(empty.mean())) if return_empty_share else p


def precision_at_n(query_codes, db_codes, query_labels, db_labels, ns, *, n_threads: int | None = None) -> np.ndarray:
    """Mean precision of the top N (index ties), one value per N in ``ns`` (int or sequence).

    N larger than the database returns the whole database: precision = #relevant / n_db.
    """
    ns = resolve_ranks(ns, "ns")
    data = prepare(query_codes, db_codes, query_labels, db_labels)
    eff = np.minimum(ns, data.ndb)
    sc = _scan(data, points=eff, n_threads=n_threads)
    pts = np.unique(eff)
    return (sc.prec_sum / data.nq)[np.searchsorted(pts, eff)]


def _pr_by_radius(hist_all, hist_rel, bits: int) -> dict:
    ca = np.cumsum(hist_all, axis=1)
    cr = np.cumsum(hist_rel, axis=1)
    total = cr[:, -1:]
    prec = np.where(ca > 0, cr / np.maximum(ca, 1), 0.0)
    rec = np.where(total > 0, cr / np.maximum(total, 1), 0.0)
    return {"radius": np.arange(bits + 1), "precision": prec.mean(axis=0), "recall": rec.mean(axis=0)}


def pr_curve_by_radius(query_codes, db_codes, query_labels, db_labels, *, n_threads: int | None = None) -> dict:
    """PR curve over Hamming radius r = 0..bits.

    Per query: precision and recall of the radius-r ball (precision 0 for an empty ball;
    recall = relevant in the ball / relevant in the database, 0 if the query has none),
    averaged over all queries. Returns ``{"radius", "precision", "recall"}`` (numpy arrays).
    """
    data = prepare(query_codes, db_codes, query_labels, db_labels)
    sc = _scan(data, n_threads=n_threads)
    return _pr_by_radius(sc.hist_all, sc.hist_rel, data.bits)


def pr_curve_by_rank(
    query_codes, db_codes, query_labels, db_labels, ranks=None, *, n_threads: int | None = None
) -> dict:
    """PR curve over the top-k lists for k in ``ranks`` (index ties; default: 100 ranks
    evenly spaced over 1..n_db). Per query: precision = relevant in top k / k, recall =
    relevant in top k / relevant in the database (0 if none); averaged over all queries.
    k larger than the database is the whole database. Returns ``{"ranks", "precision",
    "recall"}`` (numpy arrays, ranks as given).
    """
    data = prepare(query_codes, db_codes, query_labels, db_labels)
    if ranks is None:
        ranks = np.unique(np.linspace(1, data.ndb, 100).round().astype(np.int64))
    ranks = resolve_ranks(ranks, "ranks")
    eff = np.minimum(ranks, data.ndb)
    sc = _scan(data, points=eff, n_threads=n_threads)
    idx = np.searchsorted(np.unique(eff), eff)
    return {"ranks": ranks, "precision": (sc.prec_sum / data.nq)[idx], "recall": (sc.rec_sum / data.nq)[idx]}


def retrieval_report(
    query_codes,
    db_codes,
    query_labels,
    db_labels,
    topk=None,
    *,
    radius: int = 2,
    max_n: int = 1000,
    pr_ranks=None,
    n_threads: int | None = None,
) -> dict:
    """Every metric of the protocol from one scan of the database.

    Returns a dict (floats and numpy arrays):

    * ``map``: mAP@topk, index ties; ``map_tie_aware``: the tie-aware mAP@topk;
      ``topk``: the R used (n_db for ALL), ``topk_is_all``;
      ``zero_relevant_share``: share of queries with no relevant item in their top R (they
      score 0 and count);
    * ``radius``, ``precision_within_radius`` (P@H<=radius, empty ball = 0), ``empty_share``;
    * ``p_at_n``: ``{"n": 1..min(max_n, n_db), "precision": ...}`` (index ties);
    * ``pr_by_radius``: as :func:`pr_curve_by_radius`;
    * ``pr_by_rank``: as :func:`pr_curve_by_rank` when ``pr_ranks`` is given;
    * ``n_queries``, ``n_db``, ``bits``, ``backend``.
    """
    radius = _check_radius(radius)
    data = prepare(query_codes, db_codes, query_labels, db_labels)
    r = resolve_topk(topk, data.ndb)
    if isinstance(max_n, bool) or not isinstance(max_n, (int, np.integer)) or max_n < 1:
        raise ValueError(f"max_n must be a positive int, got {max_n!r}")
    ns = np.arange(1, min(int(max_n), data.ndb) + 1, dtype=np.int64)
    points = ns
    rank_eff = None
    if pr_ranks is not None:
        pr_ranks = resolve_ranks(pr_ranks, "pr_ranks")
        rank_eff = np.minimum(pr_ranks, data.ndb)
        points = np.union1d(ns, rank_eff)
    sc = _scan(data, cutoffs=[r], points=points, n_threads=n_threads)
    pts = np.unique(points)
    per_q = _ap_from_sums(sc.ap_sum[:, 0], sc.nrel[:, 0])
    ball, empty = _ball(sc.hist_all, sc.hist_rel, radius)
    out = {
        "n_queries": data.nq,
        "n_db": data.ndb,
        "bits": data.bits,
        "topk": r,
        "topk_is_all": r == data.ndb,
        "map": float(per_q.mean()),
        "map_tie_aware": float(tie_aware_ap(sc.hist_all, sc.hist_rel, r, n_threads=threads(n_threads)).mean()),
        "zero_relevant_share": float((sc.nrel[:, 0] == 0).mean()),
        "radius": radius,
        "precision_within_radius": float(ball.mean()),
        "empty_share": float(empty.mean()),
        "p_at_n": {"n": ns, "precision": (sc.prec_sum / data.nq)[np.searchsorted(pts, ns)]},
        "pr_by_radius": _pr_by_radius(sc.hist_all, sc.hist_rel, data.bits),
        "backend": backend(),
    }
    if rank_eff is not None:
        idx = np.searchsorted(pts, rank_eff)
        out["pr_by_rank"] = {
            "ranks": pr_ranks,
            "precision": (sc.prec_sum / data.nq)[idx],
            "recall": (sc.rec_sum / data.nq)[idx],
        }
    return out
