"""The index folder's format, written by ``pipeline.index`` and read by ``pipeline.search``::

    codes.npy       (n, ceil(bits/64)) uint64 packed codes (dpfah.codes.pack_codes), row i = item i
    keys.parquet    key (string) of each row, and for a prepared split its source path
    labels.npy      (n, classes) uint8, when the source has labels
    sublinear.faiss with ``pipeline.index --sublinear``: a faiss binary IVF of the codes (faiss's format),
                    its parameters and measured recall under the manifest's ``sublinear``
    manifest.json   format, model (URI, version, run), bits, count, source, skipped, sha256 of each file,
                    codes_from (encoded, or the evaluation whose codes were taken), created

The manifest is written last: its presence marks the index complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import write_json_atomic
from .errors import DataError, PipelineError
from .tracking import git_commit

__all__ = [
    "FORMAT",
    "MANIFEST",
    "CODES",
    "KEYS",
    "LABELS",
    "SUBLINEAR",
    "NotAnIndex",
    "Index",
    "read_manifest",
    "load_index",
    "write_index",
    "sha256_file",
]


FORMAT = "dpfah-index/1"
MANIFEST = "manifest.json"
CODES = "codes.npy"
KEYS = "keys.parquet"
LABELS = "labels.npy"
SUBLINEAR = "sublinear.faiss"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_index(
    tmp: Path,
    packed: np.ndarray,
    keep: np.ndarray,
    collection,
    resolved,
    skipped,
    plan,
    device: str,
    used: str,
    codes_from: str,
) -> dict[str, Any]:
    """Write the index folder ``tmp`` (new): the rows ``keep`` of ``collection``
    (a :class:`pipeline.collection.Collection`) with their ``packed`` codes, encoded by
    ``resolved`` (a :class:`pipeline.registry.ResolvedModel`); the manifest last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp.mkdir(parents=True)
    np.save(tmp / CODES, np.ascontiguousarray(packed, dtype=np.uint64))
    columns = {"key": pa.array([collection.keys[j] for j in keep], pa.string())}
    if collection.paths is not None:
        columns["path"] = pa.array([collection.paths[j] for j in keep], pa.string())
    pq.write_table(pa.table(columns), tmp / KEYS)
    files = [CODES, KEYS]
    if collection.labels is not None:
        np.save(tmp / LABELS, np.ascontiguousarray(collection.labels[keep], dtype=np.uint8))
        files.append(LABELS)
    manifest = {
        "format": FORMAT,
        "model": resolved.describe(),
        "bits": resolved.bits,
        "words": int(packed.shape[1]),
        "count": int(len(keep)),
        "source": collection.identity,
        "classes": collection.classes,
        "skipped": {"count": len(skipped), "items": skipped},
        "files": {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files},
        "block_size": plan["block_size"],
        "precision": plan["precision"],
        "encoded_on": device,
        "precision_used": used,  # what a query must be encoded with to match (search does)
        "codes_from": codes_from,  # "encoded", or the evaluation whose verified codes were taken
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
    }
    write_json_atomic(tmp / MANIFEST, manifest)  # last: its presence marks the index complete
    return manifest


class NotAnIndex(PipelineError):
    """The folder holds no complete index (or one whose files do not match its manifest)."""


@dataclass
class Index:
    directory: Path
    manifest: dict[str, Any]
    codes: np.ndarray  # (n, words) uint64, memory-mapped
    keys: Any  # pyarrow StringArray
    labels: np.ndarray | None  # (n, classes) uint8, memory-mapped
    paths: Any | None  # pyarrow StringArray (prepared splits: the source path)
    _hamming: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def bits(self) -> int:
        return int(self.manifest["bits"])

    def hamming(self):
        """The search kernel over the codes, built once (``dpfah.codes.HammingIndex``)."""
        if self._hamming is None:
            from dpfah.codes import HammingIndex

            self._hamming = HammingIndex(self.codes)
        return self._hamming

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """Row of each key (vectorised lookup); an unknown key is an error naming it."""
        import pyarrow as pa
        import pyarrow.compute as pc

        keys = list(keys)
        wanted = pa.array(keys, pa.string())
        if len(keys) * 64 < len(self.keys):
            # A few keys (a search's --key): one pass over the column against a set of those
            # keys. index_in hashes the whole column on every call: 3.4 s at 10M keys, 0.06 s so.
            hits = np.flatnonzero(pc.is_in(self.keys, value_set=wanted).to_numpy(zero_copy_only=False))
            first: dict[str, int] = {}
            for row, key in zip(hits.tolist(), self.keys.take(pa.array(hits)).to_pylist()):
                first.setdefault(key, row)  # the first row of a key, as index_in gives
            rows = [first.get(k) for k in keys]
        else:
            rows = pc.index_in(wanted, value_set=self.keys).to_numpy(zero_copy_only=False)
        missing = [k for k, r in zip(keys, rows) if r is None or (isinstance(r, float) and np.isnan(r))]
        if missing:
            raise DataError(f"{self.directory}: no item with key {missing[0]!r} ({len(missing)} unknown key(s))")
        return np.asarray(rows, dtype=np.int64)

    def key(self, row: int) -> str:
        return self.keys[int(row)].as_py()


#: A manifest larger than this is not one this project wrote (it lists skipped items only).
MANIFEST_MAX_BYTES = 256 * 2**20


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the index folder ``directory``, its format checked; NotAnIndex when it
    is unreadable, too large or of another format."""
    path = Path(directory) / MANIFEST
    try:
        if path.stat().st_size > MANIFEST_MAX_BYTES:
            raise NotAnIndex(f"{path}: over {MANIFEST_MAX_BYTES} bytes, not an index manifest")
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NotAnIndex(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise NotAnIndex(f"{path}: format {found!r}, expected {FORMAT!r}")
    return manifest


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """The fields a load reads are there and of their type: NotAnIndex naming the first that is not."""
    for key, kind in (
        ("count", int),
        ("words", int),
        ("bits", int),
        ("files", dict),
        ("model", dict),
        ("source", dict),
    ):
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            got = "missing" if key not in manifest else f"{value!r}"[:40]
            raise NotAnIndex(f"{path}: {key} is {got}, expected {'a count' if kind is int else 'an object'}")
    for name in dict.fromkeys((CODES, KEYS, *manifest["files"])):  # each file it lists, these two at least
        info = manifest["files"].get(name)
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise NotAnIndex(f"{path}: files.{name} lacks its size or sha256")


def _check_sizes(directory: Path, manifest: dict[str, Any]) -> None:
    """Each file of the index has the size its manifest records (cheap: no file is read)."""
    for name, info in manifest["files"].items():
        try:
            size = (directory / name).stat().st_size
        except OSError as e:
            raise NotAnIndex(f"{directory / name}: {e.strerror or e} (the index lists it in {MANIFEST})") from None
        if size != info["bytes"]:
            raise NotAnIndex(
                f"{directory / name}: {size:,} bytes, {MANIFEST} says {info['bytes']:,} (truncated or replaced; "
                "rebuild the index with python -m pipeline.index)"
            )


def _load_array(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The .npy file memory-mapped, its dtype and shape checked (``-1``: any length there)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise NotAnIndex(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None
    if (
        array.dtype != dtype
        or len(array.shape) != len(shape)
        or any(w not in (-1, g) for g, w in zip(array.shape, shape))
    ):
        want = tuple("*" if w == -1 else w for w in shape)
        raise NotAnIndex(f"{path}: {array.dtype} {array.shape}, {MANIFEST} says {np.dtype(dtype)} {want}")
    return array


def load_index(directory: str | os.PathLike, *, verify: bool = False) -> Index:
    """Open an index folder: the manifest checked, each file's size against it (every load;
    ``verify``: also each file's sha256), the codes and labels memory-mapped with their
    shapes checked, the keys read as one column. A corrupt or incomplete index is a
    :class:`NotAnIndex` naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        partial = directory.with_name(directory.name + ".partial")
        if partial.exists():
            raise NotAnIndex(
                f"{directory}: not complete (an indexing run stopped; run the same python -m pipeline.index "
                "again to resume)"
            )
        raise NotAnIndex(f"{directory}: no index ({MANIFEST} not found; build one with python -m pipeline.index)")
    manifest = read_manifest(directory)
    _check_manifest(path, manifest)
    _check_sizes(directory, manifest)
    if verify:
        for name, info in manifest["files"].items():
            if sha256_file(directory / name) != info["sha256"]:
                raise NotAnIndex(f"{directory / name}: sha256 does not match {MANIFEST} (the file changed)")
    n, words = manifest["count"], manifest["words"]
    codes = _load_array(directory / CODES, np.uint64, (n, words))
    try:
        table = pq.read_table(directory / KEYS)
        keys = table.column("key").combine_chunks()
        paths = table.column("path").combine_chunks() if "path" in table.column_names else None
    except (OSError, KeyError, pa.ArrowException) as e:
        raise NotAnIndex(f"{directory / KEYS}: unreadable ({type(e).__name__}: {e})") from None
    if len(keys) != n or (paths is not None and len(paths) != n):
        raise NotAnIndex(f"{directory / KEYS}: {len(keys)} keys, {MANIFEST} says {n}")
    labels = None
    if LABELS in manifest["files"]:
        classes = manifest.get("classes")
        labels = _load_array(directory / LABELS, np.uint8, (n, len(classes) if isinstance(classes, list) else -1))
    return Index(directory, manifest, codes, keys, labels, paths)
