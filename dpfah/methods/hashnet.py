"""HashNet: Cao, Long, Wang, Yu, "HashNet: deep learning to hash by continuation", ICCV 2017."""

from __future__ import annotations

import math

import torch

from .base import PairwiseMethod, Part, likelihood

__all__ = ["HashNet", "continuation_beta"]


def continuation_beta(schedule: str, iteration: int, epoch: int, gamma: float, power: float, step_size: int) -> float:
    """The scale beta of h = tanh(beta u) at a step.

    * ``"iteration"`` (the authors' code, thuml/HashNet): beta = (1 + gamma t)^power with t
      the iteration count at the last multiple of ``step_size`` (recomputed every
      ``step_size`` iterations);
    * ``"epoch"`` (the code zoo): beta = sqrt(floor(epoch / 20) + 1), set at each epoch start.
    """
    if schedule == "iteration":
        t = iteration - iteration % step_size
        return (1.0 + gamma * t) ** power
    return math.sqrt(epoch // 20 + 1)


class HashNet(PairwiseMethod):
    """Weighted pairwise likelihood on h = tanh(beta u), beta growing (continuation):

        L = sum_{similar} c_ij l_ij / |S1| + sum_{dissimilar} l_ij / |S0|,
        l_ij = log(1 + e^{alpha <h_i, h_j>}) - s_ij alpha <h_i, h_j>

    that is, the paper's sum_{ij} w_ij l_ij / |S| with w_ij = c_ij |S| / |S1| (similar) and
    |S| / |S0| (dissimilar), |S1|, |S0| counted over the pairs of the step (global batch).
    c_ij: the label cosine y_i.y_j / (|y_i| |y_j|) on similar pairs of multi-label data
    (``label_cosine``; 1 for single-label; dissimilar pairs keep weight 1: our reading of the
    paper's multi-label weighting). alpha = 10 / K (``alpha=None``; the authors' code),
    pairs within the mini-batch (ordered i != j), beta by :func:`continuation_beta`
    (``schedule="iteration"``: gamma 0.005, power 0.5, every 200 iterations).

    Code zoo deviations not followed by default: alpha 0.1, no c_ij, beta per 20 epochs, and
    (before 2022-09-16, the version a 2022 paper ran) pairs against a memory of h over all
    training items with |S1|, |S0| counted on batch x memory. That variant matters for the
    DPFAH comparison, so it is available: ``pairs="memory", schedule="epoch", alpha=0.1,
    label_cosine=False``.

    State: ``iteration`` and ``epoch`` counters (buffers; beta is a function of them), and the
    memory with ``pairs="memory"``. Data-parallel: global-batch (or memory) pairs, the counts
    from the all-gathered labels, every rank's counters advance identically.
    """

    name = "hashnet"
    term_weights = {"similar": 1.0, "dissimilar": 1.0}

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))

    @property
    def alpha(self) -> float:
        a = self.hparams["alpha"]
        return 10.0 / self.bits if a is None else float(a)

    @property
    def beta(self) -> float:
        p = self.hparams
        return continuation_beta(
            p["schedule"], int(self.iteration), int(self.epoch), p["gamma"], p["power"], p["step_size"]
        )

    def start_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def code(self, u):
        return torch.tanh(self.beta * u)

    def parts(self, u, logits, labels, index, shard) -> dict[str, Part]:
        h = self.code(u)
        self.iteration += 1
        pairs = self.pairs(h, labels, index, shard)
        ip = self.alpha * (h @ pairs.codes.T)
        similar = pairs.similar()
        loss = likelihood(ip, similar[pairs.rows].to(u.dtype))
        if self.hparams["label_cosine"]:
            norms = labels.norm(dim=1, keepdim=True) * pairs.labels.norm(dim=1)
            cosine = (labels @ pairs.labels.T) / norms.clamp_min(torch.finfo(norms.dtype).tiny)
            loss = torch.where(similar[pairs.rows], cosine * loss, loss)
        return {"similar": pairs.reduce(loss, similar), "dissimilar": pairs.reduce(loss, ~similar)}
