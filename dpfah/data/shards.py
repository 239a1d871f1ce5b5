"""Shards: a reproducible writer of WebDataset tar shards and the readers of their samples
(one split's pieces, single samples by index) (docs/data-formats.md)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from .manifest import Manifest, ShardError, ShardInfo, SplitInfo, open_path

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_EXT_RE = re.compile(r"^[a-z0-9]+$")
_LABELS_EXT = "labels.npy"
_INDEX_EXT = "index"
_MEMBER_MODE = 0o644


# ----------------------------------------------------------------------------- writer


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


_BLOCK = 512
_RECORD = 20 * _BLOCK


def _ustar_header(name: str, size: int) -> bytes:
    """A ustar header with fixed metadata (mode 644, uid/gid 0, no user names, mtime 0)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes")
    header = b"".join(
        (
            raw.ljust(100, b"\0"),
            b"%07o\0" % _MEMBER_MODE,
            b"0000000\0",  # uid
            b"0000000\0",  # gid
            b"%011o\0" % size,
            b"00000000000\0",  # mtime
            b"        ",  # checksum, counted as spaces
            b"0",  # regular file
            b"\0" * 100,  # linkname
            b"ustar\x0000",
            b"\0" * 64,  # uname, gname
            b"\0" * 16,  # devmajor, devminor (unused for regular files)
            b"\0" * 167,  # prefix, padding
        )
    )
    return header[:148] + b"%06o\0 " % sum(header) + header[156:]


class _TarFile:
    """A write-only tar file of regular files, hashed as it is written.

    Writes go out in chunks of about 1 MiB: hashing and writing small pieces would release
    and re-take the GIL for every member, which stalls next to busy reader threads."""

    _CHUNK = 1 << 20

    def __init__(self, path: str):
        self._f = open(path, "wb")
        self._sha = hashlib.sha256()
        self._parts: list[bytes] = []
        self._buffered = 0
        self._size = 0

    def _write(self, data: bytes) -> None:
        self._parts.append(data)
        self._buffered += len(data)
        self._size += len(data)
        if self._buffered >= self._CHUNK:
            self._flush()

    def _flush(self) -> None:
        chunk = b"".join(self._parts)
        self._f.write(chunk)
        self._sha.update(chunk)
        self._parts.clear()
        self._buffered = 0

    def add(self, name: str, data: bytes) -> None:
        self._write(_ustar_header(name, len(data)))
        self._write(data)
        if len(data) % _BLOCK:
            self._write(bytes(_BLOCK - len(data) % _BLOCK))

    def close(self) -> str:
        """Write the end-of-archive blocks (padded to a whole record, as tar does); the sha256."""
        end = 2 * _BLOCK
        end += -(self._size + end) % _RECORD
        self._write(bytes(end))
        self._flush()
        self._f.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._f.close()


_NPY_HEADERS: dict[int, bytes] = {}


def _npy_bytes(labels: np.ndarray) -> bytes:
    """``np.save`` of a uint8 vector (the header cached per length)."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8).reshape(-1)
    header = _NPY_HEADERS.get(labels.size)
    if header is None:
        buf = io.BytesIO()
        np.save(buf, np.zeros(labels.size, np.uint8), allow_pickle=False)
        header = _NPY_HEADERS[labels.size] = buf.getvalue()[: -labels.size or None]
    return header + labels.tobytes()


class ShardWriter:
    """Write one split as shards of at most ``shard_size`` samples, reproducibly.

    Samples get consecutive indices in the order they are written. Every tar header is
    fixed (ustar, mode 644, uid/gid 0, no user names, mtime 0) and a sample's members are
    written in a fixed order, so the same samples give byte-identical shards on any machine.
    """

    def __init__(self, directory: str | os.PathLike, split: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = os.fspath(directory)
        self.split = split
        self.shard_size = shard_size
        self.count = 0
        self._done: list[ShardInfo] = []
        self._tar: _TarFile | None = None
        self._name = ""
        self._in_shard = 0

    def write(self, key: str, image: bytes, ext: str, labels: np.ndarray) -> int:
        """Append a sample; returns its index in the split."""
        if not _KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} must match {_KEY_RE.pattern} (no dots)")
        if not _EXT_RE.match(ext):
            raise ValueError(f"image extension {ext!r} must match {_EXT_RE.pattern}")
        if self._tar is None or self._in_shard == self.shard_size:
            self._next_shard()
        index = self.count
        self._tar.add(f"{key}.{ext}", image)
        self._tar.add(f"{key}.{_LABELS_EXT}", _npy_bytes(labels))
        self._tar.add(f"{key}.{_INDEX_EXT}", str(index).encode())
        self._in_shard += 1
        self.count += 1
        return index

    def _next_shard(self) -> None:
        self._close_shard()
        self._name = shard_name(self.split, len(self._done))
        self._tar = _TarFile(os.path.join(self.directory, self._name))
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._done.append(ShardInfo(self._name, self._in_shard, self._tar.close()))
            self._tar = None

    def close(self) -> SplitInfo:
        """Finish the last shard; returns the split's entry for the manifest."""
        self._close_shard()
        return SplitInfo(self.split, self.count, tuple(self._done))

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.abort()
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# ----------------------------------------------------------------------------- reading


class Sample(NamedTuple):
    key: str
    image: bytes
    labels: np.ndarray
    index: int


def tar_members(f, path: str) -> Iterator[tuple[str, int, Any]]:
    """(name, size, read) of each regular file of a tar stream, in order; ``read()`` returns
    the data and must be called before the next member (unread data is skipped).

    Parses plain ustar/v7 headers (what :class:`ShardWriter` writes) directly; anything else
    (pax or GNU long-name headers) goes through :mod:`tarfile`."""
    seekable = f.seekable()
    pending = 0  # bytes of the current member (with padding) not consumed yet

    def skip(n: int) -> None:
        if seekable:
            f.seek(n, os.SEEK_CUR)
        else:
            while n > 0:
                n -= len(f.read(min(n, 1 << 20)) or b"\0" * n)

    while True:
        if pending:
            skip(pending)
            pending = 0
        header = f.read(_BLOCK)
        if len(header) < _BLOCK or header == bytes(_BLOCK):
            return
        kind = header[156:157]
        if kind not in (b"0", b"\0", b"5"):
            if not seekable:
                raise ShardError(f"{path}: tar member type {kind!r} is not supported when streaming")
            yield from _members_tarfile(f, path, f.tell() - _BLOCK)
            return
        try:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            # POSIX ustar keeps a name prefix here; old GNU headers ("ustar  ") keep times
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:263] == b"ustar\0" else ""
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise ShardError(f"{path}: corrupt tar header at byte {f.tell() - _BLOCK}") from None
        if prefix:
            name = f"{prefix}/{name}"
        padded = size + (-size % _BLOCK)
        if kind == b"5":
            pending = padded
            continue
        pending = padded

        def read(size=size, padded=padded, name=name) -> bytes:
            nonlocal pending
            data = f.read(size)
            if len(data) < size:
                raise ShardError(f"{path}: truncated (member {name!r})")
            pending = padded - size
            return data

        yield name, size, read


def _members_tarfile(f, path: str, offset: int) -> Iterator[tuple[str, int, Any]]:
    f.seek(offset)
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, member.size, lambda m=member: tar.extractfile(m).read()


def read_piece(path: str, start: int, stop: int, only: set[int] | None = None) -> Iterator[Sample]:
    """Samples ``start <= i < stop`` of one shard (of those, only the positions in ``only``
    when given), in stored order.

    Samples not wanted are skipped without reading their data (a local shard is seeked
    over; a remote one is streamed)."""
    if stop <= start:
        return

    def wanted(position: int) -> bool:
        return position >= start and (only is None or position in only)

    with open_path(path) as f:
        position, key, parts = -1, None, {}
        try:
            for name, _, read in tar_members(f, path):
                base, dot, ext = name.partition(".")
                if not dot:
                    raise ShardError(f"{path}: member {name!r} has no extension")
                if base != key:
                    if key is not None and wanted(position):
                        yield _assemble(path, key, parts)
                    position += 1
                    if position >= stop:
                        return
                    key, parts = base, {}
                if wanted(position):
                    parts[ext] = read()
        except (OSError, tarfile.TarError) as e:
            raise ShardError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        if key is not None and position < stop and wanted(position):
            yield _assemble(path, key, parts)


_NPY_OK: set[bytes] = set()


def _labels(data: bytes) -> np.ndarray:
    """A uint8 vector from .npy bytes; the common header is checked once, then sliced off."""
    if data[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(data[8:10], "little")
        header = data[:end]
        if header in _NPY_OK:
            return np.frombuffer(data, dtype=np.uint8, offset=end)
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype == np.uint8 and array.ndim == 1:
            _NPY_OK.add(header)
        return array
    return np.load(io.BytesIO(data), allow_pickle=False)


def _assemble(path: str, key: str, parts: dict[str, bytes]) -> Sample:
    try:
        labels = _labels(parts.pop(_LABELS_EXT))
        index = int(parts.pop(_INDEX_EXT))
        ((_, image),) = parts.items()
    except (KeyError, ValueError) as e:
        raise ShardError(f"{path}: sample {key!r} is malformed ({type(e).__name__}: {e})") from None
    return Sample(key, image, labels, index)


def read_samples(manifest: Manifest, split: str, indices: Sequence[int]) -> dict[int, bytes]:
    """The encoded image bytes of a few samples of a split, by their index in it.

    Reads only the shards that hold them, each up to its last wanted sample (a local
    shard is seeked over; a remote one is streamed)."""
    info = manifest.split(split)
    paths = manifest.shard_paths(split)
    starts = np.concatenate([[0], np.cumsum([s.count for s in info.shards])]).astype(np.int64)
    wanted: dict[int, set[int]] = {}
    for i in sorted({int(i) for i in indices}):
        if not 0 <= i < info.count:
            raise ShardError(f"{manifest.directory}: split {split!r} has no sample {i} (it holds {info.count})")
        s = int(np.searchsorted(starts, i, side="right") - 1)
        wanted.setdefault(s, set()).add(i - int(starts[s]))
    out: dict[int, bytes] = {}
    for s, offsets in wanted.items():
        found = list(read_piece(paths[s], min(offsets), max(offsets) + 1, only=offsets))
        expected = [int(starts[s]) + o for o in sorted(offsets)]
        if [sample.index for sample in found] != expected:
            raise ShardError(f"{paths[s]}: samples at positions {sorted(offsets)[:5]} are missing or out of place")
        out.update((sample.index, sample.image) for sample in found)
    return out
