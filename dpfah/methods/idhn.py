"""IDHN: Zhang, Zou, Lin, Chen, Wang, "Improved deep hashing with soft pairwise similarity for
multi-label image retrieval", IEEE TMM 2019."""

from __future__ import annotations

import torch

from .base import PairwiseMethod, Part, likelihood, sample_part

__all__ = ["IDHN", "soft_similarity"]


def soft_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The label cosine y_i.y_j / (|y_i| |y_j|) in [0, 1]; 0 where a label vector is all zero."""
    norms = a.norm(dim=1, keepdim=True) * b.norm(dim=1)
    return (a @ b.T) / norms.clamp_min(torch.finfo(norms.dtype).tiny)


class IDHN(PairwiseMethod):
    """Soft pairwise similarity: cross-entropy on hard pairs, squared error on soft ones.

        L = mean_{pairs} M_ij (log(1 + e^{p_ij}) - s_ij p_ij)
            + gamma mean_{pairs} (1 - M_ij) K ((<h_i, h_j> + K) / (2K) - s_ij)^2
            + lam mean_{i,k} | |h_ik| - 1 |

    h = softsign(u) = u / (1 + |u|) (a bounded code: the squared error's target
    (<h_i, h_j> + K) / 2K lies in [0, 1] only then), s_ij the label cosine, M_ij = 1 for hard
    pairs (s > 0.99 or s < 0.01), p_ij = (beta / K) <h_i, h_j>, beta = 5, gamma = 0.1,
    lam = 0.1, pairs within the mini-batch (ordered i != j), following the authors' code
    (pectinid16/IDHN). For single-label data every pair is hard.

    Code zoo deviations not followed: it feeds the scaled p_ij (alpha 0.5) into the squared
    error (minimiser outside [-K, K]) without the 1/(2K) normalisation, and uses a memory.

    State: none (the memory with ``pairs="memory"``). Data-parallel: global-batch pairs.
    """

    name = "idhn"
    term_weights = {"likelihood": 1.0, "soft": "gamma", "quantization": "lam"}

    def code(self, u):
        return u / (1 + u.abs())

    def parts(self, u, logits, labels, index, shard) -> dict[str, Part]:
        h, k = self.code(u), self.bits
        pairs = self.pairs(h, labels, index, shard)
        ip = h @ pairs.codes.T
        s = soft_similarity(labels, pairs.labels)
        hard = (s > 0.99) | (s < 0.01)
        cross_entropy = likelihood(self.hparams["beta"] / k * ip, s)
        squared = k * ((ip + k) / (2 * k) - s).pow(2)
        zero = torch.zeros((), dtype=u.dtype, device=u.device)
        return {
            "likelihood": pairs.reduce(torch.where(hard, cross_entropy, zero)),
            "soft": pairs.reduce(torch.where(hard, zero, squared)),
            "quantization": sample_part((h.abs() - 1).abs(), shard),
        }
