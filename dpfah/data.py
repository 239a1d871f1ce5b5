"""Prepared datasets as WebDataset shards: the format, a reproducible writer, and readers.

A prepared dataset is one directory (written by ``pipeline.prepare``)::

    manifest.json          dataset, protocol, seed, class names; per split its count and
                           its shards (file, count, sha256)
    splits.parquet         split membership: split, index, key, source path, label vector
    <split>-NNNNNN.tar     WebDataset shards; splits: train, validation, query, database

Every split is stored in a seeded random order (never class-sorted: the database order
breaks Hamming ties). A sample is three consecutive tar members sharing its key::

    <key>.<ext>            the image, its original encoded bytes (ext: jpg, png, ...), or
                           an 8-bit RGB PNG of them where the decoder of training would
                           not read the original as PIL does (see conversion_reason)
    <key>.labels.npy       the 0/1 label vector, uint8 (classes,)
    <key>.index            the sample's position in its split, ASCII decimal

The key is the sample's dataset-wide id (digits, no dots), so a training image stored in
both ``train`` and ``database`` has the same key in both. ``webdataset.WebDataset`` reads
the shards as they are; the readers below do not need it.

Readers (both ``torch.utils.data.IterableDataset``; use them in a ``DataLoader`` with
``batch_size=None``, any number of workers, and one copy per rank):

* :class:`TrainStream` gives every rank the same number of full batches per epoch and, in
  each epoch, every sample to at most one rank and worker (an exact, seeded partition), so
  uneven shards never leave one DDP rank waiting for another.
* :class:`EvalStream` yields every sample of a split exactly once over all ranks and
  workers, each with its stable index; sort by ``index`` to get the stored order.

Both yield :class:`Batch` tuples ``(images, labels, index)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

__all__ = [
    "SPLITS",
    "MANIFEST_FILE",
    "TABLE_FILE",
    "FORMAT",
    "Batch",
    "ShardInfo",
    "SplitInfo",
    "Manifest",
    "ShardWriter",
    "ShardError",
    "NotPrepared",
    "read_manifest",
    "verify_shards",
    "tar_members",
    "read_samples",
    "shard_name",
    "decode_image",
    "conversion_reason",
    "as_rgb_png",
    "UnsupportedImage",
    "TrainStream",
    "EvalStream",
]

FORMAT = "dpfah-shards/1"
MANIFEST_FILE = "manifest.json"
TABLE_FILE = "splits.parquet"
SPLITS = ("train", "validation", "query", "database")

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_EXT_RE = re.compile(r"^[a-z0-9]+$")
_LABELS_EXT = "labels.npy"
_INDEX_EXT = "index"
_MEMBER_MODE = 0o644


class ShardError(ValueError):
    """A prepared dataset directory is missing, malformed or does not match its manifest."""


class NotPrepared(ShardError):
    """The directory holds no prepared dataset (no manifest.json)."""


class Batch(NamedTuple):
    """A batch from a reader.

    ``images``: a list of encoded bytes, or with ``decode=True`` a uint8 tensor
    (N, 3, H, W); ``labels``: uint8 (N, classes); ``index``: int64 (N,), each sample's
    position in its split.
    """

    images: Any
    labels: torch.Tensor
    index: torch.Tensor


# ----------------------------------------------------------------------------- manifest


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
                f"{_join(self.directory, MANIFEST_FILE)}: no split {name!r} (has {', '.join(self.splits)})"
            ) from None

    def shard_paths(self, name: str) -> list[str]:
        return [_join(self.directory, s.file) for s in self.split(name).shards]

    @property
    def sha256(self) -> str:
        """Identity of the prepared dataset: the manifest lists every shard's sha256."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if "://" in directory else os.path.join(directory, name)


def _open(path: str):
    if "://" in path:
        import fsspec  # only for remote directories

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and check ``manifest.json`` of a prepared dataset directory (local or URL)."""
    directory = os.fspath(directory)
    path = _join(directory, MANIFEST_FILE)
    try:
        with _open(path) as f:
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
    with _open(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_shards(directory: str | os.PathLike) -> Manifest:
    """Check every shard's sha256 against the manifest; raise :class:`ShardError` on a mismatch."""
    manifest = read_manifest(directory)
    for split in manifest.splits.values():
        for shard in split.shards:
            path = _join(manifest.directory, shard.file)
            try:
                digest = _sha256_file(path)
            except FileNotFoundError:
                raise ShardError(f"{path}: missing (listed in {MANIFEST_FILE})") from None
            if digest != shard.sha256:
                raise ShardError(f"{path}: sha256 {digest} does not match the manifest's {shard.sha256}")
    return manifest


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


class _Sample(NamedTuple):
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


def _read_piece(path: str, start: int, stop: int, only: set[int] | None = None) -> Iterator[_Sample]:
    """Samples ``start <= i < stop`` of one shard (of those, only the positions in ``only``
    when given), in stored order.

    Samples not wanted are skipped without reading their data (a local shard is seeked
    over; a remote one is streamed)."""
    if stop <= start:
        return

    def wanted(position: int) -> bool:
        return position >= start and (only is None or position in only)

    with _open(path) as f:
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


def _assemble(path: str, key: str, parts: dict[str, bytes]) -> _Sample:
    try:
        labels = _labels(parts.pop(_LABELS_EXT))
        index = int(parts.pop(_INDEX_EXT))
        ((_, image),) = parts.items()
    except (KeyError, ValueError) as e:
        raise ShardError(f"{path}: sample {key!r} is malformed ({type(e).__name__}: {e})") from None
    return _Sample(key, image, labels, index)


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
        found = list(_read_piece(paths[s], min(offsets), max(offsets) + 1, only=offsets))
        expected = [int(starts[s]) + o for o in sorted(offsets)]
        if [sample.index for sample in found] != expected:
            raise ShardError(f"{paths[s]}: samples at positions {sorted(offsets)[:5]} are missing or out of place")
        out.update((sample.index, sample.image) for sample in found)
    return out


# ----------------------------------------------------------------------------- image forms

# What is stored as it is: the images that the decoder of training and evaluation
# (dpfah.augment.decode_batch: torchvision on the CPU, nvJPEG for JPEG batches on a GPU)
# reads to exactly the pixels of PIL's ``Image.convert("RGB")``. Checked image by image in
# tests/test_prepare.py; everything else is stored as an 8-bit RGB PNG of PIL's pixels.
_AS_IS_MODES = {"JPEG": frozenset({"L", "RGB"}), "PNG": None, "WEBP": None}  # None: any mode
_SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class UnsupportedImage(ValueError):
    """An image that has no 8-bit RGB form to store (32-bit integer or float pixels)."""


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


def _sixteen_bit_grey(im, data: bytes) -> bool:
    return im.mode in _SIXTEEN_BIT_GREY or (im.mode == "I" and _png_bit_depth(data) == 16)


def _refuse_32_bit(im, data: bytes) -> None:
    if im.mode in ("I", "F") and not _sixteen_bit_grey(im, data):
        kind = "integer" if im.mode == "I" else "float"
        raise UnsupportedImage(
            f"{im.format} image of 32-bit {kind} pixels (mode {im.mode}): no 8-bit RGB form; save it as 8-bit"
        )


def conversion_reason(data: bytes) -> str | None:
    """Why the image ``data`` must be stored converted (see :func:`as_rgb_png`), or None when
    the training decoder reads it as it is, to PIL's RGB pixels.

    Raises :class:`UnsupportedImage` for an image with no 8-bit RGB form, and PIL's errors
    for data that is not a readable image. Reads the header only."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        fmt, mode = im.format or "unknown", im.mode
        if fmt == "MPO":  # a camera's multi-picture JPEG: both read its first picture
            fmt = "JPEG"
        _refuse_32_bit(im, data)
        if fmt not in _AS_IS_MODES and fmt != "GIF":
            return f"{fmt} image: the training decoder (torchvision) reads only JPEG, PNG, WebP and GIF"
        if fmt == "GIF":
            return "GIF image: the training decoder reads all its frames and its transparency unlike PIL; its first frame is stored"
        if fmt != "JPEG" and getattr(im, "is_animated", False):
            return f"animated {fmt} image: the training decoder cannot read it as PIL does; its first frame is stored"
        if fmt == "PNG" and (_png_bit_depth(data) or 8) > 8:
            return "16-bit PNG: the training decoder reads 16-bit samples as white; stored with 8 bits (the high byte, as PIL reads 16-bit colour)"
        modes = _AS_IS_MODES[fmt]
        if modes is not None and mode not in modes:
            return f"{mode} {fmt}: stored as RGB so that every decoder (CPU or GPU) gives PIL's colours"
    return None


def as_rgb_png(data: bytes) -> bytes:
    """The image ``data`` as an 8-bit RGB PNG of PIL's RGB pixels (``convert("RGB")`` of its
    first frame; for 16-bit greyscale, which PIL clips to white, the high byte of each
    sample, as PIL reads 16-bit colour). Lossless for 8-bit images. The same input always
    gives the same bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        _refuse_32_bit(im, data)
        if _sixteen_bit_grey(im, data):
            grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
            rgb = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
        else:
            rgb = im.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
        return buf.getvalue()


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB tensor (3, H, W), on the CPU (PIL).

    (torchvision 0.29 deprecates its decoders; decoding for training belongs on the device
    anyway, see ``dpfah.augment.decode_batch``.)"""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def _make_batch(samples: Sequence[_Sample], decode: bool) -> Batch:
    labels = torch.from_numpy(np.stack([s.labels for s in samples]))
    index = torch.tensor([s.index for s in samples], dtype=torch.int64)
    if not decode:
        return Batch([s.image for s in samples], labels, index)
    images = [decode_image(s.image) for s in samples]
    if any(im.shape != images[0].shape for im in images):
        shapes = sorted({tuple(im.shape) for im in images})
        raise ShardError(
            f"decode=True needs images of one size in a batch, got {shapes[:3]}: read the encoded bytes "
            "(decode=False) and resize on the device (dpfah.augment.decode_batch)"
        )
    return Batch(torch.stack(images), labels, index)


def _resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return rank, world_size


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _share(total: int, parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of ``part`` when ``total`` items are cut into ``parts`` near-equal runs."""
    return total * part // parts, total * (part + 1) // parts


class _Layout:
    """Positions of a split's samples across its shards, in some shard order."""

    def __init__(self, paths: Sequence[str], counts: Sequence[int]):
        self.paths = list(paths)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.total = int(self.starts[-1])

    def pieces(self, start: int, length: int) -> Iterator[tuple[str, int, int]]:
        """(shard path, first, stop) runs covering ``length`` positions from ``start``,
        wrapping around the end."""
        if self.total == 0:
            return
        pos = start % self.total
        while length > 0:
            s = int(np.searchsorted(self.starts, pos, side="right") - 1)
            lo = pos - int(self.starts[s])
            n = min(length, int(self.counts[s]) - lo)
            yield self.paths[s], lo, lo + n
            length -= n
            pos = (pos + n) % self.total


class TrainStream(IterableDataset):
    """Training batches: the same number of full batches on every rank, whatever the shards.

    Each epoch every rank and DataLoader worker computes the same plan from ``(seed,
    epoch)``: a random shard order and a random starting offset into the concatenated split.
    Rank ``r`` then reads the ``r``-th run of ``len(self) * batch_size`` consecutive samples
    (its workers cut that run into near-equal whole-batch parts), through a seeded shuffle
    buffer. Every sample is used at most once per epoch; with ``drop_last`` (default) fewer
    than ``world_size * batch_size`` samples are left out, different ones each epoch (the
    stored order is already random). Without it the runs wrap around so that every sample
    is used and a few are used twice. Reading is sequential within shards, as WebDataset's
    resampled shards are, but the epoch is exact.

    Call :meth:`set_epoch` before each epoch (not with ``persistent_workers=True``).
    ``rank``/``world_size`` default to the process group, else ``RANK``/``WORLD_SIZE``.
    ``batch_size`` is per rank.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        batch_size: int,
        *,
        split: str = "train",
        seed: int = 0,
        decode: bool = False,
        shuffle_buffer: int = 1000,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.manifest = read_manifest(directory)
        info = self.manifest.split(split)
        if info.count == 0:
            raise ShardError(f"{self.manifest.directory}: split {split!r} is empty")
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.decode = decode
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.rank, self.world_size = _resolve_world(rank, world_size)
        self.epoch = 0
        self._paths = self.manifest.shard_paths(split)
        self._counts = [s.count for s in info.shards]
        global_batch = self.world_size * batch_size
        if drop_last:
            self.batches_per_rank = info.count // global_batch
            if self.batches_per_rank == 0:
                raise ShardError(
                    f"split {split!r} has {info.count} samples, fewer than one batch of {batch_size} on each of "
                    f"{self.world_size} ranks; lower the batch size or use drop_last=False"
                )
        else:
            self.batches_per_rank = -(-info.count // global_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.batches_per_rank

    def _rng(self, *words: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch, *words])))

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        plan = self._rng()
        order = plan.permutation(len(self._paths))
        layout = _Layout([self._paths[i] for i in order], [self._counts[i] for i in order])
        offset = int(plan.integers(layout.total))
        b0, b1 = _share(self.batches_per_rank, workers, worker)
        start = offset + (self.rank * self.batches_per_rank + b0) * self.batch_size
        length = (b1 - b0) * self.batch_size
        rng = self._rng(1 + self.rank, worker)
        buffer: list[_Sample] = []
        out: list[_Sample] = []

        def emit(sample: _Sample) -> Iterator[Batch]:
            out.append(sample)
            if len(out) == self.batch_size:
                yield _make_batch(out, self.decode)
                out.clear()

        for path, lo, hi in layout.pieces(start, length):
            for sample in _read_piece(path, lo, hi):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = int(rng.integers(len(buffer)))
                buffer[j], sample = sample, buffer[j]
                yield from emit(sample)
        for j in rng.permutation(len(buffer)):
            yield from emit(buffer[j])


class EvalStream(IterableDataset):
    """Every sample of a split exactly once over all ranks and DataLoader workers.

    Rank ``r`` of ``R`` reads the ``r``-th of ``R`` near-equal consecutive runs of the
    stored order (sizes differ by at most one); its workers cut that run again. Batches
    carry each sample's index: order by it (within a rank, workers interleave) to get the
    stored order. ``num_samples`` is this rank's share.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        split: str,
        *,
        batch_size: int = 256,
        decode: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.manifest = read_manifest(directory)
        info = self.manifest.split(split)
        self.split = split
        self.batch_size = batch_size
        self.decode = decode
        self.rank, self.world_size = _resolve_world(rank, world_size)
        self._layout = _Layout(self.manifest.shard_paths(split), [s.count for s in info.shards])
        self._start, self._stop = _share(info.count, self.world_size, self.rank)

    @property
    def num_samples(self) -> int:
        return self._stop - self._start

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        lo, hi = _share(self.num_samples, workers, worker)
        out: list[_Sample] = []
        for path, a, b in self._layout.pieces(self._start + lo, hi - lo):
            for sample in _read_piece(path, a, b):
                out.append(sample)
                if len(out) == self.batch_size:
                    yield _make_batch(out, self.decode)
                    out = []
        if out:
            yield _make_batch(out, self.decode)
