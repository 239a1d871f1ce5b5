"""``pipeline.index`` against evaluate's encoder on the same images (issue 30, target 3).

A prepared split (default: CIFAR-10's database split, 59,000 images, at the image size of
params.yaml's ``train.image_size``) is encoded, in one run, by

* evaluate's own encoder (``pipeline.evaluation._encode_split``: its shard reader with
  ``evaluate.loader_workers`` DataLoader processes, ``dpfah.train.encode``), twice: before and
  after the index runs (the machine's drift shows as their difference; the faster one is the
  reference), with no Ray instance up, as the evaluate stage runs;
* ``pipeline.index.build_index`` (a new local Ray instance, ``index.workers`` actors: its
  default, null, unless ``--workers 1,2`` names others): its encoding time cut into the actors' start-up and
  the steady state. The steady state is measured from outside the code under test, by the
  times the driver writes the block files: the items of the blocks after the first
  ``workers`` ones over the time from the ``workers``-th block written to the last
  (``start-up`` is then the encoding time less items / steady rate). The index's own account
  (``IndexResult.timing``, where the code has it) is reported beside.

The codes of every index run are compared with evaluate's, bit for bit. The model is
``--model`` (a ``models:/`` URI in ``--tracking-uri``), else a randomly initialised DPFAH of
params.yaml's size (first of ``bits``, the dataset's classes) registered in a throwaway MLflow
store: throughput does not depend on the weights. A data root without the dataset prepared is
prepared first from ``--source`` (or DPFAH_CIFAR10_SOURCE: the official archive or CIFAR-10 as
an image-folder ``.tar.gz``). The code measured is whichever ``pipeline`` package Python
imports (``PYTHONPATH``), so the same file measures another checkout's code.

Prints a table, writes JSON (``bench/results/index_throughput.json`` by default). Run from the
repository root: ``python -m bench.index_throughput --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, "") and importlib.util.find_spec("pipeline") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "index_throughput.json"


def _repo() -> Path:
    """The checkout whose ``pipeline`` is measured (its params.yaml is the one read)."""
    import pipeline

    return Path(pipeline.__file__).resolve().parents[1]


def _load(data_root: str, tracking: str, overrides: list[str]):
    from pipeline.config import load_params

    return load_params(
        _repo() / "params.yaml", [f"data.root={data_root}", f"mlflow.tracking_uri={tracking}", *overrides]
    )


def _prepared(params, dataset: str, source: str | None) -> None:
    """Prepare ``dataset`` under data.root from ``source`` unless it is there already."""
    from pipeline.prepare import prepare

    if (Path(params.shards_dir(dataset)) / "manifest.json").is_file():
        return
    if not source:
        raise SystemExit(
            f"{params.shards_dir(dataset)}: not prepared; give --source (or DPFAH_CIFAR10_SOURCE) to prepare it"
        )
    t = time.perf_counter()
    prepare(params, dataset, progress=False)
    print(f"prepared {dataset} under {params.data.root} in {time.perf_counter() - t:.0f} s", flush=True)


def _random_model(params, dataset: str, tracking: str) -> str:
    """A randomly initialised DPFAH registered as ``bench-random`` in the store ``tracking``: its URI."""
    import mlflow
    import torch

    from dpfah.data import read_manifest
    from dpfah.model import DPFAH
    from pipeline.model_logging import log_model_artifact
    from pipeline.tracking import open_experiment, using_tracking_uri

    manifest = read_manifest(params.shards_dir(dataset))
    bits, size = params.bits[0], params.train.image_size
    torch.manual_seed(0)
    net = DPFAH(bits, len(manifest.classes)).eval()
    with using_tracking_uri(tracking):
        experiment = open_experiment(f"bench-{dataset}", tracking)
        with mlflow.start_run(experiment_id=experiment.experiment_id):
            mlflow.log_params({"dataset": dataset, "bits": bits, "train.image_size": size})
            mlflow.set_tags({"dataset": dataset, "manifest_sha256": manifest.sha256})
            uri = log_model_artifact(net, size, "model")
        version = mlflow.register_model(uri, "bench-random").version
    return f"models:/bench-random/{version}"


class _BlockClock:
    """When the index's driver writes each block file (``write_atomic`` of pipeline.index_blocks,
    wrapped): the steady state measured the same way on any version of the code."""

    def __init__(self):
        self.times: list[tuple[float, str]] = []

    def __enter__(self):
        from pipeline import index_blocks

        self._module, self._original = index_blocks, index_blocks.write_atomic

        def timed(path, data, *args, **kwargs):
            out = self._original(path, data, *args, **kwargs)
            if str(path).endswith(".npz"):
                self.times.append((time.perf_counter(), str(path)))
            return out

        index_blocks.write_atomic = timed
        return self

    def __exit__(self, *exc):
        self._module.write_atomic = self._original


def _block_items(path: str) -> int:
    with np.load(path) as z:
        return len(z["ok"])


def _evaluate(loaded, params, dataset: str, split: str, image_size: int) -> tuple[np.ndarray, dict]:
    import torch

    from pipeline.evaluation import _encode_split

    t = time.perf_counter()
    codes, _, _ = _encode_split(
        loaded, params.shards_dir(dataset), split, params, torch.device("cpu"), image_size, False
    )
    seconds = time.perf_counter() - t
    return codes, {"seconds": seconds, "images_per_s": len(codes) / seconds, "load": os.getloadavg()[0]}


def _index(params, workers: int | None, out: Path, model: str, dataset: str, split: str, reference: np.ndarray):
    from dpfah.codes import pack_codes
    from pipeline.index import build_index

    p = dataclasses.replace(params, index=dataclasses.replace(params.index, workers=workers))
    t = time.perf_counter()
    with _BlockClock() as clock:
        kwargs = {"reencode": True} if "reencode" in build_index.__code__.co_varnames else {}
        result = build_index(p, out, model=model, dataset=dataset, split=split, progress=False, **kwargs)
    wall = time.perf_counter() - t
    n = result.manifest["count"]
    timing = getattr(result, "timing", None)  # the index's own account (this branch's code on)
    actors = timing.actors if timing is not None else workers or 1  # null: 1 before CPU_ACTORS
    encode_s = n / result.images_per_s
    # the blocks are gone once assembled: their sizes from the block size
    sizes = [min(params.index.block_size, n - b * params.index.block_size) for b in range(result.blocks)]
    order = [int(Path(path).stem) for _, path in clock.times]
    k = min(actors, len(order) - 1)
    steady_items = sum(sizes[b] for b in order[k:])
    steady_s = clock.times[-1][0] - clock.times[k - 1][0] if k >= 1 else float("nan")
    steady = steady_items / steady_s
    same = np.array_equal(np.load(out / "codes.npy"), pack_codes(reference))
    row = {
        "workers": workers,
        "actors": actors,
        "blocks": result.blocks,
        "block_size": params.index.block_size,
        "wall_s": wall,
        "encode_s": encode_s,
        "encode_images_per_s": result.images_per_s,
        "steady_images_per_s": steady,
        "steady_blocks": len(order) - k,
        "startup_s": encode_s - n / steady,
        "block_written_s": [round(t - clock.times[0][0], 3) for t, _ in clock.times],
        "codes_equal_evaluate": bool(same),
        "load": os.getloadavg()[0],
    }
    if timing is not None:
        row["own_account"] = {
            "startup_s": timing.startup_s,
            "steady_images_per_s": timing.steady_images_per_s,
            "actors_busy_s": timing.busy_s,
            "actors_images_per_s": timing.items / timing.busy_s * timing.actors if timing.busy_s else 0.0,
        }
    return row


def bench(args) -> dict:
    from pipeline.registry import load_model, resolve_model

    with tempfile.TemporaryDirectory(prefix="dpfah-bench-idx-") as tmp:
        tracking = args.tracking_uri or f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        source = [f"datasets.{args.dataset}.source={args.source}"] if args.source else []
        params = _load(args.data_root, tracking, source + args.set)
        _prepared(params, args.dataset, args.source)
        model = args.model or _random_model(params, args.dataset, tracking)
        resolved = resolve_model(params, model)
        loaded = load_model(resolved)
        codes, first = _evaluate(loaded, params, args.dataset, args.split, resolved.image_size)
        n = len(codes)
        if n < args.min_items:
            print(f"note: {args.dataset} {args.split} holds {n:,} items, fewer than {args.min_items:,}", flush=True)
        rows = [
            _index(params, w, Path(tmp) / f"index-w{w}", model, args.dataset, args.split, codes) for w in args.workers
        ]
        again, second = _evaluate(loaded, params, args.dataset, args.split, resolved.image_size)
        assert np.array_equal(codes, again), "evaluate's encoder gave other codes the second time"
    best = max(first["images_per_s"], second["images_per_s"])
    for r in rows:
        r["steady_ratio_to_evaluate"] = r["steady_images_per_s"] / best
        r["encode_ratio_to_evaluate"] = r["encode_images_per_s"] / best
        r["wall_ratio_to_evaluate"] = n / r["wall_s"] / best
    return {
        "dataset": args.dataset,
        "split": args.split,
        "items": n,
        "image_size": resolved.image_size,
        "bits": resolved.bits,
        "model": model if args.model else "randomly initialised DPFAH (bench-random)",
        "code": str(_repo()),
        "settings": args.set,
        "evaluate": {
            "runs": [first, second],
            "images_per_s": best,
            "loader_workers": params.evaluate.loader_workers,
            "batch_size": params.evaluate.batch_size,
        },
        "index": rows,
    }


def _table(doc: dict) -> list[tuple[str, ...]]:
    ev = doc["evaluate"]
    a, b = (r["images_per_s"] for r in ev["runs"])
    rows = [
        ("what", "img/s", "vs evaluate", "notes"),
        (
            f"evaluate's encoder, {doc['dataset']} {doc['split']}",
            f"{ev['images_per_s']:,.0f}",
            "1.00x",
            f"{doc['items']:,} img, {doc['image_size']} px; best of {a:,.0f} (before) / {b:,.0f} (after)",
        ),
    ]
    for r in doc["index"]:
        w = f"pipeline.index, index.workers={r['workers'] or 'null'}: {r['actors']} actor(s)"
        own = r.get("own_account")
        rows.append(
            (
                f"{w}: steady state",
                f"{r['steady_images_per_s']:,.0f}",
                f"{r['steady_ratio_to_evaluate']:.2f}x",
                f"{r['steady_blocks']} of {r['blocks']} blocks; target >= 0.9x; "
                + ("codes equal" if r["codes_equal_evaluate"] else "CODES DIFFER")
                + (f"; own account {own['steady_images_per_s']:,.0f} img/s" if own else ""),
            )
        )
        rows.append(
            (
                f"{w}: encoding, start-up included",
                f"{r['encode_images_per_s']:,.0f}",
                f"{r['encode_ratio_to_evaluate']:.2f}x",
                f"start-up {r['startup_s']:.1f} s" + (f" (own account {own['startup_s']:.1f} s)" if own else ""),
            )
        )
        rows.append(
            (
                f"{w}: whole build_index",
                f"{doc['items'] / r['wall_s']:,.0f}",
                f"{r['wall_ratio_to_evaluate']:.2f}x",
                f"{r['wall_s']:.1f} s (model loading, assembling the index)",
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.index_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-root",
        default=os.environ.get("DPFAH_BENCH_DATA_ROOT"),
        required="DPFAH_BENCH_DATA_ROOT" not in os.environ,
        help="data.root holding (or to hold) the prepared dataset (default: DPFAH_BENCH_DATA_ROOT)",
    )
    parser.add_argument(
        "--source",
        default=os.environ.get("DPFAH_CIFAR10_SOURCE"),
        help="CIFAR-10 to prepare when --data-root lacks it (default: DPFAH_CIFAR10_SOURCE)",
    )
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--split", default="database", help="the split encoded (default database: 59,000 images)")
    parser.add_argument("--min-items", type=int, default=50_000, help="say so when the split is smaller (50,000)")
    parser.add_argument(
        "--workers",
        default="null",
        type=lambda s: [None if w == "null" else int(w) for w in s.split(",")],
        help="index.workers of each index run, comma-separated; null: the default (default: null)",
    )
    parser.add_argument("--model", help="models:/ URI of the encoding model (default: a random DPFAH)")
    parser.add_argument("--tracking-uri", help="the store of --model")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml value (index.block_size=1024)"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.model and not args.tracking_uri:
        parser.error("--model needs --tracking-uri")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    doc = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "")
        or platform.processor(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_start": os.getloadavg(),
    }
    from pipeline.artifacts import write_json_atomic

    doc.update(bench(args))
    doc["load_end"] = os.getloadavg()
    header, *rows = _table(doc)  # a Markdown table, as docs/benchmarks.md shows it
    for r in (header, ("---",) * len(header), *rows):
        print("| " + " | ".join(r) + " |")
    print(f"load average {doc['load_start'][0]:.2f} at the start, {doc['load_end'][0]:.2f} at the end; {doc['code']}")
    print(f"wrote {write_json_atomic(args.out, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
