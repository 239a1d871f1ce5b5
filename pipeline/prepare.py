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
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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

from .config import (
    CIFAR10_PROTOCOLS,
    Cifar10Dataset,
    CustomDataset,
    DatasetConfig,
    ListsDataset,
    Params,
    add_config_args,
    config_from_args,
)
from .errors import ConfigError, DataError, run_main
from .sources import (
    Cifar10ArchiveSource,
    ImageSource,
    check_image,
    download,
    file_identity,
    folder_labels,
    is_url,
    open_source,
    read_list,
)
from .userfiles import Limits, Unreadable, mib

__all__ = ["Catalog", "PrepareResult", "prepare", "main"]

# A local copy of the CIFAR-10 download (the README's quick start): used instead of
# downloading datasets.cifar10.source when its md5 is datasets.cifar10.md5.
LOCAL_COPY_ENV = "DPFAH_CIFAR10_SOURCE"

_THREADS = max(1, min(8, os.cpu_count() or 1))


# ----------------------------------------------------------------------------- bad input


class BadInput:
    """Collects bad items; with ``on_bad_image: fail`` the first one stops the run."""

    def __init__(self, policy: str, key: str):
        self.policy = policy
        self.key = key
        self.items: list[dict[str, str]] = []

    def __call__(self, where: str, reason: str) -> None:
        if self.policy == "fail":
            raise DataError(f"{where}: {reason} ({self.key}.on_bad_image: skip leaves such items out)")
        self.items.append({"where": where, "reason": reason})


# ----------------------------------------------------------------------------- catalog


@dataclass
class Catalog:
    """Every candidate image of a dataset, sorted by reference; position = sample id."""

    source: ImageSource
    classes: list[str]
    refs: list[str]
    labels: np.ndarray  # uint8 (n, classes)
    listed: list[str] | None = None  # file:line each image was first listed at (list files)
    fixed: dict[str, np.ndarray] | None = None  # list protocols: ids of query / train / database
    lists: dict[str, Any] = field(default_factory=dict)  # identity of the list files

    def where(self, i: int) -> str:
        w = self.source.where(self.refs[i])
        return f"{w} (listed at {self.listed[i]})" if self.listed else w


def _required(cfg: DatasetConfig, name: str, attr: str, hint: str) -> str:
    value = getattr(cfg, attr)
    if value is None:
        raise ConfigError(f"datasets.{name}.{attr}: not set; {hint}")
    return value


def _source(
    given: str, key: str, *, allow_cifar10: bool, progress: bool | None, limits: Limits, bad: BadInput
) -> ImageSource:
    """The source ``given`` opened within ``limits``; the archive members it left out go to ``bad``."""
    try:
        source = open_source(given, allow_cifar10=allow_cifar10, progress=progress, limits=limits)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {given}: not found") from None
    for where, why in source.rejected:
        bad(where, why)
    return source


def _local_copy(cfg: Cifar10Dataset, name: str) -> Path | None:
    """The local copy of the download named by $DPFAH_CIFAR10_SOURCE, checked against
    ``datasets.<name>.md5`` (which DVC sees), or None when the variable is not set."""
    given = os.environ.get(LOCAL_COPY_ENV)
    if not given:
        return None
    path = Path(given).expanduser()
    if not path.is_file():
        raise ConfigError(f"{LOCAL_COPY_ENV}={given}: not found (or not a file)")
    if cfg.md5 is None:
        raise ConfigError(
            f"{LOCAL_COPY_ENV}={given}: datasets.{name}.md5 is null; the local copy stands in for the download "
            "only when the md5 says which file it is"
        )
    md5 = file_identity(path, given)["md5"]
    if md5 != cfg.md5:
        raise DataError(
            f"{LOCAL_COPY_ENV}={given}: md5 {md5} is not datasets.{name}.md5 ({cfg.md5}), so it is not "
            f"{cfg.source}; for other CIFAR-10 files set datasets.{name}.source instead"
        )
    return path


def _folder_catalog(source: ImageSource) -> Catalog:
    refs = source.refs()
    if not refs:
        raise DataError(f"{source.given}: no images found")
    classes, cls = folder_labels(source, refs)
    labels = np.zeros((len(refs), len(classes)), dtype=np.uint8)
    labels[np.arange(len(refs)), cls] = 1
    return Catalog(source, classes, refs, labels)


def _cifar10_catalog(cfg: Cifar10Dataset, params: Params, name: str, bad: BadInput, progress: bool | None) -> Catalog:
    key = f"datasets.{name}.source"
    given = cfg.source
    limits = Limits.of(params.prepare)
    if is_url(given):
        local = _local_copy(cfg, name) or download(
            given, Path(params.data.root) / "downloads", cfg.md5, progress=progress
        )
        source = _source(str(local), key, allow_cifar10=True, progress=progress, limits=limits, bad=bad)
        source.identity = {k: v for k, v in source.identity.items() if k != "path"} | {"url": given}
    else:
        source = _source(given, key, allow_cifar10=True, progress=progress, limits=limits, bad=bad)
    if not isinstance(source, Cifar10ArchiveSource):
        catalog = _folder_catalog(source)
        if len(catalog.classes) != 10:
            shown = ", ".join(catalog.classes[:12]) + (", ..." if len(catalog.classes) > 12 else "")
            raise DataError(f"{given}: CIFAR-10 has 10 classes, this image folder has {len(catalog.classes)} ({shown})")
        return catalog
    refs = source.refs()
    labels = np.zeros((len(refs), len(source.classes)), dtype=np.uint8)
    labels[np.arange(len(refs)), [source.label(r) for r in refs]] = 1
    return Catalog(source, source.classes, refs, labels)


def _list_identity(path: Path, given: str, entries: int) -> dict[str, Any]:
    return {"path": given, "lines": entries, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _read_lists(
    named: dict[str, str], name: str, num_classes: int, bad: BadInput
) -> tuple[dict[str, list], dict[str, Any]]:
    entries, identity = {}, {}
    for attr, given in named.items():
        path = Path(given).expanduser()
        entries[attr] = read_list(path, given, f"datasets.{name}.{attr}", num_classes, bad)
        identity[attr] = _list_identity(path, given, len(entries[attr]))
    return entries, identity


def _merge_lists(
    entries: dict[str, list], bad: BadInput
) -> tuple[list[str], np.ndarray, list[str], dict[str, np.ndarray]]:
    """Union of the lists' images (sorted), their labels, where each was first listed, and
    each list as ids. An image listed twice with different labels is a bad item."""
    first: dict[str, Any] = {}
    conflicts: set[str] = set()
    for items in entries.values():
        for e in items:
            seen = first.setdefault(e.ref, e)
            if seen is not e and not np.array_equal(seen.labels, e.labels):
                bad(e.where, f"{e.ref}: labels differ from {seen.where}")
                conflicts.add(e.ref)
    refs = sorted(r for r in first if r not in conflicts)
    pos = {r: i for i, r in enumerate(refs)}
    labels = np.stack([first[r].labels for r in refs]) if refs else np.zeros((0, 0), np.uint8)
    listed = [first[r].where for r in refs]
    ids = {
        k: np.array(sorted(pos[e.ref] for e in items if e.ref in pos), dtype=np.int64) for k, items in entries.items()
    }
    return refs, labels, listed, ids


def _class_names(cfg, num_classes: int) -> list[str]:
    if cfg.class_names is not None:
        return list(cfg.class_names)
    width = len(str(num_classes - 1))
    return [f"{i:0{width}d}" for i in range(num_classes)]


def _lists_catalog(cfg: ListsDataset, name: str, bad: BadInput, progress: bool | None, limits: Limits) -> Catalog:
    images = _required(
        cfg,
        name,
        "images",
        f"give the image root the list paths are relative to, e.g. --set datasets.{name}.images=/data/{name}",
    )
    named = {
        "query_list": _required(cfg, name, "query_list", "give the query list file"),
        "train_list": _required(cfg, name, "train_list", "give the training list file"),
    }
    if cfg.database_list is not None:
        named["database_list"] = cfg.database_list
    elif cfg.all_list is not None:
        named["all_list"] = cfg.all_list
    else:
        raise ConfigError(
            f"datasets.{name}.all_list: not set; give the list of all images (the database is all of them but the "
            f"queries), or datasets.{name}.database_list"
        )
    source = _source(images, f"datasets.{name}.images", allow_cifar10=False, progress=progress, limits=limits, bad=bad)
    entries, identity = _read_lists(named, name, cfg.num_classes, bad)
    refs, labels, listed, ids = _merge_lists(entries, bad)
    query, train = ids["query_list"], ids["train_list"]
    database = ids["database_list"] if "database_list" in ids else np.setdiff1d(ids["all_list"], query)
    q_where = {refs[i]: listed[i] for i in query}
    for attr, members in (("train_list", train), ("database_list", ids.get("database_list", np.zeros(0, np.int64)))):
        clash = np.intersect1d(members, query)
        if clash.size:
            ref = refs[clash[0]]
            raise DataError(
                f"{named[attr]}: {ref} is also a query ({q_where[ref]}); {clash.size} images in both "
                f"(queries must stay out of datasets.{name}.{attr.replace('_list', '')})"
            )
    fixed = {"query": query, "train": train, "database": database}
    return Catalog(source, _class_names(cfg, cfg.num_classes), refs, labels, listed, fixed, identity)


def _custom_catalog(cfg: CustomDataset, name: str, bad: BadInput, progress: bool | None, limits: Limits) -> Catalog:
    images = _required(
        cfg,
        name,
        "images",
        "give the image folder (one folder per class) or root of labels_list, "
        f"e.g. --set datasets.{name}.images=/data/{name}",
    )
    source = _source(images, f"datasets.{name}.images", allow_cifar10=False, progress=progress, limits=limits, bad=bad)
    if cfg.labels_list is None:
        return _folder_catalog(source)
    entries, identity = _read_lists({"labels_list": cfg.labels_list}, name, cfg.num_classes, bad)
    refs, labels, listed, _ = _merge_lists(entries, bad)
    return Catalog(source, _class_names(cfg, cfg.num_classes), refs, labels, listed, None, identity)


def build_catalog(cfg: DatasetConfig, params: Params, name: str, bad: BadInput, progress: bool | None) -> Catalog:
    if isinstance(cfg, Cifar10Dataset):
        return _cifar10_catalog(cfg, params, name, bad, progress)
    if isinstance(cfg, ListsDataset):
        return _lists_catalog(cfg, name, bad, progress, Limits.of(params.prepare))
    return _custom_catalog(cfg, name, bad, progress, Limits.of(params.prepare))


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


# ----------------------------------------------------------------------------- splits


def _rng(seed: int, *words: str) -> np.random.Generator:
    """A generator for one purpose: the same (seed, words) always give the same stream."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, *(zlib.crc32(w.encode()) for w in words)]))
    )


def _per_class(
    labels: np.ndarray, available: np.ndarray, count: int, seed: int, purpose: str, classes: list[str], what: str
) -> np.ndarray:
    """``count`` images of each class (in class order, without replacement across classes)."""
    available = available.copy()
    picked = []
    for c, cname in enumerate(classes):
        candidates = np.flatnonzero(available & (labels[:, c] == 1))
        if candidates.size < count:
            raise DataError(f"class {cname!r} has {candidates.size} usable images left for {what}, fewer than {count}")
        pick = candidates[_rng(seed, purpose, cname).permutation(candidates.size)[:count]]
        available[pick] = False
        picked.append(pick)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def _validation(
    pool: np.ndarray, labels: np.ndarray, size: int, seed: int, classes: list[str], multi_label: bool, key: str
):
    """(train, validation) ids: ``size`` images carved from the training pool, spread
    evenly over the classes present for single-label data."""
    if size == 0:
        return pool, np.zeros(0, np.int64)
    if size >= pool.size:
        raise ConfigError(
            f"{key}: {size} validation images from a training pool of {pool.size} leaves no training image"
        )
    if multi_label:
        val = pool[_rng(seed, "validation").permutation(pool.size)[:size]]
    else:
        cls = labels[pool].argmax(axis=1)
        present = np.unique(cls)
        base, extra = divmod(size, present.size)
        parts = []
        for j, c in enumerate(present):
            members = pool[cls == c]
            want = base + (1 if j < extra else 0)
            if want > members.size:
                raise ConfigError(
                    f"{key}: {size} over {present.size} classes needs {want} from class {classes[c]!r}, which has "
                    f"{members.size} training images"
                )
            parts.append(members[_rng(seed, "validation", classes[c]).permutation(members.size)[:want]])
        val = np.concatenate(parts)
    val = np.sort(val)
    return np.setdiff1d(pool, val), val


def assign_splits(cfg: DatasetConfig, catalog: Catalog, ok: np.ndarray, seed: int, name: str) -> dict[str, np.ndarray]:
    """Ids of every split, each in its seeded stored order."""
    labels = catalog.labels
    multi_label = bool((labels[ok].sum(axis=1) > 1).any()) if ok.any() else False
    if catalog.fixed is not None:
        query, pool, database = (ids[ok[ids]] for ids in (catalog.fixed[k] for k in ("query", "train", "database")))
    else:
        if isinstance(cfg, Cifar10Dataset):
            q, t, with_train = CIFAR10_PROTOCOLS[cfg.protocol]
        else:
            q, t, with_train = cfg.query_per_class, cfg.train_per_class, cfg.database_includes_train
        try:
            query = _per_class(labels, ok, q, seed, "query", catalog.classes, "queries")
            rest = ok.copy()
            rest[query] = False
            pool = _per_class(labels, rest, t, seed, "train", catalog.classes, "training")
        except DataError as e:
            raise DataError(f"datasets.{name}: {e}") from None
        if not with_train:
            rest[pool] = False
        database = np.flatnonzero(rest)
    train, validation = _validation(
        pool, labels, cfg.validation, seed, catalog.classes, multi_label, f"datasets.{name}.validation"
    )
    splits = {"train": train, "validation": validation, "query": query, "database": database}
    for split in ("train", "query", "database"):
        if splits[split].size == 0:
            raise DataError(f"datasets.{name}: the {split} split is empty")
    return {s: ids[_rng(seed, "order", s).permutation(ids.size)] for s, ids in splits.items()}


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
