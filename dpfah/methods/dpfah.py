"""The DPFAH objective (:class:`dpfah.loss.DPFAHLoss`) as a registry entry."""

from __future__ import annotations

from typing import Any

from ..loss import DPFAHLoss
from .base import Declared

__all__ = ["DPFAH"]


class DPFAH(Declared, DPFAHLoss):
    """:class:`~dpfah.loss.DPFAHLoss` unchanged (L1 + eta L2 + zeta L3; see its docstring),
    with the registry's declarations. Its hyper-parameters, defaults (the paper's), choices
    and bounds are DPFAHLoss's, declared there once. ``pairs``: ``batch``, ``bank`` (the
    batch against every training item seen so far) or ``memory`` (against every training
    item, unseen ones as zero rows); both need train_size.

    State: the memory with ``pairs`` bank or memory. Data-parallel: see DPFAHLoss.step.
    """

    name = "dpfah"

    def __init__(self, *, bits: int, num_classes: int, train_size: int | None = None, **params: Any) -> None:
        p = self.resolve(params, bits, num_classes, train_size)
        super().__init__(
            p["eta"], p["zeta"], p["delta"], pairs=p["pairs"], bank_size=train_size, bits=bits, num_classes=num_classes
        )
        self.hparams = p
