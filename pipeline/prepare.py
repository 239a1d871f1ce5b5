"""Stage `prepare`: seeded protocol splits of a dataset, written as WebDataset shards.

    python -m pipeline.prepare --dataset cifar10 [--params params.yaml] [--set key=value ...]

Writes ``<data.root>/shards/<dataset>/`` (shards, ``splits.parquet``, ``manifest.json``; see
docs/data-formats.md) aside and renames it into place: a failed run, a full disk included,
leaves the previous result (or nothing). The same inputs and seed give byte-identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dpfah.data import (
    FORMAT,
    MANIFEST_FILE,
    SPLITS,
    TABLE_FILE,
    ShardWriter,
    SplitInfo,
    UnsupportedImage,
    as_rgb_png,
    conversion_reason,
)

from .catalog import BadInput, Catalog, build_catalog
from .config import Params, add_config_args, config_from_args
from .errors import ConfigError, DataError, run_main
from .sources import ImageSource, check_image
from .splits import assign_splits
from .userfiles import Unreadable, mib

__all__ = ["PrepareResult", "prepare", "main"]

_THREADS = max(1, min(8, os.cpu_count() or 1))


# ----------------------------------------------------------------------------- images


def _ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], threads: int, chunk: int = 64) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool, in order, with a bounded number in flight."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for start in range(0, len(items), chunk):
            pending.append(pool.submit(lambda part: [fn(x) for x in part], items[start : start + chunk]))
            if len(pending) > 4 * threads:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _image_problem(source: ImageSource, ref: str) -> tuple[str | None, str | None]:
    """(why the image is unusable, or None; why it is stored converted, or None)."""
    try:
        data = source.read(ref)
    except FileNotFoundError:
        return "missing file", None
    except Unreadable as e:
        return str(e), None
    except OSError as e:
        return f"cannot read ({e.strerror or e})", None
    problem = check_image(data)
    if problem is not None:
        return problem, None
    try:
        return None, conversion_reason(data)
    except UnsupportedImage as e:
        return str(e), None


def check_images(
    catalog: Catalog, ids: np.ndarray, bad: BadInput, progress: bool | None, desc: str
) -> tuple[np.ndarray, dict[int, str]]:
    """Usable-image mask over the catalog (every image in ``ids`` read and decoded), and the
    images to store converted to RGB PNG (id -> why): those the training decoder would not
    read to PIL's pixels (dpfah.data.conversion_reason)."""
    ok = np.zeros(len(catalog.refs), dtype=bool)
    convert: dict[int, str] = {}
    refs = [catalog.refs[i] for i in ids]
    results = _ordered_map(lambda ref: _image_problem(catalog.source, ref), refs, _THREADS)
    for i, (problem, conversion) in tqdm(
        zip(ids, results), total=len(ids), desc=desc, unit="img", disable=progress is False or None
    ):
        if problem is None:
            ok[i] = True
            if conversion is not None:
                convert[int(i)] = conversion
        else:
            bad(catalog.where(i), problem)
    return ok, convert


# ----------------------------------------------------------------------------- writing


@dataclass
class PrepareResult:
    directory: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]

    @property
    def images_written(self) -> int:
        return sum(s["count"] for s in self.manifest["splits"].values())


def _key(i: int) -> str:
    return f"{i:07d}"


def _clean_stale(parent: Path, name: str) -> None:
    """Remove work directories (``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>-*``) left by
    runs of this dataset that were killed before they could clean up."""
    for path in parent.glob(f".{name}.*"):
        kind, _, rest = path.name[len(name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its owner still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(path, ignore_errors=True)


def _write_split(
    out: Path, split: str, ids: np.ndarray, catalog: Catalog, shard_size: int, bar, convert: dict[int, str]
) -> SplitInfo:
    source = catalog.source

    def read(i: int) -> tuple[bytes, str]:
        ref = catalog.refs[i]
        try:
            data = source.read(ref)
        except OSError as e:
            raise DataError(f"{source.where(ref)}: became unreadable while writing ({e})") from None
        if i in convert:
            return as_rgb_png(data), "png"
        return data, source.ext(ref)

    with ShardWriter(out, split, shard_size) as writer:
        threads = _THREADS if source.parallel_reads or convert else 1
        for i, (data, ext) in zip(ids, _ordered_map(read, [int(i) for i in ids], threads)):
            writer.write(_key(int(i)), data, ext, catalog.labels[i])
            bar.update()
        return writer.close()


def _table(splits: dict[str, np.ndarray], catalog: Catalog) -> pa.Table:
    names, index, keys, paths, labels = [], [], [], [], []
    for split, ids in splits.items():
        names += [split] * ids.size
        index.append(np.arange(ids.size, dtype=np.int64))
        keys += [_key(int(i)) for i in ids]
        paths += [catalog.refs[i] for i in ids]
        labels.append(catalog.labels[ids])
    flat = np.concatenate(labels).reshape(-1) if labels else np.zeros(0, np.uint8)
    return pa.table(
        {
            "split": pa.array(names, pa.string()),
            "index": pa.array(np.concatenate(index)),
            "key": pa.array(keys, pa.string()),
            "path": pa.array(paths, pa.string()),
            "labels": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint8()), len(catalog.classes)),
        }
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(params: Params, name: str, *, progress: bool | None = None) -> PrepareResult:
    """Prepare dataset ``name`` of ``params``; returns where it went and what it holds.

    ``progress``: None shows bars on a terminal, False never."""
    cfg = params.dataset(name)
    if "://" in params.data.root:
        raise ConfigError(
            f"data.root: {params.data.root}: prepare writes to a local directory (a URL is not supported yet)"
        )
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    bad = BadInput(cfg.on_bad_image, f"datasets.{name}")
    catalog = build_catalog(cfg, params, name, bad, progress)
    seconds["read_sources"] = time.perf_counter() - t0

    t = time.perf_counter()
    convert: dict[int, str] = {}
    if catalog.source.generated:
        ok = np.ones(len(catalog.refs), dtype=bool)
    else:
        wanted = (
            np.unique(np.concatenate(list(catalog.fixed.values()))) if catalog.fixed else np.arange(len(catalog.refs))
        )
        ok, convert = check_images(catalog, wanted, bad, progress, f"{name}: checking")
    seconds["check_images"] = time.perf_counter() - t

    t = time.perf_counter()
    splits = assign_splits(cfg, catalog, ok, params.seed, name)
    seconds["split"] = time.perf_counter() - t

    final = Path(params.shards_dir(name))
    total = sum(ids.size for ids in splits.values())
    work: Path | None = None
    bar = _Counted(tqdm(total=total, desc=f"{name}: writing shards", unit="img", disable=progress is False or None))
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(final.parent, name)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=final.parent))
        t = time.perf_counter()
        infos = {}
        with bar.bar:
            for split in SPLITS:
                infos[split] = _write_split(work, split, splits[split], catalog, cfg.shard_size, bar, convert)
        pq.write_table(_table(splits, catalog), work / TABLE_FILE, compression="zstd")
        seconds["write_shards"] = time.perf_counter() - t
        manifest = _manifest(cfg, params, name, catalog, splits, infos, bad, convert, work)
        (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.chmod(work, 0o755)  # mkdtemp makes it 0700
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-{os.getpid()}-", dir=final.parent))
            old.rmdir()
            final.rename(old)
            work.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(final)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        written = _size(work) if work is not None else 0
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        raise DataError(_no_space(final.parent, written, bar.n, total)) from None
    finally:
        if work is not None and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    seconds["total"] = time.perf_counter() - t0
    return PrepareResult(final, manifest, seconds)


class _Counted:
    """A progress bar that counts even when it is not shown (for the disk-full estimate)."""

    def __init__(self, bar):
        self.bar, self.n = bar, 0

    def update(self) -> None:
        self.n += 1
        self.bar.update()


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file()) if directory.is_dir() else 0


def _no_space(where: Path, written: int, done: int, total: int) -> str:
    """The one line for a full file system: where, about how much the output needs, how much is free."""
    need = f"about {mib(written * total // done)}" if done else f"more than {mib(written)}"
    try:
        free = f"{mib(shutil.disk_usage(where).free)} free"
    except OSError:
        free = "free space unknown"
    return (
        f"{where}: no space left on the device: the shards of {total:,} images need {need} ({free}); "
        "nothing was written (free space there, or set data.root elsewhere)"
    )


def _manifest(cfg, params, name, catalog, splits, infos, bad, convert, work) -> dict[str, Any]:
    labels = catalog.labels
    members = {s: set(ids.tolist()) for s, ids in splits.items()}
    protocol = cfg.protocol
    stored = set().union(*members.values())
    converted = sorted(
        ({"where": catalog.where(i), "reason": why} for i, why in convert.items() if i in stored),
        key=lambda d: d["where"],
    )
    # Only when there are any: a dataset with nothing to convert keeps the manifest (and so
    # the identity, manifest_sha256) it had before conversions existed.
    extra = {"converted": {"count": len(converted), "to": "png (8-bit RGB)", "items": converted}} if converted else {}
    return extra | {
        "format": FORMAT,
        "dataset": name,
        "kind": cfg.kind,
        "protocol": protocol,
        "seed": params.seed,
        "classes": list(catalog.classes),
        "multi_label": bool((labels[np.concatenate(list(splits.values()))].sum(axis=1) > 1).any()),
        "params": dataclasses.asdict(cfg),
        "source": catalog.source.identity,
        "lists": catalog.lists,
        "splits": {
            s: {
                "count": infos[s].count,
                "class_counts": labels[ids].sum(axis=0, dtype=np.int64).tolist(),
                "shards": [dataclasses.asdict(x) for x in infos[s].shards],
            }
            for s, ids in splits.items()
        },
        "overlap": {
            f"{a}_in_{b}": len(members[a] & members[b])
            for a, b in (
                ("train", "database"),
                ("validation", "database"),
                ("query", "database"),
                ("query", "train"),
                ("query", "validation"),
            )
        },
        "skipped": {"count": len(bad.items), "items": sorted(bad.items, key=lambda d: (d["where"], d["reason"]))},
        "table": {"file": TABLE_FILE, "sha256": _sha256(work / TABLE_FILE)},
    }


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.prepare",
        description=(
            "Draw a dataset's seeded protocol splits (train, validation, query, database) and write\n"
            "them as WebDataset shards, with splits.parquet and manifest.json, to\n"
            "<data.root>/shards/<dataset>/. The datasets and their sources are described in\n"
            "params.yaml (`datasets:`); override any parameter with --set."
        ),
        epilog=(
            "examples:\n"
            "  python -m pipeline.prepare --dataset cifar10\n"
            "  python -m pipeline.prepare --dataset cifar10 --set datasets.cifar10.source=/data/cifar10-jpg.tar.gz\n"
            "  python -m pipeline.prepare --dataset imagenet100 --set datasets.imagenet100.images=/data/imagenet\n"
            "  python -m pipeline.prepare --dataset cifar10 --set datasets.cifar10.protocol=cifar10-54k --set seed=1\n"
            "Errors print one line naming the file, line or parameter, and exit with status 2."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        metavar="NAME",
        action="append",
        help="a dataset named under `datasets:` in the parameters; repeatable (default: the list prepare.datasets)",
    )
    add_config_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    for name in args.dataset or params.prepare.datasets:
        result = prepare(params, name, progress=False if args.quiet else None)
        m = result.manifest
        counts = ", ".join(f"{s} {m['splits'][s]['count']:,}" for s in SPLITS)
        skipped = f", {m['skipped']['count']} skipped (see manifest)" if m["skipped"]["count"] else ""
        if "converted" in m:
            skipped += f", {m['converted']['count']} stored converted to PNG (see manifest)"
        rate = result.images_written / result.seconds["total"]
        print(
            f"{name} ({m['protocol']}, seed {m['seed']}): {counts}{skipped} -> {result.directory} "
            f"in {result.seconds['total']:.1f} s ({rate:,.0f} img/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
