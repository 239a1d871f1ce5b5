"""DSH: Liu, Wang, Shan, Chen, "Deep supervised hashing for fast image retrieval", CVPR 2016."""

from __future__ import annotations

import torch.nn.functional as F

from .base import PairwiseMethod, Part, sample_part

__all__ = ["DSH"]


class DSH(PairwiseMethod):
    """Contrastive loss on real-valued codes plus a pull of |u| toward 1 (paper, Eq. 4-5):

        L = mean_{pairs} [ 1/2 (1 - y_ij) d_ij + 1/2 y_ij max(m - d_ij, 0)
                          + alpha (|| |u_i| - 1 ||_1 + || |u_j| - 1 ||_1) ]

    d_ij = ||u_i - u_j||^2, y_ij = 1 when i and j share no label (dissimilar), m = 2K
    (``margin=None``), alpha = 0.01, pairs within the mini-batch (ordered i != j). Over the
    ordered pairs of a batch each sample is a pair member 2 (n - 1) times, so the regulariser
    is reported per sample, weight 2 alpha: the same objective.

    Code zoo deviations not followed: pairs against a memory of all training items (available
    as ``pairs="memory"``; the regulariser stays per batch sample, weight 2 alpha), alpha 0.1,
    the regulariser as a mean over elements.

    State: none (the memory with ``pairs="memory"``). Data-parallel: global-batch pairs, local
    rows against the all-gathered batch (the symmetric pair term's gradient doubled).
    """

    name = "dsh"
    term_weights = {"contrastive": 1.0, "regularizer": "alpha"}

    def weights(self):
        return {**super().weights(), "regularizer": 2.0 * self.hparams["alpha"]}  # a pair has two members

    @property
    def margin(self) -> float:
        m = self.hparams["margin"]
        return 2.0 * self.bits if m is None else float(m)

    def parts(self, u, logits, labels, index, shard) -> dict[str, Part]:
        pairs = self.pairs(u, labels, index, shard)
        cols = pairs.codes
        d = u.pow(2).sum(1, keepdim=True) + cols.pow(2).sum(1) - 2 * (u @ cols.T)
        dissimilar = (~pairs.similar()[pairs.rows]).to(u.dtype)
        contrastive = 0.5 * (1 - dissimilar) * d + 0.5 * dissimilar * F.relu(self.margin - d)
        regularizer = (u.abs() - 1).abs().sum(dim=1)
        return {"contrastive": pairs.reduce(contrastive), "regularizer": sample_part(regularizer, shard)}
