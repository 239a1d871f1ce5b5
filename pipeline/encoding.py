"""Images to codes with a loaded model, as evaluate computes them: index encodes a
collection's blocks with it, search its query images (the same device type and precision as
the index, so a query and its copy in the index get the same code)."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

import numpy as np

from .errors import DataError

__all__ = ["encode_images", "read_image_file", "NotAnImageFile", "MAX_IMAGE_BYTES"]

#: The default cap on an image file's size: far above any photo (a 24-megapixel JPEG is a
#: few MB), far below what would strain memory.
MAX_IMAGE_BYTES = 64 * 2**20


class NotAnImageFile(DataError):
    """A path that is not a regular file (a FIFO, a device, a folder) or is over the size cap."""


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def read_image_file(path: str | os.PathLike, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the image file ``path``: a regular file of at most ``max_bytes``. Anything
    else is refused before reading (:class:`NotAnImageFile`, naming the path): opened without
    blocking (a FIFO with no writer would wait forever), checked on the open descriptor, and
    read to at most ``max_bytes`` + 1 bytes (a file that grows while read is refused too).
    OSError (missing, no permission) passes through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:  # a folder opens too (Linux): its mode says what it is
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise NotAnImageFile(f"{path}: {kind}, not an image file (only regular files are read)")
        if info.st_size > max_bytes:
            raise NotAnImageFile(f"{path}: {info.st_size:,} bytes, over the cap of {max_bytes:,}")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise NotAnImageFile(f"{path}: grew past the cap of {max_bytes:,} bytes while read")
    return data


def _decode_problem(data: bytes, error: Exception) -> str:
    from .sources import check_image

    return (
        check_image(data)
        or f"cannot decode image ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    )


def encode_images(
    model, images: Sequence[bytes | None], device, image_size: int, precision: str, *, convert: bool = True
):
    """Codes of encoded images, as evaluate computes them (``dpfah.train.encode``: decoded and
    resized on ``device``, eval mode, binarised). ``convert``: first turn images the training
    decoder would not read as PIL does into prepare's RGB PNG (files; prepared shards hold
    them converted already). Returns (int8 +1/-1 codes of the good images, good mask,
    {position: why} for the rest); a None image is skipped (its reader said why)."""
    import torch

    from dpfah.augment import decode_batch
    from dpfah.data import Batch, as_rgb_png, conversion_reason
    from dpfah.train import encode

    ok = np.zeros(len(images), dtype=bool)
    problems: dict[int, str] = {}
    ready: list[tuple[int, bytes]] = []
    for i, data in enumerate(images):
        if data is None:
            continue
        if convert:
            try:
                if conversion_reason(data) is not None:
                    data = as_rgb_png(data)
            except Exception as e:  # PIL raises many types for unreadable data
                problems[i] = _decode_problem(data, e)
                continue
        ready.append((i, data))
    good = [i for i, _ in ready]
    try:
        pixels = decode_batch([d for _, d in ready], image_size, device) if ready else None
    except Exception:  # one bad image spoils the batch: decode one by one to name it
        parts, good = [], []
        for i, data in ready:
            try:
                parts.append(decode_batch([data], image_size, device))
                good.append(i)
            except Exception as e:
                problems[i] = _decode_problem(data, e)
        pixels = torch.cat(parts) if parts else None
    if not good:
        return np.zeros((0, model.bits), np.int8), ok, problems
    n = len(good)
    batch = Batch(pixels, torch.zeros((n, 1), dtype=torch.uint8), torch.arange(n))
    codes, _, _ = encode(model, [batch], device, image_size, precision)
    ok[good] = True
    return codes, ok, problems
