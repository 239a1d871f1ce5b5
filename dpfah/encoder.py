"""A trained network as one callable: images in, binary codes out, and its files.

:class:`ImageEncoder` holds the trained :class:`dpfah.model.DPFAH` network (``.net``) and
evaluation's input side: ``(N, H, W, 3)`` integers 0..255 in (resized to ``image_size``,
normalised), ``int8`` codes ``(N, bits)`` in {-1, +1} out; bad input is refused with one
sentence (:meth:`ImageEncoder.check_images`). :meth:`ImageEncoder.save` writes it as two
files, the weights as plain tensors and the settings the network is rebuilt from, and
:meth:`ImageEncoder.load` reads them back without unpickling code. See docs/serving.md.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import DeviceAugment, resize_uint8
from .codes import binarize
from .model import DPFAH

__all__ = [
    "ImageEncoder",
    "ModelFileError",
    "FORMAT",
    "WEIGHTS_FILE",
    "SETTINGS_FILE",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "MAX_REQUEST_PIXELS",
]

#: The files of a saved encoder (:meth:`ImageEncoder.save`) and the format they record.
WEIGHTS_FILE = "weights.pt"
SETTINGS_FILE = "settings.json"
FORMAT = "dpfah-image-encoder/1"
#: The settings file's keys and their types: what the network is rebuilt from.
_SETTINGS = {
    "format": str,
    "bits": int,
    "num_classes": int,
    "image_size": int,
    "backbone": str,
    "pfa": bool,
    "lam": float,
    "max_image_pixels": int,
    "max_image_side": int,
    "max_request_pixels": int,
}


class ModelFileError(ValueError):
    """A saved encoder's file is missing, unreadable or not what :meth:`ImageEncoder.save`
    writes (a pickle of code, another network): refused, never unpickled."""


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

    def settings(self) -> dict:
        """What :meth:`load` rebuilds this encoder from (JSON: numbers, strings, booleans)."""
        pfa = self.net.attention
        return {
            "format": FORMAT,
            "bits": self.bits,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "backbone": self.net.backbone,
            "pfa": pfa is not None,
            "lam": pfa.lam if pfa is not None else 1e-4,
            **self.limits,
        }

    def save(self, folder: str | os.PathLike) -> tuple[str, str]:
        """Write ``folder/weights.pt`` (the network's state dict: tensors only) and
        ``folder/settings.json``; returns their paths."""
        os.makedirs(folder, exist_ok=True)
        weights, settings = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, SETTINGS_FILE)
        state = {key: value.detach().cpu().contiguous() for key, value in self.net.state_dict().items()}
        torch.save(state, weights)
        with open(settings, "w") as f:
            json.dump(self.settings(), f, indent=1, sort_keys=True)
        return weights, settings

    @classmethod
    def load(
        cls,
        weights: str | os.PathLike,
        settings: str | os.PathLike,
        *,
        map_location="cpu",
        refusal_base: type[Exception] | None = None,
        refusal_kwargs: dict | None = None,
    ) -> ImageEncoder:
        """The encoder :meth:`save` wrote: the network built by this code from the settings
        file, its weights read with ``torch.load(weights_only=True)`` (tensors, no code).
        Anything else is a :class:`ModelFileError` in one line naming the file."""
        config = _read_settings(os.fspath(settings))
        try:
            net = DPFAH(
                config["bits"], config["num_classes"], pfa=config["pfa"], lam=config["lam"], backbone=config["backbone"]
            )
        except ValueError as e:
            raise ModelFileError(f"{os.fspath(settings)}: {e}") from None
        path = os.fspath(weights)
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal says enough
                warnings.simplefilter("ignore")
                # read on the CPU: a device that cannot be used is an error of its own (below), never
                # mistaken for a file that is not plain tensors
                state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ModelFileError(f"{path}: no such file (the model's weights)") from None
        except Exception as e:  # a pickle of code ends here, refused unread
            found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(e))
            detail = found.group(0) if found else type(e).__name__
            raise ModelFileError(
                f"{path}: not a file of plain tensors; refused without running it (torch.load weights_only: {detail})"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelFileError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
        try:
            net.load_state_dict(state)
        except RuntimeError as e:  # "Error(s) in loading state_dict ...:", then what differs
            lines = [line.strip() for line in str(e).strip().splitlines()]
            raise ModelFileError(
                f"{path}: not the weights of the network {os.fspath(settings)} describes ({lines[-1][:200]})"
            ) from None
        limits = {key: config[key] for key in ("max_image_pixels", "max_image_side", "max_request_pixels")}
        encoder = cls(net, config["image_size"], **limits, refusal_base=refusal_base, refusal_kwargs=refusal_kwargs)
        return encoder if str(map_location) == "cpu" else encoder.to(map_location)

    def _refuse(self, sentence: str) -> ValueError:
        return _refusal_class(self.refusal_base)(sentence, **(self.refusal_kwargs or {}))

    def _as_tensor(self, images, expected: str) -> torch.Tensor:
        """A tensor of what a request holds (a served model gets the JSON's nested lists as
        they are): nested lists of unequal lengths and values that are not numbers refused."""
        if isinstance(images, torch.Tensor):
            return images
        try:
            array = np.asarray(images)
        except ValueError:  # numpy: "... inhomogeneous shape ...": images of different sizes
            raise self._refuse(
                "Got images of different sizes (nested lists of unequal lengths): images in one request must share "
                "H and W, or be sent one per request."
            ) from None
        if array.dtype.kind not in "biufc":
            what = {"U": "text", "S": "text"}.get(array.dtype.kind, "non-numeric (null, object or over 64-bit)")
            raise self._refuse(f"Got {what} values: {expected}.")
        return torch.as_tensor(array)

    def check_images(self, images) -> torch.Tensor:
        """``images`` as a uint8 (N, H, W, 3) tensor, or a refusal (a ValueError, see the
        module) that says in one sentence what was expected. Shape, type and limits are
        checked before any pixel is read; the values (0..255) before any is converted."""
        expected = "expected RGB images as an array (N, H, W, 3) of integers 0..255 (uint8)"
        images = self._as_tensor(images, expected)
        shape = tuple(images.shape)
        if (images.dim() <= 1 and images.numel() == 0) or (images.dim() > 1 and shape[0] == 0):
            raise self._refuse(f"The request holds no images: {expected}, with N >= 1.")
        if images.dim() != 4 or shape[-1] != 3:
            raise self._refuse(
                f"Got an array of shape {shape}: {expected} (send a single image as a list of one image)."
            )
        if images.is_floating_point() or images.is_complex() or images.dtype == torch.bool:
            raise self._refuse(
                f"Got {str(images.dtype).replace('torch.', '')} values: {expected}; "
                "floats in 0..1 must be multiplied by 255 and rounded first."
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


def _read_settings(path: str) -> dict:
    """The settings file, checked key by key (:data:`_SETTINGS`); one line naming it otherwise."""
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(1 << 16))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file (the model's settings)") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: unreadable model settings ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ModelFileError(f"{path}: not a {FORMAT} settings file (format {found!r})")
    if set(config) != set(_SETTINGS):
        raise ModelFileError(f"{path}: expected the keys {sorted(_SETTINGS)}, got {sorted(config)}")
    for key, kind in _SETTINGS.items():
        value = config[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = config[key] = float(value)
        wrong = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if wrong or (kind is float and not math.isfinite(value)) or (kind is int and value < 1):
            raise ModelFileError(
                f"{path}: {key} must be a {'positive ' if kind is int else ''}{kind.__name__}, got {value!r}"
            )
    return config
