"""DPFAH: deep parameter-free attention hashing for image retrieval.

The method as a library (torch + numpy only): the attention module, the network, the loss,
binary codes with Hamming search, and retrieval metrics. Nothing here imports Ray, MLflow
or DVC; the pipeline (``pipeline/``) builds on it.
"""

from .attention import ParameterFreeAttention
from .loss import DPFAHLoss, LossParts
from .model import DPFAH

__all__ = ["DPFAH", "DPFAHLoss", "LossParts", "ParameterFreeAttention"]
__version__ = "0.1.0"
