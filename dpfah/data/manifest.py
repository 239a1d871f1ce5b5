"""The prepared dataset's manifest: its format constants, reading and checking ``manifest.json``,
and the shards' checksums (docs/data-formats.md)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

FORMAT = "dpfah-shards/1"
MANIFEST_FILE = "manifest.json"
TABLE_FILE = "splits.parquet"
SPLITS = ("train", "validation", "query", "database")


class ShardError(ValueError):
    """A prepared dataset directory is missing, malformed or does not match its manifest."""


class NotPrepared(ShardError):
    """The directory holds no prepared dataset (no manifest.json)."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    count: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    name: str
    count: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """The parts of ``manifest.json`` the readers need; ``raw`` holds all of it."""

    directory: str
    dataset: str
    protocol: str
    seed: int
    classes: tuple[str, ...]
    multi_label: bool
    splits: dict[str, SplitInfo]
    raw: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        try:
            return self.splits[name]
        except KeyError:
            raise ShardError(
                f"{join_path(self.directory, MANIFEST_FILE)}: no split {name!r} (has {', '.join(self.splits)})"
            ) from None

    def shard_paths(self, name: str) -> list[str]:
        return [join_path(self.directory, s.file) for s in self.split(name).shards]

    @property
    def sha256(self) -> str:
        """Identity of the prepared dataset: the manifest lists every shard's sha256."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()


def join_path(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if "://" in directory else os.path.join(directory, name)


def open_path(path: str):
    if "://" in path:
        import fsspec  # only for remote directories

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and check ``manifest.json`` of a prepared dataset directory (local or URL)."""
    directory = os.fspath(directory)
    path = join_path(directory, MANIFEST_FILE)
    try:
        with open_path(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise NotPrepared(f"{path}: not found (run `python -m pipeline.prepare` first)") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if raw.get("format") != FORMAT:
        raise ShardError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
    try:
        splits = {}
        for name, info in raw["splits"].items():
            shards = tuple(ShardInfo(str(s["file"]), int(s["count"]), str(s["sha256"])) for s in info["shards"])
            if sum(s.count for s in shards) != int(info["count"]):
                raise ShardError(
                    f"{path}: split {name!r} counts {info['count']} but its shards hold {sum(s.count for s in shards)}"
                )
            splits[name] = SplitInfo(name, int(info["count"]), shards)
        return Manifest(
            directory=directory,
            dataset=str(raw["dataset"]),
            protocol=str(raw["protocol"]),
            seed=int(raw["seed"]),
            classes=tuple(raw["classes"]),
            multi_label=bool(raw["multi_label"]),
            splits=splits,
            raw=raw,
        )
    except (KeyError, TypeError) as e:
        raise ShardError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open_path(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_shards(directory: str | os.PathLike) -> Manifest:
    """Check every shard's sha256 against the manifest; raise :class:`ShardError` on a mismatch."""
    manifest = read_manifest(directory)
    for split in manifest.splits.values():
        for shard in split.shards:
            path = join_path(manifest.directory, shard.file)
            try:
                digest = _sha256_file(path)
            except FileNotFoundError:
                raise ShardError(f"{path}: missing (listed in {MANIFEST_FILE})") from None
            if digest != shard.sha256:
                raise ShardError(f"{path}: sha256 {digest} does not match the manifest's {shard.sha256}")
    return manifest
