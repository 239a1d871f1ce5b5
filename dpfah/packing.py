"""+1/-1 codes and their packed form.

A code is a row of +1/-1 values (``binarize`` maps 0 to +1, so codes are never ternary). A
packed code is a row of ``ceil(bits / 64)`` little-endian ``uint64`` words: bit ``j`` of the
code (+1 -> 1, -1 -> 0) is bit ``j % 64`` of word ``j // 64``; padding bits are 0 in every
code, so they never add to a distance. ``dpfah.codes`` re-exports the public names.
"""

from __future__ import annotations

import numpy as np
import torch


def words_for_bits(bits: int) -> int:
    """Number of uint64 words a packed ``bits``-bit code takes."""
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    return (bits + 63) // 64


def binarize(u):
    """sign(u) with sign(0) = +1, keeping the container (numpy or torch) and float dtype.

    Integer and boolean numpy inputs give int8 codes.
    """
    if isinstance(u, torch.Tensor):
        one = torch.ones((), dtype=u.dtype if u.is_floating_point() else torch.int8, device=u.device)
        return torch.where(u >= 0, one, -one)
    u = np.asarray(u)
    dtype = u.dtype if np.issubdtype(u.dtype, np.floating) else np.int8
    return np.where(u >= 0, 1, -1).astype(dtype, copy=False)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def pack_codes(codes) -> np.ndarray:
    """Pack +1/-1 codes of shape (n, bits) into uint64 words of shape (n, ceil(bits/64)).

    Accepts numpy arrays or torch tensors of any numeric dtype. Values must be +1 or -1
    (binarize real-valued outputs first): anything else raises, since a 0 would silently
    become a third symbol.
    """
    c = _as_numpy(codes)
    if c.ndim != 2:
        raise ValueError(f"codes must have shape (n, bits), got {c.shape}")
    n, bits = c.shape
    if bits < 1:
        raise ValueError("codes must have at least one bit")
    positive = c > 0
    if not np.all(positive | (c < 0)) or (np.issubdtype(c.dtype, np.floating) and not np.all(np.abs(c) == 1)):
        raise ValueError("codes must contain only +1 and -1 (use dpfah.codes.binarize first)")
    words = words_for_bits(bits)
    padded = np.zeros((n, words * 64), dtype=bool)
    padded[:, :bits] = positive
    packed_bytes = np.packbits(padded, axis=1, bitorder="little")  # (n, words * 8)
    return np.ascontiguousarray(packed_bytes).view("<u8").astype(np.uint64, copy=False).reshape(n, words)


def unpack_codes(packed, bits: int) -> np.ndarray:
    """Inverse of ``pack_codes``: int8 +1/-1 codes of shape (n, bits)."""
    p = np.ascontiguousarray(_as_numpy(packed), dtype=np.uint64)
    if p.ndim != 2 or p.shape[1] != words_for_bits(bits):
        raise ValueError(f"packed codes of {bits} bits must have shape (n, {words_for_bits(bits)}), got {p.shape}")
    as_bytes = p.astype("<u8", copy=False).view(np.uint8).reshape(p.shape[0], -1)
    bits01 = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
    return (bits01.astype(np.int8) * 2 - 1).astype(np.int8)


def as_packed(x, name: str) -> np.ndarray:
    """Packed codes as a C-contiguous (n, words) uint64 array (int64 is taken bit for bit)."""
    a = _as_numpy(x)
    if a.dtype == np.int64:
        a = a.view(np.uint64)
    elif a.dtype != np.uint64:
        raise TypeError(f"{name}: packed codes must be uint64 (or int64) words from pack_codes, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name}: packed codes must be 2-D (n, words), got shape {a.shape}")
    if a.shape[1] < 1:
        raise ValueError(f"{name}: packed codes need at least one word per code, got shape {a.shape}")
    return np.ascontiguousarray(a)


def check_packed(query_packed, db_packed) -> tuple[np.ndarray, np.ndarray]:
    q = as_packed(query_packed, "query_packed")
    d = as_packed(db_packed, "db_packed")
    if q.shape[1] != d.shape[1]:
        raise ValueError(
            f"query and database codes differ in length: {q.shape[1]} vs {d.shape[1]} words "
            f"(shapes {q.shape} and {d.shape})"
        )
    return q, d
