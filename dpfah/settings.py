"""The settings of a training, declared once: fields, types, defaults and their checks.

Two frozen dataclasses, one per part of a training besides its objective:

* :class:`TrainSettings`: how the loop trains (epochs, batch, optimiser, schedule, ...);
* :class:`ModelSettings`: the network around the code length (the backbone, PFA on/off,
  its lambda, the backbone's starting weights).

The objective is a method of :mod:`dpfah.methods`; each declares its own hyper-parameters
and their defaults (DPFAH's too).

The pipeline's ``params.yaml`` sections are these same classes (``pipeline.config`` adds
only the fields about running them: workers, GPUs, storage), so a knob, its default and its
check live here and nowhere else; ``params.yaml`` repeats the defaults for the reader, and
a test keeps the two equal. The defaults are the CPU profile (32 px, from scratch, minutes
on a laptop); ``profiles/paper.yaml`` holds the paper's values.

Each field may carry ``metadata={"check": fn}``: ``fn(value)`` returns None or what is
wrong; a float (or list of floats) must also be finite. Constructing an object runs the
checks (a ``ValueError`` naming the field); the pipeline's config loader runs them first,
to name the dotted key.

Nothing here imports torch: the pipeline reads these at start-up.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "at_least",
    "above",
    "finite",
    "checked",
    "check_fields",
    "pick",
    "TrainSettings",
    "ModelSettings",
    "OPTIMIZERS",
    "SCHEDULES",
    "PRECISIONS",
    "BACKBONES",
]

Check = Callable[[Any], "str | None"]


def finite(v: Any) -> str | None:
    """What is wrong with a float value (or a list of them) that is inf or NaN, else None.
    Every float field is checked with it: a comparison such as ``v >= 0`` lets inf through."""
    values = v if isinstance(v, (tuple, list)) else (v,)
    bad = next((x for x in values if isinstance(x, float) and not math.isfinite(x)), None)
    return None if bad is None else f"must be a finite number, got {bad!r}"


def at_least(low: float) -> Check:
    return lambda v: None if v is None or v >= low else f"must be >= {low}, got {v!r}"


def above(low: float) -> Check:
    return lambda v: None if v is None or v > low else f"must be > {low}, got {v!r}"


def checked(fn: Check, **extra: Any) -> dict[str, Any]:
    """Field metadata carrying a check (and e.g. ``noun`` for the error message of a choice)."""
    return {"check": fn, **extra}


def check_fields(obj: Any) -> None:
    """Run every field's check and every ``Literal`` choice, and refuse inf and NaN in any
    float; ``ValueError`` naming the field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if typing.get_origin(hints[f.name]) is Literal and value not in typing.get_args(hints[f.name]):
            raise ValueError(f"{f.name}={value!r}: choose one of {', '.join(map(str, typing.get_args(hints[f.name])))}")
        check = f.metadata.get("check")
        problem = finite(value) or (check(value) if check else None)
        if problem:
            raise ValueError(f"{f.name}: {problem}")


def pick(cls: type, source: Any, **changes: Any) -> Any:
    """A ``cls`` with the fields of ``cls`` taken from ``source`` (any object having them,
    e.g. a pipeline config section that extends ``cls``), then ``changes``."""
    values = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls)}
    return cls(**{**values, **changes})


OPTIMIZERS = ("rmsprop", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16")
BACKBONES = ("resnet18", "alexnet")


def _crop_scale(v: tuple[float, ...]) -> str | None:
    if len(v) != 2 or not 0 < v[0] <= v[1] <= 1:
        return f"must be [lo, hi] with 0 < lo <= hi <= 1, got {list(v)}"
    return None


@dataclass(frozen=True)
class TrainSettings:
    """How the training loop runs. Defaults: the CPU profile (params.yaml's ``train``)."""

    epochs: int = field(default=8, metadata=checked(at_least(1)))
    batch_size: int = field(default=64, metadata=checked(at_least(2)))  # global: split evenly over the ranks
    image_size: int = field(default=32, metadata=checked(at_least(8)))  # resized on the device
    optimizer: Literal["rmsprop", "adamw", "sgd"] = field(default="adamw", metadata={"noun": "optimizer"})
    lr: float = field(default=1e-3, metadata=checked(above(0)))
    weight_decay: float = field(default=1e-5, metadata=checked(at_least(0)))
    momentum: float = field(default=0.9, metadata=checked(at_least(0)))  # sgd only
    schedule: Literal["constant", "cosine", "onecycle"] = field(default="onecycle", metadata={"noun": "schedule"})
    freeze_bn: bool = False  # BN in eval mode (running statistics fixed) while training
    sync_bn: bool = True  # SyncBatchNorm across GPU ranks (ignored on CPU, where torch has none)
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata={"noun": "precision"}
    )  # auto: bf16 on a GPU
    crop_scale: tuple[float, ...] = field(default=(0.5, 1.0), metadata=checked(_crop_scale))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class ModelSettings:
    """The DPFAH network besides its code length and classes (params.yaml's ``model``)."""

    pfa: bool = True  # False: the paper's plain ResNet-18 ablation
    lam: float = field(default=1e-4, metadata=checked(above(0)))  # PFA's lambda
    backbone_weights: str | None = None  # a local torchvision state dict of the backbone (ImageNet)
    backbone: Literal["resnet18", "alexnet"] = field(default="resnet18", metadata={"noun": "backbone"})

    def __post_init__(self) -> None:
        check_fields(self)
