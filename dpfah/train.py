"""The one training loop, shared by Ray Train workers, Tune trials and plain unit tests.

Nothing here knows about Ray or MLflow: the runner passes in its batches, a ``report``
function and, when it resumes, the last checkpoint state. Data parallelism is plain
``torch.distributed``: when a process group is initialised (Ray Train does that), the model
is wrapped in DDP and the pairwise likelihood is formed over the global batch, so N
workers compute what one worker would with the same global batch.
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
from .loss import DPFAHLoss
from .metrics import mean_average_precision
from .model import DPFAH

__all__ = [
    "Batch",
    "TrainSettings",
    "FitResult",
    "fit",
    "encode",
    "validation_map",
    "build_model",
    "world",
]

OPTIMIZERS = ("rmsprop", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
PAIRS = ("batch", "bank")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides what a training run computes. Paper values as defaults."""

    bits: int = 64
    num_classes: int = 10
    epochs: int = 100
    batch_size: int = 128  # global: split evenly over the ranks
    image_size: int = 224
    optimizer: str = "rmsprop"
    lr: float = 5e-5
    weight_decay: float = 1e-5
    momentum: float = 0.9  # sgd only
    schedule: str = "constant"
    eta: float = 10.0
    zeta: float = 0.1
    delta: float = 1.1
    pairs: str = "batch"  # in-batch pairs, or the batch against a memory bank
    pfa: bool = True
    lam: float = 1e-4
    backbone_weights: str | None = None
    freeze_bn: bool = False  # BN in eval mode (running statistics fixed) while training
    sync_bn: bool = False  # SyncBatchNorm across GPUs (raises on CPU tensors)
    precision: str = "auto"  # auto: bf16 autocast on a GPU, fp32 on the CPU
    crop_scale: tuple[float, float] = (0.5, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("bits", self.bits >= 1),
            ("num_classes", self.num_classes >= 1),
            ("epochs", self.epochs >= 1),
            ("batch_size", self.batch_size >= 2),
            ("image_size", self.image_size >= 8),
            ("lr", self.lr > 0),
            ("weight_decay", self.weight_decay >= 0),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"train setting {name}={getattr(self, name)!r} is out of range")
        for name, value, choices in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("pairs", self.pairs, PAIRS),
            ("precision", self.precision, PRECISIONS),
        ):
            if value not in choices:
                raise ValueError(f"train setting {name}={value!r}: choose one of {', '.join(choices)}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    epochs_run: int
    best_val_map: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def world() -> tuple[int, int]:
    """(world_size, rank) of the current process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    size, _ = world()
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if world()[0] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def build_model(settings: TrainSettings) -> DPFAH:
    torch.manual_seed(settings.seed)  # the same initial weights on every rank
    return DPFAH(settings.bits, settings.num_classes, pfa=settings.pfa, lam=settings.lam, backbone_weights=settings.backbone_weights)


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
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=total)
    if s.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
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


def fit(
    settings: TrainSettings,
    *,
    train_batches: Callable[[int], Iterable[Batch]],
    steps_per_epoch: int,
    report: Callable[[dict[str, float], dict[str, Any] | None], None],
    device: torch.device | str = "cpu",
    validate: Callable[[nn.Module], float] | None = None,
    state: dict[str, Any] | None = None,
    bank_size: int | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> FitResult:
    """Train, validate and report once per epoch; resume from ``state`` when given.

    ``train_batches(epoch)`` yields this rank's batches (equal size on every rank);
    ``steps_per_epoch`` of them are used. ``validate(model)`` returns the validation mAP
    (every rank calls it; it may use collectives). ``report(metrics, checkpoint_state)`` is
    called on every rank after every epoch; ``checkpoint_state`` is the full resumable state
    on rank 0 and ``None`` elsewhere. ``bank_size`` (> largest sample index) is needed for
    ``pairs="bank"``.
    """
    s = settings
    device = torch.device(device)
    size, rank = world()
    if s.batch_size % size:
        raise ValueError(f"global batch_size {s.batch_size} is not divisible by the {size} workers")
    if steps_per_epoch < 1:
        raise ValueError("steps_per_epoch must be >= 1 (is the training split smaller than one global batch?)")
    if s.pairs == "bank" and not bank_size:
        raise ValueError("pairs='bank' needs bank_size (one row per training sample index)")
    local_batch = s.batch_size // size

    model = build_model(s).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if s.sync_bn and size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = _build_optimizer(model, s)
    schedule = _build_schedule(optimizer, s, steps_per_epoch)
    loss_fn = DPFAHLoss(s.eta, s.zeta, s.delta)

    bank_u = bank_labels = bank_seen = None
    if s.pairs == "bank":
        bank_u = torch.zeros(bank_size, s.bits, device=device)
        bank_labels = torch.zeros(bank_size, s.num_classes, device=device)
        bank_seen = torch.zeros(bank_size, dtype=torch.bool, device=device)

    start_epoch, best_map, best_epoch, best_model = 0, -1.0, -1, None
    history: list[dict[str, float]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch = int(state["epoch"]) + 1
        best_map, best_epoch = float(state["best_val_map"]), int(state["best_epoch"])
        best_model = state.get("best_model")
        history = list(state.get("history", []))
        if bank_u is not None and state.get("bank") is not None:
            bank_u.copy_(state["bank"]["u"])
            bank_labels.copy_(state["bank"]["labels"])
            bank_seen.copy_(state["bank"]["seen"])

    net: nn.Module = model
    if size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    augment = DeviceAugment(scale=s.crop_scale)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    global_pairs_batch = s.batch_size * (s.batch_size - 1)

    for epoch in range(start_epoch, s.epochs):
        _set_train_mode(net, s.freeze_bn)
        sums = np.zeros(4)  # pair_sum, l2, l3, steps
        pairs_total = 0
        seen_images = 0
        t0 = time.perf_counter()
        batches: Iterator[Batch] = iter(train_batches(epoch))
        for step in range(steps_per_epoch):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"the training stream ended after {step} of {steps_per_epoch} steps in epoch {epoch}") from None
            labels = torch.as_tensor(batch.labels, device=device).float()
            if labels.shape[0] != local_batch:
                raise RuntimeError(f"rank {rank} got a batch of {labels.shape[0]}, expected {local_batch}")
            rand = sample_uniforms(batch.index, s.seed, epoch)
            images = augment(_to_images(batch.images, s.image_size, device), train=True, rand=rand, memory_format=memory_format)
            with _autocast(device, s.precision):
                u, logits = net(images)
            u, logits = u.float(), logits.float()
            all_u = _all_gather(u.detach())
            all_labels = _all_gather(labels)
            if bank_u is not None:
                all_index = _all_gather(torch.as_tensor(batch.index, device=device).long())
                bank_u[all_index] = all_u
                bank_labels[all_index] = all_labels
                bank_seen[all_index] = True
                pair_u, pair_labels = bank_u[bank_seen], bank_labels[bank_seen]
                offset, num_pairs = None, s.batch_size * pair_u.shape[0]
            else:
                pair_u, pair_labels = all_u, all_labels
                offset, num_pairs = rank * local_batch, global_pairs_batch
            surrogate, pair_sum, l2, l3 = loss_fn.sharded(
                u, logits, labels, pair_u, pair_labels, world_size=size, offset=offset, num_pairs=num_pairs
            )
            optimizer.zero_grad(set_to_none=True)
            surrogate.backward()
            optimizer.step()
            schedule.step()
            sums += (pair_sum.item(), l2.item(), l3.item(), 1)
            pairs_total += num_pairs
            seen_images += labels.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        pair_sum_all, l2_all, l3_all, images_all = _all_reduce_sum([sums[0], sums[1], sums[2], seen_images], device)
        steps = sums[3]
        # pair sums add up over ranks; L2/L3 are per-rank means, averaged over ranks and steps.
        l1 = pair_sum_all / pairs_total
        l2_mean, l3_mean = l2_all / (steps * size), l3_all / (steps * size)
        metrics = {
            "epoch": epoch,
            "loss": l1 + s.eta * l2_mean + s.zeta * l3_mean,
            "loss_l1": l1,
            "loss_l2": l2_mean,
            "loss_l3": l3_mean,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": images_all / elapsed if elapsed > 0 else float("nan"),
            "epoch_s": elapsed,
        }
        if validate is not None:
            val_map = float(validate(net))
            metrics["val_map"] = val_map
            if val_map > best_map:
                best_map, best_epoch = val_map, epoch
                best_model = _snapshot(model.state_dict())
        metrics["best_val_map"] = best_map
        metrics["best_epoch"] = best_epoch
        history.append(dict(metrics))
        checkpoint = None
        if rank == 0:
            checkpoint = {
                "model": _snapshot(model.state_dict()),
                "optimizer": _snapshot(optimizer.state_dict()),
                "schedule": schedule.state_dict(),
                "epoch": epoch,
                "best_val_map": best_map,
                "best_epoch": best_epoch,
                "best_model": best_model,
                "history": list(history),
                "settings": s.as_dict(),
                "bank": None if bank_u is None else _snapshot({"u": bank_u, "labels": bank_labels, "seen": bank_seen}),
            }
        report(metrics, checkpoint)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return FitResult(epochs_run=s.epochs - start_epoch, best_val_map=best_map, best_epoch=best_epoch, history=history)
