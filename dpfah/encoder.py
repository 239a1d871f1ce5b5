"""A trained network as one callable: images in, binary codes out.

:class:`ImageEncoder` is what the pipeline logs to MLflow as the model (``pipeline.train``):
it holds the trained :class:`dpfah.model.DPFAH` network (``.net``) and the input side that
evaluation uses, so that whoever loads the model (``mlflow.pyfunc.load_model``, a REST
request to ``mlflow models serve``, an index build) gets exactly the codes the pipeline
evaluated, without the pipeline.

Input: RGB images, channels last, ``(N, H, W, 3)`` (what ``numpy.asarray`` of a PIL image
gives, stacked), as ``uint8`` or any integer type holding values 0..255; they are resized
(bilinear, antialiased) to the network's ``image_size`` and normalised with the ImageNet
statistics, as evaluation does (the codes are bit for bit those of evaluation's resize).
Output: ``int8`` codes ``(N, bits)`` in {-1, +1} (sign of the hash layer, sign(0) = +1), one
row per image, bit j in column j. :func:`dpfah.codes.pack_codes` packs them into
``ceil(bits / 64)`` ``uint64`` words per image (bit j of the code in bit j % 64 of word
j // 64, set for +1): the form the evaluation's ``codes/*.parquet`` and the Hamming search use.

Refused, each with one sentence that says what was expected
(:meth:`ImageEncoder.check_images`): no images; an array that is not ``(N, H, W, 3)``;
floating-point values (floats in 0..1 read as 0..255 would be a black image: scale by 255
and round first); integers outside 0..255; an image over ``max_image_pixels`` pixels or
with a side over ``max_image_side``; a request over ``max_request_pixels`` pixels in all
(N * H * W). The limits are attributes of the encoder (so of the logged model; train logs
them as its tags too), checked before any pixel is converted; :data:`MAX_IMAGE_PIXELS`,
:data:`MAX_IMAGE_SIDE` and :data:`MAX_REQUEST_PIXELS` are the defaults, and what an encoder
pickled before the limits existed gets. The resize holds one image at a time and, on the
CPU, a float copy of at most ``_STRIP_VALUES`` values of it (a strip of rows), never a float
copy of the whole image or request.

Serving (``mlflow models serve``, MLflow 3.17): ``POST /invocations`` with
``{"inputs": [image, ...]}``, each image a list of H rows of W ``[r, g, b]`` integers. The
logged signature has outputs only, on purpose: with an input schema MLflow casts the JSON
numbers to its dtype before the model sees them (floats in 0..1 became 0, a black image,
answered 200) and answers an empty list or a 2-D array with its own message, which echoes
the input. A refusal here is a 400 ``INVALID_PARAMETER_VALUE`` whose ``message`` is the one
sentence (MLflow's server would otherwise prefix "Failed to predict data '<the input>'").
What stays MLflow's: an empty list and images of different sizes never reach the model.
``{"inputs": []}`` is a 400 "Encountered an unexpected error while evaluating the model"
with a stack trace (its PyTorch wrapper refuses the list MLflow makes of it); images of
different sizes fail in its JSON parse, a 400 in numpy's words ("inhomogeneous shape"):
send them one per request, or resized to one size. Its server has no 413 and no limit on
the body size, and parses the whole body (reported: 2.7 s for one 1024 x 1024 image, 7.3 GB
of server memory for a 4000 x 4000 one, about 0.45 GB a megapixel) before the model checks
the limits: bound the body in a proxy in front (JSON takes about 16 bytes a pixel, so
``client_max_body_size 80m`` in nginx for the default request limit) and the time with
``mlflow models serve -t`` (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, 60 s by default: it
answers 504 but the request's thread runs on).

A refusal is a ``ValueError``, and also an instance of ``refusal_base`` when the encoder has
one: ``pipeline.train`` logs it with MLflow's ``MlflowException`` and INVALID_PARAMETER_VALUE
(a 400 in the scoring server), pickled by reference, so that this module imports nothing of
MLflow (torch and torchvision only, like the rest of ``dpfah``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .augment import DeviceAugment, resize_uint8
from .codes import binarize
from .model import DPFAH

__all__ = ["ImageEncoder", "MAX_IMAGE_PIXELS", "MAX_IMAGE_SIDE", "MAX_REQUEST_PIXELS"]

#: Pixels (H * W) one image may have: a 2048 x 2048 image, 4.2 MP. The network sees
#: ``image_size`` pixels a side (224 in the paper's profile), so larger images only cost the
#: server (MLflow's JSON parse takes about 0.45 GB and 2.7 s a megapixel, see the module):
#: at the limit a request parses in about 11 s, well inside the server's 60 s default.
MAX_IMAGE_PIXELS = 2048 * 2048
#: Longest side an image may have: bounds the resize's intermediate (H x image_size floats).
MAX_IMAGE_SIDE = 8192
#: Pixels one request may carry in all (N * H * W): one image at MAX_IMAGE_PIXELS, or e.g.
#: 83 images of 224 x 224; about 2 GB of MLflow's parsing and 70 MB of JSON.
MAX_REQUEST_PIXELS = 2048 * 2048
#: Float values per strip of rows in the CPU resize's first (horizontal) pass: 8 MB.
_STRIP_VALUES = 1 << 21


@functools.cache
def _refusal_class(base: type[Exception] | None) -> type[ValueError]:
    """ValueError, or a subclass of ``base`` and ValueError whose ``message`` stays the
    sentence it was made with: MLflow 3.17's scoring server rewrites a model's
    MlflowException message to "Failed to predict data '<the whole input>'. Error: ...",
    which would echo the images back."""
    if base is None:
        return ValueError

    class ImageInputError(base, ValueError):
        def __init__(self, sentence: str, **kwargs) -> None:
            self._sentence = sentence
            super().__init__(sentence, **kwargs)

        @property
        def message(self) -> str:
            return self._sentence

        @message.setter
        def message(self, value: str) -> None:
            pass  # keep the sentence (see above)

    return ImageInputError


class ImageEncoder(nn.Module):
    """``forward(images (N, H, W, 3) of integers 0..255) -> codes int8 (N, bits)`` in
    {-1, +1}; the network in fp32, in eval mode. ``net``: the DPFAH network; ``image_size``:
    the side it was trained at (every image is resized to it); the limits: see the module."""

    # class-level defaults: an encoder pickled before these attributes existed loads with them
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_image_side: int = MAX_IMAGE_SIDE
    max_request_pixels: int = MAX_REQUEST_PIXELS
    #: what a refusal also is, and the keyword arguments it is made with (see the module)
    refusal_base: type[Exception] | None = None
    refusal_kwargs: dict | None = None

    def __init__(
        self,
        net: DPFAH,
        image_size: int,
        *,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_image_side: int = MAX_IMAGE_SIDE,
        max_request_pixels: int = MAX_REQUEST_PIXELS,
        refusal_base: type[Exception] | None = None,
        refusal_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if min(max_image_pixels, max_image_side, max_request_pixels) < 1:
            raise ValueError(
                f"the limits must be >= 1, got {max_image_pixels=}, {max_image_side=}, {max_request_pixels=}"
            )
        self.net = net.eval()
        self.image_size = int(image_size)
        self.max_image_pixels = int(max_image_pixels)
        self.max_image_side = int(max_image_side)
        self.max_request_pixels = int(max_request_pixels)
        self.refusal_base, self.refusal_kwargs = refusal_base, refusal_kwargs
        self._normalize = DeviceAugment()

    @property
    def bits(self) -> int:
        return self.net.bits

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def limits(self) -> dict[str, int]:
        return {
            "max_image_pixels": self.max_image_pixels,
            "max_image_side": self.max_image_side,
            "max_request_pixels": self.max_request_pixels,
        }

    def _refuse(self, sentence: str) -> ValueError:
        return _refusal_class(self.refusal_base)(sentence, **(self.refusal_kwargs or {}))

    def check_images(self, images) -> torch.Tensor:
        """``images`` as a uint8 (N, H, W, 3) tensor, or a refusal (a ValueError, see the
        module) that says in one sentence what was expected. Shape, type and limits are
        checked before any pixel is read; the values (0..255) before any is converted."""
        images = torch.as_tensor(images)
        shape = tuple(images.shape)
        expected = "expected RGB images as an array (N, H, W, 3) of integers 0..255 (uint8)"
        if (images.dim() <= 1 and images.numel() == 0) or (images.dim() > 1 and shape[0] == 0):
            raise self._refuse(f"The request holds no images: {expected}, with N >= 1.")
        if images.dim() != 4 or shape[-1] != 3:
            raise self._refuse(
                f"Got an array of shape {shape}: {expected} (send a single image as a list of one image)."
            )
        if images.is_floating_point() or images.is_complex() or images.dtype == torch.bool:
            raise self._refuse(
                f"Got {str(images.dtype).replace('torch.', '')} values: {expected}; floats in 0..1 must be multiplied by 255 and rounded first."
            )
        n, h, w, _ = shape
        if h * w == 0:
            raise self._refuse(f"Got images of {h} x {w} pixels: {expected}, with H and W >= 1.")
        if h * w > self.max_image_pixels or max(h, w) > self.max_image_side:
            raise self._refuse(
                f"Images of {h} x {w} = {h * w} pixels are over this model's limit of {self.max_image_pixels} pixels "
                f"and {self.max_image_side} a side per image: scale them down before sending."
            )
        if n * h * w > self.max_request_pixels:
            raise self._refuse(
                f"{n} images of {h} x {w} are {n * h * w} pixels in all, over this model's limit of "
                f"{self.max_request_pixels} pixels per request: send fewer images per request."
            )
        if images.dtype != torch.uint8:
            low, high = int(images.min()), int(images.max())
            if low < 0 or high > 255:
                raise self._refuse(f"Got values from {low} to {high}: {expected}.")
            images = images.to(torch.uint8)
        return images

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (1, 3, H, W) -> uint8 (1, 3, S, S), bit for bit :func:`resize_uint8`. On the
        CPU in two passes, as torch's antialiased resize does them (rows, then columns), the
        first a strip of rows at a time: float copies of at most ``_STRIP_VALUES`` values of
        the image and of (H, S) for the second pass."""
        size = self.image_size
        if image.device.type != "cpu" or image.shape[-2:] == (size, size):
            return resize_uint8(image.contiguous(), size)
        height, width = image.shape[-2:]
        rows = max(1, _STRIP_VALUES // (3 * width))
        half = torch.empty((1, 3, height, size), dtype=torch.float32)
        for top in range(0, height, rows):
            strip = image[..., top : top + rows, :].to(torch.float32, memory_format=torch.contiguous_format)
            half[..., top : top + rows, :] = F.interpolate(
                strip, size=(strip.shape[-2], size), mode="bilinear", antialias=True, align_corners=False
            )
        x = F.interpolate(half, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.round_().clamp_(0, 255).to(torch.uint8)

    def preprocess(self, images) -> torch.Tensor:
        """Images (N, H, W, 3), checked (:meth:`check_images`) -> the network's float input
        (N, 3, image_size, image_size), resized one image at a time."""
        images = self.check_images(images)
        device = next(self.net.parameters()).device
        size = self.image_size
        resized = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8, device=device)
        for i, image in enumerate(images):
            resized[i] = self._resize(image.to(device).permute(2, 0, 1)[None])[0]
        return self._normalize(resized, train=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        was_training = self.net.training
        self.net.eval()
        try:
            u, _ = self.net(self.preprocess(images))
        finally:
            self.net.train(was_training)
        return binarize(u.float()).to(torch.int8)
