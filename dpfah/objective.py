"""What the training loop asks of a method's objective, and the data-parallel context it gets.

An objective is an ``nn.Module`` (so any state it keeps, e.g. a memory bank, is a buffer
that moves with ``.to(device)`` and is checkpointed with ``state_dict()``) with:

* ``forward(u, logits, labels, ...)``: the objective on one batch in one process, the
  reference definition (tests compare the data-parallel form with it);
* ``terms``: the names of the parts it reports each epoch (logged as ``loss_<term>``);
* ``step(u, logits, labels, index, shard) -> Step``: the data-parallel form on this rank's
  rows of a global batch. ``Step.surrogate`` is what the loop back-propagates: once DDP
  averages gradients over the ranks, they must equal the gradients of ``forward`` on the
  whole global batch. ``Step.stats`` maps each term to ``(sum, weight)`` on this rank;
  the loop adds them over steps and ranks, and the epoch's value of a term is sum / weight;
* ``total(**terms) -> float``: the objective's value from the epoch's term values, by the
  same formula as ``forward`` (the loop never weighs terms itself);
* ``start_epoch(epoch)``: called before each epoch (schedules such as HashNet's beta,
  per-epoch solvers); a no-op by default.

:class:`Shard` tells ``step`` where it runs and gathers tensors from every rank;
:class:`Memory` is the state of the objectives that pair the batch with every training item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from .hyperparameters import PAIR_SETS

__all__ = ["Memory", "PAIR_SETS", "Shard", "Step", "Objective", "check_hparams", "world"]


def check_hparams(name: str, values: dict, choices: dict, at_least: dict) -> None:
    """``ValueError`` naming the first of ``values`` (hyper-parameter -> value) of method
    ``name`` that is not among its ``choices`` or below its ``at_least`` bound."""
    for key, allowed in choices.items():
        if values.get(key) not in allowed:
            raise ValueError(f"{name}: {key}={values.get(key)!r}: choose one of {', '.join(map(str, allowed))}")
    for key, low in at_least.items():
        value = values.get(key)
        if value is not None and not value >= low:
            raise ValueError(f"{name}: {key} must be >= {low:g}, got {value!r}")


def world() -> tuple[int, int]:
    """(world_size, rank) of the current process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@dataclass(frozen=True)
class Shard:
    """This rank's place in the data-parallel group: ``world_size`` ranks with equal local
    batches of ``local_batch`` rows; rank r holds global rows r*local_batch ... ."""

    world_size: int = 1
    rank: int = 0
    local_batch: int = 0

    @property
    def offset(self) -> int:
        """Global position of this rank's first row."""
        return self.rank * self.local_batch

    @property
    def global_batch(self) -> int:
        return self.world_size * self.local_batch

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated in rank order (no gradient flows back)."""
        if self.world_size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)


class Memory(nn.Module):
    """The latest (detached) code and label vector of every training item, one row per item
    index, zero-initialised, replicated on every rank: each step writes the all-gathered
    batch before its loss (so the batch meets itself). Buffers, so they move with ``.to`` and
    are checkpointed. One mechanism, read two ways (:data:`PAIR_SETS`): every row
    (``memory``) or only the rows written so far (``bank``)."""

    def __init__(self, size: int, bits: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("codes", torch.zeros(size, bits))
        self.register_buffer("labels", torch.zeros(size, num_classes))
        self.register_buffer("seen", torch.zeros(size, dtype=torch.bool))

    def write(self, index: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor) -> None:
        self.codes[index] = codes.to(self.codes.dtype)
        self.labels[index] = labels.to(self.labels.dtype)
        self.seen[index] = True

    def columns(self, pairs: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, labels) the batch is paired with: every row for ``memory``, the rows
        written so far for ``bank``."""
        if pairs == "bank":
            return self.codes[self.seen], self.labels[self.seen]
        return self.codes, self.labels


class Step(NamedTuple):
    surrogate: torch.Tensor
    stats: dict[str, tuple[float, float]]


@runtime_checkable
class Objective(Protocol):
    terms: tuple[str, ...]

    def step(
        self, u: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, shard: Shard
    ) -> Step: ...

    def total(self, **terms: float) -> float: ...

    def start_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> object: ...
