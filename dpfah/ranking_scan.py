"""The one pass over the database that every retrieval metric derives from.

Checks and packs the inputs (``prepare``), then ``scan`` computes per query the histograms over
Hamming distance 0..bits of all and of relevant items, the index-tie AP sums at the cutoffs
and the relevant counts at rank points, in query chunks on a thread per core, with the C
kernel or ``scan_chunk_numpy``, its numpy twin (identical results).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .codes import hamming_distance, pack_codes

TIES = ("index", "average")
# Query chunk sizes: the C kernel needs only O(n_db) scratch per call; the numpy path holds a
# few (chunk, n_db) arrays (uint16 distances, int64 argsort indices), so it aims at ~2M elements.
_C_CHUNK = 32
_NUMPY_CHUNK_ELEMENTS = 1 << 21


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
class Data:
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


def _zero_one(a: np.ndarray) -> bool:
    """Whether every value is 0 or 1 (integers: two reductions instead of three passes)."""
    if a.dtype == bool:
        return True
    if np.issubdtype(a.dtype, np.integer):
        return a.size == 0 or (int(a.min()) >= 0 and int(a.max()) <= 1)
    return bool(np.all((a == 0) | (a == 1)))


def prepare(query_codes, db_codes, query_labels, db_labels) -> Data:
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
        if not _zero_one(a):
            raise ValueError(f"{name} must contain only 0 and 1")
    packed = []
    for name, a in (("query_codes", qc), ("db_codes", dc)):
        try:
            packed.append(pack_codes(a))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return Data(packed[0], packed[1], _pack_labels(ql), _pack_labels(dl), int(qc.shape[1]))


def check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def resolve_topk(topk, ndb: int) -> int:
    if topk is None:
        return ndb
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)):
        raise ValueError(f"topk must be None (ALL) or a positive int, got {topk!r}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1 (or None for ALL), got {topk}")
    return int(min(topk, ndb))


def resolve_ranks(values, name: str) -> np.ndarray:
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


def threads(n_threads) -> int:
    """Threads to use: all cores this process may run on for None, else n_threads (>= 1)."""
    if n_threads is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover
            return max(1, os.cpu_count() or 1)
    if int(n_threads) < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return int(n_threads)


@dataclass
class Scan:
    hist_all: np.ndarray  # (nq, bits+1) int64
    hist_rel: np.ndarray  # (nq, bits+1) int64
    ap_sum: np.ndarray  # (nq, ncut) float64: sum of precision at relevant ranks <= cutoff
    nrel: np.ndarray  # (nq, ncut) int64: relevant items in the top cutoff
    prec_sum: np.ndarray  # (npts,) sum over queries of precision at the point
    rec_sum: np.ndarray  # (npts,) sum over queries of recall at the point


def scan_chunk_numpy(qc, dc, ql, dl, bits, hist, cutoffs, ap, nrel, points, relcount) -> None:
    """Numpy twin of ``_dpfah_ranking.scan`` (same arguments, same outputs)."""
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


def scan(data: Data, cutoffs=(), points=(), n_threads=None, *, kernel=None) -> Scan:
    """Scan all queries in chunks (threads over chunks). cutoffs/points: sorted unique, 1..ndb.

    ``kernel``: the compiled ``_dpfah_ranking.scan``, or None for its numpy twin.
    """
    cutoffs = np.ascontiguousarray(np.unique(np.asarray(cutoffs, dtype=np.int64)))
    points = np.ascontiguousarray(np.unique(np.asarray(points, dtype=np.int64)))
    nq, ndb, bits = data.nq, data.ndb, data.bits
    nb = bits + 1
    hist = np.empty((nq, 2 * nb), dtype=np.int64)
    ap = np.zeros((nq, cutoffs.size), dtype=np.float64)
    nrel = np.zeros((nq, cutoffs.size), dtype=np.int64)
    use_c = kernel is not None
    kernel = kernel if use_c else scan_chunk_numpy
    chunk = _C_CHUNK if use_c else max(1, _NUMPY_CHUNK_ELEMENTS // ndb)
    n_workers = threads(n_threads)
    # enough chunks to balance the threads, never more than `chunk` queries per call
    chunk = max(1, min(chunk, -(-nq // (4 * n_workers))))
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

    if n_workers == 1 or len(starts) == 1:
        add(map(work, starts))
    else:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:  # the kernel releases the GIL
            add(pool.map(work, starts))
    return Scan(hist[:, 0::2] + hist[:, 1::2], hist[:, 1::2].copy(), ap, nrel, prec_sum, rec_sum)
