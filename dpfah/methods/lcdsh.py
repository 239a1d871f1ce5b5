"""LCDSH: Zhu, Gao, "Locality-constrained deep supervised hashing for image retrieval", IJCAI 2017."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..codes import binarize
from .base import PairwiseMethod, Part

__all__ = ["LCDSH"]


class LCDSH(PairwiseMethod):
    """The posterior of pairwise labels, with the feature-based similarity constrained to the
    code-based one instead of a quantization loss:

        L = mean_{pairs} log(1 + e^{-s_ij theta_ij}) + lam mean_{pairs} (sigma(theta_ij) - sigma(phi_ij))^2

    s_ij = +1 (share a label) or -1, theta_ij = <u_i, u_j> / 2, phi_ij = <b_i, b_j> / 2 with
    b = sign(u) a constant, lam = 3, pairs within the mini-batch (ordered i != j). The paper's
    equations were not reachable; this is the code zoo's form.

    Code zoo deviations not followed: it includes the self-pairs i = j and clamps theta to
    +-50 (not needed: the softplus here is stable).

    State: none (the memory with ``pairs="memory"``). Data-parallel: global-batch pairs.
    """

    name = "lcdsh"
    term_weights = {"likelihood": 1.0, "locality": "lam"}

    def parts(self, u, logits, labels, index, shard) -> dict[str, Part]:
        pairs = self.pairs(u, labels, index, shard)
        theta = pairs.theta(u)
        phi = 0.5 * (binarize(u.detach()) @ binarize(pairs.codes).T)
        sign = 2 * pairs.row_similar(u.dtype) - 1
        nll = F.softplus(-sign * theta)
        locality = (torch.sigmoid(theta) - torch.sigmoid(phi)).pow(2)
        return {"likelihood": pairs.reduce(nll), "locality": pairs.reduce(locality)}
