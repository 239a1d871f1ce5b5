"""DSDH: Li, Sun, He, Tan, "Deep supervised discrete hashing", NIPS 2017."""

from __future__ import annotations

import torch

from ..codes import binarize
from .base import PairwiseMethod, Part, broadcast_, likelihood

__all__ = ["DSDH", "dcc"]


def dcc(
    b: torch.Tensor, u: torch.Tensor, y: torch.Tensor, mu: float, nu: float, eta: float, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's alternation for the discrete codes B and the classifier W, columns = items.

    ``b`` (K, n) in {-1, +1}, ``u`` (K, n) the relaxed codes, ``y`` (C, n) the labels. Each
    iteration: the W-step W = (B B^T + (nu / mu) I)^-1 B Y^T (K, C), then the B-step by
    discrete cyclic coordinate descent, one bit (row) k at a time with the others fixed:
    B_k = sign(P_k - w_k W'^T B'), P = W Y + (eta / mu) U, W' and B' without row k, w_k row
    k of W; sign(0) = +1. Returns (B, W).
    """
    k = b.shape[0]
    eye = torch.eye(k, dtype=b.dtype, device=b.device)
    w = torch.zeros(k, y.shape[0], dtype=b.dtype, device=b.device)
    for _ in range(iterations):
        w = torch.linalg.solve(b @ b.T + (nu / mu) * eye, b @ y.T)
        p = w @ y + (eta / mu) * u
        for bit in range(k):
            rest = torch.arange(k, device=b.device) != bit
            b[bit] = binarize(p[bit] - (w[rest] @ w[bit]) @ b[rest])
    return b, w


class DSDH(PairwiseMethod):
    """Pairwise likelihood plus a linear classifier on discrete codes B, alternating B, W and
    the network. The paper's objective:

        -sum_{ij} (s_ij Psi_ij - log(1 + e^Psi_ij)) + mu sum_i ||y_i - W^T b_i||^2
        + nu ||W||_F^2 + eta sum_i ||b_i - u_i||^2,  Psi_ij = <u_i, U_j> / 2, b_i in {-1, 1}^K

    Network step (the terms that depend on u): the likelihood against the memory U of every
    training item plus the coupling eta sum_i ||b_i - u_i||^2 with b_i the item's current
    discrete code, divided by the pair count as DPSH. B and W step: :func:`dcc` over every
    training item seen, ``dcc_iter`` alternations at the start of every epoch after the first
    (the epoch's network pass has filled the memory). B starts as seeded random +-1 codes.
    mu = 1, nu = 0.1, eta = 55 (our reading of the paper; unconfirmed), dcc_iter = 10.

    Code zoo deviations not followed: its network loss drops the coupling term (B and W enter
    only through terms without a gradient, so it trains plain DPSH without quantization),
    starts B at 0 (sign(0) = 0 codes) and uses nu = 1.

    State: memory (U, labels, seen), B (one code per item) and W, all buffers.
    Data-parallel: replicated memory written with the all-gathered batch; the B/W step runs
    on every rank from the same memory and rank 0's result is broadcast.
    """

    name = "dsdh"
    term_weights = {"likelihood": 1.0, "coupling": "eta"}

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        g = torch.Generator().manual_seed(int(self.hparams["seed"]))
        start = torch.randint(0, 2, (self.train_size, self.bits), generator=g) * 2.0 - 1.0
        self.register_buffer("codes_b", start)
        self.register_buffer("classifier_w", torch.zeros(self.bits, self.num_classes))

    @torch.no_grad()
    def start_epoch(self, epoch: int) -> None:
        seen = self.memory.seen
        if epoch < 1 or not bool(seen.any()):
            return
        p = self.hparams
        b, w = dcc(
            self.codes_b[seen].double().T.contiguous(),
            self.memory.codes[seen].double().T,
            self.memory.labels[seen].double().T,
            p["mu"],
            p["nu"],
            p["eta"],
            int(p["dcc_iter"]),
        )
        self.codes_b[seen] = b.T.to(self.codes_b.dtype)
        self.classifier_w.copy_(w)
        broadcast_(self.codes_b, self.classifier_w)

    def parts(self, u, logits, labels, index, shard) -> dict[str, Part]:
        pairs = self.pairs(u, labels, index, shard)
        theta = pairs.theta(u)
        s = pairs.row_similar(u.dtype)
        b = self.codes_b[index].to(u.dtype)
        coupling = (b - u).pow(2).sum(dim=1)
        return {"likelihood": pairs.reduce(likelihood(theta, s)), "coupling": pairs.per_pair(coupling)}
