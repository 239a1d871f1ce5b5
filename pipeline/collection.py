"""What index encodes: a collection of images with a key per item (and labels when known),
read by position in blocks. A prepared split (its items in stored order, keyed by their index
in the split, with their labels), an image folder or a tar archive (every image file, keyed
by its relative path / member name, sorted), or a list file (``<path> [0/1 labels]`` per
line, read by :func:`pipeline.listfile.list_tokens`; relative paths against ``root``, default
the list's folder; keyed by the path as listed, sorted).

The readers are picklable: index's Ray Data actors each get one and read their blocks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import prepared_manifest
from .config import Params
from .errors import ConfigError, DataError
from .userfiles import DEFAULT_LIMITS, Limits, Unreadable, read_regular

__all__ = ["SplitReader", "FileReader", "TarReader", "Collection", "open_collection"]


class SplitReader:
    """Items of a prepared split, by position (= index in the split)."""

    def __init__(self, manifest, split: str):
        self.manifest, self.split = manifest, split

    def read(self, start: int, stop: int) -> list[tuple[bytes | None, str | None]]:
        from dpfah.data import read_samples

        got = read_samples(self.manifest, self.split, range(start, stop))
        return [(got[i], None) for i in range(start, stop)]


class FileReader:
    """Image files by path (``root``/ref): regular files only, each at most ``limits.max_file``
    bytes (a FIFO, a device or a bigger file is an unreadable item, named with the reason)."""

    def __init__(self, root: str, refs: Sequence[str], limits: Limits = DEFAULT_LIMITS):
        self.root, self.refs, self.limits = root, list(refs), limits

    def where(self, i: int) -> str:
        return os.path.join(self.root, self.refs[i])

    def read(self, start: int, stop: int) -> list[tuple[bytes | None, str | None]]:
        out: list[tuple[bytes | None, str | None]] = []
        for i in range(start, stop):
            try:
                out.append((read_regular(self.where(i), self.limits.max_file, self.limits.file_key), None))
            except FileNotFoundError:
                out.append((None, "missing file"))
            except Unreadable as e:
                out.append((None, str(e)))
            except OSError as e:
                out.append((None, f"cannot read ({e.strerror or e})"))
        return out


class TarReader:
    """Image files of a tar archive, held in memory: ``files``, as the driver read them while
    listing the archive (read once; index ships each block's bytes to its actors), else read
    on first use."""

    def __init__(
        self,
        path: str,
        refs: Sequence[str],
        files: dict[str, bytes] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        left_out: dict[str, str] | None = None,
    ):
        self.path, self.refs, self.limits = path, list(refs), limits
        self._files: dict[str, bytes] | None = files
        self._left_out: dict[str, str] = dict(left_out or {})

    @property
    def in_memory(self) -> bool:
        """Whether the items are held here: a reader to ship blocks from, not to ship."""
        return self._files is not None

    def where(self, i: int) -> str:
        return f"{self.path}!{self.refs[i]}"

    def read(self, start: int, stop: int) -> list[tuple[bytes | None, str | None]]:
        from .sources import read_archive

        if self._files is None:
            contents = read_archive(Path(self.path), self.path, progress=False, limits=self.limits)
            self._files, self._left_out = contents.files, contents.rejected
        out: list[tuple[bytes | None, str | None]] = []
        for ref in self.refs[start:stop]:
            data = self._files.get(ref)
            out.append((data, None) if data is not None else (None, self._left_out.get(ref, "missing file")))
        return out


@dataclass
class Collection:
    """What to index: each item's key (rows of the index, in this order), labels when known."""

    keys: list[str]
    labels: np.ndarray | None
    classes: list[str] | None
    reader: Any  # SplitReader | FileReader | TarReader
    identity: dict[str, Any]  # the source, for the manifest and the resume check
    convert: bool  # images may need prepare's conversion (files, not prepared shards)
    paths: list[str] | None = None  # a prepared split's source paths

    def where(self, i: int) -> str:
        return self.reader.where(i) if hasattr(self.reader, "where") else f"{self.identity['split']}[{self.keys[i]}]"


def _list_entries(path: Path, given: str) -> tuple[list[str], np.ndarray | None]:
    """``<path> [0/1 ...]`` lines: the paths and, when every line has them, the label vectors."""
    from .listfile import list_tokens

    paths, vectors, seen = [], [], {}
    for lineno, tokens in list_tokens(path, given):
        ref, values = tokens[0], tokens[1:]
        if any(v not in ("0", "1") for v in values):
            raise DataError(f"{given}:{lineno}: expected `<path> [0/1 label vector]`, got {' '.join(tokens)[:80]!r}")
        if ref in seen:
            raise DataError(f"{given}:{lineno}: {ref} is listed twice (first at line {seen[ref]})")
        seen[ref] = lineno
        paths.append(ref)
        vectors.append(values)
    lengths = {len(v) for v in vectors}
    if len(lengths) > 1:
        raise DataError(
            f"{given}: lines carry label vectors of different lengths ({sorted(lengths)}); give all or none"
        )
    labels = np.array(vectors, dtype=np.uint8).reshape(len(paths), -1) if lengths and lengths != {0} else None
    return paths, labels


def open_collection(
    params: Params,
    *,
    dataset: str | None = None,
    split: str | None = None,
    images: str | None = None,
    root: str | None = None,
) -> Collection:
    """The collection to index: a prepared ``split`` of ``dataset``, or ``images`` (a folder,
    a tar archive or a list file; ``root``: where a list's relative paths start)."""
    import pyarrow.parquet as pq

    from dpfah.data import TABLE_FILE

    from .sources import IMAGE_EXTS, DirectorySource, file_identity, open_source

    if split is not None:
        if dataset is None:
            raise ConfigError("--split needs --dataset")
        manifest = prepared_manifest(params, dataset)
        info = manifest.split(split) if split in manifest.splits else None
        if info is None:
            raise ConfigError(f"--split {split}: {dataset} has no such split (has {', '.join(manifest.splits)})")
        table = pq.read_table(os.path.join(manifest.directory, TABLE_FILE), filters=[("split", "=", split)])
        table = table.sort_by("index")
        if table.num_rows != info.count or not np.array_equal(table.column("index").to_numpy(), np.arange(info.count)):
            raise DataError(
                f"{manifest.directory}/{TABLE_FILE}: split {split!r} does not list indices 0..{info.count - 1}"
            )
        lab = table.column("labels").combine_chunks()
        labels = np.asarray(lab.values.to_numpy(zero_copy_only=False), dtype=np.uint8).reshape(
            info.count, lab.type.list_size
        )
        identity = {
            "type": "split",
            "dataset": dataset,
            "split": split,
            "protocol": manifest.protocol,
            "directory": manifest.directory,
            "manifest_sha256": manifest.sha256,
        }
        keys = [str(i) for i in range(info.count)]
        return Collection(
            keys,
            labels,
            list(manifest.classes),
            SplitReader(manifest, split),
            identity,
            False,
            table.column("path").to_pylist(),
        )
    if images is None:
        raise ConfigError("give --split (with --dataset) or --images (a folder, a .tar archive or a list file)")
    path = Path(images).expanduser()
    if not path.exists():
        raise ConfigError(f"--images {images}: not found")
    limits = Limits.of(params.prepare)
    if path.is_dir():
        source = DirectorySource(path, images, limits)
        refs = source.refs()
        identity = {"type": "directory", "path": str(path.resolve()), "images": len(refs)}
        reader: Any = FileReader(str(path.resolve()), refs, limits)
    elif _is_tar(path):
        source = open_source(images, allow_cifar10=False, limits=limits)
        # the members left out (too large, hostile names) stay items: index names them as bad
        refs = sorted(source.refs() + list(getattr(source, "left_out", ())))
        identity = {**source.identity, "path": str(path.resolve()), "images": len(refs)}
        left_out = dict(getattr(source, "left_out", {}))
        reader = TarReader(str(path.resolve()), refs, source.files, limits, left_out)  # read once, here
    else:
        refs, labels = _list_entries(path, images)
        base = Path(root).expanduser() if root else path.parent
        order = sorted(range(len(refs)), key=refs.__getitem__)
        refs = [refs[i] for i in order]
        labels = labels[order] if labels is not None else None
        identity = {
            **file_identity(path, images),
            "type": "list",
            "path": str(path.resolve()),
            "root": str(base.resolve()),
            "images": len(refs),
        }
        return Collection(refs, labels, None, FileReader(str(base.resolve()), refs, limits), identity, True)
    if not refs:
        raise DataError(f"{images}: no image files ({', '.join(sorted(IMAGE_EXTS))})")
    return Collection(refs, None, None, reader, identity, True)


def _is_tar(path: Path) -> bool:
    import tarfile

    return path.is_file() and tarfile.is_tarfile(path)
