"""Tie-aware average precision from per-query distance histograms.

The expectation of AP over every order inside each group of equal Hamming distance: a closed
form per group and, for the group that rank R cuts, the exact hypergeometric sum over how many
of its relevant items land in the top R. ``dpfah.metrics`` calls it with ``ties="average"``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

# H_n exactly from a table below this; the asymptotic expansion above
_HARMONIC_TABLE = 64
# straddling queries are computed in parts of rows of about this many elements (cache-sized
# temporaries), at least _MIN_PART_ROWS rows, parts spread over the threads
_PART_ELEMENTS = 1 << 15
_MIN_PART_ROWS = 8


def harmonic_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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


def group_expectation(n, r, n_before, r_before, h=None):
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
        h = harmonic_diff(np.asarray(n_before, dtype=np.int64) + n.astype(np.int64), n_before)
    beta = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
    e = (r / np.maximum(n, 1)) * (beta * n + (r_before + 1 - beta * (1 + nbf)) * h)
    return np.where((n > 0) & (r > 0), e, 0.0)


def tie_aware_ap(
    hist_all: np.ndarray, hist_rel: np.ndarray, topk: int, *, every_group: bool = False, n_threads: int = 1
) -> np.ndarray:
    """Per-query expected AP@topk over all orders inside tie groups (0 with nothing relevant).

    ``n_threads``: threads for the queries whose top R cuts a tie group (the same bits with
    any number). ``every_group=True`` computes as before the work of issue 30: the group
    expectation on every group, each block of those queries in one piece on one thread (the
    same bits, slower; bench/metrics.py times both).
    """
    nq = hist_all.shape[0]
    n_before = np.cumsum(hist_all, axis=1) - hist_all
    r_before = np.cumsum(hist_rel, axis=1) - hist_rel
    full = n_before + hist_all <= topk  # groups entirely inside the top R
    # the expectation only where it is not 0 (a group inside the top R holding relevant items):
    # the same numbers in the same places as on the whole array, a fraction of the work
    if every_group:
        e = np.where(full, group_expectation(hist_all, hist_rel, n_before, r_before), 0.0)
    else:
        some = full & (hist_all > 0) & (hist_rel > 0)
        e = np.zeros(hist_all.shape)
        e[some] = group_expectation(hist_all[some], hist_rel[some], n_before[some], r_before[some])
    s_full = e.sum(axis=1)
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
    h_m = harmonic_diff(nb4 + m, nb4)  # H_{N+m} - H_N, one per straddling query
    # straddling queries in row blocks; each row enumerates k = lo..hi (hypergeometric)
    width_all = hi - lo + 1
    order = np.argsort(width_all, kind="stable")  # blocks of rows of similar width
    budget = 1 << 21  # elements per block
    blocks = []
    i = 0
    while i < order.size:
        j = i + 1
        while j < order.size and (j + 1 - i) * int(width_all[order[j]]) <= budget:
            j += 1
        rows = order[i:j]
        # a block's rows are padded to its widest one: that width decides the order of the
        # row sums, so a block may be cut into parts of rows (threads), never regrouped
        w = int(width_all[rows].max())
        # parts of about _PART_ELEMENTS elements: their temporaries stay in the cache
        step = rows.size if every_group else max(_MIN_PART_ROWS, _PART_ELEMENTS // w)
        blocks += [(rows[a : a + step], w) for a in range(0, rows.size, step)]
        i = j

    def run(block):
        rows, w = block
        ap[qs[rows]] = _straddle_rows(
            n[rows], r[rows], m[rows], lo[rows], hi[rows], nb4[rows], rb4[rows], sf[rows], h_m[rows], w
        )

    if len(blocks) > 1 and n_threads > 1 and not every_group:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:  # numpy releases the GIL
            list(pool.map(run, blocks))
    else:
        for block in blocks:
            run(block)
    return ap


def _straddle_rows(n, r, m, lo, hi, nb4, rb4, sf, h_m, w: int) -> np.ndarray:
    """AP of straddling queries (1-D arrays, one entry each) from the rows k = lo..lo + w - 1."""
    k = lo[:, None] + np.arange(w)[None, :]
    valid = k <= hi[:, None]
    kk = np.minimum(k, hi[:, None])
    nn, rr, mm = n[:, None], r[:, None], m[:, None]
    # log pmf up to a constant via the ratio P(k+1)/P(k) = (r-k)(m-k) / ((k+1)(n-r-m+k+1))
    kp = kk[:, :-1]
    kf = kp.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log(((rr - kf) * (mm - kf)) / ((kf + 1) * (nn - rr - mm + kf + 1)))
    lr = np.where(valid[:, 1:], lr, 0.0)
    logp = np.concatenate([np.zeros((n.size, 1)), np.cumsum(lr, axis=1)], axis=1)
    logp = np.where(valid, logp, -np.inf)
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    # the k in-range relevant items sit uniformly in the group's first m positions
    e_k = group_expectation(mm, kk, nb4[:, None], rb4[:, None], h=h_m[:, None])
    denom = rb4[:, None] + kk
    with np.errstate(divide="ignore", invalid="ignore"):
        val = np.where(denom > 0, (sf[:, None] + e_k) / np.maximum(denom, 1), 0.0)
    return np.where(valid, p * val, 0.0).sum(axis=1)
