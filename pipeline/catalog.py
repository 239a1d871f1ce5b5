"""What prepare draws a dataset's splits from: every candidate image with its labels (a
:class:`Catalog`), from an image folder or archive, the CIFAR-10 python archive (downloaded,
or the local copy named by $DPFAH_CIFAR10_SOURCE) or list files; bad items go to a
:class:`BadInput` that stops the run or records them (``on_bad_image``)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import Cifar10Dataset, CustomDataset, DatasetConfig, ListsDataset, Params
from .errors import ConfigError, DataError
from .listfile import read_list
from .sources import (
    Cifar10ArchiveSource,
    ImageSource,
    download,
    file_identity,
    folder_labels,
    is_url,
    open_source,
)
from .userfiles import Limits

__all__ = ["LOCAL_COPY_ENV", "BadInput", "Catalog", "build_catalog"]

# A local copy of the CIFAR-10 download (the README's quick start): used instead of
# downloading datasets.cifar10.source when its md5 is datasets.cifar10.md5.
LOCAL_COPY_ENV = "DPFAH_CIFAR10_SOURCE"


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
