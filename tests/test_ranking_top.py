"""The top-K scan (``_dpfah_ranking.scan_top``) against the full scan, bit for bit.

mAP@R takes scan_top when R is small beside the database; its AP sums, counts and rank-point
counts must equal the full scan's exactly (same visits in the same order), and its histogram
must equal the full one up to the distance that reaches rank K (0 beyond). Every compiled
kernel this CPU supports is checked, the AVX-512 one with and without VPOPCNTQ.
"""

import numpy as np
import pytest

from dpfah import metrics as M
from dpfah import ranking_scan, tie_aware
from dpfah.tie_aware import tie_aware_ap


def require_ranking():
    if M._ranking is None:
        pytest.skip("the compiled ranking kernel did not import")
    return M._ranking


@pytest.fixture(params=["portable", "popcnt", "avx512bw", "avx512bw-lut"])
def kernel(request):
    ranking = require_ranking()
    name = request.param.split("-")[0]
    if name not in ranking.kernels():
        pytest.skip(f"kernel {name} not supported by this CPU")
    previous = ranking.set_kernel(name)
    request.addfinalizer(lambda: ranking.set_kernel(previous))
    if request.param == "avx512bw-lut":
        was = ranking.set_vpopcnt(False)
        request.addfinalizer(lambda: ranking.set_vpopcnt(was))
    return ranking


def codes(rng, n, bits, centres, flip):
    c = centres[rng.integers(0, centres.shape[0], n)]
    return np.where(rng.random((n, bits)) < flip, -c, c).astype(np.int8)


def labels(rng, n, classes, multi):
    out = np.zeros((n, classes), dtype=np.int8)
    out[np.arange(n), rng.integers(0, classes, n)] = 1
    if multi:
        out |= (rng.random((n, classes)) < 0.05).astype(np.int8)
    return out


def assert_same(data, cutoffs, points, ranking):
    full = ranking_scan.scan(data, cutoffs, points, 2, kernel=ranking.scan)
    top = ranking_scan.scan(data, cutoffs, points, 2, kernel=ranking.scan_top)
    assert np.array_equal(full.ap_sum, top.ap_sum) and np.array_equal(full.nrel, top.nrel)
    assert np.array_equal(full.prec_sum[: len(points)], top.prec_sum[: len(points)]) or not len(points)
    k = max(list(cutoffs) + list(points))
    cum = np.cumsum(full.hist_all, axis=1)
    dcut = np.argmax(cum >= k, axis=1)
    for i in range(data.nq):
        d = dcut[i]
        assert np.array_equal(top.hist_all[i, : d + 1], full.hist_all[i, : d + 1])
        assert np.array_equal(top.hist_rel[i, : d + 1], full.hist_rel[i, : d + 1])
        assert not top.hist_all[i, d + 1 :].any()


@pytest.mark.parametrize("bits,classes,multi", [(64, 100, False), (48, 7, True), (16, 3, False), (100, 70, True)])
def test_scan_top_equals_scan(kernel, bits, classes, multi):
    rng = np.random.default_rng(bits + classes)
    centres = rng.choice(np.array([-1, 1], dtype=np.int8), size=(classes, bits))
    qc, dc = codes(rng, 37, bits, centres, 0.2), codes(rng, 5003, bits, centres, 0.2)
    ql, dl = labels(rng, 37, classes, multi), labels(rng, 5003, classes, multi)
    data = ranking_scan.prepare(qc, dc, ql, dl)
    for cutoffs, points in [([1], []), ([100], []), ([7, 250], [1, 3, 100]), ([1000], []), ([5003], []), ([], [40])]:
        assert_same(data, cutoffs, points, kernel)


def test_scan_top_collects_again_when_the_sample_guesses_low(kernel):
    """Even items sit at distance 0 and odd ones at distance 64: the sample (every other item)
    says rank 3000 lies at distance 0, the scan finds only 2048 there and collects again."""
    bits, n = 64, 4096
    q = np.ones((3, bits), dtype=np.int8)
    dc = np.ones((n, bits), dtype=np.int8)
    dc[1::2] = -1
    rng = np.random.default_rng(1)
    ql, dl = labels(rng, 3, 5, False), labels(rng, n, 5, False)
    assert_same(ranking_scan.prepare(q, dc, ql, dl), [3000], [], kernel)


def test_map_takes_scan_top_and_gives_the_same_bits(monkeypatch):
    require_ranking()
    rng = np.random.default_rng(5)
    centres = rng.choice(np.array([-1, 1], dtype=np.int8), size=(20, 64))
    qc, dc = codes(rng, 50, 64, centres, 0.25), codes(rng, 20000, 64, centres, 0.25)
    ql, dl = labels(rng, 50, 20, True), labels(rng, 20000, 20, True)
    got = {}
    for use_top in (False, True):
        monkeypatch.setattr(M, "_USE_TOP", use_top)
        got[use_top] = [
            M.mean_average_precision(qc, dc, ql, dl, topk=1000, ties=t, return_per_query=True)
            for t in ("index", "average")
        ]
    for (a, pa), (b, pb) in zip(got[False], got[True]):
        assert a == b and np.array_equal(pa, pb)


def test_scan_top_needs_a_cutoff_or_point():
    ranking = require_ranking()
    rng = np.random.default_rng(2)
    data = ranking_scan.prepare(
        np.ones((2, 8), np.int8), np.ones((5, 8), np.int8), labels(rng, 2, 3, False), labels(rng, 5, 3, False)
    )
    with pytest.raises(ValueError, match="at least one cutoff or point"):
        ranking_scan.scan(data, kernel=ranking.scan_top)


def test_tie_aware_ap_same_bits_as_on_every_group():
    """tie_aware_ap computes the group expectation only where it is not 0: the same bits as the
    computation on every group (the one before; every_group=True), on random histograms."""
    rng = np.random.default_rng(3)
    for _ in range(100):
        nq, nb = int(rng.integers(1, 40)), int(rng.integers(2, 70))
        hist_all = rng.integers(0, int(rng.integers(1, 3000)), (nq, nb))
        hist_rel = (hist_all * rng.random((nq, nb))).astype(np.int64)
        for r in (1, 10, 100, 1000, int(hist_all.sum(axis=1).max())):
            a = tie_aware_ap(hist_all, hist_rel, r)
            assert np.array_equal(a, tie_aware_ap(hist_all, hist_rel, r, every_group=True))


@pytest.mark.parametrize("bad", [-1, 2, 0.5])
def test_labels_other_than_zero_and_one_are_refused(bad):
    rng = np.random.default_rng(4)
    ql, dl = labels(rng, 3, 4, False), labels(rng, 9, 4, False)
    dl = dl.astype(np.float32) if isinstance(bad, float) else dl
    dl[5, 2] = bad
    with pytest.raises(ValueError, match="db_labels must contain only 0 and 1"):
        ranking_scan.prepare(np.ones((3, 8), np.int8), np.ones((9, 8), np.int8), ql, dl)


def test_tie_aware_ap_same_bits_with_threads(monkeypatch):
    """The straddling queries' blocks cut into parts of rows for threads: the same bits."""
    monkeypatch.setattr(tie_aware, "_PART_ELEMENTS", 64)
    rng = np.random.default_rng(6)
    hist_all = rng.integers(0, 400, (300, 33))
    hist_rel = (hist_all * rng.random((300, 33))).astype(np.int64)
    for r in (5, 100, 1000, 3000):
        one = tie_aware_ap(hist_all, hist_rel, r)
        for n in (2, 3, 7):
            assert np.array_equal(one, tie_aware_ap(hist_all, hist_rel, r, n_threads=n))
