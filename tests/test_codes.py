"""Binary codes and exact Hamming search, checked against plain independent computations.

References never call the function under test: distances come from +1/-1 codes as
(bits - <b_i, b_j>) / 2, rankings from np.lexsort on (index, distance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpfah import codes, kernels
from dpfah.codes import (
    HammingIndex,
    binarize,
    hamming_distance,
    pack_codes,
    topk_hamming,
    topk_hamming_torch,
    unpack_codes,
)


def require_compiled():
    """The compiled Hamming module; without it, skip, or fail where DPFAH_REQUIRE_KERNELS=1 (CI)."""
    if codes.HAVE_COMPILED_KERNEL and kernels.hamming is not None:
        return kernels.hamming
    why = f"{kernels.MODULES['hamming']} did not import ({kernels.import_error('hamming')})"
    if kernels.required():
        pytest.fail(f"{why}, and {kernels.REQUIRE_ENV}=1 requires the compiled kernels")
    pytest.skip(f"{why}: numpy fallback tested instead; build it with pip install -e .")


def _kernels() -> list[str]:
    return list(kernels.hamming.kernels()) if kernels.hamming is not None else []


@pytest.fixture(scope="module")
def large_case():
    """70,000 random 64-bit codes, large enough for the SIMD kernels' sampled threshold
    estimate, with an adversarial twist: copies of query 0 planted only in the sampled
    blocks make the estimate too low, which must fall back to a full rescan."""
    rng = np.random.default_rng(11)
    n_db, bits = 70_000, 64
    d = random_codes(rng, n_db, bits)
    q = random_codes(rng, 4, bits)
    full = n_db // 64
    blocks = min(256, full // 16)
    for i in range(blocks):  # the blocks the kernels sample (see _hamming.c)
        d[(i * full // blocks) * 64 + 5] = q[0]
    d[12_345] = q[2]
    dist = plain_distances(q, d)
    idx = np.stack([np.lexsort((np.arange(n_db), row))[:1000] for row in dist])
    return q, d, (idx, np.take_along_axis(dist, idx, axis=1))


@pytest.fixture(params=_kernels() or ["missing"])
def kernel(request):
    """Each compiled kernel this CPU supports (avx512vpopcntdq, avx512bw, avx2, popcnt, portable), in turn."""
    _hamming = require_compiled()
    before = _hamming.set_kernel(request.param)
    yield request.param
    _hamming.set_kernel(before)


def random_codes(rng, n: int, bits: int) -> np.ndarray:
    return np.where(rng.random((n, bits)) < 0.5, 1, -1).astype(np.int8)


def plain_distances(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(bits - <b_i, b_j>) / 2 on +1/-1 codes."""
    bits = q.shape[1]
    return (bits - q.astype(np.int64) @ d.astype(np.int64).T) // 2


def plain_ranking(q: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every database index of each query, by distance then index, and the distances."""
    dist = plain_distances(q, d)
    idx = np.empty(dist.shape, dtype=np.int64)
    for i, row in enumerate(dist):
        idx[i] = np.lexsort((np.arange(d.shape[0]), row))
    return idx, np.take_along_axis(dist, idx, axis=1)


def plain_topk(q: np.ndarray, d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx, dist = plain_ranking(q, d)
    return idx[:, :k], dist[:, :k]


def tie_heavy_case(rng, n_db: int, n_q: int, bits: int):
    """Few distinct codes (so most distances tie) plus exact duplicates of some queries."""
    pool = random_codes(rng, 12, bits)
    d = pool[rng.integers(0, len(pool), n_db)]
    d[::7] = random_codes(rng, len(d[::7]), bits)
    q = random_codes(rng, n_q, bits)
    q[0] = pool[3]  # many database codes at distance 0
    d[n_db // 2] = q[1]
    return q, d


# --------------------------------------------------------------------------- binarize, packing


def test_binarize_numpy_sign_zero_is_plus_one():
    u = np.array([[-2.5, -0.0, 0.0, 1e-9, 3.0]], dtype=np.float32)
    b = binarize(u)
    assert b.dtype == np.float32
    np.testing.assert_array_equal(b, [[-1, 1, 1, 1, 1]])
    bi = binarize(np.array([-3, 0, 4]))
    assert bi.dtype == np.int8
    np.testing.assert_array_equal(bi, [-1, 1, 1])


def test_binarize_torch_sign_zero_is_plus_one():
    u = torch.tensor([[-1.0, 0.0, 2.0], [0.0, -0.5, 0.25]], dtype=torch.float64)
    b = binarize(u)
    assert isinstance(b, torch.Tensor) and b.dtype == torch.float64
    assert torch.equal(b, torch.tensor([[-1.0, 1.0, 1.0], [1.0, -1.0, 1.0]], dtype=torch.float64))
    bi = binarize(torch.tensor([0, -7, 5]))
    assert bi.dtype == torch.int8
    assert bi.tolist() == [1, -1, 1]
    assert set(binarize(torch.randn(100)).unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("bits", [1, 16, 63, 64, 65, 128])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    c = random_codes(rng, 37, bits)
    p = pack_codes(c)
    words = (bits + 63) // 64
    assert p.dtype == np.uint64 and p.shape == (37, words)
    # Layout, computed independently: bit j of the code is bit j % 64 of word j // 64.
    for i in range(3):
        expect = [0] * words
        for j in range(bits):
            if c[i, j] > 0:
                expect[j // 64] |= 1 << (j % 64)
        assert [int(x) for x in p[i]] == expect
    # Padding bits are 0.
    if bits % 64:
        assert np.all(p[:, -1] >> np.uint64(bits % 64) == 0)
    np.testing.assert_array_equal(unpack_codes(p, bits), c)
    np.testing.assert_array_equal(pack_codes(torch.from_numpy(c.astype(np.float32))), p)


def test_pack_rejects_non_binary_codes():
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        pack_codes(np.array([[1, 0, -1]]))
    with pytest.raises(ValueError, match="shape"):
        pack_codes(np.ones(5))


# --------------------------------------------------------------------------- distances


@pytest.mark.parametrize("bits", [8, 64, 65, 200, 256])
def test_hamming_distance_matches_plain_formula(bits):
    rng = np.random.default_rng(100 + bits)
    q, d = random_codes(rng, 9, bits), random_codes(rng, 131, bits)
    expect = plain_distances(q, d)
    got = hamming_distance(pack_codes(q), pack_codes(d))
    assert got.dtype == np.uint16 and got.shape == (9, 131)
    np.testing.assert_array_equal(got, expect)


def test_hamming_distance_numpy_fallback(monkeypatch):
    monkeypatch.setattr(codes, "HAVE_COMPILED_KERNEL", False)
    rng = np.random.default_rng(5)
    q, d = random_codes(rng, 4, 100), random_codes(rng, 50, 100)
    np.testing.assert_array_equal(hamming_distance(pack_codes(q), pack_codes(d)), plain_distances(q, d))


@pytest.mark.parametrize("bits", [16, 64, 130, 256])
def test_index_distances_and_counts_each_kernel(kernel, bits):
    rng = np.random.default_rng(bits)
    q, d = tie_heavy_case(rng, 333, 7, bits)
    expect = plain_distances(q, d)
    index = HammingIndex(pack_codes(d), threads=2)
    assert index.kernel == kernel
    np.testing.assert_array_equal(index.distances(pack_codes(q), query_chunk=3), expect)
    for radius in (0, 2, bits // 2, bits + 5):
        np.testing.assert_array_equal(index.count_within(pack_codes(q), radius), (expect <= radius).sum(axis=1))


# --------------------------------------------------------------------------- top-k search


TOPK_CASES = [
    # (bits, n_db, n_q): 8 and 16 bits tie heavily; 130 bits = 3 words; 256 and 1024 bits =
    # 4 and 16 words (16-bit accumulators in the SIMD kernels); n_db not a multiple of 64.
    (8, 200, 5),
    (16, 257, 7),
    (64, 300, 6),
    (130, 190, 5),
    (256, 129, 4),
    (1024, 100, 3),
]


def _ks(n_db: int) -> list[int]:
    # 1 and n_db // 20: the running-threshold selection; n_db // 3 and up: the dense one
    return [1, n_db // 20, n_db // 3, n_db, n_db + 5]


def _check_topk(got, q, d, k, ranking=None):
    idx, dist = got
    ref_idx, ref_dist = ranking if ranking is not None else plain_ranking(q, d)
    ref_idx, ref_dist = ref_idx[:, :k], ref_dist[:, :k]
    assert idx.dtype == np.int64 and dist.dtype == np.int32
    assert idx.shape == ref_idx.shape == (q.shape[0], min(k, d.shape[0]))
    np.testing.assert_array_equal(dist, ref_dist)
    np.testing.assert_array_equal(idx, ref_idx)


@pytest.mark.parametrize("bits,n_db,n_q", TOPK_CASES)
def test_topk_compiled_each_kernel(kernel, bits, n_db, n_q):
    rng = np.random.default_rng(bits * 1000 + n_db)
    q, d = tie_heavy_case(rng, n_db, n_q, bits)
    ranking = plain_ranking(q, d)
    for k in _ks(n_db):
        got = topk_hamming(pack_codes(q), pack_codes(d), k, threads=2, query_chunk=2, backend="compiled")
        _check_topk(got, q, d, k, ranking)


@pytest.mark.parametrize("bits,n_db,n_q", TOPK_CASES)
def test_topk_numpy_fallback(monkeypatch, bits, n_db, n_q):
    monkeypatch.setattr(codes, "HAVE_COMPILED_KERNEL", False)
    assert codes.compiled_kernel() is None
    rng = np.random.default_rng(bits * 1000 + n_db)
    q, d = tie_heavy_case(rng, n_db, n_q, bits)
    ranking = plain_ranking(q, d)
    for k in _ks(n_db):
        _check_topk(topk_hamming(pack_codes(q), pack_codes(d), k, threads=2), q, d, k, ranking)
    with pytest.raises(RuntimeError, match="not built"):
        HammingIndex(pack_codes(d), backend="compiled")


@pytest.mark.parametrize("bits,n_db,n_q", TOPK_CASES)
def test_topk_torch_backend_on_packed_cpu_tensors(bits, n_db, n_q):
    rng = np.random.default_rng(bits * 1000 + n_db)
    q, d = tie_heavy_case(rng, n_db, n_q, bits)
    qt = torch.from_numpy(pack_codes(q).view(np.int64))
    dt = torch.from_numpy(pack_codes(d).view(np.int64))
    ranking = plain_ranking(q, d)
    for k in _ks(n_db):
        idx, dist = topk_hamming(qt, dt, k, backend="torch", query_chunk=2)
        assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64 and dist.dtype == torch.int32
        _check_topk((idx.numpy(), dist.numpy()), q, d, k, ranking)


@pytest.mark.parametrize("bits,n_db,n_q", TOPK_CASES)
def test_topk_hamming_torch_on_sign_codes(bits, n_db, n_q):
    rng = np.random.default_rng(bits * 1000 + n_db)
    q, d = tie_heavy_case(rng, n_db, n_q, bits)
    ranking = plain_ranking(q, d)
    for dtype in (torch.float32, torch.float16, torch.int8):
        for k in _ks(n_db):
            idx, dist = topk_hamming_torch(torch.from_numpy(q).to(dtype), torch.from_numpy(d).to(dtype), k, chunk=3)
            _check_topk((idx.numpy(), dist.numpy()), q, d, k, ranking)


def test_topk_torch_tensor_inputs_auto_backend_returns_tensors():
    rng = np.random.default_rng(3)
    q, d = tie_heavy_case(rng, 100, 3, 32)
    idx, dist = topk_hamming(torch.from_numpy(pack_codes(q)), torch.from_numpy(pack_codes(d)), 10)
    assert isinstance(idx, torch.Tensor) and isinstance(dist, torch.Tensor)
    _check_topk((idx.numpy(), dist.numpy()), q, d, 10)


def test_topk_large_database_threshold_estimate(kernel, large_case):
    q, d, ranking = large_case
    pq, pd = pack_codes(q), pack_codes(d)
    for k in (1, 100, 1000):
        _check_topk(topk_hamming(pq, pd, k, threads=2, backend="compiled"), q, d, k, ranking)


def test_topk_wide_codes_large_database(kernel):
    rng = np.random.default_rng(12)
    q, d = random_codes(rng, 3, 300), random_codes(rng, 5_000, 300)
    _check_topk(topk_hamming(pack_codes(q), pack_codes(d), 50, backend="compiled"), q, d, 50)


@pytest.mark.parametrize("bits,n_db,n_q,k", [(64, 70_000, 101, 1000), (64, 70_000, 37, 10), (130, 20_000, 45, 300)])
def test_topk_many_queries_split_into_batches(kernel, bits, n_db, n_q, k):
    """More queries than one batch holds (the SIMD kernels split a call into batches of equal
    size, in whole groups of queries where they can), in one call and in uneven chunks."""
    rng = np.random.default_rng(n_q)
    q, d = random_codes(rng, n_q, bits), random_codes(rng, n_db, bits)
    dist = plain_distances(q, d)
    idx = np.stack([np.lexsort((np.arange(n_db), row))[:k] for row in dist])
    ranking = (idx, np.take_along_axis(dist, idx, axis=1))
    index = HammingIndex(pack_codes(d), threads=1)
    assert index.kernel == kernel
    _check_topk(index.search(pack_codes(q), k), q, d, k, ranking)
    _check_topk(index.search(pack_codes(q), k, query_chunk=n_q - 2), q, d, k, ranking)


def test_topk_same_result_for_any_threads_and_chunks():
    rng = np.random.default_rng(4)
    q, d = tie_heavy_case(rng, 500, 13, 16)
    pq, pd = pack_codes(q), pack_codes(d)
    ref = plain_topk(q, d, 40)
    for threads, chunk in [(1, None), (2, 1), (3, 5), (2, 64)]:
        got = topk_hamming(pq, pd, 40, threads=threads, query_chunk=chunk)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


def test_topk_empty_inputs():
    d = pack_codes(random_codes(np.random.default_rng(0), 10, 64))
    idx, dist = topk_hamming(d[:0], d, 3)
    assert idx.shape == (0, 3) and dist.shape == (0, 3)
    idx, dist = topk_hamming(d[:2], d[:0], 3)
    assert idx.shape == (2, 0)


# --------------------------------------------------------------------------- errors


def test_topk_errors():
    rng = np.random.default_rng(0)
    d64 = pack_codes(random_codes(rng, 20, 64))
    d128 = pack_codes(random_codes(rng, 20, 128))
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_hamming(d64, d64, 0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_hamming(d64, d64, -3)
    with pytest.raises(TypeError, match="k must be an integer"):
        topk_hamming(d64, d64, 2.5)
    with pytest.raises(ValueError, match=r"differ in length: 1 vs 2 words"):
        topk_hamming(d64, d128, 1)
    with pytest.raises(TypeError, match="dtype float64"):
        topk_hamming(d64.astype(np.float64), d64, 1)
    with pytest.raises(TypeError, match="dtype int32"):
        topk_hamming(d64, d64.astype(np.int32), 1)
    with pytest.raises(ValueError, match="2-D"):
        topk_hamming(d64[0], d64, 1)
    with pytest.raises(ValueError, match="threads"):
        topk_hamming(d64, d64, 1, threads=0)
    with pytest.raises(ValueError, match="query_chunk"):
        topk_hamming(d64, d64, 1, query_chunk=0)
    with pytest.raises(ValueError, match="backend"):
        topk_hamming(d64, d64, 1, backend="gpu")
    with pytest.raises(TypeError, match="torch tensors"):
        topk_hamming(d64, d64, 1, backend="torch")
    with pytest.raises(ValueError, match="differ in length"):
        hamming_distance(d64, d128)


def test_topk_hamming_torch_errors():
    q = torch.ones(3, 16)
    with pytest.raises(ValueError, match="differ in length"):
        topk_hamming_torch(q, torch.ones(5, 8), 1)
    with pytest.raises(ValueError, match=r"only \+1 and -1"):
        topk_hamming_torch(q, torch.zeros(5, 16), 1)
    with pytest.raises(ValueError, match="shape"):
        topk_hamming_torch(q, torch.ones(16), 1)
    with pytest.raises(TypeError, match="torch tensor"):
        topk_hamming_torch(q, np.ones((5, 16)), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_hamming_torch(q, q, 0)
    with pytest.raises(TypeError, match="int64"):
        topk_hamming(torch.ones(2, 1), torch.ones(2, 1), 1, backend="torch")


def test_kernel_module_validates_buffers():
    _hamming = require_compiled()
    rng = np.random.default_rng(0)
    d = pack_codes(random_codes(rng, 100, 128))
    prepared = np.empty(_hamming.prepared_size(100, 2), dtype=np.uint8)
    _hamming.prepare(d, 2, prepared)
    q = d[:3]
    oi, od = np.empty((3, 5), np.int64), np.empty((3, 5), np.int32)
    _hamming.topk(prepared, q, 5, oi, od)
    np.testing.assert_array_equal(od[:, 0], 0)
    with pytest.raises(ValueError, match="2-word codes"):
        _hamming.topk(prepared, q[:, :1].copy(), 5, oi, od)
    with pytest.raises(ValueError, match="k must be in 1..n_db"):
        _hamming.topk(prepared, q, 101, np.empty((3, 101), np.int64), np.empty((3, 101), np.int32))
    with pytest.raises(ValueError, match="out_idx"):
        _hamming.topk(prepared, q, 4, oi, od)
    with pytest.raises(ValueError, match="not made by prepare"):
        _hamming.topk(np.zeros_like(prepared), q, 5, oi, od)
    with pytest.raises(ValueError, match="too small"):
        _hamming.prepare(d, 2, prepared[:100])
    with pytest.raises(ValueError, match="unknown kernel"):
        _hamming.set_kernel("sse9")
    # A copy at a different alignment must be refused, not read at the wrong offset.
    raw = np.empty(prepared.size + 128, dtype=np.uint8)
    base = (-raw.ctypes.data) % 64
    for shift in (8, 24):
        moved = raw[base + shift : base + shift + prepared.size]
        moved[:] = prepared
        if (moved.ctypes.data - prepared.ctypes.data) % 64:
            with pytest.raises(ValueError, match="differently aligned"):
                _hamming.topk(moved, q, 5, oi, od)
