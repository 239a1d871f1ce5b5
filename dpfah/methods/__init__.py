"""The hashing methods: DPFAH and the comparison methods of the paper's Table 6, one module
each, every one an objective for :func:`dpfah.train.fit` (the :mod:`dpfah.objective`
protocol) on any network of :mod:`dpfah.model` (ResNet-18 or AlexNet, PFA on or off).

``get(name)`` gives the class; each declares ``defaults`` (hyper-parameter -> default),
``tunable`` (the names worth searching), ``choices`` (categorical values), ``terms`` (the
reported parts) and ``needs_train_size(params)``; ``build(name, params, bits=...,
num_classes=..., train_size=...)`` makes one (``params``: a mapping of hyper-parameters, or
an object whose attributes named like them are taken). Each class's docstring gives the
formula implemented, its defaults, where the popular code zoo (DeepHash-pytorch) differs and
which was followed, its state and its data-parallel decomposition.
"""

from __future__ import annotations

from typing import Any

from .base import Declared, Method
from .dbdh import DBDH
from .dfh import DFH
from .dhn import DHN
from .dpfah import DPFAH
from .dpsh import DPSH
from .dsdh import DSDH
from .dsh import DSH
from .hashnet import HashNet
from .idhn import IDHN
from .lcdsh import LCDSH

__all__ = ["METHODS", "Declared", "Method", "build", "get", "names"]

METHODS: dict[str, type] = {cls.name: cls for cls in (DPFAH, DPSH, DSH, DHN, HashNet, DSDH, DFH, IDHN, DBDH, LCDSH)}


def names() -> tuple[str, ...]:
    """The registry names, in the order above (DPFAH first, then the paper's Table 6)."""
    return tuple(METHODS)


def get(name: str) -> type:
    """The method class registered as ``name`` (case-insensitive)."""
    try:
        return METHODS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None


def build(name: str, params: Any = None, *, bits: int, num_classes: int, train_size: int | None = None):
    """The objective of method ``name`` with ``params`` over its defaults."""
    return get(name).from_settings(params, bits=bits, num_classes=num_classes, train_size=train_size)
