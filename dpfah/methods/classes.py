"""The method classes by registry name (imports torch and every method's module)."""

from __future__ import annotations

from ..hyperparameters import REGISTRY
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

__all__ = ["CLASSES"]

#: name -> class, in the registry's order.
CLASSES: dict[str, type] = {cls.name: cls for cls in (DPFAH, DPSH, DSH, DHN, HashNet, DSDH, DFH, IDHN, DBDH, LCDSH)}
if list(CLASSES) != list(REGISTRY):
    raise ImportError(f"dpfah.methods: classes {list(CLASSES)} but declarations {list(REGISTRY)}")
