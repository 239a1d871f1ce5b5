"""The one training loop, shared by Ray Train workers, Tune trials and plain unit tests.

Nothing here knows about Ray or MLflow: the runner passes in the model, the objective, its
batches, a ``report`` function and, when it resumes, the last checkpoint state. Data
parallelism is plain ``torch.distributed``: when a process group is initialised (Ray Train
does that), the model is wrapped in DDP and the objective gets a :class:`Shard` to form its
terms over the global batch, so N workers compute what one worker would with the same
global batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .augment import DeviceAugment, decode_batch, resize_uint8, sample_uniforms
from .codes import binarize
from .data import Batch
from .metrics import mean_average_precision
from .objective import Objective, Shard, world
from .settings import TrainSettings

__all__ = [
    "Batch",
    "NonFiniteLoss",
    "TrainSettings",
    "FitResult",
    "fit",
    "encode",
    "validation_map",
    "world",
]


class NonFiniteLoss(FloatingPointError):
    """The objective became NaN or infinite; raised on every rank at the same step, before
    the step's update, so the last checkpoint is the last finite state."""

    def __init__(self, epoch: int, step: int, values: dict[str, float]):
        self.epoch, self.step, self.values = epoch, step, dict(values)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        super().__init__(
            f"the loss became non-finite at epoch {epoch}, step {step} ({shown}): training stopped "
            "(a learning rate or loss weight too large, or non-finite inputs)"
        )


def _all_finite(surrogate: torch.Tensor, stats: dict[str, tuple[float, float]], device: torch.device) -> bool:
    """Whether this step's loss is finite on every rank (one small all-reduce under a
    process group, so that every rank stops at the same step and none waits in DDP)."""
    ok = math.isfinite(float(surrogate.detach())) and all(math.isfinite(v) for v, _ in stats.values())
    if world()[0] == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@dataclass
class FitResult:
    epochs_run: int
    best_val_map: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if world()[0] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class RanksDiverged(RuntimeError):
    """Data-parallel ranks hold different weights: one of them stepped differently."""


def _check_ranks_agree(model: nn.Module, epoch: int, device: torch.device) -> None:
    """Raise :class:`RanksDiverged` on every rank when a rank's weights differ from rank 0's.

    Under DDP every rank applies the same all-reduced gradient with the same optimiser, so
    the weights stay equal; a rank with its own learning rate, schedule or optimiser state
    drifts apart while the loss still looks sane, and only rank 0's weights are saved. The
    check costs one float64 sum per parameter tensor and one all-gather per epoch; sums of
    equal tensors agree to rounding (1e-9 of their magnitude; a rank's own thread count may
    order the sum differently)."""
    size, rank = world()
    if size == 1:
        return
    params = [p.detach() for p in model.parameters()]
    digest = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in params]).to(device)
    parts = [torch.empty_like(digest) for _ in range(size)]
    dist.all_gather(parts, digest)
    scale = parts[0][:, 1].clamp_min(1e-30)
    for r, part in enumerate(parts[1:], start=1):
        off = ((part[:, 0] - parts[0][:, 0]).abs() / scale).max().item()
        if off > 1e-9:
            raise RanksDiverged(
                f"after epoch {epoch}, rank {r}'s weights differ from rank 0's by {off:.1e} of their magnitude: "
                "a rank stepped differently (its own learning rate, schedule or optimiser state)"
            )


def _snapshot(obj):
    """A detached CPU copy of a nested state (on the CPU, ``.cpu()`` alone would alias)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _build_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay, momentum=s.momentum, nesterov=True)


def _build_schedule(opt: torch.optim.Optimizer, s: TrainSettings, steps_per_epoch: int):
    total = s.epochs * steps_per_epoch
    if s.schedule == "onecycle":
        # 1cycle also cycles momentum (0.95 -> 0.85 -> 0.95) by default: kept for adamw (its
        # beta1, the usual 1cycle recipe), off for sgd and rmsprop, which keep their own
        # (train.momentum; none for the paper's RMSProp).
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=s.lr, total_steps=total, cycle_momentum=s.optimizer == "adamw"
        )
    if s.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def precision_used(precision: str, device_type: str) -> str:
    """What a ``precision`` setting (auto, fp32, bf16) encodes with on a device of this type
    (``cuda``, ``cpu``): auto is bf16 on GPUs, fp32 elsewhere."""
    return "bf16" if precision == "bf16" or (precision == "auto" and device_type == "cuda") else "fp32"


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision_used(precision, device.type) == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _to_images(batch_images, size: int, device: torch.device) -> torch.Tensor:
    """A reader's images (encoded bytes, or a uint8 batch) as uint8 (N, 3, size, size) on ``device``."""
    if isinstance(batch_images, torch.Tensor):
        return resize_uint8(batch_images.to(device, non_blocking=True), size)
    return decode_batch(batch_images, size, device)


@torch.no_grad()
def encode(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    image_size: int,
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (int8 +1/-1), labels (uint8) and indices of every sample, sorted by index.

    Under a process group each rank encodes its own part of the evaluation stream and the
    parts are gathered, so every rank returns the full, identically ordered arrays.
    """
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = net.training
    net.eval()
    augment = DeviceAugment()
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    codes, labels, index = [], [], []
    for batch in batches:
        images = augment(_to_images(batch.images, image_size, device), train=False, memory_format=memory_format)
        with _autocast(device, precision):
            u, _ = net(images)
        codes.append(binarize(u.float()).to(torch.int8).cpu().numpy())
        labels.append(np.asarray(batch.labels, dtype=np.uint8))
        index.append(np.asarray(batch.index, dtype=np.int64))
    net.train(was_training)
    bits = net.bits
    part = (
        np.concatenate(codes) if codes else np.zeros((0, bits), np.int8),
        np.concatenate(labels) if labels else np.zeros((0, net.num_classes), np.uint8),
        np.concatenate(index) if index else np.zeros(0, np.int64),
    )
    size, _ = world()
    if size > 1:
        gathered: list[Any] = [None] * size
        dist.all_gather_object(gathered, part)
        part = tuple(np.concatenate([g[i] for g in gathered]) for i in range(3))
    order = np.argsort(part[2], kind="stable")
    if len(order) > 1 and np.any(np.diff(part[2][order]) == 0):
        raise RuntimeError("the evaluation stream yielded a sample twice (duplicate index)")
    return part[0][order], part[1][order], part[2][order]


def validation_map(
    model: nn.Module,
    query_batches: Iterable[Batch],
    db_batches: Iterable[Batch],
    device: torch.device,
    image_size: int,
    precision: str = "auto",
) -> float:
    """mAP@ALL (index ties) of the validation split against the training images."""
    q_codes, q_labels, _ = encode(model, query_batches, device, image_size, precision)
    d_codes, d_labels, _ = encode(model, db_batches, device, image_size, precision)
    return float(mean_average_precision(q_codes, d_codes, q_labels, d_labels, topk=None, ties="index"))


class _Trainer:
    """The state of one fit: model (DDP-wrapped under a process group), objective,
    optimiser, schedule, and the best model so far. ``fit`` drives it epoch by epoch."""

    def __init__(
        self, s: TrainSettings, model: nn.Module, objective: nn.Module, device: torch.device, steps_per_epoch: int
    ):
        size, rank = world()
        if s.batch_size % size:
            raise ValueError(f"global batch_size {s.batch_size} is not divisible by the {size} workers")
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1 (is the training split smaller than one global batch?)")
        if not isinstance(objective, Objective):
            raise TypeError(f"{type(objective).__name__} is not an objective (see dpfah.objective)")
        self.s, self.device, self.steps_per_epoch = s, device, steps_per_epoch
        self.shard = Shard(size, rank, s.batch_size // size)
        model = model.to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            if s.sync_bn and size > 1:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = _build_optimizer(model, s)
        self.schedule = _build_schedule(self.optimizer, s, steps_per_epoch)
        self.objective = objective.to(device)
        self.start_epoch, self.best_map, self.best_epoch, self.best_model = 0, -1.0, -1, None
        self.history: list[dict[str, float]] = []
        self.augment = DeviceAugment(scale=s.crop_scale)
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.objective.load_state_dict(state["objective"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_map, self.best_epoch = float(state["best_val_map"]), int(state["best_epoch"])
        self.best_model = state.get("best_model")
        self.history = list(state.get("history", []))

    def wrap(self) -> nn.Module:
        if self.shard.world_size == 1:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def train_epoch(self, net: nn.Module, epoch: int, batches: Iterator[Batch], seed: int) -> dict[str, float]:
        """One epoch of steps; returns the epoch's loss terms, learning rate and throughput."""
        s, device, shard = self.s, self.device, self.shard
        _set_train_mode(net, s.freeze_bn)
        self.objective.start_epoch(epoch)
        sums: dict[str, list[float]] = {term: [0.0, 0.0] for term in self.objective.terms}
        seen_images = 0
        t0 = time.perf_counter()
        for step in range(self.steps_per_epoch):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(
                    f"the training stream ended after {step} of {self.steps_per_epoch} steps in epoch {epoch}"
                ) from None
            labels = torch.as_tensor(batch.labels, device=device).float()
            if labels.shape[0] != shard.local_batch:
                raise RuntimeError(f"rank {shard.rank} got a batch of {labels.shape[0]}, expected {shard.local_batch}")
            rand = sample_uniforms(batch.index, seed, epoch)
            images = self.augment(
                _to_images(batch.images, s.image_size, device), train=True, rand=rand, memory_format=self.memory_format
            )
            with _autocast(device, s.precision):
                u, logits = net(images)
            surrogate, stats = self.objective.step(u.float(), logits.float(), labels, batch.index, shard)
            if not _all_finite(surrogate, stats, device):
                raise NonFiniteLoss(epoch, step, {term: v / w if w else v for term, (v, w) in stats.items()})
            self.optimizer.zero_grad(set_to_none=True)
            surrogate.backward()
            self.optimizer.step()
            self.schedule.step()
            for term, (value, weight) in stats.items():
                sums[term][0] += value
                sums[term][1] += weight
            seen_images += labels.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        terms = list(sums)
        flat = [x for term in terms for x in sums[term]] + [seen_images]
        reduced = _all_reduce_sum(flat, device)
        values = {term: reduced[2 * i] / reduced[2 * i + 1] for i, term in enumerate(terms)}
        return {
            "epoch": epoch,
            "loss": float(self.objective.total(**values)),
            **{f"loss_{term}": value for term, value in values.items()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": reduced[-1] / elapsed if elapsed > 0 else float("nan"),
            "epoch_s": elapsed,
        }

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        """The full resumable state (taken on rank 0)."""
        return {
            "model": _snapshot(self.model.state_dict()),
            "optimizer": _snapshot(self.optimizer.state_dict()),
            "schedule": self.schedule.state_dict(),
            "objective": _snapshot(self.objective.state_dict()),
            "epoch": epoch,
            "best_val_map": self.best_map,
            "best_epoch": self.best_epoch,
            "best_model": self.best_model,
            "history": list(self.history),
            "settings": asdict(self.s),
        }


def fit(
    settings: TrainSettings,
    model: nn.Module,
    objective: Objective,
    *,
    train_batches: Callable[[int], Iterable[Batch]],
    steps_per_epoch: int,
    report: Callable[[dict[str, float], dict[str, Any] | None], None],
    device: torch.device | str = "cpu",
    seed: int = 0,
    validate: Callable[[nn.Module], float] | None = None,
    state: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``objective``, validate and report once per epoch; resume from
    ``state`` when given.

    ``model(images)`` returns ``(u, logits)``; build it with the same seed on every rank.
    ``objective`` follows :mod:`dpfah.objective` (e.g. :class:`dpfah.loss.DPFAHLoss`).
    ``train_batches(epoch)`` yields this rank's batches (equal size on every rank);
    ``steps_per_epoch`` of them are used. ``seed`` drives the per-sample augmentation.
    ``validate(model)`` returns the validation mAP (every rank calls it; it may use
    collectives). ``report(metrics, checkpoint_state)`` is called on every rank after every
    epoch; ``checkpoint_state`` is the full resumable state on rank 0 and ``None`` elsewhere.
    Without ``validate`` no model is selected: the metrics carry no ``best_*`` and the
    result's ``best_epoch`` is -1 (the last epoch's weights stand). A loss that is NaN or
    infinite on any rank raises :class:`NonFiniteLoss` on every rank before that step's update.
    """
    trainer = _Trainer(settings, model, objective, torch.device(device), steps_per_epoch)
    if state is not None:
        trainer.restore(state)
    net = trainer.wrap()
    for epoch in range(trainer.start_epoch, settings.epochs):
        metrics = trainer.train_epoch(net, epoch, iter(train_batches(epoch)), seed)
        _check_ranks_agree(trainer.model, epoch, trainer.device)
        if validate is not None:
            val_map = float(validate(net))
            metrics["val_map"] = val_map
            if val_map > trainer.best_map:
                trainer.best_map, trainer.best_epoch = val_map, epoch
                trainer.best_model = _snapshot(trainer.model.state_dict())
        if validate is not None:
            metrics["best_val_map"] = trainer.best_map
            metrics["best_epoch"] = trainer.best_epoch
        trainer.history.append(dict(metrics))
        report(metrics, trainer.checkpoint(epoch) if trainer.shard.rank == 0 else None)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return FitResult(
        epochs_run=settings.epochs - trainer.start_epoch,
        best_val_map=trainer.best_map,
        best_epoch=trainer.best_epoch,
        history=trainer.history,
    )
