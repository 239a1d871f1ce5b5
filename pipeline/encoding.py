"""Images to codes with a loaded model, as evaluate computes them: index encodes a
collection's blocks with it, search its query images (the same device type and precision as
the index, so a query and its copy in the index get the same code)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["encode_images"]


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
