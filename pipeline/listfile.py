"""The `<path> <0/1 labels>` list format, the one reader of it for prepare's lists and index's:
UTF-8 text (a byte order mark dropped), plain or gzipped, a regular file of bounded size."""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .userfiles import Unreadable, mib, read_regular

__all__ = ["LIST_MAX", "ListEntry", "list_lines", "list_tokens", "read_list"]


@dataclass(frozen=True)
class ListEntry:
    ref: str
    labels: np.ndarray  # uint8 (classes,)
    where: str  # file:line


_BOM = b"\xef\xbb\xbf"


LIST_MAX = 1 << 30  # a list file, decompressed (195,834 NUS-WIDE lines are about 12 MiB)


def list_lines(path: Path) -> list[bytes]:
    """The lines of a list file (plain or gzipped; a UTF-8 byte order mark dropped), undecoded.
    A regular file of at most :data:`LIST_MAX` bytes, decompressed (else :class:`Unreadable`)."""
    data = read_regular(path, LIST_MAX, "a list file's cap")
    if data[:2] == b"\x1f\x8b":
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            data = f.read(LIST_MAX + 1)
        if len(data) > LIST_MAX:
            raise Unreadable(f"decompresses to over {mib(LIST_MAX)}, a list file's cap")
    return data.removeprefix(_BOM).splitlines()


def list_tokens(path: Path, given: str) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated tokens) of each non-blank line of a `<path> <labels>`
    list file (UTF-8, plain or gzipped): the one reader of the format, for prepare's lists and
    index's. A file that cannot be read, or a line that is not UTF-8, is a DataError naming
    the file (and the line, the byte and its column)."""
    try:
        lines = list_lines(path)
    except Unreadable as e:
        raise DataError(f"{given}: cannot read the list ({e})") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{given}: cannot read the list ({type(e).__name__}: {e})") from None
    out: list[tuple[int, list[str]]] = []
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{given}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "save the list as UTF-8"
            ) from None
        if tokens := line.split():
            out.append((lineno, tokens))
    return out


def read_list(path: Path, given: str, key: str, num_classes: int, report) -> list[ListEntry]:
    """Entries of a `<path> <v_1> ... <v_C>` list (:func:`list_tokens`). A bad line goes to
    ``report(where, reason)``, which raises or records it; blank lines are ignored."""
    if not path.is_file():
        raise ConfigError(f"{key}: {given}: not found")
    entries: list[ListEntry] = []
    seen: dict[str, int] = {}
    for lineno, tokens in list_tokens(path, given):
        where = f"{given}:{lineno}"
        if all(t in ("0", "1") for t in tokens):
            report(where, "no image path: the line is only a label vector (expected `<path> <0/1 label vector>`)")
            continue
        if len(tokens) < 2:
            report(where, "malformed line (expected `<path> <0/1 label vector>`)")
            continue
        ref, values = tokens[0], tokens[1:]
        if len(values) != num_classes:
            report(where, f"label vector has {len(values)} entries, expected {num_classes}")
            continue
        if any(v not in ("0", "1") for v in values):
            bad = next(v for v in values if v not in ("0", "1"))
            report(where, f"label vector has a value {bad!r} (only 0 and 1)")
            continue
        labels = np.array([v == "1" for v in values], dtype=np.uint8)
        if not labels.any():
            report(where, "label vector has no 1 (every image needs a label)")
            continue
        if ref in seen:
            report(where, f"{ref} is listed twice (first at line {seen[ref]})")
            continue
        seen[ref] = lineno
        entries.append(ListEntry(ref, labels, where))
    return entries
