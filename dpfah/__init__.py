"""DPFAH: deep parameter-free attention hashing for image retrieval.

The method as a library (torch + numpy only): the attention module, the network, the loss,
binary codes with Hamming search, retrieval metrics and the training loop. Nothing here
imports Ray, MLflow or DVC; the pipeline (``pipeline/``) builds on it.

The top-level names load lazily, so ``import dpfah.settings`` (what the pipeline reads at
start-up) does not pull in torch.
"""

from importlib import import_module

__all__ = ["DPFAH", "DPFAHLoss", "LossParts", "ParameterFreeAttention"]
__version__ = "0.1.0"

_HOME = {"DPFAH": "model", "DPFAHLoss": "loss", "LossParts": "loss", "ParameterFreeAttention": "attention"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
