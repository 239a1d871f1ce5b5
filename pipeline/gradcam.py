"""Grad-CAM heat maps of the hashing output, with and without PFA (the paper's Fig. 3), for the
report: the ``grad-cam`` package on the hash layer u, target the image's own code sign(u)·u, at the
deepest trunk stage whose map is at least MIN_SIDE pixels wide. Why so: docs/report.md (Grad-CAM)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .artifacts import DEFAULT_METHOD
from .config import Params
from .errors import PipelineError

__all__ = [
    "N_IMAGES",
    "MIN_SIDE",
    "code_output",
    "OwnCode",
    "cam_layer",
    "heat_maps",
    "pick_methods",
    "first_of_classes",
    "Pair",
    "compute",
]

N_IMAGES = 6  # query images in the figure (the first of as many distinct classes)
MIN_SIDE = 4  # the smallest side of the target layer's map

#: The preferred models of each column, before any other method with (without) PFA.
WITHOUT_PFA = ("resnet18",)
WITH_PFA = (DEFAULT_METHOD, "resnet18-pfa")


def code_output(net):
    """The network with one output, the hash layer's u (N, bits): what ``BaseCAM`` needs.
    (Built here: torch is imported only when a figure is drawn, not when the report
    merely says why it is not.)"""
    from torch import nn

    class CodeOutput(nn.Module):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[0]

    return CodeOutput(net)


class OwnCode:
    """Grad-CAM target of one sample's u (bits,): f(u) = sign(u)·u, sign(0) = +1, the sign
    detached, i.e. the image's own code; d f / d u = sign(u)."""

    def __call__(self, u):
        from dpfah.codes import binarize

        return (binarize(u).detach() * u).sum()


@contextmanager
def _one_thread():
    """torch on one intra-op thread: a few images do not need more, and on a busy machine
    torch's spinning threads made one ResNet-18 forward and backward pass of three 32 px
    images take 3 s instead of 0.1 (2 loaded cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _candidates(net) -> list[tuple[str, Any]]:
    """The trunk's stages after the stem (ResNet-18: layer1..layer4; AlexNet: its
    convolutions and ReLUs), pooling layers left out."""
    from torch import nn

    pools = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    names = {"resnet18": ["layer1", "layer2", "layer3", "layer4"]}.get(getattr(net, "backbone", ""), None)
    out = []
    for i, module in enumerate(net.layers):
        if not isinstance(module, pools):
            out.append((names[i] if names and i < len(names) else f"layers[{i}]", module))
    return out


def cam_layer(net, image_size: int) -> tuple[str, Any, int]:
    """(name, module, side of its output map) of the deepest stage whose map is at least
    :data:`MIN_SIDE` on a side at ``image_size`` (else the stage with the largest map)."""
    import torch

    sides: dict[int, int] = {}
    stages = _candidates(net)
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, i=i: sides.__setitem__(i, min(out.shape[-2:])))
        for i, (_, m) in enumerate(stages)
    ]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad(), _one_thread():
            net(torch.zeros(1, 3, image_size, image_size, device=next(net.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    wide = [i for i in sides if sides[i] >= MIN_SIDE]
    i = max(wide) if wide else max(sides, key=lambda j: (sides[j], -j))
    return stages[i][0], stages[i][1], sides[i]


def heat_maps(net, images, layer) -> np.ndarray:
    """Grad-CAM (the package's ``GradCAM``) of :class:`OwnCode` at ``layer`` for each of the
    normalised ``images`` (N, 3, H, W): float32 (N, H, W), each scaled to [0, 1]."""
    import torch
    from pytorch_grad_cam import GradCAM

    was_training = net.training
    try:
        with torch.enable_grad(), _one_thread(), GradCAM(model=code_output(net), target_layers=[layer]) as cam:
            return cam(input_tensor=images, targets=[OwnCode() for _ in range(len(images))])
    finally:
        net.train(was_training)


def pick_methods(params: Params) -> tuple[str, str] | str:
    """(a method without PFA, one with PFA) of train.methods, each network as params.yaml
    builds it (``variant_model``): resnet18 else any without; dpfah, else resnet18-pfa, else
    any with. A sentence saying what is missing when there is no such pair."""
    methods = list(params.train.methods)
    pfa = {m: params.variant_model(m).pfa for m in methods}
    without = [m for m in (*WITHOUT_PFA, *methods) if m in pfa and not pfa[m]]
    with_ = [m for m in (*WITH_PFA, *methods) if m in pfa and pfa[m]]
    if without and with_:
        return without[0], with_[0]
    lacking = " and ".join(
        k
        for k, found in (("a method without PFA (e.g. resnet18)", without), ("a method with PFA (e.g. dpfah)", with_))
        if not found
    )
    return f"train.methods ({', '.join(methods)}) lacks {lacking}"


def first_of_classes(labels: np.ndarray, n: int = N_IMAGES) -> np.ndarray:
    """Positions of the first query of each class (a query's class: its first label), in
    query order, up to ``n``; with fewer classes than ``n``, then the second of each, and so
    on. Fixed by the data alone (nothing is chosen on how a model does)."""
    first = np.where(labels.any(axis=1), labels.argmax(axis=1), -1) if len(labels) else np.zeros(0, np.int64)
    seen: dict[int, int] = {}
    rank = np.empty(len(first), np.int64)
    for i, c in enumerate(first.tolist()):
        rank[i] = seen.get(c, 0) + (c < 0) * len(first)  # unlabelled queries last
        seen[c] = seen.get(c, 0) + 1
    order = np.lexsort((np.arange(len(first)), rank))  # by rank within the class, then position
    return np.sort(order[:n]).astype(np.int64)


@dataclass(frozen=True)
class Pair:
    """The figure's content: the query images (uint8 (N, S, S, 3)), their class names, and
    per column (without PFA, with PFA) the method, run, target layer and heat maps (N, S, S)."""

    bits: int
    seed: int
    indices: np.ndarray
    images: np.ndarray
    names: list[str]
    methods: tuple[str, str]
    runs: tuple[str, str]
    layers: tuple[str, str]
    maps: tuple[np.ndarray, np.ndarray]
    image_size: int


def _resize(maps: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return maps if maps.shape[-1] == size else np.stack([cv2.resize(m, (size, size)) for m in maps]).astype(np.float32)


def compute(
    params: Params, dataset: str, bits: int, labels: np.ndarray, index: np.ndarray, root: str | os.PathLike = "."
) -> Pair | str:
    """Heat maps of the first query images of distinct classes (``labels``, ``index``: the
    query split's, as evaluate wrote them) under the first seed's models of
    :func:`pick_methods`; a sentence saying why not when they cannot be made (no such
    methods, no loadable model, no shards, no ``grad-cam`` package)."""
    chosen = pick_methods(params)
    if isinstance(chosen, str):
        return chosen
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError as e:
        return f"the grad-cam package does not import ({e}); pip install grad-cam (pinned in pyproject.toml)"
    import torch

    from dpfah.augment import DeviceAugment, decode_batch
    from dpfah.data import ShardError, read_samples

    from .figures import class_name
    from .registry import load_subject
    from .runkey import RunKey

    seed = min(params.train.seeds)
    cpu = torch.device("cpu")
    subjects = []
    for method, pfa in zip(chosen, (False, True)):
        try:
            subject = load_subject(params, RunKey(dataset, bits, method, seed), None, root, cpu)
        except PipelineError as e:
            return f"the model of {method} ({bits} bits, seed {seed}) could not be loaded: {e}"
        if subject.model.uses_pfa != pfa:
            trained = "with" if subject.model.uses_pfa else "without"
            return (
                f"the model of {method} (run {subject.run_id}) was trained {trained} PFA, "
                "not as params.yaml builds it now"
            )
        subjects.append(subject)
    positions = first_of_classes(labels)
    indices = index[positions]
    size = max(s.image_size for s in subjects)
    try:
        raw = read_samples(subjects[1].manifest, "query", indices)
    except ShardError as e:
        return f"the query images could not be read: {e}"
    shown = decode_batch([raw[int(i)] for i in indices], size)  # uint8 (N, 3, S, S), as evaluation decodes them
    maps, layers = [], []
    for s in subjects:
        pixels = shown if s.image_size == size else decode_batch([raw[int(i)] for i in indices], s.image_size)
        name, layer, side = cam_layer(s.model, s.image_size)
        maps.append(_resize(heat_maps(s.model, DeviceAugment()(pixels, train=False), layer), size))
        layers.append(f"{name} ({side}x{side})")
    names = [class_name(labels[p], subjects[1].manifest.classes) for p in positions]
    return Pair(
        bits,
        seed,
        indices,
        shown.permute(0, 2, 3, 1).numpy(),
        names,
        chosen,
        (subjects[0].run_id, subjects[1].run_id),
        tuple(layers),
        tuple(maps),
        size,
    )
