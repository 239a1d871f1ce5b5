"""Parameter-free attention (PFA): the closed form of SimAM's energy minimisation."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ParameterFreeAttention", "pfa"]


def pfa(x: torch.Tensor, lam: float = 1e-4) -> torch.Tensor:
    """Weight every activation of an (N, C, H, W) map by its neuron importance.

    Per sample and channel over the M = H*W positions (method notes, corrected form):
    ``inv_e = (x - mu)^2 / (4 (sigma2 + lam)) + 1/2`` with ``sigma2`` the unbiased variance,
    and the output is ``x * sigmoid(inv_e)``. For M = 1 the variance is undefined; we use
    denominator max(M - 1, 1), which gives ``inv_e = 1/2`` there (no division by zero).
    """
    if x.dim() != 4:
        raise ValueError(f"PFA expects an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    m = x.shape[2] * x.shape[3]
    d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
    sigma2 = d.sum(dim=(2, 3), keepdim=True) / max(m - 1, 1)
    inv_e = d / (4 * (sigma2 + lam)) + 0.5
    return x * torch.sigmoid(inv_e)


class ParameterFreeAttention(nn.Module):
    """PFA as a module: no parameters, no buffers, identical in train and eval mode."""

    def __init__(self, lam: float = 1e-4) -> None:
        super().__init__()
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.lam = float(lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pfa(x, self.lam)

    def extra_repr(self) -> str:
        return f"lam={self.lam:g}"
