"""dpfah.metrics against independent plain computations (per-query loops over +/-1 codes).

The references below never call dpfah: distances come from the +/-1 inner product, relevance
from the label inner product, the ranking from np.lexsort by (distance, index).
Both the compiled kernel and the numpy fallback are checked (``impl`` fixture).
"""

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch

from dpfah import kernels, ranking_scan
from dpfah import metrics as M
from dpfah.tie_aware import harmonic_diff

# --------------------------------------------------------------------------------------------
# plain references


def plain_dist_rel(qc, dc, ql, dl):
    """(nq, ndb) integer distances and boolean relevance, from the +/-1 and 0/1 matrices."""
    bits = qc.shape[1]
    dist = ((bits - qc.astype(np.int64) @ dc.astype(np.int64).T) // 2).astype(np.int64)
    rel = (ql.astype(np.int64) @ dl.astype(np.int64).T) > 0
    return dist, rel


def plain_sorted_rel(dist_row, rel_row):
    order = np.lexsort((np.arange(dist_row.size), dist_row))  # by distance, then index
    return rel_row[order]


def plain_ap(rel_sorted, r):
    top = rel_sorted[:r]
    hits = 0
    total = 0.0
    for k, is_rel in enumerate(top, start=1):
        if is_rel:
            hits += 1
            total += hits / k
    return total / hits if hits else 0.0


def plain_map(qc, dc, ql, dl, r):
    dist, rel = plain_dist_rel(qc, dc, ql, dl)
    return np.array([plain_ap(plain_sorted_rel(dist[i], rel[i]), r) for i in range(qc.shape[0])])


def plain_tie_aware_ap(dist_row, rel_row, r):
    """Mean AP@r over every distinct arrangement of relevance inside each tie group."""
    groups = []
    for d in np.unique(dist_row):
        members = rel_row[dist_row == d]
        groups.append((members.size, int(members.sum())))
    per_group = [list(itertools.combinations(range(n), k)) for n, k in groups]
    values = []
    for choice in itertools.product(*per_group):
        seq = []
        for (n, _), pos in zip(groups, choice):
            g = np.zeros(n, dtype=bool)
            g[list(pos)] = True
            seq.append(g)
        values.append(plain_ap(np.concatenate(seq), r))
    return float(np.mean(values))


# --------------------------------------------------------------------------------------------
# data


def make_data(seed, nq, ndb, bits, classes, multi=False, flips=1, centres=6, absent_class=True):
    """Codes drawn from a few centres with a few bit flips (many ties); seeded."""
    rng = np.random.default_rng(seed)
    cent = rng.choice([-1, 1], size=(centres, bits))

    def codes(n):
        c = cent[rng.integers(0, centres, n)].copy()
        for _ in range(flips):
            j = rng.integers(0, bits, n)
            c[np.arange(n), j] *= -1
        return c.astype(np.int8)

    def labels(n, lo_classes):
        if multi:
            lab = (rng.random((n, classes)) < 0.25).astype(np.int64)
            lab[: max(1, n // 10)] = 0  # some items with no label at all
            return lab
        lab = np.zeros((n, classes), dtype=np.int64)
        lab[np.arange(n), rng.integers(0, lo_classes, n)] = 1
        return lab

    # single-label: the database never uses the last class, so queries of that class have no
    # relevant item at all (they must score 0 and count)
    db_classes = classes - 1 if absent_class else classes
    return codes(nq), codes(ndb), labels(nq, classes), labels(ndb, db_classes)


def require_compiled():
    """The compiled ranking module; without it, skip, or fail where DPFAH_REQUIRE_KERNELS=1 (CI)."""
    if M._ranking is not None:
        return M._ranking
    why = f"{kernels.MODULES['ranking']} did not import ({kernels.import_error('ranking')})"
    if kernels.required():
        pytest.fail(f"{why}, and {kernels.REQUIRE_ENV}=1 requires the compiled kernels")
    pytest.skip(f"{why}: numpy fallback tested instead; build it with pip install -e .")


@pytest.fixture(params=["numpy", "portable", "popcnt", "avx512bw"])
def impl(request, monkeypatch):
    """The numpy fallback, and each compiled kernel this CPU supports."""
    if request.param == "numpy":
        monkeypatch.setattr(M, "_USE_COMPILED", False)
    else:
        ranking = require_compiled()
        if request.param not in ranking.kernels():
            pytest.skip(f"kernel {request.param} not supported by this CPU (has {ranking.kernels()})")
        previous = ranking.set_kernel(request.param)
        request.addfinalizer(lambda: ranking.set_kernel(previous))
        monkeypatch.setattr(M, "_USE_COMPILED", True)
    # small chunks so that chunking and threading are exercised
    monkeypatch.setattr(ranking_scan, "_C_CHUNK", 3)
    monkeypatch.setattr(ranking_scan, "_NUMPY_CHUNK_ELEMENTS", 500)
    return request.param


# --------------------------------------------------------------------------------------------
# mAP, index ties


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("multi", [False, True])
def test_map_index_ties_matches_plain_loop(impl, bits, multi):
    qc, dc, ql, dl = make_data(bits * 10 + multi, nq=37, ndb=211, bits=bits, classes=5, multi=multi)
    _, rel = plain_dist_rel(qc, dc, ql, dl)
    assert (~rel.any(axis=1)).sum() >= 2  # queries with nothing relevant are present
    for topk, r in [(1, 1), (7, 7), (None, 211), (1000, 211)]:
        ref = plain_map(qc, dc, ql, dl, r)
        got, per_q = M.mean_average_precision(qc, dc, ql, dl, topk=topk, return_per_query=True, n_threads=2)
        np.testing.assert_allclose(per_q, ref, rtol=0, atol=1e-12)
        assert got == pytest.approx(ref.mean(), abs=1e-12)  # zero-relevant queries count as 0
        assert isinstance(got, float)


@pytest.mark.parametrize("bits,classes", [(64, 3), (100, 70), (130, 200), (12, 64), (7, 65)])
def test_map_word_layouts(impl, bits, classes):
    """Codes and labels spanning 1, 2 and 3 uint64 words (all kernel specialisations)."""
    qc, dc, ql, dl = make_data(bits + classes, nq=20, ndb=150, bits=bits, classes=classes, multi=True, flips=3)
    for topk, r in [(5, 5), (None, 150)]:
        ref = plain_map(qc, dc, ql, dl, r)
        _, per_q = M.mean_average_precision(qc, dc, ql, dl, topk=topk, return_per_query=True)
        np.testing.assert_allclose(per_q, ref, rtol=0, atol=1e-12)


def test_map_ties_matter_and_index_policy_is_fixed(impl):
    """One distance for everything: index order decides, the plain reference agrees."""
    qc = np.ones((1, 8), dtype=np.int8)
    dc = np.ones((6, 8), dtype=np.int8)
    ql = np.array([[1, 0]])
    dl = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1]])
    got = M.mean_average_precision(qc, dc, ql, dl)
    assert got == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert M.mean_average_precision(qc, dc, ql, dl, topk=1) == 0.0


# --------------------------------------------------------------------------------------------
# tie-aware mAP


@pytest.mark.parametrize("seed", range(4))
def test_tie_aware_matches_enumeration(impl, seed):
    qc, dc, ql, dl = make_data(100 + seed, nq=5, ndb=9, bits=4, classes=3, multi=seed % 2 == 1, flips=1, centres=2)
    dist, rel = plain_dist_rel(qc, dc, ql, dl)
    for r in range(1, 10):  # every R, so R cuts through tie groups and lands on boundaries
        ref = np.array([plain_tie_aware_ap(dist[i], rel[i], r) for i in range(5)])
        _, got = M.mean_average_precision(qc, dc, ql, dl, topk=r, ties="average", return_per_query=True)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    ref_all = np.mean([plain_tie_aware_ap(dist[i], rel[i], 9) for i in range(5)])
    assert M.mean_average_precision(qc, dc, ql, dl, ties="average") == pytest.approx(ref_all, rel=1e-12)


def test_tie_aware_large_groups_before(impl):
    """Big homogeneous groups (one arrangement each) put >64 items before small mixed groups,
    so the asymptotic harmonic-number path is used; enumeration stays small."""
    bits = 8
    q = np.ones((1, bits), dtype=np.int8)

    def at(dist, n):
        c = np.ones((n, bits), dtype=np.int8)
        c[:, :dist] = -1
        return c

    # distance 0: 70 irrelevant; distance 1: 5 items (2 relevant); distance 2: 80 relevant;
    # distance 3: 6 items (3 relevant); distance 4: 3 irrelevant
    blocks = [(0, 70, 0), (1, 5, 2), (2, 80, 80), (3, 6, 3), (4, 3, 0)]
    rng = np.random.default_rng(5)
    codes, labs = [], []
    for d, n, r in blocks:
        codes.append(at(d, n))
        lab = np.zeros((n, 2), dtype=np.int64)
        rel_idx = rng.permutation(n)[:r]
        lab[:, 1] = 1
        lab[rel_idx] = [1, 0]
        labs.append(lab)
    order = rng.permutation(sum(b[1] for b in blocks))
    dc = np.concatenate(codes)[order]
    dl = np.concatenate(labs)[order]
    ql = np.array([[1, 0]])
    dist, rel = plain_dist_rel(q, dc, ql, dl)
    for r in [1, 70, 72, 75, 100, 150, 155, 158, 161, 164]:
        ref = plain_tie_aware_ap(dist[0], rel[0], r)
        got = M.mean_average_precision(q, dc, ql, dl, topk=r, ties="average")
        assert got == pytest.approx(ref, rel=1e-12, abs=1e-15), r


def test_harmonic_differences_exact():
    """H_a - H_b (used by the closed form) against exact rational sums, table and asymptotic range."""
    pairs = [(a, b) for b in [0, 1, 5, 63, 64, 65, 100, 1000, 128000] for a in [b, b + 1, b + 2, b + 10, b + 1000]]
    got = harmonic_diff(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    for (a, b), g in zip(pairs, got):
        ref = float(sum(Fraction(1, i) for i in range(b + 1, a + 1)))
        assert g == pytest.approx(ref, rel=1e-14, abs=0), (a, b)


def test_tie_aware_equals_index_without_ties(impl):
    """Distinct distances: every group has one item, so both policies agree."""
    bits = 12
    dc = np.ones((bits + 1, bits), dtype=np.int8)
    for d in range(bits + 1):
        dc[d, :d] = -1
    rng = np.random.default_rng(3)
    perm = rng.permutation(bits + 1)
    dc = dc[perm]
    dl = np.eye(2, dtype=np.int64)[rng.integers(0, 2, bits + 1)]
    qc = np.ones((2, bits), dtype=np.int8)
    ql = np.eye(2, dtype=np.int64)
    for topk in [1, 4, None]:
        a = M.mean_average_precision(qc, dc, ql, dl, topk=topk)
        b = M.mean_average_precision(qc, dc, ql, dl, topk=topk, ties="average")
        assert a == pytest.approx(b, rel=1e-13)


# --------------------------------------------------------------------------------------------
# P@H<=r, P@N, PR curves


@pytest.mark.parametrize("bits", [8, 16])
def test_precision_within_radius(impl, bits):
    qc, dc, ql, dl = make_data(7 + bits, nq=40, ndb=120, bits=bits, classes=4, flips=3, centres=8)
    dist, rel = plain_dist_rel(qc, dc, ql, dl)
    shares = []
    for radius in [0, 1, 2, 3, bits]:
        precs, empty = [], 0
        for i in range(qc.shape[0]):
            ball = dist[i] <= radius
            if ball.sum() == 0:
                precs.append(0.0)
                empty += 1
            else:
                precs.append(rel[i][ball].sum() / ball.sum())
        p, e = M.precision_within_radius(qc, dc, ql, dl, radius=radius, return_empty_share=True)
        assert p == pytest.approx(np.mean(precs), abs=1e-12)
        assert e == pytest.approx(empty / qc.shape[0])
        shares.append(e)
    assert any(0 < e < 1 for e in shares) and shares[-1] == 0  # some balls empty, some not
    assert M.precision_within_radius(qc, dc, ql, dl) == pytest.approx(
        M.precision_within_radius(qc, dc, ql, dl, radius=2, return_empty_share=True)[0]
    )


def test_precision_at_n_and_pr_by_rank(impl):
    qc, dc, ql, dl = make_data(11, nq=30, ndb=90, bits=16, classes=4, multi=True, flips=2)
    dist, rel = plain_dist_rel(qc, dc, ql, dl)
    ns = [1, 5, 17, 90, 200]
    ref_p = np.zeros(len(ns))
    ref_r = np.zeros(len(ns))
    for i in range(qc.shape[0]):
        s = plain_sorted_rel(dist[i], rel[i])
        total = rel[i].sum()
        for j, n in enumerate(ns):
            top = s[: min(n, 90)]
            ref_p[j] += top.sum() / min(n, 90)
            ref_r[j] += top.sum() / total if total else 0.0
    ref_p /= qc.shape[0]
    ref_r /= qc.shape[0]
    np.testing.assert_allclose(M.precision_at_n(qc, dc, ql, dl, ns), ref_p, atol=1e-12)
    np.testing.assert_allclose(M.precision_at_n(qc, dc, ql, dl, 17), ref_p[2:3], atol=1e-12)
    pr = M.pr_curve_by_rank(qc, dc, ql, dl, ranks=ns)
    np.testing.assert_array_equal(pr["ranks"], ns)
    np.testing.assert_allclose(pr["precision"], ref_p, atol=1e-12)
    np.testing.assert_allclose(pr["recall"], ref_r, atol=1e-12)
    # unsorted, repeated ranks come back in the order given
    pr2 = M.pr_curve_by_rank(qc, dc, ql, dl, ranks=[17, 1, 17])
    np.testing.assert_allclose(pr2["precision"], ref_p[[2, 0, 2]], atol=1e-12)


def test_pr_curve_by_radius(impl):
    bits = 16
    qc, dc, ql, dl = make_data(13, nq=25, ndb=100, bits=bits, classes=3, multi=True, flips=3)
    dist, rel = plain_dist_rel(qc, dc, ql, dl)
    ref_p = np.zeros(bits + 1)
    ref_r = np.zeros(bits + 1)
    for i in range(qc.shape[0]):
        total = rel[i].sum()
        for r in range(bits + 1):
            ball = dist[i] <= r
            m = rel[i][ball].sum()
            ref_p[r] += m / ball.sum() if ball.sum() else 0.0
            ref_r[r] += m / total if total else 0.0
    pr = M.pr_curve_by_radius(qc, dc, ql, dl)
    np.testing.assert_array_equal(pr["radius"], np.arange(bits + 1))
    np.testing.assert_allclose(pr["precision"], ref_p / qc.shape[0], atol=1e-12)
    np.testing.assert_allclose(pr["recall"], ref_r / qc.shape[0], atol=1e-12)


def test_retrieval_report_matches_plain(impl):
    bits = 16
    qc, dc, ql, dl = make_data(17, nq=33, ndb=140, bits=bits, classes=5, flips=2)
    dist, rel = plain_dist_rel(qc, dc, ql, dl)
    rep = M.retrieval_report(qc, dc, ql, dl, topk=10, max_n=50, pr_ranks=[3, 140])
    assert rep["map"] == pytest.approx(plain_map(qc, dc, ql, dl, 10).mean(), abs=1e-12)
    assert rep["map_tie_aware"] == pytest.approx(M.mean_average_precision(qc, dc, ql, dl, 10, ties="average"))
    assert rep["topk"] == 10 and not rep["topk_is_all"]
    zero = [plain_sorted_rel(dist[i], rel[i])[:10].sum() == 0 for i in range(33)]
    assert rep["zero_relevant_share"] == pytest.approx(np.mean(zero))
    ball = dist <= 2
    n = ball.sum(axis=1)
    m = (ball & rel).sum(axis=1)
    assert rep["precision_within_radius"] == pytest.approx(np.where(n > 0, m / np.maximum(n, 1), 0).mean())
    assert rep["empty_share"] == pytest.approx((n == 0).mean())
    ref_pn = np.mean([np.cumsum(plain_sorted_rel(dist[i], rel[i])[:50]) / np.arange(1, 51) for i in range(33)], axis=0)
    np.testing.assert_array_equal(rep["p_at_n"]["n"], np.arange(1, 51))
    np.testing.assert_allclose(rep["p_at_n"]["precision"], ref_pn, atol=1e-12)
    assert rep["pr_by_radius"]["precision"].shape == (bits + 1,)
    np.testing.assert_allclose(rep["pr_by_rank"]["precision"], ref_pn[[2]].tolist() + [rel.mean()], atol=1e-12)
    assert rep["backend"] == ("numpy" if impl == "numpy" else "c")
    rep_all = M.retrieval_report(qc, dc, ql, dl, max_n=1000)
    assert rep_all["topk_is_all"] and rep_all["p_at_n"]["n"].size == 140
    assert rep_all["map"] == pytest.approx(plain_map(qc, dc, ql, dl, 140).mean(), abs=1e-12)


# --------------------------------------------------------------------------------------------
# inputs


def test_torch_inputs_and_dtypes(impl):
    qc, dc, ql, dl = make_data(19, nq=10, ndb=60, bits=16, classes=3)
    ref = M.mean_average_precision(qc, dc, ql, dl, topk=20)
    tq = torch.tensor(qc, dtype=torch.float32)
    td = torch.tensor(dc, dtype=torch.float64)
    got = M.mean_average_precision(tq, td, torch.tensor(ql), torch.tensor(dl, dtype=torch.bool), topk=20)
    assert got == ref == pytest.approx(plain_map(qc, dc, ql, dl, 20).mean(), abs=1e-12)
    rep = M.retrieval_report(tq, td, torch.tensor(ql), torch.tensor(dl), topk=20)
    assert rep["map"] == ref


def test_bad_inputs_raise(impl):
    qc, dc, ql, dl = make_data(23, nq=4, ndb=10, bits=8, classes=3)
    cases = [
        ((qc, dc[:, :6], ql, dl), {}, "bits"),
        ((qc, dc, ql[:3], dl), {}, "length"),
        ((qc, dc, ql, dl[:9]), {}, "length"),
        ((qc, dc, ql, dl[:, :2]), {}, "label width"),
        ((np.where(qc > 0, 1, 0), dc, ql, dl), {}, "query_codes"),
        ((qc, dc * 0.5, ql, dl), {}, "db_codes"),
        ((qc, dc, ql * 2, dl), {}, "query_labels"),
        ((qc[0], dc, ql, dl), {}, "2-D"),
        ((qc, dc, ql, dl), {"ties": "random"}, "ties"),
        ((qc, dc, ql, dl), {"topk": 0}, "topk"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            M.mean_average_precision(*args, **kw)
    with pytest.raises(ValueError, match="radius"):
        M.precision_within_radius(qc, dc, ql, dl, radius=-1)
    with pytest.raises(ValueError, match="ns"):
        M.precision_at_n(qc, dc, ql, dl, [0, 5])
    with pytest.raises(ValueError, match="bits"):
        M.retrieval_report(qc, dc[:, :4], ql, dl)


def test_backends_agree_on_larger_case(monkeypatch):
    require_compiled()
    qc, dc, ql, dl = make_data(29, nq=64, ndb=3000, bits=32, classes=11, flips=4, centres=12)
    monkeypatch.setattr(M, "_USE_COMPILED", True)
    a = M.retrieval_report(qc, dc, ql, dl, topk=100, max_n=300, pr_ranks=[1000, 3000])
    monkeypatch.setattr(M, "_USE_COMPILED", False)
    b = M.retrieval_report(qc, dc, ql, dl, topk=100, max_n=300, pr_ranks=[1000, 3000])
    assert a["backend"] == "c" and b["backend"] == "numpy"
    for k in ["map", "map_tie_aware", "precision_within_radius", "empty_share", "zero_relevant_share"]:
        assert a[k] == pytest.approx(b[k], abs=1e-12), k
    np.testing.assert_allclose(a["p_at_n"]["precision"], b["p_at_n"]["precision"], atol=1e-12)
    np.testing.assert_allclose(a["pr_by_rank"]["recall"], b["pr_by_rank"]["recall"], atol=1e-12)
    np.testing.assert_allclose(a["pr_by_radius"]["recall"], b["pr_by_radius"]["recall"], atol=1e-12)
    assert a["map"] == pytest.approx(plain_map(qc, dc, ql, dl, 100).mean(), abs=1e-12)
