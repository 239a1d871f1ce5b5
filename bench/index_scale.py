"""Search past one scan (issue 30, target 4): the exact scan against faiss's sub-linear binary
indexes on a large collection of realistic 64-bit codes, side by side in one run.

Codes: as bench/metrics.py draws them (one random centre per class, each bit flipped with
probability ``--flip``, classes drawn uniformly), but drawn packed: the flip mask of a word is
an AND/OR of random words (the binary digits of ``--flip``, rounded to 1/65536), so 10M codes
take seconds and 80 MB (bench/metrics.py's ``make_codes`` draws a float64 per bit: 5 GB at
10M). Queries are fresh draws around the same centres.

Rows, each with build time, memory, latency of single queries (p50, p99; one query per call,
on one thread, as ``pipeline.search`` runs one: faiss's OpenMP is set to 1 thread for them),
batch throughput (all threads), and recall@k against the exact scan:

* exact: ``dpfah.codes.HammingIndex.search`` (the database laid out once; top-k exact);
* faiss ``IndexBinaryMultiHash`` (multi-index hashing: ``nhash`` tables of ``b``-bit
  substrings; a kNN search verifies the codes sharing a substring within ``nflip`` flips);
  its range search is exact within radius r when ``nflip >= r // nhash``: rows "range r",
  checked against ``HammingIndex.count_within`` query by query;
* faiss ``IndexBinaryIVF`` (``nlist`` lists trained by k-means, ``pipeline.index_sublinear.build_ivf``
  as ``pipeline.index --sublinear ivf`` builds it), over an ``nprobe`` sweep.

Recall is counted on distances (``pipeline.index_sublinear.distance_recall``): an item at a
distance the exact top k holds counts as found, up to as many as the exact top k has there, so
which of several codes tied at the k-th distance comes back is never a miss. A configuration
whose single queries exceed ``--budget`` seconds stops there (the row says on how many queries
it was measured, and gives no batch rate). Memory: the bytes the index holds (exact: the
codes and the kernel's layout; faiss: its serialised size, the codes included) and the growth
of this process's resident memory while it was built.

    python -m bench.index_scale                       # 10M codes; writes bench/results/index_scale.json
    python -m bench.index_scale --db 1000000 --ivf-nlist 1024 --nprobe 1,4,16
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python bench/index_scale.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.search import _cpu_model  # noqa: E402
from dpfah.codes import HammingIndex  # noqa: E402
from pipeline.index_sublinear import build_ivf, distance_recall  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "index_scale.json"
DEPTH = 16  # binary digits of the flip probability


def _words(rng, shape) -> np.ndarray:
    return rng.integers(0, 2**64, size=shape, dtype=np.uint64)


def flip_mask(rng, shape, p: float) -> np.ndarray:
    """uint64 words whose bits are 1 independently with probability ``p`` (rounded to
    1/2**16): the binary digits of p, least significant first, fold random words with OR
    (digit 1) or AND (digit 0), halving or raising the probability each time."""
    q = round(p * 2**DEPTH)
    if q <= 0:
        return np.zeros(shape, np.uint64)
    if q >= 2**DEPTH:
        return np.full(shape, np.uint64(2**64 - 1))
    digits = [(q >> (DEPTH - 1 - i)) & 1 for i in range(DEPTH)]  # p = sum digits[i] / 2**(i+1)
    while digits[-1] == 0:
        digits.pop()
    mask = np.zeros(shape, np.uint64)
    for digit in reversed(digits):
        mask = (_words(rng, shape) | mask) if digit else (_words(rng, shape) & mask)
    return mask


def make_packed_codes(seed: int, n_queries: int, n_db: int, bits: int, classes: int, flip: float, chunk=1 << 21):
    """Packed (n, bits/64) uint64 codes and class ids, drawn as bench/metrics.py's make_codes
    draws them (a random centre per class, each bit flipped with probability ``flip``)."""
    rng = np.random.default_rng(seed)
    words = bits // 64
    centres = _words(rng, (classes, words))

    def draw(n):
        y = rng.integers(0, classes, n)
        codes = np.empty((n, words), np.uint64)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            codes[a:b] = centres[y[a:b]] ^ flip_mask(rng, (b - a, words), flip)
        return codes, y

    q, qy = draw(n_queries)
    db, dby = draw(n_db)
    return q, db, qy, dby


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _true_distances(db: np.ndarray, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Hamming distances of the returned rows (recomputed, not taken from the index); -1 where none."""
    d = np.zeros(rows.shape, np.int64)
    safe = np.where(rows >= 0, rows, 0)
    for w in range(db.shape[1]):
        d += np.bitwise_count(db[safe, w] ^ q[:, w : w + 1]).astype(np.int64)
    return np.where(rows >= 0, d, -1)


def _single(fn, queries: np.ndarray, budget: float):
    """Latencies (s) of fn(one query) over the queries, in order, until ``budget`` seconds."""
    fn(queries[:1])  # warm-up
    lat, spent = [], 0.0
    for i in range(len(queries)):
        t = time.perf_counter()
        fn(queries[i : i + 1])
        lat.append(time.perf_counter() - t)
        spent += lat[-1]
        if spent > budget:
            break
    return np.asarray(lat)


def _batch(fn, queries: np.ndarray, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(queries)
        best = min(best, time.perf_counter() - t)
    return best, out


class Runner:
    def __init__(self, args, q, db):
        self.args, self.q, self.db, self.rows = args, q, db, []
        self.qb = q.view(np.uint8)
        self.exact: dict[int, np.ndarray] = {}

    def row(self, method, params, k, built=None, lat=None, batch_s=None, recall=None, note=""):
        built = built or {}
        self.rows.append(
            {
                "method": method,
                "params": params,
                "k": k,
                "build_s": built.get("build_s"),
                "load_s": built.get("load_s"),
                "bytes_held": built.get("held"),
                "rss_growth_bytes": built.get("rss"),
                "single_queries": None if lat is None else len(lat),
                "p50_ms": None if lat is None else float(np.percentile(lat, 50) * 1e3),
                "p99_ms": None if lat is None else float(np.percentile(lat, 99) * 1e3),
                "batch_queries": len(self.q) if batch_s is not None else None,
                "batch_qps": len(self.q) / batch_s if batch_s else None,
                "recall": None if recall is None else float(recall.mean()),
                "recall_p05": None if recall is None else float(np.percentile(recall, 5)),
                "note": note,
                "loadavg_1min": os.getloadavg()[0],
            }
        )
        print(format_table(self.rows[-1:], header=len(self.rows) == 1), flush=True)

    def recall(self, k: int, rows: np.ndarray, n_q: int) -> np.ndarray:
        return distance_recall(self.exact[k][:n_q], _true_distances(self.db, self.q[:n_q], rows))

    def build(self, make) -> tuple[object, dict]:
        """The index ``make()`` builds, and its build time and resident-memory growth."""
        gc.collect()
        rss0, t = _rss(), time.perf_counter()
        index = make()
        return index, {"build_s": time.perf_counter() - t, "rss": _rss() - rss0}

    def exact_rows(self) -> None:
        a = self.args
        index, built = self.build(lambda: HammingIndex(self.db, threads=a.threads))
        built["held"] = self.db.nbytes + (index._prepared.nbytes if index._prepared is not None else 0)
        built["load_s"] = built["build_s"]  # what pipeline.search does to load it: the kernel's layout
        method, single = f"exact HammingIndex ({index.kernel or index.backend})", self.q[: a.single]
        for k in a.k:
            lat = _single(lambda x, k=k: index.search(x, k), single, a.budget)
            batch_s, (_, self.exact[k]) = _batch(lambda x, k=k: index.search(x, k), self.q, a.repeat)
            self.row(method, "", k, built, lat, batch_s, np.ones(len(self.q)), "the reference")

        def within(x, r):  # as pipeline.search does: count, then the nearest that many
            return index.search(x, max(1, int(index.count_within(x, r).max())))

        self.count_within = {r: index.count_within(self.q, r) for r in a.radius}
        for r in a.radius:
            lat = _single(lambda x, r=r: within(x, r), single, a.budget)
            note = f"{self.count_within[r].mean():,.1f} codes within per query"
            self.row(f"{method} within radius", f"radius {r}", None, lat=lat, note=note)

    def approx_rows(self, method: str, params: str, index, built: dict) -> None:
        """Rows of the faiss ``index`` as set now, one per k: single queries on one thread (as
        the exact scan runs one), then the batch on all threads unless over the budget."""
        a, faiss = self.args, self.faiss
        for k in a.k:
            faiss.omp_set_num_threads(1)
            lat = _single(lambda x, k=k: index.search(x, k), self.qb[: a.single], a.budget)
            faiss.omp_set_num_threads(a.threads)
            stopped = len(lat) < min(a.single, len(self.q))
            if stopped or np.median(lat) * len(self.q) > a.budget * a.threads:
                _, rows = index.search(self.qb[: len(lat)], k)
                recall = self.recall(k, rows, len(lat))
                note = f"stopped at the {a.budget:g} s budget" if stopped else "no batch: over the budget"
                self.row(method, params, k, built, lat, None, recall, note)
                continue
            batch_s, (_, rows) = _batch(lambda x, k=k: index.search(x, k), self.qb, a.repeat)
            self.row(method, params, k, built, lat, batch_s, self.recall(k, rows, len(self.q)))

    def mih_rows(self) -> None:
        a, bits, faiss = self.args, self.db.shape[1] * 64, self.faiss
        for nhash in a.mih:
            b = bits // nhash

            def make(nhash=nhash, b=b):
                index = faiss.IndexBinaryMultiHash(bits, nhash, b)
                index.add(self.db.view(np.uint8))
                return index

            index, built = self.build(make)
            built["held"] = faiss.serialize_index_binary(index).nbytes
            for nflip in a.nflip:
                index.nflip = nflip
                self.approx_rows("faiss IndexBinaryMultiHash", f"nhash {nhash}, b {b}, nflip {nflip}", index, built)
            for r in a.radius:
                index.nflip = r // nhash  # pigeonhole: some substring is within r // nhash flips
                faiss.omp_set_num_threads(1)
                lat = _single(lambda x, r=r, index=index: index.range_search(x, r + 1), self.qb[: a.single], a.budget)
                faiss.omp_set_num_threads(a.threads)
                n_q = len(lat)
                lims, _, _ = index.range_search(self.qb[:n_q], r + 1)  # faiss: distance < radius
                same = bool(np.array_equal(np.diff(lims), self.count_within[r][:n_q]))
                note = f"{'exact: same counts' if same else 'COUNTS DIFFER'} as count_within"
                note += "" if n_q == len(self.q) else f" on {n_q} queries"
                params = f"nhash {nhash}, b {b}, nflip {r // nhash}, radius {r}"
                self.row("faiss IndexBinaryMultiHash range", params, None, built, lat, note=note)
            index = None  # freed before the next is built

    def ivf_rows(self) -> None:
        for nlist in self.args.ivf_nlist:
            index, built = self.build(lambda nlist=nlist: build_ivf(self.db, nlist))
            blob = self.faiss.serialize_index_binary(index)
            t = time.perf_counter()  # what pipeline.search does to load it: the bytes hashed, then read by faiss
            hashlib.sha256(blob.tobytes()).hexdigest()
            self.faiss.deserialize_index_binary(blob)
            built["held"], built["load_s"] = blob.nbytes, time.perf_counter() - t
            for nprobe in [p for p in self.args.nprobe if p <= nlist]:
                index.nprobe = nprobe
                self.approx_rows("faiss IndexBinaryIVF", f"nlist {nlist}, nprobe {nprobe}", index, built)
            index = None  # freed before the next is built


#: The table's columns: header, row key, format, width (bytes shown in MiB).
COLUMNS = [
    ("method", "method", "", 38),
    ("params", "params", "", 36),
    ("k", "k", "d", 4),
    ("build s", "build_s", ".1f", 7),
    ("load s", "load_s", ".2f", 6),
    ("MiB held", "bytes_held", "mib", 8),
    ("RSS+ MiB", "rss_growth_bytes", "mib", 8),
    ("queries", "single_queries", "d", 7),
    ("p50 ms", "p50_ms", ".3f", 8),
    ("p99 ms", "p99_ms", ".3f", 8),
    ("batch q/s", "batch_qps", ",.0f", 9),
    ("recall", "recall", ".4f", 6),
    ("recall p5", "recall_p05", ".3f", 9),
    ("load", "loadavg_1min", ".2f", 5),
    ("note", "note", "", 0),
]


def _cell(value, spec: str) -> str:
    if value is None:
        return ""
    if spec == "mib":
        return f"{value / 2**20:,.0f}"
    return format(value, spec) if spec else str(value)


def format_table(rows: list[dict], header: bool = True) -> str:
    lines = [" | ".join(h.ljust(w) for h, _, _, w in COLUMNS).rstrip()] if header else []
    lines += [" | ".join(_cell(r[key], spec).ljust(w) for _, key, spec, w in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.index_scale",
        description=__doc__.split("\n\n")[0],
        epilog="Writes the table's rows as JSON (--out). Run from the repository root.",
    )
    p.add_argument("--db", type=int, default=10_000_000, help="database codes (default 10,000,000)")
    p.add_argument("--queries", type=int, default=1000, help="queries of the batch and of the recall (default 1,000)")
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time (default 200)")
    p.add_argument("-k", type=_ints, default=[100, 1000], help="comma-separated k (default 100,1000)")
    p.add_argument("--bits", type=int, default=64, choices=[64, 128], help="code length (default 64)")
    p.add_argument("--classes", type=int, default=100, help="class centres (default 100, ImageNet-100's)")
    p.add_argument("--flip", type=float, default=0.25, help="bit-flip probability around the centre (default 0.25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="threads (default: all CPUs of this process)")
    p.add_argument("--mih", type=_ints, default=[4, 8], help="nhash of the multi-index hashing rows (default 4,8)")
    p.add_argument("--nflip", type=_ints, default=[0, 1], help="nflip of the MIH kNN rows (default 0,1)")
    p.add_argument("--radius", type=_ints, default=[8, 12], help="radii of the range rows (default 8,12)")
    p.add_argument("--ivf-nlist", type=_ints, default=[1024, 4096], help="nlist of the IVF rows (default 1024,4096)")
    p.add_argument("--nprobe", type=_ints, default=[1, 2, 4, 8, 16, 32, 64, 128], help="nprobe sweep of the IVF rows")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of single queries per row at most (default 20)")
    p.add_argument("--repeat", type=int, default=3, help="batch runs per row, best kept (default 3)")
    p.add_argument("--no-faiss", action="store_true", help="the exact rows only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    a.threads = a.threads or len(os.sched_getaffinity(0))
    load0 = os.getloadavg()
    t = time.perf_counter()
    q, db, _, _ = make_packed_codes(a.seed, a.queries, a.db, a.bits, a.classes, a.flip)
    gen_s = time.perf_counter() - t
    print(
        f"{a.db:,} codes of {a.bits} bits around {a.classes} class centres (flip {a.flip}), {a.queries:,} queries "
        f"drawn the same way, generated in {gen_s:.1f} s; {_cpu_model()}, {a.threads} threads, "
        f"load {load0[0]:.2f}",
        flush=True,
    )
    run = Runner(a, q, db)
    run.exact_rows()
    if not a.no_faiss:
        import faiss

        run.faiss = faiss
        faiss.omp_set_num_threads(a.threads)
        run.ivf_rows()
        run.mih_rows()
    result = {
        "benchmark": "search past one scan (issue 30, target 4)",
        "command": "python -m bench.index_scale " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "generate_s": gen_s,
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "recall_definition": "recall@k counted on distances: an item at a distance the exact top k holds counts, "
        "up to as many as the exact top k has there (ties at the k-th distance are never a miss)",
        "rows": run.rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
