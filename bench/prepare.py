"""Benchmark of `pipeline.prepare` on CIFAR-10's 60,000 images, and of the shard readers.

Sources (CIFAR-10 comes from DPFAH_CIFAR10_SOURCE or --source: the image-folder archive
cifar10-jpg.tar.gz, or the official python archive):

* "image folder": prepare straight from the given archive (its original JPEG bytes are
  stored; every image is decoded once to check it);
* "python archive": the official pickle layout, rebuilt here from the same images (not
  timed), so the PNG-encoding path is measured too; skipped with --no-archive, or used
  directly when the source already is the official archive.

Each prepare writes the cifar10-59k protocol (65,000 samples: train 4,500, validation 500,
query 1,000, database 59,000); images per second count the 60,000 source images. Then the
readers: one pass of the database with EvalStream (bytes, and decoded to uint8 tensors) and
one epoch of TrainStream, in one process (no DataLoader workers).

    python -m bench.prepare                       # writes bench/results/prepare.json
    python -m bench.prepare --source /data/cifar10-jpg.tar.gz --repeat 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dpfah.data import EvalStream, TrainStream  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.prepare import prepare  # noqa: E402
from pipeline.sources import Cifar10ArchiveSource, open_source  # noqa: E402

SOURCE_IMAGES = 60_000


def build_official_archive(source: str, out: Path) -> Path:
    """The official cifar-10-batches-py layout from an image-folder CIFAR-10 (5 x 10,000
    training images from train/, 10,000 test images from test/)."""
    from PIL import Image

    folder = open_source(source, allow_cifar10=False, progress=False)
    refs = folder.refs()
    classes = sorted({Path(r).parent.name for r in refs})
    parts = {"train": [], "test": []}
    for ref in refs:
        part = "test" if "/test/" in f"/{ref}" else "train"
        pixels = np.asarray(Image.open(io.BytesIO(folder.read(ref))).convert("RGB"))
        parts[part].append((pixels.transpose(2, 0, 1).reshape(-1), classes.index(Path(ref).parent.name)))
    batches = {f"data_batch_{i + 1}": parts["train"][i::5] for i in range(5)} | {"test_batch": parts["test"]}
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        members = {"batches.meta": {b"label_names": [c.encode() for c in classes]}}
        for name, rows in batches.items():
            members[name] = {b"data": np.stack([p for p, _ in rows]), b"labels": [y for _, y in rows]}
        for name, obj in members.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return out


def time_prepare(source: str, work: Path, repeat: int) -> dict:
    best = None
    for r in range(repeat):
        params = load_params(
            ROOT / "params.yaml",
            [f"datasets.cifar10.source={source}", f"data.root={work / f'run{r}'}", "datasets.cifar10.md5=null"],
        )
        result = prepare(params, "cifar10", progress=False)
        if best is None or result.seconds["total"] < best.seconds["total"]:
            best = result
    s = best.seconds
    return {
        "seconds": {k: round(v, 3) for k, v in s.items()},
        "images_per_s": SOURCE_IMAGES / s["total"],
        "samples_written": best.images_written,
        "bytes_written": sum(p.stat().st_size for p in best.directory.iterdir()),
        "directory": best.directory,
    }


def time_readers(directory: Path) -> list[dict]:
    rows = []
    for decode in (False, True):
        t = time.perf_counter()
        n = sum(len(b.index) for b in EvalStream(directory, "database", batch_size=512, decode=decode))
        rows.append(
            {
                "reader": f"EvalStream database{' decode=True' if decode else ''}",
                "samples": n,
                "seconds": time.perf_counter() - t,
            }
        )
    stream = TrainStream(directory, 128, seed=0)
    t = time.perf_counter()
    n = sum(len(b.index) for b in stream)
    rows.append({"reader": "TrainStream train, one epoch", "samples": n, "seconds": time.perf_counter() - t})
    for row in rows:
        row["samples_per_s"] = row["samples"] / row["seconds"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source", default=os.environ.get("DPFAH_CIFAR10_SOURCE"), help="CIFAR-10 (default: $DPFAH_CIFAR10_SOURCE)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per source; the fastest is reported")
    parser.add_argument("--no-archive", action="store_true", help="skip the official python-archive run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "prepare.json"))
    args = parser.parse_args(argv)
    if not args.source or not Path(args.source).exists():
        print(
            "error: give CIFAR-10 with --source or DPFAH_CIFAR10_SOURCE (e.g. ../shared/data/cifar10-jpg.tar.gz)",
            file=sys.stderr,
        )
        return 2

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        official = isinstance(open_source(args.source, allow_cifar10=True, progress=False), Cifar10ArchiveSource)
        sources = [("python archive" if official else "image folder", args.source)]
        if not official and not args.no_archive:
            t = time.perf_counter()
            archive = build_official_archive(args.source, tmp / "cifar-10-python.tar.gz")
            print(f"(built an official-layout archive from the same images in {time.perf_counter() - t:.1f} s)")
            sources.append(("python archive (rebuilt)", str(archive)))
        readers = []
        for label, source in sources:
            r = time_prepare(source, tmp / label.split()[0], args.repeat)
            if not readers:
                readers = time_readers(r["directory"])
            r.pop("directory")
            results.append({"source": label, **r})

    print(
        f"\nprepare, CIFAR-10 (cifar10-59k: {SOURCE_IMAGES:,} source images, 65,000 samples written); "
        f"{os.cpu_count()} CPUs"
    )
    head = f"{'source':<26}{'read src s':>11}{'check s':>9}{'write s':>9}{'total s':>9}{'img/s':>9}{'MB written':>12}"
    print(head + "\n" + "-" * len(head))
    for r in results:
        s = r["seconds"]
        print(
            f"{r['source']:<26}{s['read_sources']:>11.2f}{s['check_images']:>9.2f}{s['write_shards']:>9.2f}{s['total']:>9.2f}"
            f"{r['images_per_s']:>9,.0f}{r['bytes_written'] / 1e6:>12.1f}"
        )
    print(f"\nreaders, one process ({results[0]['source']} shards)")
    head = f"{'reader':<36}{'samples':>9}{'s':>8}{'samples/s':>11}"
    print(head + "\n" + "-" * len(head))
    for r in readers:
        print(f"{r['reader']:<36}{r['samples']:>9,}{r['seconds']:>8.2f}{r['samples_per_s']:>11,.0f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "prepare",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "source": args.source,
        "repeat": args.repeat,
        "prepare": results,
        "readers": readers,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
