"""What every method of :mod:`dpfah.methods` shares: hyper-parameters with declared defaults,
the data-parallel decomposition of its terms, and the pair sets (in-batch or memory).

A method's objective is a linear combination of *terms* (``weights()``), each a sum over
pairs or samples divided by a count (a mean). A method's ``parts`` returns, per term, a
:class:`Part`: this rank's sum and the global count. :meth:`Method.step` turns them into
the loop's :class:`~dpfah.objective.Step`:

* surrogate = total of ``world_size * part.total / part.count``: after DDP averages the
  gradients over the ranks, each rank's rows get the gradient of the global-batch mean;
* stats = ``(part.total, part.local)``: summed over steps and ranks and divided, the epoch's
  value of every term.

Pairs (:class:`Pairs`) are this rank's rows against columns that are constants:

* ``"batch"``: the whole global batch (all-gathered), ordered pairs i != j. The pair terms of
  every method here are symmetric in (i, j), so the true gradient of a row is twice the
  constant-column one: :func:`double_grad` doubles it without changing the value.
* ``"memory"``: a replicated :class:`~dpfah.objective.Memory` of the latest (detached) code
  and label of every training item, zero-initialised (DPSH's U; zero rows are dissimilar,
  theta = 0), into which every rank writes the all-gathered batch before the loss, so the
  batch meets itself. ``"bank"``: the same memory, only the rows written so far (DPFAH's
  choice). Buffers: they move with ``.to``, are checkpointed by ``state_dict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..codes import binarize
from ..hyperparameters import REGISTRY
from ..loss import similarity
from ..objective import Memory, Shard, Step, check_hparams, world

__all__ = ["Declared", "Method", "PairwiseMethod", "Pairs", "Part", "double_grad", "likelihood", "broadcast_"]


class Part(NamedTuple):
    total: torch.Tensor  # this rank's sum (carries the gradient)
    count: float  # the denominator of the global-batch mean
    local: float  # this rank's share of ``count`` (for the epoch's value of the term)


def double_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` with twice its gradient: the value is exactly ``x``."""
    return x + (x - x.detach())


def likelihood(theta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood of pairwise labels s under p(s=1) = sigmoid(theta):
    log(1 + e^theta) - s theta, computed stably."""
    return F.softplus(theta) - s * theta


def broadcast_(*tensors: torch.Tensor) -> None:
    """Make rank 0's values everyone's (a no-op without a process group): for discrete steps
    whose floating-point result could differ bitwise between devices."""
    if world()[0] > 1:
        for t in tensors:
            dist.broadcast(t, 0)


def sample_part(values: torch.Tensor, shard: Shard) -> Part:
    """The mean over the global batch of per-sample ``values`` (rows = this rank's samples;
    extra dimensions are averaged too)."""
    per_sample = values[0].numel() if values.dim() > 1 else 1
    return Part(values.sum(), float(shard.global_batch * per_sample), float(values.numel()))


class Declared:
    """Hyper-parameters declared on the class, checked on construction (shared by
    :class:`Method` and the DPFAH objective's registry entry).

    Class attributes (a registered class takes all but ``name`` and ``terms`` from its entry in
    :data:`dpfah.hyperparameters.REGISTRY`, which a pipeline reads without torch):

    * ``name``: the registry name; ``defaults``: every hyper-parameter and its default (the
      paper's where it gives one, see each docstring); ``tunable``: the ones worth searching;
      ``choices``: the allowed values of the categorical ones; ``at_least``: lower bounds of
      numeric ones;
    * ``terms``: the reported parts. ``needs_train_size(params)`` says whether a training-set
      size (one state row per training item index) is needed.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]
    tunable: ClassVar[tuple[str, ...]] = ()
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    at_least: ClassVar[dict[str, float]] = {}
    terms: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A registered class (its own ``name``) takes its declaration from the registry."""
        super().__init_subclass__(**kwargs)
        declared = REGISTRY.get(cls.__dict__.get("name", ""))
        if declared is not None:
            cls.defaults, cls.tunable = declared.defaults, declared.tunable
            cls.choices, cls.at_least = declared.choices, declared.at_least

    @classmethod
    def resolve(cls, params: Mapping[str, Any], bits: int, num_classes: int, train_size: int | None) -> dict[str, Any]:
        """The defaults updated by ``params`` (a None value keeps the default); ``ValueError``
        naming what is wrong."""
        unknown = sorted(set(params) - set(cls.defaults))
        if unknown:
            raise ValueError(f"{cls.name}: unknown hyper-parameter(s) {unknown}; it has {sorted(cls.defaults)}")
        resolved = {**cls.defaults, **{k: v for k, v in params.items() if v is not None}}
        check_hparams(cls.name, resolved, cls.choices, cls.at_least)
        if bits < 1 or num_classes < 1:
            raise ValueError(f"{cls.name}: bits and num_classes must be >= 1, got {bits}, {num_classes}")
        if cls.needs_train_size(resolved) and not (train_size and train_size > 0):
            raise ValueError(f"{cls.name}: needs train_size (one state row per training item index)")
        return resolved

    @classmethod
    def needs_train_size(cls, params: Mapping[str, Any]) -> bool:
        """Whether ``params`` pair the batch with a memory (one row per training item)."""
        return params.get("pairs", "batch") != "batch"

    @classmethod
    def from_settings(cls, settings: Any = None, *, bits: int, num_classes: int, train_size: int | None = None):
        """From a mapping (every key must be a hyper-parameter of this method) or an object
        (a dataclass, a config section: the attributes named like hyper-parameters are taken);
        missing ones keep their defaults."""
        if settings is None:
            params = {}
        elif isinstance(settings, Mapping):
            params = dict(settings)
        else:
            source = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else vars(settings)
            params = {k: v for k, v in source.items() if k in cls.defaults}
        return cls(bits=bits, num_classes=num_classes, train_size=train_size, **params)


class Method(Declared, nn.Module):
    """A comparison method's objective (the :class:`~dpfah.objective.Objective` protocol),
    built with ``Method(bits=..., num_classes=..., train_size=..., **hyper_parameters)`` or
    :meth:`Declared.from_settings`. Subclasses define ``weights`` and ``parts``."""

    def __init__(self, *, bits: int, num_classes: int, train_size: int | None = None, **params: Any) -> None:
        super().__init__()
        self.hparams = self.resolve(params, bits, num_classes, train_size)
        self.bits, self.num_classes, self.train_size = int(bits), int(num_classes), train_size

    #: term -> its coefficient: a number, or the name of the hyper-parameter holding it;
    #: the terms are reported in this order.
    term_weights: ClassVar[dict[str, float | str]]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "term_weights" in cls.__dict__:
            cls.terms = tuple(cls.term_weights)

    def weights(self) -> dict[str, float]:
        """The coefficient of every term in the objective."""
        return {t: float(self.hparams[w]) if isinstance(w, str) else float(w) for t, w in self.term_weights.items()}

    def total(self, **terms: Any) -> Any:
        """The objective from its terms' values (the formula, in one place)."""
        return sum(w * terms[t] for t, w in self.weights().items())

    def parts(
        self, u: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, shard: Shard
    ) -> dict[str, Part]:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        pass

    def step(self, u: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, index: Any, shard: Shard) -> Step:
        index = torch.as_tensor(index, device=u.device).long()
        parts = self.parts(u, logits, labels.to(u.dtype), index, shard)
        scaled = {t: shard.world_size * p.total / max(p.count, 1.0) for t, p in parts.items()}
        stats = {t: (float(p.total.detach()), float(p.local)) for t, p in parts.items()}
        # The comparison methods do not use the classification logits; a zero-weighted term
        # gives their head a zero gradient, as DDP needs every parameter to take part.
        return Step(self.total(**scaled) + 0.0 * logits.sum(), stats)

    def forward(self, u: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, index: Any) -> torch.Tensor:
        """The objective of one batch in one process (updates the state as a step does)."""
        return self.step(u, logits, labels, index, Shard(1, 0, u.shape[0])).surrogate

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hparams.items())


class Pairs(NamedTuple):
    """This rank's rows against the columns; ``valid`` marks the pairs of the objective over
    the whole global batch (rows) x columns, ``rows`` selects this rank's rows of it."""

    codes: torch.Tensor  # columns (n_cols, bits), constants
    labels: torch.Tensor  # their label vectors
    batch_codes: torch.Tensor  # the whole global batch's (detached) codes
    batch_labels: torch.Tensor
    valid: torch.Tensor  # (global batch, n_cols) bool
    rows: slice
    in_batch: bool

    def similar(self) -> torch.Tensor:
        """s_ij = 1[i and j share a label], global batch x columns."""
        return similarity(self.batch_labels, self.labels)

    def theta(self, h: torch.Tensor) -> torch.Tensor:
        """DPSH's Theta_ij = <h_i, column_j> / 2 for this rank's rows ``h``."""
        return 0.5 * (h @ self.codes.T)

    def row_similar(self, dtype: torch.dtype) -> torch.Tensor:
        """s_ij for this rank's rows, as numbers."""
        return self.similar()[self.rows].to(dtype)

    def reduce(self, matrix: torch.Tensor, select: torch.Tensor | None = None) -> Part:
        """The sum of this rank's pair values ``matrix`` (local rows x columns) over the valid
        pairs (and ``select``, a global-batch x columns mask); the count is global."""
        valid = self.valid if select is None else self.valid & select
        mine = valid[self.rows]
        total = torch.where(mine, matrix, torch.zeros((), dtype=matrix.dtype, device=matrix.device)).sum()
        if self.in_batch:
            total = double_grad(total)
        return Part(total, float(valid.sum()), float(mine.sum()))

    def per_pair(self, values: torch.Tensor) -> Part:
        """A sum over this rank's samples normalised by the number of pairs (a paper's sum
        objective divided by the pair count, e.g. DPSH's quantizer over N * batch)."""
        return Part(values.sum(), float(self.valid.sum()), float(self.valid[self.rows].sum()))


class PairwiseMethod(Method):
    """A method whose main term is over pairs (in-batch or against a memory); ``code(u)``
    maps the network output to what the pairs see (tanh, softsign, ...); the memory holds it."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        if self.hparams["pairs"] != "batch":
            self.memory = Memory(self.train_size, self.bits, self.num_classes)

    def code(self, u: torch.Tensor) -> torch.Tensor:
        return u

    def pairs(self, h: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, shard: Shard) -> Pairs:
        all_h, all_labels = shard.gather(h.detach()), shard.gather(labels)
        rows = slice(shard.offset, shard.offset + h.shape[0])
        if self.hparams["pairs"] != "batch":
            self.memory.write(shard.gather(index), all_h, all_labels)
            codes, col_labels = (c.to(h.dtype) for c in self.memory.columns(self.hparams["pairs"]))
            valid = torch.ones(all_h.shape[0], codes.shape[0], dtype=torch.bool, device=h.device)
            return Pairs(codes, col_labels, all_h, all_labels, valid, rows, False)
        n = all_h.shape[0]
        if n < 2:
            raise ValueError(f"{self.name}: in-batch pairs need a global batch of at least 2")
        valid = ~torch.eye(n, dtype=torch.bool, device=h.device)
        return Pairs(all_h, all_labels, all_h, all_labels, valid, rows, True)


def quantization_gap(u: torch.Tensor) -> torch.Tensor:
    """Per sample, ||sign(u) - u||^2 with the sign a constant."""
    return (binarize(u.detach()) - u).pow(2).sum(dim=1)
