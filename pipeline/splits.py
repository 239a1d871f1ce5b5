"""Seeded protocol splits: which images of a :class:`pipeline.catalog.Catalog` are query,
train, validation and database, each split in its seeded stored order."""

from __future__ import annotations

import zlib

import numpy as np

from .catalog import Catalog
from .config import CIFAR10_PROTOCOLS, Cifar10Dataset, DatasetConfig
from .errors import ConfigError, DataError

__all__ = ["assign_splits", "seeded_rng"]


def seeded_rng(seed: int, *words: str) -> np.random.Generator:
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
        pick = candidates[seeded_rng(seed, purpose, cname).permutation(candidates.size)[:count]]
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
        val = pool[seeded_rng(seed, "validation").permutation(pool.size)[:size]]
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
            parts.append(members[seeded_rng(seed, "validation", classes[c]).permutation(members.size)[:want]])
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
    return {s: ids[seeded_rng(seed, "order", s).permutation(ids.size)] for s, ids in splits.items()}
