"""Retrieval metrics for Hamming codes: mAP@R (index ties and tie-aware), P@H<=r, P@N, PR curves.

Conventions (the project notes, method.md, section "Metrics"):

* Codes are +1/-1 arrays (numpy or torch, any numeric dtype) of shape (n, bits); labels are 0/1
  arrays of shape (n, classes). A database item is *relevant* to a query when they share at
  least one label (multi-label works).
* The ranking of the database for a query is by (Hamming distance, database index): ties are
  broken by index, which is deterministic and CPU-independent. Store the database in a seeded
  random order (never class-sorted) so that index order inside a tie group carries no signal.
* mAP@R: in the top R, AP = mean of precision@k over the ranks k holding a relevant item
  (normalised by the number of relevant items in the top R). A query with no relevant item in
  its top R scores 0 and **counts** in the mean. ``topk=None`` (R = ALL) keeps the whole
  database; R larger than the database is the same as ALL.
* ``ties="average"``: the tie-aware AP, the expectation of AP over all orders inside every
  group of equal distance (closed form per group; for the group straddling rank R, the exact
  hypergeometric sum over how many of its relevant items land in the top R).
* P@H<=r: precision of the Hamming ball of radius r, 0 for an empty ball, averaged over all
  queries; ``return_empty_share=True`` also gives the share of queries with an empty ball.
* P@N: precision of the top N (index ties). N larger than the database returns the whole
  database, so its precision is (#relevant) / n_db.

Implementation: everything derives, per query, from the histograms over distance 0..bits of all
items and of relevant items, plus (for index ties) the relevance of items in rank order up to a
cutoff. A C kernel (``_dpfah_ranking``, imported through ``dpfah.kernels``) computes both in
two passes over the database per query chunk, without the GIL, on a thread per core; a
vectorised numpy fallback (stable radix argsort on uint16 distances) gives identical results
where the extension is not built (logged once per process). Work is chunked over queries:
memory stays bounded (tens of MB) whatever the number of queries.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import kernels as _kernels
from .codes import hamming_distance, pack_codes

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

_TIES = ("index", "average")
# Query chunk sizes: the C kernel needs only O(n_db) scratch per call; the numpy path holds a
# few (chunk, n_db) arrays (uint16 distances, int64 argsort indices), so it aims at ~2M elements.
_C_CHUNK = 32
_NUMPY_CHUNK_ELEMENTS = 1 << 21
_HARMONIC_TABLE = 64


def backend() -> str:
    """``"c"`` when the compiled kernel is in use, else ``"numpy"``."""
    return "c" if (_USE_COMPILED and _ranking is not None) else "numpy"


# --------------------------------------------------------------------------------------------
# input checking and packing


def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{name} must be a numeric array, got dtype {a.dtype}")
    return a


def _pack_labels(labels: np.ndarray) -> np.ndarray:
    n, c = labels.shape
    words = (c + 63) // 64
    padded = np.zeros((n, words * 64), dtype=bool)
    padded[:, :c] = labels != 0
    packed = np.packbits(padded, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False).reshape(n, words)


@dataclass
class _Data:
    qc: np.ndarray  # (nq, W) uint64
    dc: np.ndarray  # (ndb, W) uint64
    ql: np.ndarray  # (nq, L) uint64
    dl: np.ndarray  # (ndb, L) uint64
    bits: int

    @property
    def nq(self) -> int:
        return self.qc.shape[0]

    @property
    def ndb(self) -> int:
        return self.dc.shape[0]


def _prepare(query_codes, db_codes, query_labels, db_labels) -> _Data:
    arrays = {}
    for name, x in (
        ("query_codes", query_codes),
        ("db_codes", db_codes),
        ("query_labels", query_labels),
        ("db_labels", db_labels),
    ):
        a = _as_numpy(x, name)
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n, {'bits' if 'codes' in name else 'classes'}), got shape {a.shape}")
        arrays[name] = a
    qc, dc, ql, dl = arrays["query_codes"], arrays["db_codes"], arrays["query_labels"], arrays["db_labels"]
    if qc.shape[0] < 1 or dc.shape[0] < 1:
        raise ValueError(f"need at least one query and one database item, got {qc.shape[0]} and {dc.shape[0]}")
    if qc.shape[1] != dc.shape[1]:
        raise ValueError(f"bits mismatch: query_codes have {qc.shape[1]} bits, db_codes have {dc.shape[1]}")
    if ql.shape[0] != qc.shape[0]:
        raise ValueError(f"length mismatch: {qc.shape[0]} query_codes but {ql.shape[0]} query_labels")
    if dl.shape[0] != dc.shape[0]:
        raise ValueError(f"length mismatch: {dc.shape[0]} db_codes but {dl.shape[0]} db_labels")
    if ql.shape[1] != dl.shape[1]:
        raise ValueError(f"label width mismatch: query_labels have {ql.shape[1]} classes, db_labels have {dl.shape[1]}")
    if ql.shape[1] < 1:
        raise ValueError("labels must have at least one class column")
    for name, a in (("query_labels", ql), ("db_labels", dl)):
        if not np.all((a == 0) | (a == 1)):
            raise ValueError(f"{name} must contain only 0 and 1")
    packed = []
    for name, a in (("query_codes", qc), ("db_codes", dc)):
        try:
            packed.append(pack_codes(a))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return _Data(packed[0], packed[1], _pack_labels(ql), _pack_labels(dl), int(qc.shape[1]))


def _check_ties(ties: str) -> None:
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")


def _resolve_topk(topk, ndb: int) -> int:
    if topk is None:
        return ndb
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)):
        raise ValueError(f"topk must be None (ALL) or a positive int, got {topk!r}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1 (or None for ALL), got {topk}")
    return int(min(topk, ndb))


def _resolve_ranks(values, name: str) -> np.ndarray:
    v = np.atleast_1d(np.asarray(values))
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty int or 1-D sequence of ints")
    if not np.issubdtype(v.dtype, np.integer):
        if not (np.issubdtype(v.dtype, np.floating) and np.all(v == np.round(v))):
            raise ValueError(f"{name} must hold integers, got {values!r}")
    v = v.astype(np.int64)
    if np.any(v < 1):
        raise ValueError(f"{name} must be >= 1, got {values!r}")
    return v


def _threads(n_threads) -> int:
    if n_threads is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover
            return max(1, os.cpu_count() or 1)
    if int(n_threads) < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return int(n_threads)


# --------------------------------------------------------------------------------------------
# the scan: histograms, index-tie AP sums, relevant counts at rank points


@dataclass
class _Scan:
    hist_all: np.ndarray  # (nq, bits+1) int64
    hist_rel: np.ndarray  # (nq, bits+1) int64
    ap_sum: np.ndarray  # (nq, ncut) float64: sum of precision at relevant ranks <= cutoff
    nrel: np.ndarray  # (nq, ncut) int64: relevant items in the top cutoff
    prec_sum: np.ndarray  # (npts,) sum over queries of precision at the point
    rec_sum: np.ndarray  # (npts,) sum over queries of recall at the point


def _scan_chunk_numpy(qc, dc, ql, dl, bits, hist, cutoffs, ap, nrel, points, relcount) -> None:
    """Numpy twin of ``_ranking.scan`` (same arguments, same outputs)."""
    cq, ndb = qc.shape[0], dc.shape[0]
    nkeys = 2 * (bits + 1)
    dist = hamming_distance(qc, dc)  # (cq, ndb) uint16
    rel = np.zeros((cq, ndb), dtype=bool)
    for w in range(ql.shape[1]):
        rel |= (ql[:, w, None] & dl[None, :, w]) != 0
    key = dist.astype(np.int64) * 2 + rel
    key += (np.arange(cq, dtype=np.int64) * nkeys)[:, None]
    hist[:] = np.bincount(key.ravel(), minlength=cq * nkeys).reshape(cq, nkeys)
    del key
    kmax = int(max(cutoffs[-1] if cutoffs.size else 0, points[-1] if points.size else 0))
    if kmax == 0:
        return
    order = np.argsort(dist, axis=1, kind="stable")[:, :kmax]  # radix sort: (distance, index)
    rel_sorted = np.take_along_axis(rel, order, axis=1)
    del order
    cum = np.cumsum(rel_sorted, axis=1, dtype=np.int64)
    for j, r in enumerate(cutoffs):
        r = int(r)
        prec = cum[:, :r] / np.arange(1, r + 1, dtype=np.float64)
        ap[:, j] = np.where(rel_sorted[:, :r], prec, 0.0).sum(axis=1)
        nrel[:, j] = cum[:, r - 1]
    if points.size:
        relcount[:] = cum[:, points - 1]


def _scan(data: _Data, cutoffs=(), points=(), n_threads=None) -> _Scan:
    """Scan all queries in chunks (threads over chunks). cutoffs/points: sorted unique, 1..ndb."""
    cutoffs = np.ascontiguousarray(np.unique(np.asarray(cutoffs, dtype=np.int64)))
    points = np.ascontiguousarray(np.unique(np.asarray(points, dtype=np.int64)))
    nq, ndb, bits = data.nq, data.ndb, data.bits
    nb = bits + 1
    hist = np.empty((nq, 2 * nb), dtype=np.int64)
    ap = np.zeros((nq, cutoffs.size), dtype=np.float64)
    nrel = np.zeros((nq, cutoffs.size), dtype=np.int64)
    use_c = _USE_COMPILED and _ranking is not None
    if _ranking is None:
        _kernels.announce_fallback()
    kernel = _ranking.scan if use_c else _scan_chunk_numpy
    chunk = _C_CHUNK if use_c else max(1, _NUMPY_CHUNK_ELEMENTS // ndb)
    threads = _threads(n_threads)
    # enough chunks to balance the threads, never more than `chunk` queries per call
    chunk = max(1, min(chunk, -(-nq // (4 * threads))))
    starts = range(0, nq, chunk)

    def work(s: int):
        e = min(s + chunk, nq)
        relcount = np.zeros((e - s, points.size), dtype=np.int64)
        kernel(
            data.qc[s:e], data.dc, data.ql[s:e], data.dl, bits, hist[s:e], cutoffs, ap[s:e], nrel[s:e], points, relcount
        )
        if not points.size:
            return None
        total_rel = hist[s:e, 1::2].sum(axis=1)
        prec = (relcount / points[None, :]).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            rec = np.where(total_rel[:, None] > 0, relcount / np.maximum(total_rel, 1)[:, None], 0.0).sum(axis=0)
        return prec, rec

    prec_sum = np.zeros(points.size)
    rec_sum = np.zeros(points.size)

    def add(results) -> None:  # consumed as they come: per-chunk point sums are not kept
        for r in results:
            if r is not None:
                prec_sum[:] += r[0]
                rec_sum[:] += r[1]

    if threads == 1 or len(starts) == 1:
        add(map(work, starts))
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:  # the kernel releases the GIL
            add(pool.map(work, starts))
    return _Scan(hist[:, 0::2] + hist[:, 1::2], hist[:, 1::2].copy(), ap, nrel, prec_sum, rec_sum)


# --------------------------------------------------------------------------------------------
# tie-aware AP from the histograms


def _harmonic_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """H_a - H_b for integer arrays a >= b >= 0, accurate to ~1e-15 relative.

    Exact table below 64; above, the asymptotic expansion written in differences (u = 1/a,
    v = 1/b) so that nearby a, b lose no digits to cancellation.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    t = _HARMONIC_TABLE
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, t + 1))])

    def big(x, y):  # H_x - H_y for x >= y >= t (float arrays)
        u, v = 1.0 / x, 1.0 / y
        d1 = (y - x) / (x * y)  # u - v, exact-ish from integers
        d2 = d1 * (u + v)  # u^2 - v^2
        d4 = d2 * (u * u + v * v)
        d6 = d2 * (u**4 + u * u * v * v + v**4)
        return np.log1p((x - y) / y) + d1 / 2 - d2 / 12 + d4 / 120 - d6 / 252

    af = a.astype(np.float64)
    bf = b.astype(np.float64)
    tb = table[np.minimum(b, t)]
    with np.errstate(divide="ignore", invalid="ignore"):
        small = table[np.minimum(a, t)] - tb  # a <= t (so b <= t)
        mixed = big(np.maximum(af, t), np.float64(t)) + (table[t] - tb)  # a > t >= b
        large = big(np.maximum(af, t), np.maximum(bf, t))  # b > t
    return np.where(a <= t, small, np.where(b <= t, mixed, large))


def _group_expectation(n, r, n_before, r_before, h=None):
    """Expected sum of precision over the relevant items of a tie group placed at random.

    n items (r relevant) occupy ranks n_before+1 .. n_before+n, with r_before relevant items
    ranked before: E = (r/n) [beta n + (r_before + 1 - beta (1 + n_before)) (H_{N+n} - H_N)],
    beta = (r - 1)/(n - 1) (any value for n = 1). Zero where n = 0 or r = 0. ``h`` may pass
    H_{N+n} - H_N when already known.
    """
    n = np.asarray(n, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    nbf = np.asarray(n_before, dtype=np.float64)
    if h is None:
        h = _harmonic_diff(np.asarray(n_before, dtype=np.int64) + n.astype(np.int64), n_before)
    beta = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
    e = (r / np.maximum(n, 1)) * (beta * n + (r_before + 1 - beta * (1 + nbf)) * h)
    return np.where((n > 0) & (r > 0), e, 0.0)


def _tie_aware_ap(hist_all: np.ndarray, hist_rel: np.ndarray, topk: int) -> np.ndarray:
    """Per-query expected AP@topk over all orders inside tie groups (0 with nothing relevant)."""
    nq = hist_all.shape[0]
    n_before = np.cumsum(hist_all, axis=1) - hist_all
    r_before = np.cumsum(hist_rel, axis=1) - hist_rel
    full = n_before + hist_all <= topk  # groups entirely inside the top R
    e = _group_expectation(hist_all, hist_rel, n_before, r_before)
    s_full = np.where(full, e, 0.0).sum(axis=1)
    r_full = np.where(full, hist_rel, 0).sum(axis=1)
    ap = np.zeros(nq)
    # the group cut by rank R, if any (at most one per query)
    straddle = (n_before < topk) & (n_before + hist_all > topk)
    has = straddle.any(axis=1)
    done = ~has  # top R ends exactly at a group boundary: all is deterministic but the order
    ap[done] = np.where(r_full[done] > 0, s_full[done] / np.maximum(r_full[done], 1), 0.0)
    qs = np.nonzero(has)[0]
    if qs.size == 0:
        return ap
    g = np.argmax(straddle[qs], axis=1)
    n = hist_all[qs, g].astype(np.int64)
    r = hist_rel[qs, g].astype(np.int64)
    nb4 = n_before[qs, g].astype(np.int64)
    rb4 = r_before[qs, g].astype(np.int64)  # = r_full[qs]
    m = topk - nb4  # positions of the group inside the top R, 1 <= m < n
    lo = np.maximum(0, m - (n - r))
    hi = np.minimum(r, m)
    sf = s_full[qs]
    h_m = _harmonic_diff(nb4 + m, nb4)  # H_{N+m} - H_N, one per straddling query
    # straddling queries in row blocks; each row enumerates k = lo..hi (hypergeometric)
    width_all = hi - lo + 1
    order = np.argsort(width_all, kind="stable")  # blocks of rows of similar width
    budget = 1 << 21  # elements per block
    i = 0
    while i < order.size:
        j = i + 1
        while j < order.size and (j + 1 - i) * int(width_all[order[j]]) <= budget:
            j += 1
        rows = order[i:j]
        w = int(width_all[rows].max())
        k = lo[rows, None] + np.arange(w)[None, :]
        valid = k <= hi[rows, None]
        kk = np.minimum(k, hi[rows, None])
        nn, rr, mm = n[rows, None], r[rows, None], m[rows, None]
        # log pmf up to a constant via the ratio P(k+1)/P(k) = (r-k)(m-k) / ((k+1)(n-r-m+k+1))
        kp = kk[:, :-1]
        kf = kp.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            lr = np.log(((rr - kf) * (mm - kf)) / ((kf + 1) * (nn - rr - mm + kf + 1)))
        lr = np.where(valid[:, 1:], lr, 0.0)
        logp = np.concatenate([np.zeros((rows.size, 1)), np.cumsum(lr, axis=1)], axis=1)
        logp = np.where(valid, logp, -np.inf)
        p = np.exp(logp - logp.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        # the k in-range relevant items sit uniformly in the group's first m positions
        e_k = _group_expectation(mm, kk, nb4[rows, None], rb4[rows, None], h=h_m[rows, None])
        denom = rb4[rows, None] + kk
        with np.errstate(divide="ignore", invalid="ignore"):
            val = np.where(denom > 0, (sf[rows, None] + e_k) / np.maximum(denom, 1), 0.0)
        ap[qs[rows]] = np.where(valid, p * val, 0.0).sum(axis=1)
        i = j
    return ap


# --------------------------------------------------------------------------------------------
# public API


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
    _check_ties(ties)
    data = _prepare(query_codes, db_codes, query_labels, db_labels)
    r = _resolve_topk(topk, data.ndb)
    if ties == "index":
        sc = _scan(data, cutoffs=[r], n_threads=n_threads)
        per_q = _ap_from_sums(sc.ap_sum[:, 0], sc.nrel[:, 0])
    else:
        sc = _scan(data, n_threads=n_threads)
        per_q = _tie_aware_ap(sc.hist_all, sc.hist_rel, r)
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
    data = _prepare(query_codes, db_codes, query_labels, db_labels)
    sc = _scan(data, n_threads=n_threads)
    prec, empty = _ball(sc.hist_all, sc.hist_rel, radius)
    p = float(prec.mean())
    return (p, float(empty.mean())) if return_empty_share else p


def precision_at_n(query_codes, db_codes, query_labels, db_labels, ns, *, n_threads: int | None = None) -> np.ndarray:
    """Mean precision of the top N (index ties), one value per N in ``ns`` (int or sequence).

    N larger than the database returns the whole database: precision = #relevant / n_db.
    """
    ns = _resolve_ranks(ns, "ns")
    data = _prepare(query_codes, db_codes, query_labels, db_labels)
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
    data = _prepare(query_codes, db_codes, query_labels, db_labels)
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
    data = _prepare(query_codes, db_codes, query_labels, db_labels)
    if ranks is None:
        ranks = np.unique(np.linspace(1, data.ndb, 100).round().astype(np.int64))
    ranks = _resolve_ranks(ranks, "ranks")
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
    data = _prepare(query_codes, db_codes, query_labels, db_labels)
    r = _resolve_topk(topk, data.ndb)
    if isinstance(max_n, bool) or not isinstance(max_n, (int, np.integer)) or max_n < 1:
        raise ValueError(f"max_n must be a positive int, got {max_n!r}")
    ns = np.arange(1, min(int(max_n), data.ndb) + 1, dtype=np.int64)
    points = ns
    rank_eff = None
    if pr_ranks is not None:
        pr_ranks = _resolve_ranks(pr_ranks, "pr_ranks")
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
        "map_tie_aware": float(_tie_aware_ap(sc.hist_all, sc.hist_rel, r).mean()),
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
