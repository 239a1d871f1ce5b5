"""Where prepare's images come from: image folders (directories or tar archives), the
official CIFAR-10 python archive and downloads (list files: :mod:`pipeline.listfile`).

Sources hand out each image's original bytes by a reference (``ref``): a relative path in
a folder, a member name in a tar archive, or ``data_batch_N[row]`` in the CIFAR-10 archive
(whose images are arrays, stored as lossless PNG).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib
import io
import lzma
import os
import pickle
import re
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dpfah.data import ShardError, tar_members

from .errors import DataError

# the list format, for the importers of sources (pipeline.collection, pipeline.catalog)
from .listfile import ListEntry, list_lines, list_tokens, read_list  # noqa: F401
from .userfiles import DEFAULT_LIMITS, Limits, Unreadable, file_kind, mib, read_regular, too_large, under_root

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm", "pbm"})
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_MEMBER = re.compile(rf"(?:^|/){_CIFAR10_DIR}/(data_batch_[1-5]|test_batch|batches\.meta)$")


def is_url(text: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text) is not None


def image_ext(ref: str) -> str | None:
    """The lower-case extension of an image file name, or None for anything else."""
    name = ref.rpartition("/")[2]
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or name.startswith("."):
        return None
    ext = ext.lower()
    return ext if ext in IMAGE_EXTS else None


def file_identity(path: Path, given: str) -> dict[str, Any]:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    return {"path": given, "size": path.stat().st_size, "md5": md5.hexdigest()}


def check_image(data: bytes) -> str | None:
    """Why ``data`` is not a readable image, or None. Decodes it (JPEGs at reduced scale)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except UnidentifiedImageError:
        return "cannot decode image (not a known image format)"
    except Exception as e:  # PIL raises many types for corrupt data
        # no object addresses in the message: it goes into the manifest, which must be reproducible
        return f"cannot decode image ({type(e).__name__}: {re.sub(r' at 0x[0-9a-fA-F]+', '', str(e))})"
    return None


# ----------------------------------------------------------------------------- sources


class ImageSource:
    """Images by reference. ``read`` raises OSError (FileNotFoundError for a missing file)."""

    identity: dict[str, Any]
    # whether reading many images at once on threads pays (file reads, encoding)
    parallel_reads = True
    # images made here from pixel arrays, so they need no decoding check
    generated = False
    # (where, why) of the files left out when the source was opened (archive members too
    # large, or with absolute or `..` names): bad items, reported by prepare
    rejected: tuple[tuple[str, str], ...] = ()

    def refs(self) -> list[str]:
        raise NotImplementedError

    def read(self, ref: str) -> bytes:
        raise NotImplementedError

    def ext(self, ref: str) -> str:
        return image_ext(ref) or "bin"

    def where(self, ref: str) -> str:
        raise NotImplementedError


class DirectorySource(ImageSource):
    """Image files under ``root``: regular files only, each read capped, and (unless
    ``limits.outside_root``) only refs that stay under the root (:mod:`pipeline.userfiles`)."""

    def __init__(self, root: Path, given: str, limits: Limits = DEFAULT_LIMITS):
        self.root = root
        self.given = given
        self.limits = limits
        self.identity = {"path": given, "type": "directory"}

    def refs(self) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root)
            out.extend((rel / f).as_posix() for f in filenames if image_ext(f))
        out.sort()
        self.identity = {**self.identity, "images": len(out)}
        return out

    def read(self, ref: str) -> bytes:
        if not self.limits.outside_root and not under_root(self.root, ref):
            raise Unreadable("outside the images root (prepare.allow_outside_root: true reads it)")
        return read_regular(self.root / ref, self.limits.max_file, self.limits.file_key)

    def where(self, ref: str) -> str:
        return str(Path(self.given) / ref)


class MemorySource(ImageSource):
    """Image files of a tar archive, held in memory (fine for CIFAR-sized data)."""

    parallel_reads = False

    def __init__(self, files: dict[str, bytes], given: str, identity: dict[str, Any]):
        self.files = files
        self.left_out: dict[str, str] = {}  # image members not read, by name: why
        self.given = given
        self.identity = identity

    def refs(self) -> list[str]:
        return sorted(self.files)

    def read(self, ref: str) -> bytes:
        try:
            return self.files[ref]
        except KeyError:
            raise FileNotFoundError(ref) from None

    def where(self, ref: str) -> str:
        return f"{self.given}!{ref}"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches (dicts of numpy arrays, lists, bytes) and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{where}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a CIFAR-10 python batch (a {type(obj).__name__}, not a dict)")
    return obj


class Cifar10ArchiveSource(ImageSource):
    """The official ``cifar-10-python.tar.gz``: images are re-encoded as lossless PNG."""

    generated = True

    def __init__(self, pickles: dict[str, bytes], given: str, identity: dict[str, Any]):
        self.given = given
        self.identity = {**identity, "type": "cifar-10-python"}
        meta = _unpickle(pickles["batches.meta"], self.where("batches.meta"))
        names = meta.get(b"label_names")
        if not isinstance(names, list) or not names:
            raise DataError(f"{self.where('batches.meta')}: no label_names")
        self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        self.batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for batch in CIFAR10_BATCHES:
            where = self.where(batch)
            d = _unpickle(pickles[batch], where)
            data, labels = d.get(b"data"), d.get(b"labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{where}: b'data' must be a uint8 array of shape (n, 3072)")
            labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
            if labels.shape != (data.shape[0],):
                raise DataError(f"{where}: {labels.size} labels for {data.shape[0]} images")
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise DataError(f"{where}: labels outside 0..{len(self.classes) - 1}")
            self.batches[batch] = (data, labels)

    @staticmethod
    def ref(batch: str, row: int) -> str:
        return f"{batch}[{row:05d}]"

    def refs(self) -> list[str]:
        return sorted(self.ref(b, r) for b, (data, _) in self.batches.items() for r in range(data.shape[0]))

    def label(self, ref: str) -> int:
        batch, row = self._parse(ref)
        return int(self.batches[batch][1][row])

    def _parse(self, ref: str) -> tuple[str, int]:
        batch, _, row = ref.partition("[")
        return batch, int(row.rstrip("]"))

    def read(self, ref: str) -> bytes:
        batch, row = self._parse(ref)
        pixels = self.batches[batch][0][row].reshape(3, 32, 32).transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
        return buf.getvalue()

    def ext(self, ref: str) -> str:
        return "png"

    def where(self, ref: str) -> str:
        return f"{self.given}!{_CIFAR10_DIR}/{ref}"


def _open_decompressed(path: Path):
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


def unsafe_name(name: str) -> bool:
    """An archive member name that is absolute or climbs with ``..``: never a class folder."""
    parts = name.split("/")
    return name.startswith("/") or ".." in parts


@dataclass
class TarContents:
    """What :func:`read_tar` took from an archive."""

    pickles: dict[str, bytes]  # CIFAR-10 batches by name
    files: dict[str, bytes]  # image files by member name
    rejected: dict[str, str]  # why each image member left out was, by member name


def read_tar(
    path: Path, given: str, *, progress: bool | None = None, limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(CIFAR-10 batch pickles, image files) of :func:`read_archive`; the members it rejects are left out."""
    contents = read_archive(path, given, progress=progress, limits=limits)
    return contents.pickles, contents.files


def read_archive(
    path: Path, given: str, *, progress: bool | None = None, limits: Limits = DEFAULT_LIMITS
) -> TarContents:
    """The CIFAR-10 batch pickles and the image files of a tar archive (plain, gzip, bzip2 or
    xz). Each member's size is checked from its header before it is read: an image member
    over ``limits.max_file``, or with an absolute or ``..`` name, is left out (``rejected``);
    members over ``limits.max_archive`` in all refuse the archive."""
    out = TarContents({}, {}, {})
    total = 0
    try:
        with (
            _open_decompressed(path) as f,
            tqdm(desc=f"reading {path.name}", unit=" files", disable=progress is False or None) as bar,
        ):
            for name, size, read in tar_members(f, given):
                total += size
                if total > limits.max_archive:
                    raise DataError(
                        f"{given}: its members hold over {mib(limits.max_archive)} uncompressed "
                        f"({limits.archive_key}; an archive is read into memory): unpack it into a folder"
                    )
                m = _CIFAR10_MEMBER.search(name)
                if m and size > limits.max_file:
                    raise DataError(f"{given}!{name}: {too_large(size, limits.max_file, limits.file_key)}")
                if m:
                    out.pickles[m.group(1)] = read()
                elif image_ext(name):
                    if unsafe_name(name):
                        out.rejected[name] = "member name is absolute or climbs with ..: left out"
                    elif size > limits.max_file:
                        out.rejected[name] = too_large(size, limits.max_file, limits.file_key)
                    else:
                        out.files[name] = read()
                    bar.update()
    except (ShardError, tarfile.TarError, EOFError, OSError, lzma.LZMAError) as e:
        raise DataError(f"{given}: not a readable tar archive ({type(e).__name__}: {e})") from None
    return out


def open_source(
    given: str, *, allow_cifar10: bool, progress: bool | None = None, limits: Limits = DEFAULT_LIMITS
) -> ImageSource:
    """A directory, a tar archive of image folders, or (``allow_cifar10``) the official
    CIFAR-10 python archive; read within ``limits``."""
    path = Path(given).expanduser()
    if path.is_dir():
        return DirectorySource(path, given, limits)
    if not path.exists():
        raise FileNotFoundError(given)
    kind = file_kind(path.stat().st_mode)
    if kind is not None or not tarfile.is_tarfile(path):
        raise DataError(f"{given}: neither a directory nor a tar archive" + (f" ({kind})" if kind else ""))
    identity = {**file_identity(path, given), "type": "tar"}
    contents = read_archive(path, given, progress=progress, limits=limits)
    pickles, files = contents.pickles, contents.files
    if pickles and allow_cifar10:
        missing = [n for n in (*CIFAR10_BATCHES, "batches.meta") if n not in pickles]
        if missing:
            raise DataError(f"{given}: CIFAR-10 python archive without {_CIFAR10_DIR}/{missing[0]}")
        return Cifar10ArchiveSource(pickles, given, identity)
    if not files and not contents.rejected:
        raise DataError(f"{given}: no image files ({', '.join(sorted(IMAGE_EXTS))}) in the archive")
    source = MemorySource(files, given, identity)
    source.left_out = contents.rejected
    source.rejected = tuple((source.where(name), why) for name, why in contents.rejected.items())
    return source


def folder_labels(source: ImageSource, refs: list[str]) -> tuple[list[str], np.ndarray]:
    """Class names (sorted) and the class of each image: the name of the folder holding it."""
    parents = [PurePosixPath(r).parent.name for r in refs]
    for ref, parent in zip(refs, parents):
        if not parent:
            raise DataError(
                f"{source.where(ref)}: not in a class folder (expected <class>/<image> under {source.given})"
            )
    classes = sorted(set(parents))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[p] for p in parents], dtype=np.int64)


# ----------------------------------------------------------------------------- downloads


def download(url: str, directory: Path, md5: str | None, *, progress: bool | None = None) -> Path:
    """Download ``url`` into ``directory`` (kept for later runs), checking its md5."""
    name = PurePosixPath(urllib.request.urlparse(url).path).name or "download"
    target = directory / name
    if target.exists() and (md5 is None or file_identity(target, "")["md5"] == md5):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, desc=f"downloading {name}", unit="B", unit_scale=True, disable=progress is False or None
            ) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise DataError(f"cannot download {url}: {getattr(e, 'reason', None) or e}") from None
    if md5 is not None and digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: md5 {digest.hexdigest()} does not match the expected {md5}")
    part.replace(target)
    return target
