"""DPSH: Li, Zhao, Kang, "Feature learning based deep supervised hashing with pairwise
labels", IJCAI 2016: the common ancestor of the pairwise-likelihood methods here."""

from __future__ import annotations

from .base import PairwiseMethod, Part, likelihood, quantization_gap

__all__ = ["DPSH"]


class DPSH(PairwiseMethod):
    """L = [ sum_{i, j} (log(1 + e^theta_ij) - s_ij theta_ij) + eta sum_i ||b_i - u_i||^2 ] / |pairs|

    theta_ij = <u_i, U_j> / 2 with U the memory of every training item's latest u (the paper's
    algorithm: the batch against all N items), s_ij = 1 when i and j share a label (multi-hot
    works), b_i = sign(u_i) (a constant). The paper's sum objective divided by the number of
    pairs (N * batch), as the official code (jiangqy/DPSH-pytorch) divides both terms, so
    eta keeps the paper's scale: eta = 10 for CIFAR-10 (50 for NUS-WIDE).

    Code zoo (DeepHash-pytorch) deviation not followed: it weighs the quantizer as
    alpha * mean over elements (alpha 0.1), i.e. not divided by N. ``pairs="batch"``: ordered
    pairs i != j of the global batch instead of the memory.

    State: the memory (codes, labels; zero rows count as dissimilar with theta 0).
    Data-parallel: memory replicated, written with the all-gathered batch.
    """

    name = "dpsh"
    term_weights = {"likelihood": 1.0, "quantization": "eta"}

    def parts(self, u, logits, labels, index, shard) -> dict[str, Part]:
        pairs = self.pairs(u, labels, index, shard)
        theta = pairs.theta(u)
        s = pairs.row_similar(u.dtype)
        return {"likelihood": pairs.reduce(likelihood(theta, s)), "quantization": pairs.per_pair(quantization_gap(u))}
