"""A trained network as one callable: images in, binary codes out.

:class:`ImageEncoder` is what the pipeline logs to MLflow as the model (``pipeline.train``):
it holds the trained :class:`dpfah.model.DPFAH` network (``.net``) and the input side that
evaluation uses, so that whoever loads the model (``mlflow.pyfunc.load_model``, a REST
request to ``mlflow models serve``, an index build) gets exactly the codes the pipeline
evaluated, without the pipeline.

Input: ``uint8`` RGB images, channels last, ``(N, H, W, 3)`` (what ``numpy.asarray`` of a
PIL image gives, stacked), any H and W; they are resized (bilinear, antialiased) to the
network's ``image_size`` and normalised with the ImageNet statistics, as evaluation does.
Output: ``int8`` codes ``(N, bits)`` in {-1, +1} (sign of the hash layer, sign(0) = +1), one
row per image, bit j in column j. :func:`dpfah.codes.pack_codes` packs them into
``ceil(bits / 64)`` ``uint64`` words per image (bit j of the code in bit j % 64 of word
j // 64, set for +1): the form the evaluation's ``codes/*.parquet`` and the Hamming search use.

Floating-point input is taken as 0..255 pixel values (rounded, clipped), so a pandas
DataFrame, which MLflow's pyfunc turns into float32, gives the same codes.

Torch and torchvision only (like the rest of ``dpfah``): no MLflow here.
"""

from __future__ import annotations

import torch
from torch import nn

from .augment import DeviceAugment, resize_uint8
from .codes import binarize
from .model import DPFAH

__all__ = ["ImageEncoder"]


class ImageEncoder(nn.Module):
    """``forward(images uint8 (N, H, W, 3)) -> codes int8 (N, bits)`` in {-1, +1}; the
    network in fp32, in eval mode. ``net``: the DPFAH network; ``image_size``: the side it
    was trained at (every image is resized to it)."""

    def __init__(self, net: DPFAH, image_size: int) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.net = net.eval()
        self.image_size = int(image_size)
        self._normalize = DeviceAugment()

    @property
    def bits(self) -> int:
        return self.net.bits

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> the network's float input (N, 3, image_size, image_size)."""
        images = torch.as_tensor(images)
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected RGB images as uint8 of shape (N, H, W, 3) (channels last), got shape {tuple(images.shape)} of {images.dtype}"
            )
        if images.is_floating_point():
            images = images.round().clamp(0, 255)
        elif images.dtype != torch.uint8:
            images = images.clamp(0, 255)
        device = next(self.net.parameters()).device
        x = images.to(device=device, dtype=torch.uint8).permute(0, 3, 1, 2).contiguous()
        return self._normalize(resize_uint8(x, self.image_size), train=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        was_training = self.net.training
        self.net.eval()
        try:
            u, _ = self.net(self.preprocess(images))
        finally:
            self.net.train(was_training)
        return binarize(u.float()).to(torch.int8)
