"""DFH: Li, Pei, Zha, van Gemert, "Push for quantization: deep Fisher hashing", BMVC 2019."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..codes import binarize
from .base import PairwiseMethod, Part, broadcast_, sample_part

__all__ = ["DFH", "center_step"]


def center_objective(v: torch.Tensor, y: torch.Tensor, b: torch.Tensor, vul: float, nta: float) -> torch.Tensor:
    """J(V) = mean (V y_i - b_i)^2 + vul mean (V^T V - K (2I - 11^T))^2 + nta mean (V - sign V)^2
    over the batch's labels ``y`` (n, C) and codes ``b`` (n, K); V is (K, C), sign V a constant."""
    k, c = v.shape
    target = k * (2 * torch.eye(c, dtype=v.dtype, device=v.device) - 1)
    return (
        (y @ v.T - b).pow(2).mean()
        + vul * (v.T @ v - target).pow(2).mean()
        + nta * (v - binarize(v.detach())).pow(2).mean()
    )


def center_step(
    v: torch.Tensor, y: torch.Tensor, b: torch.Tensor, *, vul: float, nta: float, steps: int, lr: float, milestones
) -> torch.Tensor:
    """``steps`` plain gradient-descent steps on J (:func:`center_objective`) from ``v``, the
    learning rate times 0.1 at each milestone; returns the new V."""
    v = v.detach().clone()
    rate = lr
    for t in range(steps):
        if t in milestones:
            rate *= 0.1
        with torch.enable_grad():
            leaf = v.requires_grad_(True)
            (grad,) = torch.autograd.grad(center_objective(leaf, y, b, vul, nta), leaf)
        v = (leaf - rate * grad).detach()
    return v


class DFH(PairwiseMethod):
    """A margin in the pairwise likelihood plus Fisher-LDA-style binary class centres C:
    codes pulled to their class centre, centres pushed apart. Every step:

    1. B-step: b_i = sign(mu C y_i + u_i) for the global batch (C = sign V, K x classes);
    2. C-step: ``center_steps`` gradient-descent steps on the relaxed centres V of
       J(V) (:func:`center_objective`: fit to the codes, antipodal Gram target, binarity),
       lr 0.03, x0.1 at steps 150 and 180;
    3. network: L = mean_{pairs} [(1 - s_ij) log(1 + e^{m + theta_ij}) + s_ij log(1 + e^{m - theta_ij})]
       + eta mean_{i,k} (b_ik - u_ik)^2, theta_ij = <u_i, U_j> / 2 against the memory U.

    m = 3 (the paper introduces the margin; the authors' released Main.py runs m = 0, the
    code zoo m = 3), mu = 1 (authors' code), vul = nta = 1, eta = 0.5. The paper's own
    constants were not reachable.

    Code zoo deviations not followed: mu = 0.1; V starts at 0, so C = sign(0) = 0 in the
    first batch (here V starts seeded N(0, 0.01^2), C always +-1, sign(0) = +1); theta
    clamped to [-100, 50] (not needed: the softplus is stable).

    State: memory (U, labels) and V, buffers. Data-parallel: replicated memory; B and the
    C-step from the all-gathered batch, identically on every rank, rank 0's V broadcast.
    """

    name = "dfh"
    term_weights = {"likelihood": 1.0, "quantization": "eta"}

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        g = torch.Generator().manual_seed(int(self.hparams["seed"]))
        self.register_buffer("centers_v", 0.01 * torch.randn(self.bits, self.num_classes, generator=g))

    def parts(self, u, logits, labels, index, shard) -> dict[str, Part]:
        p = self.hparams
        pairs = self.pairs(u, labels, index, shard)
        centers = binarize(self.centers_v).to(u.dtype)
        b_all = binarize(p["mu"] * pairs.batch_labels @ centers.T + pairs.batch_codes)
        with torch.no_grad():
            v = center_step(
                self.centers_v.double(),
                pairs.batch_labels.double(),
                b_all.double(),
                vul=p["vul"],
                nta=p["nta"],
                steps=int(p["center_steps"]),
                lr=p["center_lr"],
                milestones=tuple(p["center_milestones"]),
            )
            self.centers_v.copy_(v)
            broadcast_(self.centers_v)
        theta = pairs.theta(u)
        s = pairs.row_similar(u.dtype)
        m = p["margin"]
        nll = (1 - s) * F.softplus(m + theta) + s * F.softplus(m - theta)
        b = b_all[pairs.rows]
        return {"likelihood": pairs.reduce(nll), "quantization": sample_part((b - u).pow(2), shard)}
