"""The hashing methods: DPFAH and the comparison methods of the paper's Table 6, one module
each, every one an objective for :func:`dpfah.train.fit` (the :mod:`dpfah.objective`
protocol) on any network of :mod:`dpfah.model` (ResNet-18 or AlexNet, PFA on or off).

The registry is :data:`dpfah.hyperparameters.REGISTRY` (torch-free: ``names()`` and
``declared(name)`` import no torch): each method's ``defaults`` (hyper-parameter -> default),
``tunable`` (the names worth searching), ``choices`` (categorical values) and ``at_least``
(bounds). ``get(name)`` gives the class (importing its module), which also has ``terms`` (the
reported parts) and ``needs_train_size(params)``; ``build(name, params, bits=...,
num_classes=..., train_size=...)`` makes one (``params``: a mapping of hyper-parameters, or
an object whose attributes named like them are taken). Each class's docstring gives the
formula implemented, its defaults, where the popular code zoo (DeepHash-pytorch) differs and
which was followed, its state and its data-parallel decomposition.
"""

from __future__ import annotations

from typing import Any

from ..hyperparameters import REGISTRY, Declaration

__all__ = ["Declaration", "Declared", "Method", "build", "declared", "get", "names"]


def names() -> tuple[str, ...]:
    """The registry names, in its order (DPFAH first, then the paper's Table 6); no torch."""
    return tuple(REGISTRY)


def declared(name: str) -> Declaration:
    """The declaration of method ``name`` (case-insensitive): its hyper-parameters, without torch."""
    try:
        return REGISTRY[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(REGISTRY)}") from None


def get(name: str) -> type:
    """The method class registered as ``name`` (case-insensitive; its module imported now)."""
    declared(name)  # the error for an unknown name
    from .classes import CLASSES

    return CLASSES[str(name).lower()]


def build(name: str, params: Any = None, *, bits: int, num_classes: int, train_size: int | None = None):
    """The objective of method ``name`` with ``params`` over its defaults."""
    return get(name).from_settings(params, bits=bits, num_classes=num_classes, train_size=train_size)


def __getattr__(name: str) -> Any:
    """``Declared`` and ``Method`` (the bases, with torch) on first use."""
    if name in ("Declared", "Method"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
