"""Reading files a user names (images, list files, archives) without hanging or filling memory.

Only regular files are opened (a FIFO, a device such as ``/dev/zero``, a socket or a
directory is refused from ``os.stat``, before any ``open``), each read is capped, and a list
line's path can be kept under its images root. The caps are parameters (``prepare:`` in
params.yaml, see docs/data-formats.md).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "Limits", "Unreadable", "file_kind", "read_regular", "under_root"]

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """The read caps, in bytes, and where a list's paths may point."""

    max_file: int = 64 * MIB  # one image file or archive member
    max_archive: int = 4096 * MIB  # an archive's uncompressed members, in all
    outside_root: bool = False  # list lines may name files outside the images root
    file_key: str = "prepare.max_image_mb"  # the parameters, for messages
    archive_key: str = "prepare.max_archive_mb"

    @classmethod
    def of(cls, prepare) -> Limits:
        """From params.yaml's ``prepare`` section (:class:`pipeline.config.PrepareConfig`)."""
        return cls(prepare.max_image_mb * MIB, prepare.max_archive_mb * MIB, prepare.allow_outside_root)


DEFAULT_LIMITS = Limits()


class Unreadable(OSError):
    """A file that is not read: not a regular file, or over its size cap. ``strerror`` says why."""

    def __init__(self, reason: str):
        super().__init__(0, reason)

    def __str__(self) -> str:
        return self.strerror


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def file_kind(mode: int) -> str | None:
    """What a file that is not regular is ("a FIFO", ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def mib(size: int) -> str:
    return f"{size / MIB:,.1f} MiB" if size < 10 * MIB else f"{size // MIB:,} MiB"


def too_large(size: int, cap: int, key: str) -> str:
    return f"{mib(size)}, over the cap of {mib(cap)} ({key})"


def read_regular(path: str | os.PathLike, max_bytes: int, key: str = "prepare.max_image_mb") -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; :class:`Unreadable` otherwise.

    Checked with ``os.stat`` before opening (opening a FIFO or some devices blocks or acts),
    opened non-blocking, checked again on the open file (it may have been swapped), and read
    to at most ``max_bytes`` + 1 bytes (it may have grown)."""
    kind = file_kind(os.stat(path).st_mode)
    if kind is not None:
        raise Unreadable(f"not a regular file: {kind}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        kind = file_kind(st.st_mode)
        if kind is not None:
            raise Unreadable(f"not a regular file: {kind}")
        if st.st_size > max_bytes:
            raise Unreadable(too_large(st.st_size, max_bytes, key))
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Unreadable(too_large(len(data), max_bytes, key))
    return data


def under_root(root: str | os.PathLike, ref: str) -> bool:
    """Whether ``root``/``ref`` stays under ``root`` by its name (an absolute ``ref`` or one whose
    ``..`` climb out does not). Symbolic links inside the root are the user's and are followed."""
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(base, ref))
    return full == base or full.startswith(base.rstrip(os.sep) + os.sep)
