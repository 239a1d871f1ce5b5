"""Exact Hamming search on packed codes (``dpfah.packing`` holds the code format).

``topk_hamming`` and ``HammingIndex`` rank by (distance, database index), ties to the smaller
index, on every backend: the C kernels of ``_dpfah_hamming`` (through ``dpfah.kernels``; SIMD
picked at run time; Python threads over queries), chunked ``np.bitwise_count`` where they are
not built (``HAVE_COMPILED_KERNEL`` False), or torch on the tensors' device.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import kernels as _kernels
from .packing import as_packed, binarize, check_packed, pack_codes, unpack_codes, words_for_bits

# Optional C extension (setup.py builds it where a compiler exists); None without it.
_kernel = _kernels.hamming

#: True when the compiled kernels (``_dpfah_hamming``) are importable. Read at call time, so
#: tests may monkeypatch it to False to exercise the numpy fallback.
HAVE_COMPILED_KERNEL: bool = _kernel is not None

__all__ = [
    "HAVE_COMPILED_KERNEL",
    "HammingIndex",
    "binarize",
    "compiled_kernel",
    "hamming_distance",
    "pack_codes",
    "topk_hamming",
    "topk_hamming_torch",
    "unpack_codes",
    "words_for_bits",
]


def compiled_kernel() -> str | None:
    """Name of the compiled kernel in use (e.g. ``"avx512bw"``), or None without the extension."""
    return _kernel.get_kernel() if (HAVE_COMPILED_KERNEL and _kernel is not None) else None


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _run_chunks(fn, n: int, chunk: int, threads: int) -> None:
    """Call fn(a, b) over [0, n) in chunks, on up to `threads` threads (fn releases the GIL)."""
    bounds = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    if threads <= 1 or len(bounds) <= 1:
        for a, b in bounds:
            fn(a, b)
        return
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dpfah-hamming")
    for f in [pool.submit(fn, a, b) for a, b in bounds]:
        f.result()


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def _check_threads(threads) -> int:
    if threads is None:
        return _default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return int(threads)


def _check_chunk(chunk, name: str) -> int | None:
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {chunk!r}")
    return int(chunk)


def _distances_numpy(q: np.ndarray, d: np.ndarray, dtype) -> np.ndarray:
    out = np.bitwise_count(q[:, 0:1] ^ d[None, :, 0]).astype(dtype, copy=False)
    for w in range(1, q.shape[1]):
        out += np.bitwise_count(q[:, w : w + 1] ^ d[None, :, w]).astype(dtype, copy=False)
    return out


class HammingIndex:
    """Exact Hamming search over a fixed database of packed codes.

    The database is laid out for the compiled kernel once, at construction (16 bytes per
    64 bits of code with the SIMD kernels, twice the packed size), so repeated searches
    against one database (metrics over many query sets, sweeps over k) do not pay for it
    again. The index keeps that copy: later changes to ``db_packed`` are not seen. Without
    the extension, or with ``backend="numpy"``, searches run in numpy.

    Args:
        db_packed: (n_db, words) uint64 packed codes (int64 accepted bit for bit; numpy
            array or CPU tensor).
        threads: threads that split the queries (default: the CPUs this process may use).
        backend: "auto" (compiled when available, else numpy), "compiled" or "numpy".
    """

    def __init__(self, db_packed, *, threads: int | None = None, backend: str = "auto"):
        self.db = as_packed(db_packed, "db_packed")
        self.n_db, self.words = self.db.shape
        if self.words > 1023:
            raise ValueError(f"codes of at most 1023 words (65,472 bits) are supported, got {self.words}")
        self.threads = _check_threads(threads)
        if backend == "auto":
            backend = "compiled" if HAVE_COMPILED_KERNEL else "numpy"
            if backend == "numpy":
                _kernels.announce_fallback()
        if backend not in ("compiled", "numpy"):
            raise ValueError(f"backend must be 'auto', 'compiled' or 'numpy', got {backend!r}")
        if backend == "compiled" and (not HAVE_COMPILED_KERNEL or _kernel is None):
            raise RuntimeError(
                f"backend='compiled' but {_kernels.MODULES['hamming']} is not built or not in use "
                f"({_kernels.import_error('hamming') or 'HAVE_COMPILED_KERNEL is False'}); "
                "build it with pip install -e ."
            )
        self.backend = backend
        self.kernel = None
        self._prepared = None
        if backend == "compiled":
            self.kernel = _kernel.get_kernel()
            self._prepared = np.empty(_kernel.prepared_size(self.n_db, self.words), dtype=np.uint8)
            _kernel.prepare(self.db, self.words, self._prepared)

    def _queries(self, query_packed) -> np.ndarray:
        q = as_packed(query_packed, "query_packed")
        if q.shape[1] != self.words:
            raise ValueError(f"query and database codes differ in length: {q.shape[1]} vs {self.words} words")
        return q

    def _chunk(self, n_q: int, query_chunk: int | None) -> int:
        if query_chunk is not None:
            return query_chunk
        # The kernel streams the database once per batch of up to 96 queries: chunks of at
        # most 96, as many per thread, so that the threads finish together.
        n_chunks = self.threads * max(1, -(-n_q // (96 * self.threads)))
        return max(1, -(-n_q // n_chunks))

    def search(self, query_packed, k: int, *, query_chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest database codes of each query.

        Returns ``(indices, distances)``: int64 and int32 arrays of shape (n_q, min(k, n_db)),
        each row sorted by (distance, database index).
        """
        q = self._queries(query_packed)
        k = min(_check_k(k), self.n_db)
        query_chunk = _check_chunk(query_chunk, "query_chunk")
        n_q = q.shape[0]
        out_i = np.empty((n_q, k), dtype=np.int64)
        out_d = np.empty((n_q, k), dtype=np.int32)
        if n_q == 0 or k == 0:
            return out_i, out_d
        if self.backend == "compiled":
            prepared = self._prepared

            def run(a: int, b: int) -> None:
                _kernel.topk(prepared, q[a:b], k, out_i[a:b], out_d[a:b])

            _run_chunks(run, n_q, self._chunk(n_q, query_chunk), self.threads)
        else:
            n_db, maxd = self.n_db, 64 * self.words
            # Distances take only maxd + 1 values: per query, a histogram gives the k-th
            # distance T; the result is every code at distance < T (stably sorted by
            # distance, so ties stay in index order) and then the first codes at T.
            acc = np.uint8 if maxd <= 255 else np.uint16
            rows = query_chunk or max(1, min(n_q, (1 << 22) // max(n_db, 1)))

            def run(a: int, b: int) -> None:
                dist = _distances_numpy(q[a:b], self.db, acc)
                for i, row in enumerate(dist, start=a):
                    cum = np.cumsum(np.bincount(row, minlength=maxd + 1))
                    t = int(np.searchsorted(cum, k))  # smallest T with k codes at <= T
                    below = int(cum[t - 1]) if t > 0 else 0
                    lt = np.flatnonzero(row < t)
                    lt = lt[np.argsort(row[lt], kind="stable")]
                    out_i[i, :below] = lt
                    out_d[i, :below] = row[lt]
                    out_i[i, below:] = np.flatnonzero(row == t)[: k - below]
                    out_d[i, below:] = t

            _run_chunks(run, n_q, rows, self.threads)
        return out_i, out_d

    def distances(self, query_packed, *, query_chunk: int | None = None) -> np.ndarray:
        """Full (n_q, n_db) uint16 distance matrix."""
        q = self._queries(query_packed)
        query_chunk = _check_chunk(query_chunk, "query_chunk")
        n_q = q.shape[0]
        if self.backend != "compiled":
            return _distances_numpy(q, self.db, np.uint16)
        out = np.empty((n_q, self.n_db), dtype=np.uint16)
        if n_q == 0 or self.n_db == 0:
            return out
        prepared = self._prepared

        def run(a: int, b: int) -> None:
            _kernel.distances(prepared, q[a:b], out[a:b])

        _run_chunks(run, n_q, self._chunk(n_q, query_chunk), self.threads)
        return out

    def count_within(self, query_packed, radius: int) -> np.ndarray:
        """Per query, the number of database codes at distance <= radius (int64)."""
        q = self._queries(query_packed)
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise ValueError(f"radius must be a non-negative integer, got {radius!r}")
        n_q = q.shape[0]
        out = np.zeros(n_q, dtype=np.int64)
        if n_q == 0 or self.n_db == 0:
            return out
        if self.backend == "compiled":
            prepared = self._prepared

            def run(a: int, b: int) -> None:
                _kernel.count_within(prepared, q[a:b], int(radius), out[a:b])

            _run_chunks(run, n_q, self._chunk(n_q, None), self.threads)
        else:
            rows = max(1, (1 << 22) // max(self.n_db, 1))
            for a in range(0, n_q, rows):
                out[a : a + rows] = (_distances_numpy(q[a : a + rows], self.db, np.uint16) <= radius).sum(axis=1)
        return out


def hamming_distance(query_packed, db_packed) -> np.ndarray:
    """Full (n_query, n_db) matrix of Hamming distances between packed codes, as uint16.

    Meant for blocks that fit in memory; top-k search and the metrics work in chunks. Uses
    the compiled kernel when it is built (all threads), numpy otherwise.
    """
    q, d = check_packed(query_packed, db_packed)
    if HAVE_COMPILED_KERNEL and _kernel is not None and d.shape[1] <= 1023 and q.shape[0] * d.shape[0] > 0:
        return HammingIndex(d).distances(q)
    if not HAVE_COMPILED_KERNEL or _kernel is None:
        _kernels.announce_fallback()
    return _distances_numpy(q, d, np.uint16)


def topk_hamming(
    query_packed,
    db_packed,
    k: int,
    *,
    threads: int | None = None,
    query_chunk: int | None = None,
    backend: str = "auto",
):
    """Exact top-k Hamming search over packed codes.

    Args:
        query_packed: (n_q, words) packed codes (uint64, or int64 bit for bit).
        db_packed: (n_db, words) packed codes of the database.
        k: neighbours per query (>= 1); clipped to n_db.
        threads: threads splitting the queries (compiled and numpy backends; default: all
            CPUs this process may use).
        query_chunk: queries per task (default: chosen from n_q and threads); with the
            torch backend, queries per matmul block.
        backend: "auto" (torch for tensors on a GPU, else compiled if built, else numpy),
            "compiled", "numpy" or "torch".

    Returns:
        ``(indices, distances)`` of shape (n_q, min(k, n_db)), int64 and int32, each row
        sorted by (distance, database index). numpy arrays, or torch tensors on the inputs'
        device when either input is a tensor.

    With torch tensors (e.g. on CUDA) the "torch" backend unpacks the words on the device and
    runs ``topk_hamming_torch``; +1/-1 codes can go to ``topk_hamming_torch`` directly.
    """
    k = _check_k(k)
    is_torch = isinstance(query_packed, torch.Tensor) or isinstance(db_packed, torch.Tensor)
    if backend == "auto":
        on_gpu = any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in (query_packed, db_packed))
        backend = "torch" if on_gpu else ("compiled" if HAVE_COMPILED_KERNEL else "numpy")
    if backend == "torch":
        if not (isinstance(query_packed, torch.Tensor) and isinstance(db_packed, torch.Tensor)):
            raise TypeError("backend='torch' needs both query_packed and db_packed as torch tensors")
        qw, dw = _packed_torch(query_packed, "query_packed"), _packed_torch(db_packed, "db_packed")
        if qw.shape[1] != dw.shape[1]:
            raise ValueError(f"query and database codes differ in length: {qw.shape[1]} vs {dw.shape[1]} words")
        if qw.device != dw.device:
            raise ValueError(f"query and database tensors are on different devices: {qw.device} vs {dw.device}")
        return topk_hamming_torch(_unpack_torch(qw), _unpack_torch(dw), k, chunk=query_chunk)
    if backend not in ("compiled", "numpy"):
        raise ValueError(f"backend must be 'auto', 'compiled', 'numpy' or 'torch', got {backend!r}")
    q, d = check_packed(query_packed, db_packed)
    idx, dist = HammingIndex(d, threads=threads, backend=backend).search(q, k, query_chunk=query_chunk)
    if is_torch:
        device = next(x.device for x in (query_packed, db_packed) if isinstance(x, torch.Tensor))
        return torch.from_numpy(idx).to(device), torch.from_numpy(dist).to(device)
    return idx, dist


def _packed_torch(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype == torch.uint64:
        x = x.view(torch.int64)
    if x.dtype != torch.int64:
        raise TypeError(f"{name}: packed codes must be int64 (or uint64) words, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{name}: packed codes must be 2-D (n, words), got shape {tuple(x.shape)}")
    return x


def _unpack_torch(words: torch.Tensor) -> torch.Tensor:
    """(n, w) int64 words -> (n, 64 w) float32 +1/-1 on the same device (padding bits give
    -1 in every code, which adds nothing to a distance)."""
    shifts = torch.arange(64, device=words.device, dtype=torch.int64)
    bits01 = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: bit 63 still comes out right
    return bits01.reshape(words.shape[0], -1).to(torch.float32) * 2 - 1


def topk_hamming_torch(query_codes: torch.Tensor, db_codes: torch.Tensor, k: int, *, chunk: int | None = None):
    """Exact top-k Hamming search on +1/-1 codes with torch only (any device, e.g. CUDA).

    Distances come from a float32 matmul, D = (bits - <q, d>) / 2, exact for bits <= 2**24
    (the products are +-1 and TF32 represents +-1 exactly). Ties are broken by database
    index through a unique integer key, key = D * n_db + index: ``torch.topk`` of the k
    smallest keys, then a sort, so the result does not depend on topk's tie handling.

    Args:
        query_codes: (n_q, bits) tensor of +1/-1 values (any real dtype).
        db_codes: (n_db, bits) tensor on the same device.
        k: neighbours per query (>= 1); clipped to n_db.
        chunk: queries per block (default: about 16M distance entries per block, some
            200 MB of temporaries; the unpacked database takes 4 bytes per bit and code).

    Returns:
        ``(indices int64, distances int32)`` tensors of shape (n_q, min(k, n_db)) on the
        inputs' device, rows sorted by (distance, database index).
    """
    k = _check_k(k)
    chunk = _check_chunk(chunk, "chunk")
    for name, x in (("query_codes", query_codes), ("db_codes", db_codes)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (n, bits), got {tuple(x.shape)}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must hold +1/-1 values in a real dtype, got {x.dtype}")
    if query_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(
            f"query and database codes differ in length: {query_codes.shape[1]} vs {db_codes.shape[1]} bits"
        )
    if query_codes.device != db_codes.device:
        raise ValueError(
            f"query and database tensors are on different devices: {query_codes.device} vs {db_codes.device}"
        )
    bits = int(db_codes.shape[1])
    if bits < 1 or bits > 2**24:
        raise ValueError(f"bits must be in 1..2**24 for exact float32 distances, got {bits}")
    q = query_codes.detach().to(torch.float32)
    d = db_codes.detach().to(torch.float32)
    for name, x in (("query_codes", q), ("db_codes", d)):
        if x.numel() and not bool((x.abs() == 1).all()):
            raise ValueError(f"{name} must contain only +1 and -1 (use dpfah.codes.binarize first)")
    n_q, n_db = q.shape[0], d.shape[0]
    k = min(k, n_db)
    out_i = torch.empty((n_q, k), dtype=torch.int64, device=q.device)
    out_d = torch.empty((n_q, k), dtype=torch.int32, device=q.device)
    if n_q == 0 or k == 0:
        return out_i, out_d
    rows = chunk or max(1, min(n_q, (1 << 24) // n_db))
    index = torch.arange(n_db, dtype=torch.int64, device=q.device)
    d_t = d.t().contiguous()
    for a in range(0, n_q, rows):
        b = min(n_q, a + rows)
        inner = q[a:b] @ d_t  # integers in [-bits, bits], exact in float32
        dist = ((bits - inner) * 0.5).round_().to(torch.int64)
        key = dist.mul_(n_db).add_(index)
        key = torch.topk(key, k, dim=1, largest=False, sorted=False).values
        key = torch.sort(key, dim=1).values
        out_i[a:b] = key % n_db
        out_d[a:b] = (key // n_db).to(torch.int32)
    return out_i, out_d
