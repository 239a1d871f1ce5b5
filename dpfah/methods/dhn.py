"""DHN: Zhu, Long, Wang, Cao, "Deep hashing network for efficient similarity retrieval", AAAI 2016."""

from __future__ import annotations

import math

import torch

from .base import PairwiseMethod, Part, likelihood

__all__ = ["DHN"]


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)), stable for large |x|: |x| + log1p(e^{-2|x|}) - log 2."""
    a = x.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)


class DHN(PairwiseMethod):
    """Pairwise cross-entropy plus a pairwise quantization loss with L1 smoothed by log cosh:

        L = [ sum_{pairs} (log(1 + e^{<z_i, z_j>}) - s_ij <z_i, z_j>)
              + lam sum_i sum_k log cosh(|z_ik| - 1) ] / |pairs|

    z = tanh(u) (the paper's fch layer has a tanh activation; the network here outputs u, so
    the tanh is in the objective), pairs within the mini-batch (ordered i != j), s_ij = share
    a label. The paper cross-validates lam over 1e-5 ... 100 and prints no single value:
    the default 0.1 is the code zoo's, tunable. Divided by the pair count as DPSH.

    Code zoo deviations not followed: no tanh, theta = <u_i, U_j> / 2 against a memory (the
    DPSH likelihood), the quantizer as a mean over elements. ``pairs="memory"`` gives the
    memory pairs (memory of z).

    State: none (the memory with ``pairs="memory"``). Data-parallel: global-batch pairs.
    """

    name = "dhn"
    term_weights = {"likelihood": 1.0, "quantization": "lam"}

    def code(self, u):
        return torch.tanh(u)

    def parts(self, u, logits, labels, index, shard) -> dict[str, Part]:
        z = self.code(u)
        pairs = self.pairs(z, labels, index, shard)
        theta = z @ pairs.codes.T
        s = pairs.row_similar(u.dtype)
        quantization = log_cosh(z.abs() - 1).sum(dim=1)
        return {"likelihood": pairs.reduce(likelihood(theta, s)), "quantization": pairs.per_pair(quantization)}
