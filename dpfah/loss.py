"""The DPFAH objective (method notes, Eq. 15): L = L1 + eta * L2 + zeta * L3."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .hyperparameters import REGISTRY
from .objective import Memory, Shard, Step, check_hparams

__all__ = ["DPFAHLoss", "LossParts", "similarity"]

_DECLARED = REGISTRY["dpfah"]


class LossParts(NamedTuple):
    total: torch.Tensor
    l1: torch.Tensor  # pairwise likelihood
    l2: torch.Tensor  # quantisation band (unweighted)
    l3: torch.Tensor  # classification (unweighted)


def similarity(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """s_ij = 1 when label vectors i and j share at least one label, else 0."""
    return (labels_a.double() @ labels_b.double().T) > 0


class DPFAHLoss(nn.Module):
    """Pairwise likelihood + quantisation band + classification.

    * L1: mean over pairs of softplus(theta_ij) - s_ij * theta_ij, theta_ij = <u_i, u_j> / 2.
      Without a bank the pairs are the ordered pairs (i, j), i != j, of the batch. With a
      bank (``bank_u``, ``bank_labels``: the latest u and labels of every training image,
      DPSH style) the pairs are the batch against every bank entry; the bank is a constant
      (no gradient flows into it) and holds the batch's own codes too, as in DPSH.
    * L2: per sample, the sum over bits of ReLU(-delta - u) + ReLU(u - delta); mean over
      samples.
    * L3: per sample, the sigmoid cross-entropy of the logits against the label vector
      summed over classes (Eq. 14); mean over samples. Multi-hot labels work.

    Labels are 0/1 label vectors (N, classes); similar = share at least one label.
    ``forward`` returns ``LossParts(total, l1, l2, l3)`` with total = l1 + eta l2 + zeta l3.

    As the training loop's objective (:mod:`dpfah.objective`): ``pairs="batch"`` pairs every
    row of the global batch with every other; ``pairs="bank"`` keeps the memory bank as
    buffers (one row per training sample index, so ``bank_size``, ``bits`` and
    ``num_classes`` are needed) and pairs the global batch with every row seen so far.
    """

    terms = ("l1", "l2", "l3")
    #: The hyper-parameters, their defaults, choices and bounds: the registry's entry
    #: (:data:`dpfah.hyperparameters.REGISTRY`, torch-free), which says where each comes from:
    #: the paper's best weights eta = 10 and zeta = 0.1, the band delta = 1.1, in-batch pairs
    #: (``bank``: the batch against every training item seen so far, this project's memory
    #: choice for DPFAH; ``memory``: against every training item, unseen ones as zero rows).
    defaults = _DECLARED.defaults
    choices = _DECLARED.choices
    at_least = _DECLARED.at_least

    def __init__(
        self,
        eta: float | None = None,
        zeta: float | None = None,
        delta: float | None = None,
        *,
        pairs: str | None = None,
        bank_size: int | None = None,
        bits: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        """Each hyper-parameter not given (None) takes its default (:attr:`defaults`)."""
        super().__init__()
        given = {"eta": eta, "zeta": zeta, "delta": delta, "pairs": pairs}
        p = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        check_hparams("dpfah", p, self.choices, self.at_least)
        self.eta, self.zeta, self.delta = float(p["eta"]), float(p["zeta"]), float(p["delta"])
        self.pairs = p["pairs"]
        if self.pairs != "batch":
            if not bank_size or not bits or not num_classes:
                raise ValueError(
                    f"pairs={self.pairs!r} needs bank_size (one row per training sample index), bits and num_classes"
                )
            self.memory = Memory(bank_size, bits, num_classes)

    def total(self, l1, l2, l3):
        """The objective from its parts (tensors or floats): the formula, in one place."""
        return l1 + self.eta * l2 + self.zeta * l3

    def pairwise(self, u, labels, bank_u=None, bank_labels=None) -> torch.Tensor:
        if (bank_u is None) != (bank_labels is None):
            raise ValueError("bank_u and bank_labels must be given together")
        if bank_u is None:
            n = u.shape[0]
            if n < 2:
                raise ValueError("the in-batch pairwise loss needs a batch of at least 2")
            theta = 0.5 * (u @ u.T)
            s = similarity(labels, labels).to(u.dtype)
            off_diag = ~torch.eye(n, dtype=torch.bool, device=u.device)
            return (F.softplus(theta) - s * theta)[off_diag].mean()
        theta = 0.5 * (u @ bank_u.detach().to(u.dtype).T)
        s = similarity(labels, bank_labels).to(u.dtype)
        return (F.softplus(theta) - s * theta).mean()

    def quantization(self, u: torch.Tensor) -> torch.Tensor:
        return (F.relu(-self.delta - u) + F.relu(u - self.delta)).sum(dim=1).mean()

    @staticmethod
    def classification(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return ce.sum(dim=1).mean()

    def sharded(
        self,
        u: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        pair_u: torch.Tensor,
        pair_labels: torch.Tensor,
        *,
        world_size: int,
        offset: int | None,
        num_pairs: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The objective for one data-parallel shard of a global batch.

        ``u``, ``logits``, ``labels`` are this rank's rows; ``pair_u``/``pair_labels`` are the
        columns: the whole global batch gathered from every rank (``offset`` = the global
        position of this rank's first row, so self-pairs are skipped), or the memory bank
        (``offset=None``). Columns are treated as constants. ``num_pairs`` is the number of
        pairs in the whole global objective.

        Returns ``(surrogate, pair_sum, l2, l3)``. ``surrogate`` is what to back-propagate: once
        DDP averages gradients over ``world_size`` ranks, they equal the gradients of the
        single-process objective on the global batch. For in-batch pairs the columns are
        the same codes as the rows (theta is symmetric), so the constant-column gradient is
        half the true one, hence the factor 2. ``pair_sum`` is this rank's sum of
        softplus(theta) - s theta, to be summed over ranks and divided by ``num_pairs`` for
        the reported L1; ``l2`` and ``l3`` are this rank's (detached) means.
        """
        theta = 0.5 * (u @ pair_u.detach().to(u.dtype).T)
        s = similarity(labels, pair_labels).to(u.dtype)
        terms = F.softplus(theta) - s * theta
        factor = 1.0
        if offset is not None:
            rows = torch.arange(u.shape[0], device=u.device)
            terms = terms.index_put((rows, rows + offset), torch.zeros((), dtype=terms.dtype, device=terms.device))
            factor = 2.0
        pair_sum = terms.sum()
        l2 = self.quantization(u)
        l3 = self.classification(logits, labels)
        surrogate = self.total(world_size * factor * pair_sum / num_pairs, l2, l3)
        return surrogate, pair_sum.detach(), l2.detach(), l3.detach()

    def forward(self, u, logits, labels, bank_u=None, bank_labels=None) -> LossParts:
        if u.dim() != 2 or logits.dim() != 2 or labels.dim() != 2:
            raise ValueError("u, logits and labels must be 2-D (batch, ...)")
        if not (u.shape[0] == logits.shape[0] == labels.shape[0]):
            raise ValueError(f"batch sizes differ: u {u.shape[0]}, logits {logits.shape[0]}, labels {labels.shape[0]}")
        if labels.shape[1] != logits.shape[1]:
            raise ValueError(f"labels have {labels.shape[1]} classes but logits {logits.shape[1]}")
        l1 = self.pairwise(u, labels, bank_u, bank_labels)
        l2 = self.quantization(u)
        l3 = self.classification(logits, labels)
        return LossParts(self.total(l1, l2, l3), l1, l2, l3)

    def start_epoch(self, epoch: int) -> None:
        pass

    def step(
        self, u: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, shard: Shard
    ) -> Step:
        """The objective on this rank's rows of the global batch (see :meth:`sharded`).

        The columns are the global batch gathered from every rank, or, with ``bank``
        (``memory``), the rows of the memory seen so far (all of them) after the global batch
        has been written into it (so the batch meets itself, as in DPSH). ``stats``: the pair
        sum over this rank's pairs, and the rank's mean L2 and L3 (weight 1 each: the epoch
        value is their mean over steps and ranks, equal local batches)."""
        all_u = shard.gather(u.detach())
        all_labels = shard.gather(labels)
        if self.pairs != "batch":
            self.memory.write(shard.gather(torch.as_tensor(index, device=u.device).long()), all_u, all_labels)
            pair_u, pair_labels = self.memory.columns(self.pairs)
            offset, num_pairs = None, shard.global_batch * pair_u.shape[0]
        else:
            pair_u, pair_labels = all_u, all_labels
            offset, num_pairs = shard.offset, shard.global_batch * (shard.global_batch - 1)
        surrogate, pair_sum, l2, l3 = self.sharded(
            u, logits, labels, pair_u, pair_labels, world_size=shard.world_size, offset=offset, num_pairs=num_pairs
        )
        rank_pairs = num_pairs // shard.world_size
        return Step(surrogate, {"l1": (pair_sum.item(), rank_pairs), "l2": (l2.item(), 1), "l3": (l3.item(), 1)})
