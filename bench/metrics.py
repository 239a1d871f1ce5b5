"""Benchmark of dpfah.metrics against a plain per-query numpy mAP, plus the search benchmark.

Two protocol-sized cases on the same kind of synthetic data: 64-bit codes drawn from one
random centre per class with independent bit flips (so, at 64 bits, every distance value is
shared by thousands of items: many ties), single-label labels, database in random order.

* ImageNet-100 sizes: 5,000 queries x 128,503 database items, 100 classes, mAP@1000;
* CIFAR-10 sizes: 1,000 queries x 59,000 database items, 10 classes, mAP@ALL.

"plain" is the per-query implementation of the public code zoos (CalcTopMap style): per query
the Hamming distance from the +/-1 inner product, a full argsort (kind="stable", so ties fall
in index order, the same policy as ours), then precision at the relevant ranks of the top R;
queries with no relevant item count as 0. It is timed on a subset of the queries
(`--plain-queries`; column "queries timed") and scaled per query to the full query set; the
values of ours and plain are checked equal, query by query, on that subset. The tie-aware mAP
is printed beside the index-tie one.

"before" is dpfah's path before the speed work of issue 30, timed in the same run: the full
scan (``dpfah.metrics._USE_TOP = False``) and ``tie_aware_ap(..., every_group=True)``; its
values must equal ours bit for bit (column "same bits"). The load average (1 min) is recorded
before and after each case: the machine is shared, compare numbers taken at a low load.

If bench/search.py exists and exposes run_search_benchmark(...), its rows are printed and
stored under "search" in the JSON.

    python bench/metrics.py                 # full run, writes bench/results/metrics.json
    python bench/metrics.py --quick         # fewer plain queries, smaller search benchmark
    python bench/metrics.py --skip-search --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.search import _cpu_model  # noqa: E402
from dpfah import metrics as M  # noqa: E402
from dpfah import tie_aware as TA  # noqa: E402

CASES = [
    {"name": "imagenet100", "n_queries": 5000, "n_db": 128_503, "classes": 100, "topk": 1000},
    {"name": "cifar10", "n_queries": 1000, "n_db": 59_000, "classes": 10, "topk": None},
]


def make_codes(seed: int, n_queries: int, n_db: int, bits: int, classes: int, flip: float):
    """+/-1 int8 codes (class centre with each bit flipped with probability `flip`) and one-hot labels."""
    rng = np.random.default_rng(seed)
    centres = rng.choice(np.array([-1, 1], dtype=np.int8), size=(classes, bits))

    def draw(n):
        y = rng.integers(0, classes, n)
        codes = centres[y]
        codes = np.where(rng.random((n, bits)) < flip, -codes, codes).astype(np.int8)
        labels = np.zeros((n, classes), dtype=np.int8)
        labels[np.arange(n), y] = 1
        return codes, labels

    qc, ql = draw(n_queries)
    dc, dl = draw(n_db)  # iid draws: the database is in random (not class-sorted) order
    return qc, dc, ql, dl


def plain_map_per_query(q_codes, db_codes, q_labels, db_labels, topk=None) -> np.ndarray:
    """The code-zoo loop (CalcTopMap), with a stable argsort; returns per-query AP."""
    qB = q_codes.astype(np.float32)
    rB = db_codes.astype(np.float32)
    qL = q_labels.astype(np.float32)
    rL = db_labels.astype(np.float32)
    bits = qB.shape[1]
    topk = rB.shape[0] if topk is None else topk
    out = np.zeros(qB.shape[0])
    for i in range(qB.shape[0]):
        gnd = (rL @ qL[i] > 0).astype(np.float32)
        hamm = 0.5 * (bits - rB @ qB[i])
        ind = np.argsort(hamm, kind="stable")
        tgnd = gnd[ind][:topk]
        tsum = int(tgnd.sum())
        if tsum == 0:
            continue  # scores 0 and counts
        count = np.linspace(1, tsum, tsum)
        tindex = np.asarray(np.where(tgnd == 1)).ravel() + 1.0
        out[i] = np.mean(count / tindex)
    return out


def timed(fn, repeats: int, cpu: list | None = None):
    """Best wall time of `repeats` calls and the last value; `cpu` gets the least process CPU
    seconds of a call (all threads: steadier than the wall time when others load the machine)."""
    best, best_cpu, value = float("inf"), float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        value = fn()
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    if cpu is not None:
        cpu.append(best_cpu)
    return best, value


@contextlib.contextmanager
def before_issue30():
    """dpfah.metrics as before issue 30: the full scan, the tie-aware expectation on every group."""
    saved = M._USE_TOP, M.tie_aware_ap
    M._USE_TOP, M.tie_aware_ap = False, functools.partial(TA.tie_aware_ap, every_group=True)
    try:
        yield
    finally:
        M._USE_TOP, M.tie_aware_ap = saved


def run_case(case: dict, args) -> dict:
    qc, dc, ql, dl = make_codes(args.seed, case["n_queries"], case["n_db"], args.bits, case["classes"], args.flip)
    topk = case["topk"]
    label = f"mAP@{topk if topk else 'ALL'}"
    n_plain = min(args.plain_queries, case["n_queries"])

    M._USE_COMPILED = M._ranking is not None
    backend = M.backend()
    kernel = M._ranking.get_kernel() if backend == "c" else "-"
    load_start = os.getloadavg()[0]

    def map_of(ties):
        return lambda: M.mean_average_precision(
            qc, dc, ql, dl, topk=topk, ties=ties, return_per_query=True, n_threads=args.threads
        )

    cpu: list[float] = []  # CPU seconds: ours, tie-aware, before, tie-aware before
    ours_s, (ours_map, ours_pq) = timed(map_of("index"), args.repeats, cpu)
    tie_s, (tie_map, tie_pq) = timed(map_of("average"), args.repeats, cpu)
    with before_issue30():
        before_s, (_, before_pq) = timed(map_of("index"), args.repeats, cpu)
        tie_before_s, (_, tie_before_pq) = timed(map_of("average"), args.repeats, cpu)
    same_bits = bool(np.array_equal(ours_pq, before_pq) and np.array_equal(tie_pq, tie_before_pq))
    report_s, report = timed(
        lambda: M.retrieval_report(qc, dc, ql, dl, topk=topk, max_n=1000, n_threads=args.threads), 1
    )

    plain_s, plain_pq = timed(lambda: plain_map_per_query(qc[:n_plain], dc, ql[:n_plain], dl, topk), 1)
    plain_per_query = plain_s / n_plain
    plain_full_est = plain_per_query * case["n_queries"]
    diff = float(np.max(np.abs(plain_pq - ours_pq[:n_plain])))

    row = {
        "case": case["name"],
        "metric": label,
        "n_queries": case["n_queries"],
        "n_db": case["n_db"],
        "bits": args.bits,
        "classes": case["classes"],
        "backend": backend,
        "kernel": kernel,
        "threads": args.threads or len(os.sched_getaffinity(0)),
        "ours_s": ours_s,
        "before_s": before_s,
        "ours_cpu_s": cpu[0],
        "before_cpu_s": cpu[2],
        "ours_repeats": args.repeats,
        "map_index": ours_map,
        "map_tie_aware": tie_map,
        "tie_aware_s": tie_s,
        "tie_aware_before_s": tie_before_s,
        "tie_aware_cpu_s": cpu[1],
        "tie_aware_before_cpu_s": cpu[3],
        "same_bits_as_before": same_bits,
        "retrieval_report_s": report_s,
        "p_at_h2": report["precision_within_radius"],
        "empty_share_h2": report["empty_share"],
        "plain_queries_timed": n_plain,
        "plain_s_timed": plain_s,
        "plain_s_per_query": plain_per_query,
        "plain_s_full_estimate": plain_full_est,
        "plain_map_on_subset": float(plain_pq.mean()),
        "ours_map_on_subset": float(ours_pq[:n_plain].mean()),
        "max_abs_diff_per_query": diff,
        "equal": bool(diff <= 1e-9),
        "speedup": plain_full_est / ours_s,
    }
    if args.numpy_fallback:
        M._USE_COMPILED = False
        try:
            np_s, np_map = timed(lambda: M.mean_average_precision(qc, dc, ql, dl, topk=topk, n_threads=args.threads), 1)
        finally:
            M._USE_COMPILED = M._ranking is not None
        row["numpy_fallback_s"] = np_s
        row["numpy_fallback_equal"] = bool(abs(np_map - ours_map) <= 1e-12)
    row["loadavg_1min_start"], row["loadavg_1min_end"] = load_start, os.getloadavg()[0]
    return row


def load_search():
    path = ROOT / "bench" / "search.py"
    if not path.exists():
        return None, "bench/search.py is missing"
    try:
        spec = importlib.util.spec_from_file_location("dpfah_bench_search", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.run_search_benchmark, None
    except Exception as e:  # noqa: BLE001 - report any import problem instead of failing the bench
        return None, f"bench/search.py did not import: {type(e).__name__}: {e}"


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    header = [c[1] for c in columns]
    body = []
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key, "")
            line.append(format(v, fmt) if (fmt and isinstance(v, (int, float)) and not isinstance(v, bool)) else str(v))
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for b in body:
        print("  ".join(x.rjust(w) for x, w in zip(b, widths)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="time plain on 50 queries, 1 repeat, small search benchmark")
    p.add_argument("--skip-search", action="store_true", help="do not run bench/search.py")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "metrics.json"), help="JSON output path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--flip", type=float, default=0.25, help="bit-flip probability around the class centre")
    p.add_argument("--plain-queries", type=int, default=None, help="queries the plain loop is timed on (default 500)")
    p.add_argument("--repeats", type=int, default=None, help="repeats of our timing, best kept (default 3)")
    p.add_argument("--threads", type=int, default=None, help="threads for ours (default: all cores)")
    p.add_argument("--no-numpy-fallback", dest="numpy_fallback", action="store_false", help="skip the fallback timing")
    args = p.parse_args(argv)
    if args.plain_queries is None:
        args.plain_queries = 50 if args.quick else 500
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3

    rows = [run_case(c, args) for c in CASES]
    print(
        f"dpfah.metrics vs plain per-query numpy ({args.bits}-bit codes, flip {args.flip}, seed {args.seed}; "
        f"{os.cpu_count()} CPUs; plain timed on a subset, scaled per query)"
    )
    print_table(
        rows,
        [
            ("case", "case", ""),
            ("metric", "metric", ""),
            ("n_queries", "queries", "d"),
            ("n_db", "db", "d"),
            ("ours_s", "ours s", ".3f"),
            ("before_s", "before s", ".3f"),
            ("ours_cpu_s", "ours CPU s", ".3f"),
            ("before_cpu_s", "before CPU s", ".3f"),
            ("plain_queries_timed", "queries timed", "d"),
            ("plain_s_timed", "plain s (timed)", ".2f"),
            ("plain_s_full_estimate", "plain s (full, est.)", ".1f"),
            ("speedup", "speedup", ".1f"),
            ("map_index", "mAP ours", ".6f"),
            ("ours_map_on_subset", "ours (subset)", ".6f"),
            ("plain_map_on_subset", "plain (subset)", ".6f"),
            ("equal", "equal", ""),
            ("map_tie_aware", "mAP tie-aware", ".6f"),
            ("kernel", "kernel", ""),
        ],
    )
    extra = [r for r in rows if "numpy_fallback_s" in r]
    if extra:
        print()
        print_table(
            rows,
            [
                ("case", "case", ""),
                ("tie_aware_s", "tie-aware s", ".3f"),
                ("tie_aware_before_s", "tie-aware before s", ".3f"),
                ("tie_aware_cpu_s", "CPU s", ".3f"),
                ("tie_aware_before_cpu_s", "before CPU s", ".3f"),
                ("same_bits_as_before", "same bits", ""),
                ("retrieval_report_s", "retrieval_report s", ".3f"),
                ("numpy_fallback_s", "numpy fallback s", ".2f"),
                ("numpy_fallback_equal", "fallback equal", ""),
                ("p_at_h2", "P@H<=2", ".4f"),
                ("empty_share_h2", "empty balls", ".4f"),
                ("max_abs_diff_per_query", "max |AP diff|", ".1e"),
                ("loadavg_1min_start", "load start", ".2f"),
                ("loadavg_1min_end", "load end", ".2f"),
            ],
        )

    result = {
        "benchmark": "dpfah.metrics",
        "machine": {
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "cases": rows,
    }

    print()
    if args.skip_search:
        result["search"] = {"status": "skipped"}
        print("search benchmark: skipped (--skip-search)")
    else:
        fn, problem = load_search()
        if fn is None:
            result["search"] = {"status": "missing", "detail": problem}
            print(f"search benchmark: {problem}")
        else:
            kw = dict(n_db=100_000, n_queries=200, k=1000, seed=args.seed) if args.quick else dict(seed=args.seed)
            search_rows = fn(**kw)
            result["search"] = {"status": "ok", "arguments": kw, "rows": search_rows}
            print(f"search benchmark (bench/search.py, {kw}):")
            if search_rows:
                keys = list(dict.fromkeys(k for r in search_rows for k in r))
                print_table(search_rows, [(k, k, ".4g") for k in keys])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    print(f"\nwrote {out}")
    ok = all(r["equal"] and r["same_bits_as_before"] for r in rows)
    if not ok:
        print("MISMATCH between ours and plain", file=sys.stderr)
    return 0 if ok else 1


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main())
