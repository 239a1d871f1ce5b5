"""Image forms: which images are stored as they are, the 8-bit RGB PNG form of the others,
and decoding to a tensor on the CPU."""

from __future__ import annotations

import io

import numpy as np
import torch

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
            return (
                "GIF image: the training decoder reads all its frames and its transparency unlike PIL; "
                "its first frame is stored"
            )
        if fmt != "JPEG" and getattr(im, "is_animated", False):
            return f"animated {fmt} image: the training decoder cannot read it as PIL does; its first frame is stored"
        if fmt == "PNG" and (_png_bit_depth(data) or 8) > 8:
            return (
                "16-bit PNG: the training decoder reads 16-bit samples as white; "
                "stored with 8 bits (the high byte, as PIL reads 16-bit colour)"
            )
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
