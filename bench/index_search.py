"""Index and search (issue 16): what `pipeline.search` and `pipeline.index` cost.

Search (always): an index folder of 1,000,000 random 64-bit codes (seeded) is written as
`pipeline.index` writes one, then

* load: ``pipeline.index_format.load_index`` (memory-mapped codes, the keys column) plus building the
  kernel's layout (``HammingIndex``), the time before the first query can run;
* one query: ``pipeline.search.search`` of one query, top 10, repeated: p50 and p99 latency,
  Python included, on the threads this process may use (2 cores here);
* a batch of 1,000 queries, top 1,000 (``bench/search.py``'s case): ``pipeline.search.search``
  against ``HammingIndex.search`` on the same index, in the same run (the rate bench/search.py
  reports for "ours, compiled"), and the ratio.

Indexing (``pipeline.index`` against evaluate's encoder): ``bench/index_throughput.py``.

Prints a table, writes JSON (``bench/results/index_search.json`` by default). Run from the
repository root: ``python -m bench.index_search --help``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "index_search.json"


def _fake_index(directory: Path, n: int, seed: int) -> np.ndarray:
    """An index folder as pipeline.index writes it, of n random 64-bit codes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.artifacts import write_json_atomic
    from pipeline.index_format import CODES, FORMAT, KEYS, MANIFEST, sha256_file

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**64, size=(n, 1), dtype=np.uint64)
    directory.mkdir(parents=True)
    np.save(directory / CODES, codes)
    pq.write_table(pa.table({"key": pa.array([f"img/{i:07d}.jpg" for i in range(n)], pa.string())}), directory / KEYS)
    files = {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in (CODES, KEYS)
    }
    manifest = {
        "format": FORMAT,
        "bits": 64,
        "words": 1,
        "count": n,
        "files": files,
        "model": {"uri": "models:/bench/1"},
        "source": {"type": "directory"},
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return codes


def bench_search(n: int, queries: int, repeat: int, seed: int) -> dict:
    from dpfah.codes import HammingIndex
    from pipeline.index_format import load_index
    from pipeline.search import search

    with tempfile.TemporaryDirectory(prefix="dpfah-bench-index-") as tmp:
        directory = Path(tmp) / "index"
        codes = _fake_index(directory, n, seed)
        t = time.perf_counter()
        index = load_index(directory)
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        index.hamming()
        t_kernel = time.perf_counter() - t
        rng = np.random.default_rng(seed + 1)
        q = rng.integers(0, 2**64, size=(max(queries, repeat), 1), dtype=np.uint64)
        for i in range(20):  # warm-up
            search(index, q[i : i + 1], k=10)
        lat = np.empty(repeat)
        for i in range(repeat):
            t = time.perf_counter()
            search(index, q[i : i + 1], k=10)
            lat[i] = time.perf_counter() - t
        batch = q[:queries]
        best_ours = best_kernel = float("inf")
        direct = HammingIndex(codes)
        for _ in range(3):
            t = time.perf_counter()
            hits = search(index, batch, k=1000)
            best_ours = min(best_ours, time.perf_counter() - t)
            t = time.perf_counter()
            idx, _ = direct.search(batch, 1000)
            best_kernel = min(best_kernel, time.perf_counter() - t)
        assert all(np.array_equal(h.rows, r) for h, r in zip(hits, idx)), "search and HammingIndex disagree"
        return {
            "n": n,
            "threads": index.hamming().threads,
            "kernel": index.hamming().kernel or index.hamming().backend,
            "load_s": t_load,
            "kernel_layout_s": t_kernel,
            "one_query_top10_p50_ms": float(np.percentile(lat, 50) * 1e3),
            "one_query_top10_p99_ms": float(np.percentile(lat, 99) * 1e3),
            "one_query_repeats": repeat,
            "batch_queries": queries,
            "batch_top1000_s": best_ours,
            "batch_top1000_qps": queries / best_ours,
            "hammingindex_top1000_s": best_kernel,
            "hammingindex_top1000_qps": queries / best_kernel,
            "batch_ratio": best_kernel / best_ours,
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.index_search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="codes in the search index (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=1000, help="queries in the batch (default 1,000)")
    parser.add_argument("--repeat", type=int, default=2000, help="single-query repetitions for p50/p99 (default 2,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    doc = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    doc["search"] = s = bench_search(args.n, args.queries, args.repeat, args.seed)
    rows = [
        (
            "search: load index + kernel layout",
            f"{s['n']:,} x 64 bits",
            f"{(s['load_s'] + s['kernel_layout_s']) * 1e3:.0f} ms ({s['load_s'] * 1e3:.0f} + "
            f"{s['kernel_layout_s'] * 1e3:.0f})",
            "target < 1 s",
        ),
        (
            "search: 1 query, top 10, p50",
            f"{s['threads']} threads, {s['kernel']}",
            f"{s['one_query_top10_p50_ms']:.2f} ms",
            "target < 2 ms",
        ),
        ("search: 1 query, top 10, p99", "", f"{s['one_query_top10_p99_ms']:.2f} ms", ""),
        (
            "search: 1,000 queries, top 1000",
            "pipeline.search.search",
            f"{s['batch_top1000_qps']:,.0f} q/s",
            f"{s['batch_ratio']:.2f}x HammingIndex",
        ),
        ("  same, HammingIndex.search", "bench/search.py's row", f"{s['hammingindex_top1000_qps']:,.0f} q/s", "1.00x"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
