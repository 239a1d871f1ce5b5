"""Decoding and augmentation on the device where the model runs.

The hashing code zoos decode and resize every image with PIL in DataLoader workers, which
caps a GPU at a few thousand images per second. Here the readers hand over the original
encoded bytes; this module decodes them (nvJPEG on a GPU, libjpeg on the CPU), brings them
to one size, and augments whole batches at once with one affine warp per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

__all__ = ["decode_batch", "resize_uint8", "DeviceAugment", "sample_uniforms", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_JPEG_MAGIC = b"\xff\xd8"


def _as_byte_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).to(torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_batch(encoded: Sequence, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decode encoded images (JPEG, PNG, ...) to a uint8 batch (N, 3, size, size) on ``device``.

    Images of another size are resized (bilinear, antialiased) on the device; an image that
    is already ``size`` x ``size`` is left untouched.
    """
    device = torch.device(device)
    raw = [_as_byte_tensor(e) for e in encoded]
    if device.type == "cuda" and all(bytes(r[:2].tolist()) == _JPEG_MAGIC for r in raw):
        images = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    else:
        images = [decode_image(r, mode=ImageReadMode.RGB).to(device, non_blocking=True) for r in raw]
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=device)
    for i, img in enumerate(images):
        out[i] = resize_uint8(img[None], size)[0]
    return out


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size), bilinear with antialiasing, on their device."""
    if images.shape[-2:] == (size, size):
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_uniforms(index, seed: int, epoch: int, k: int = 4) -> torch.Tensor:
    """k uniform [0, 1) numbers per sample, a pure function of (seed, epoch, sample index).

    Augmentation drawn this way does not depend on which rank or DataLoader worker a
    sample lands on, so N workers see exactly the images one worker would.
    """
    idx = np.asarray(index, dtype=np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        stream = _splitmix64(np.uint64(seed) * np.uint64(0x100000001B3) + np.uint64(epoch))
        counter = idx * np.uint64(k) + np.arange(k, dtype=np.uint64)[None, :]
        bits = _splitmix64(counter ^ stream)
    return torch.from_numpy(((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53).astype(np.float32))


class DeviceAugment:
    """Batched training augmentation and normalisation of uint8 (N, 3, H, W) images.

    Training: a random scaled crop (area fraction in ``scale``, aspect ratio kept) and a
    horizontal flip, done as one ``affine_grid`` + ``grid_sample`` for the whole batch.
    ``rand`` (N, 4) uniforms drive it (see :func:`sample_uniforms`); fresh ones otherwise.
    Evaluation: only the normalisation. The output is float (or ``dtype``), normalised with
    the ImageNet statistics, in ``memory_format``.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.5, 1.0),
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        lo, hi = scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        self.scale = (float(lo), float(hi))
        self.flip = bool(flip)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255

    def normalize(
        self, images: torch.Tensor, dtype=torch.float32, memory_format=torch.contiguous_format
    ) -> torch.Tensor:
        x = (images.float() - self.mean.to(images.device)) / self.std.to(images.device)
        return x.to(dtype=dtype, memory_format=memory_format)

    def __call__(
        self,
        images: torch.Tensor,
        train: bool,
        rand: torch.Tensor | None = None,
        dtype=torch.float32,
        memory_format=torch.contiguous_format,
    ) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {tuple(images.shape)}")
        x = self.normalize(images)
        if train:
            n = x.shape[0]
            rand = torch.rand(n, 4) if rand is None else rand
            if rand.shape != (n, 4):
                raise ValueError(f"rand must have shape ({n}, 4), got {tuple(rand.shape)}")
            rand = rand.to(x.device)
            lo, hi = self.scale
            side = torch.sqrt(lo + (hi - lo) * rand[:, 0])  # crop side as a fraction of the image
            tx = (1 - side) * (2 * rand[:, 1] - 1)  # crop centre, kept inside the image
            ty = (1 - side) * (2 * rand[:, 2] - 1)
            mirrored = (rand[:, 3] < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool, device=x.device)
            sx = side * torch.where(mirrored, -1.0, 1.0)
            theta = torch.zeros(n, 2, 3, device=x.device)
            theta[:, 0, 0], theta[:, 0, 2] = sx, tx
            theta[:, 1, 1], theta[:, 1, 2] = side, ty
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return x.to(dtype=dtype, memory_format=memory_format)
