"""DBDH: Zheng, Zhang, Lu, "Deep balanced discrete hashing for image retrieval", Neurocomputing 2020."""

from __future__ import annotations

from ..codes import binarize
from .base import PairwiseMethod, Part, likelihood, sample_part

__all__ = ["DBDH"]


class DBDH(PairwiseMethod):
    """The network outputs binary codes directly: b = sign(u) forward, straight-through
    (identity) gradient backward, with the pairwise likelihood and a balance term:

        L = mean_{pairs} (log(1 + e^theta_ij) - s_ij theta_ij) + alpha mean_i |mean_k b_ik|^p

    theta_ij = <b_i, B_j> / 2 with B the memory of every training item's latest b; the
    balance term asks each code's bits to sum to zero. alpha = 0.1, p = 2 (the paper's
    constants and pair set are unchecked: only its abstract was reachable; these follow the
    code zoo, the only implementation).

    Code zoo deviation not followed: it clamps u to [-1, 1] (hard tanh, zero gradient outside)
    instead of sign with a straight-through gradient, and the memory holds the clamped u.

    State: the memory. Data-parallel: replicated memory; the balance term is per sample.
    """

    name = "dbdh"
    term_weights = {"likelihood": 1.0, "balance": "alpha"}

    def code(self, u):
        return u + (binarize(u.detach()) - u).detach()

    def parts(self, u, logits, labels, index, shard) -> dict[str, Part]:
        b = self.code(u)
        pairs = self.pairs(b, labels, index, shard)
        theta = pairs.theta(b)
        s = pairs.row_similar(u.dtype)
        balance = b.mean(dim=1).abs().pow(self.hparams["p"])
        return {"likelihood": pairs.reduce(likelihood(theta, s)), "balance": sample_part(balance, shard)}
