"""The optional sub-linear index of an index folder (``pipeline.index --sublinear ivf``): a
faiss binary IVF index of the codes, written beside them in faiss's own format, with its
recall@k measured at build time on a sample of the index's own codes. ``pipeline.search``
uses it when present (approximate; ``--exact`` scans). faiss is an optional dependency (the
``faiss`` extra). Where each search fits: docs/serving.md; numbers: bench/index_scale.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import write_atomic, write_json_atomic
from .errors import ConfigError
from .index_format import MANIFEST, SUBLINEAR, NotAnIndex, sha256_file

__all__ = [
    "KINDS",
    "RECALL_K",
    "SublinearSpec",
    "add_sublinear",
    "build_ivf",
    "default_nlist",
    "describe",
    "distance_recall",
    "import_faiss",
    "load_sublinear",
    "search_sublinear",
    "sublinear_bytes",
]

#: The sub-linear indexes offered (bench/index_scale.py: multi-index hashing lost to the exact
#: scan on realistic codes, so only the binary IVF is).
KINDS = ("ivf",)
#: The k whose recall is measured at build time (pipeline.search's default k is 10).
RECALL_K = (10, 100)
#: Own codes searched at build time to measure the recall.
RECALL_QUERIES = 1000
#: Training items per list (faiss warns below 39).
TRAIN_PER_LIST = 40
#: Below this many queries a search runs on one thread (faiss splits queries over threads).
FEW_QUERIES = 16
INSTALL = "pip install 'dpfah-pipeline[faiss]'"


def import_faiss(what: str):
    """faiss, or a one-line ConfigError naming the extra that installs it."""
    try:
        import faiss
    except ImportError:
        raise ConfigError(f"{what} needs faiss, an optional dependency: {INSTALL} (faiss-cpu)") from None
    return faiss


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` codes: the power of two nearest sqrt(n) / 4 (1,024 for 10M codes:
    as good as 4,096 at the same latency in bench/index_scale.py, and built 3-4x faster), at most
    n / 40 (each list trained on 40 codes), at least 1."""
    nlist = 1 << max(0, round(np.log2(np.sqrt(max(n, 1)) / 4)))
    return int(max(1, min(nlist, n // TRAIN_PER_LIST)))


@dataclass(frozen=True)
class SublinearSpec:
    """What ``pipeline.index --sublinear`` builds: its kind, lists (None: :func:`default_nlist`)
    and the lists a search probes by default."""

    kind: str = "ivf"
    nlist: int | None = None
    nprobe: int = 32  # 10M codes, 1,024 lists: recall@100 0.95 at 0.3 ms a query (bench/index_scale.py)

    def check(self) -> SublinearSpec:
        if self.kind not in KINDS:
            raise ConfigError(f"--sublinear {self.kind}: expected one of {', '.join(KINDS)}")
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError(f"--nlist {self.nlist}: must be >= 1")
        if self.nprobe < 1:
            raise ConfigError(f"--nprobe {self.nprobe}: must be >= 1")
        return self


def sublinear_bytes(n: int, words: int, spec: SublinearSpec) -> int:
    """At least the bytes of the faiss file ``spec`` writes for ``n`` codes of ``words`` words:
    a binary IVF stores each code with its 8-byte id, and each list's centroid (faiss 1.15
    wrote n (8 words + 8) + nlist (8 words + 8 to 31) + about 100 bytes; checked in
    tests/test_sublinear.py)."""
    if n <= 0:
        return 0
    nlist = spec.nlist or default_nlist(n)
    return n * (8 * words + 8) + nlist * (8 * words + 64) + 4096


def build_ivf(packed: np.ndarray, nlist: int, *, seed: int = 0):
    """A faiss IndexBinaryIVF of the (n, words) uint64 ``packed`` codes (ids = rows), its
    lists trained on :data:`TRAIN_PER_LIST` codes each, drawn at random (``seed``). Each code
    goes to its nearest list as faiss's ``add`` would send it, but found by the project's
    kernel (``HammingIndex``: some 30x faster than faiss's flat assignment here; among lists
    at the same distance, the first)."""
    from dpfah.codes import HammingIndex

    faiss = import_faiss("a sub-linear index")
    packed = np.ascontiguousarray(packed, dtype=np.uint64)
    n, bits = packed.shape[0], packed.shape[1] * 64
    nlist = max(1, min(int(nlist), n))
    rng = np.random.default_rng(seed)
    train = packed[np.sort(rng.choice(n, min(n, TRAIN_PER_LIST * nlist), replace=False))]
    index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, nlist)
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # no warning for a small collection's few lists (else 40 codes a list)
    index.train(train.view(np.uint8))
    if n:
        centroids = np.ascontiguousarray(index.quantizer.reconstruct_n(0, nlist)).view(np.uint64)
        lists = np.ascontiguousarray(HammingIndex(centroids).search(packed, 1)[0][:, 0], dtype=np.int64)
        index.add_core(n, faiss.swig_ptr(packed.view(np.uint8)), None, faiss.swig_ptr(lists))
    return index


def distance_recall(exact: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """Per query, the recall@k of ``approx`` against ``exact`` (each (n_q, k) int distances,
    ``approx`` negative where it returned no item), counted on distances: an approximate
    item at a distance the exact top k holds counts as found, up to as many as the exact top k
    has there, so which of several items tied at the k-th distance comes back is no miss."""
    exact, approx = np.asarray(exact, np.int64), np.asarray(approx, np.int64)
    n_q, k = exact.shape
    if n_q == 0 or k == 0:
        return np.ones(n_q)
    top = int(max(exact.max(), approx.max(initial=0))) + 2
    rows = np.arange(n_q)[:, None] * top

    def counts(d: np.ndarray) -> np.ndarray:
        d = np.where(d < 0, top - 1, d)  # missing: a bin the exact side never fills
        return np.bincount((rows + d).ravel(), minlength=n_q * top).reshape(n_q, top)

    return np.minimum(counts(exact), counts(approx)).sum(axis=1) / k


def search_sublinear(index, packed: np.ndarray, k: int, nprobe: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per query, the approximate top ``k`` rows and distances from the faiss ``index``
    probing ``nprobe`` lists, ordered by (distance, row) like the exact search."""
    faiss = import_faiss("a sub-linear index")
    index.nprobe = int(nprobe)
    k = min(int(k), int(index.ntotal))
    threads = faiss.omp_get_max_threads()
    if len(packed) < FEW_QUERIES:  # one thread per query: idle OpenMP threads only spin (and slow a busy machine)
        faiss.omp_set_num_threads(1)
    try:
        dist, rows = index.search(np.ascontiguousarray(packed, dtype=np.uint64).view(np.uint8), k)
    finally:
        faiss.omp_set_num_threads(threads)
    out_rows, out_dist = [], []
    for r, d in zip(rows, dist):
        keep = r >= 0
        r, d = r[keep], d[keep]
        order = np.lexsort((r, d))
        out_rows.append(r[order].astype(np.int64))
        out_dist.append(d[order].astype(np.int32))
    return out_rows, out_dist


def _measure_recall(index, packed: np.ndarray, nprobe: int, seed: int) -> dict[str, Any]:
    """Recall@k (:data:`RECALL_K`) of ``index`` at ``nprobe`` on a sample of its own codes as
    queries, against the exact scan."""
    from dpfah.codes import HammingIndex

    n = packed.shape[0]
    rng = np.random.default_rng(seed + 1)
    sample = np.sort(rng.choice(n, min(n, RECALL_QUERIES), replace=False))
    queries = np.ascontiguousarray(packed[sample])
    ks = [min(k, n) for k in RECALL_K]
    _, exact = HammingIndex(packed).search(queries, max(ks))
    recall = {}
    for k, shown in zip(ks, RECALL_K):
        _, approx = search_sublinear(index, queries, k, nprobe)
        approx_d = np.full((len(queries), k), -1, np.int64)
        for i, d in enumerate(approx):
            approx_d[i, : len(d)] = d
        recall[str(shown)] = round(float(distance_recall(exact[:, :k], approx_d).mean()), 4)
    return {"recall": recall, "recall_queries": int(len(sample))}


def add_sublinear(directory: Path, manifest: dict[str, Any], packed: np.ndarray, spec: SublinearSpec) -> dict:
    """Build the sub-linear index ``spec`` of the index folder ``directory`` (its codes
    ``packed``), write it beside them, measure its recall and record both in the manifest
    (rewritten, last). Returns the manifest."""
    faiss = import_faiss("--sublinear")
    t0 = time.perf_counter()
    n = packed.shape[0]
    if n == 0:  # nothing to train lists on; the exact search of nothing is instant
        return manifest
    nlist = spec.nlist or default_nlist(n)
    index = build_ivf(packed, nlist)
    build_s = time.perf_counter() - t0
    nprobe = min(spec.nprobe, index.nlist)
    measured = _measure_recall(index, packed, nprobe, 0)
    write_atomic(directory / SUBLINEAR, faiss.serialize_index_binary(index).tobytes())
    path = directory / SUBLINEAR
    manifest = dict(manifest)
    manifest["files"] = {**manifest["files"], SUBLINEAR: {"sha256": sha256_file(path), "bytes": path.stat().st_size}}
    manifest["sublinear"] = {
        "kind": spec.kind,
        "file": SUBLINEAR,
        "library": f"faiss {faiss.__version__} IndexBinaryIVF",
        "nlist": int(index.nlist),
        "nprobe": int(nprobe),
        "trained_on": int(min(n, TRAIN_PER_LIST * index.nlist)),
        "build_s": round(build_s, 3),
        **measured,
        "recall_of": "recall@k of the index's own codes as queries against the exact scan, counted on "
        "distances (an item tied at the k-th distance counts as found)",
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def describe(info: dict[str, Any], nprobe: int | None = None) -> str:
    """One line on the manifest's sublinear entry ``info``: what it is and the recall measured
    at build time (and the lists probed now, when ``nprobe`` is not the measured one)."""
    recall = ", ".join(f"recall@{k} {v:.3f}" for k, v in info.get("recall", {}).items()) or "recall not measured"
    now = "" if nprobe in (None, info.get("nprobe")) else f"; this search probes {nprobe}"
    return (
        f"{info.get('library')}, nlist {info.get('nlist')}, nprobe {info.get('nprobe')}: {recall}, measured at "
        f"build on {info.get('recall_queries', 0):,} of its own codes{now}"
    )


def load_sublinear(directory: Path, manifest: dict[str, Any]):
    """The faiss index the manifest records, read through faiss's own format (never pickle)
    once its bytes match the manifest's sha256, checked to be a binary IVF of the index's
    codes; a :class:`NotAnIndex` naming the file otherwise. faiss missing: a ConfigError."""
    import hashlib

    info = manifest.get("sublinear")
    if not isinstance(info, dict) or info.get("file") != SUBLINEAR or SUBLINEAR not in manifest["files"]:
        raise NotAnIndex(f"{directory / MANIFEST}: its sublinear entry is malformed")
    faiss = import_faiss("searching the sub-linear index (or --exact)")
    path = directory / SUBLINEAR
    try:
        data = path.read_bytes()
    except OSError as e:
        raise NotAnIndex(f"{path}: {e.strerror or e} (the index lists it in {MANIFEST})") from None
    if hashlib.sha256(data).hexdigest() != manifest["files"][SUBLINEAR]["sha256"]:
        raise NotAnIndex(f"{path}: sha256 does not match {MANIFEST} (the file changed; rebuild the index)")
    try:
        index = faiss.deserialize_index_binary(np.frombuffer(data, np.uint8))
    except RuntimeError as e:
        raise NotAnIndex(f"{path}: not a faiss index ({str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if (
        not isinstance(index, faiss.IndexBinaryIVF)
        or index.ntotal != manifest["count"]
        or index.d != 64 * manifest["words"]
    ):
        raise NotAnIndex(f"{path}: not a binary IVF of the index's {manifest['count']:,} codes")
    return index
