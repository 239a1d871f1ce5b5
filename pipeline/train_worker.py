"""The worker side of a training: what runs on every Ray Train worker (:func:`worker_loop`,
given a :class:`Job`): this rank's data, the network and the method's objective, then
``dpfah.train.fit``, reporting each epoch (and rank 0's checkpoint) to Ray Train."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpfah.settings import ModelSettings, TrainSettings

from .timing import record, span

__all__ = [
    "STATE_FILE",
    "DIVERGED",
    "Job",
    "worker_loop",
    "load_state",
    "process_start_time",
    "batches_for",
    "validator_for",
]


STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Job:
    """What every worker needs, pickled to it: the three settings and the data."""

    train: TrainSettings
    model: ModelSettings  # with a variant's network changes
    method: str  # a dpfah.methods name
    hparams: dict[str, Any]  # its hyper-parameters over its defaults
    bits: int
    num_classes: int
    seed: int
    shards: str
    steps_cap: int | None
    loader_workers: int
    eval_batch_size: int
    validate: bool = True
    # Test hooks, never set by the stage's command line: a deterministic batch source instead
    # of the shards, and fault injection (the last rank dies once as the epoch after
    # fail_at_epoch starts).
    batch_source: Callable | None = None
    steps_per_epoch: int | None = None
    fail_at_epoch: int | None = None
    fault_marker: str | None = None


def _batches(job: Job, rank: int, size: int, device):
    """(train_batches(epoch), steps per epoch, bank size) for this rank."""
    if job.batch_source is not None:  # tests: a deterministic global batch sliced by rank
        from dpfah.data import read_manifest  # a memory bank still has a row per training sample

        return (
            (lambda epoch: job.batch_source(epoch, rank, size)),
            job.steps_per_epoch,
            read_manifest(job.shards).split("train").count,
        )
    from torch.utils.data import DataLoader

    from dpfah.data import TrainStream

    with span("worker: open the shards"):
        stream = TrainStream(job.shards, job.train.batch_size // size, seed=job.seed, rank=rank, world_size=size)
        loader = DataLoader(stream, batch_size=None, num_workers=job.loader_workers, pin_memory=device.type == "cuda")
    steps = len(stream) if not job.steps_cap else min(len(stream), job.steps_cap)

    def train_batches(epoch: int):
        stream.set_epoch(epoch)
        return _first_batch_timed(loader) if epoch == 0 else loader

    return train_batches, steps, stream.manifest.split("train").count


def _first_batch_timed(batches):
    """The batches, with the wait for the first one (reader start-up) recorded."""
    start = time.time()
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        return
    record("worker: first batch", start)
    yield first
    yield from iterator


def _validator(job: Job, rank: int, size: int, device):
    """validate(model): mAP@ALL of the validation split against the training split."""
    from torch.utils.data import DataLoader

    from dpfah.data import EvalStream
    from dpfah.train import validation_map

    kwargs = dict(batch_size=job.eval_batch_size, rank=rank, world_size=size)

    def validate(model) -> float:
        with span("worker: validation"):
            query = DataLoader(
                EvalStream(job.shards, "validation", **kwargs), batch_size=None, num_workers=job.loader_workers
            )
            db = DataLoader(EvalStream(job.shards, "train", **kwargs), batch_size=None, num_workers=job.loader_workers)
            return validation_map(model, query, db, device, job.train.image_size, job.train.precision)

    return validate


def _reporter(job: Job, rank: int, size: int):
    """report(metrics, state): a Ray Train report, with the checkpoint from rank 0. The
    epoch's metrics reach MLflow from the controller (:class:`EpochMetricsToMlflow`), once
    Ray Train has registered the report."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        now = time.time()
        record("worker: epoch steps", now - float(metrics["epoch_s"]), now)  # the duration fit measured
        with span("worker: checkpoint and report"), tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if state is not None:
                torch.save(state, os.path.join(d, STATE_FILE))
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    return report


#: The key of the report a worker makes when the loss became non-finite (no checkpoint).
DIVERGED = "diverged"


def _epoch_hook(job: Job, train_batches, rank: int, size: int):
    """Tests only (with ``fail_at_epoch``): every rank notes each epoch it starts in
    ``<run>/.epochs-started``, and the last rank dies once, hard, as epoch fail_at_epoch + 1
    starts: Ray Train must restart the group and resume from fail_at_epoch's checkpoint.
    It waits until the controller has registered that checkpoint first (a report the
    controller has not yet collected dies with its worker: that epoch would run again)."""
    if job.fault_marker is None or job.fail_at_epoch is None:
        return train_batches
    log = os.path.join(os.path.dirname(job.fault_marker), ".epochs-started")

    def batches(epoch: int):
        with open(log, "a") as f:
            f.write(f"{epoch} {rank}\n")
        if epoch == job.fail_at_epoch + 1 and rank == size - 1 and not os.path.exists(job.fault_marker):
            _wait_registered(os.path.dirname(job.fault_marker), job.fail_at_epoch)
            Path(job.fault_marker).write_text(f"killed rank {rank} as epoch {epoch} started\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return train_batches(epoch)

    return batches


def _wait_registered(run_dir: str, epoch: int, timeout_s: float = 120.0) -> None:
    """Tests only: wait until Ray Train's controller has registered the checkpoint of
    ``epoch``, as its snapshot file in the run folder says (Ray's own format: a test fails,
    not a training, if it changes)."""
    snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with open(snapshot) as f:
                latest = json.load(f).get("latest_checkpoint_result") or {}
            if int(latest.get("metrics", {}).get("epoch", -1)) >= epoch:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)


def load_state(path: str) -> dict[str, Any]:
    """A checkpoint's state, loaded without unpickling code (tensors, numbers, strings)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def process_start_time(pid: str = "self") -> float | None:
    """When process ``pid`` started (wall clock), from /proc; None where /proc has no answer."""
    try:
        ticks = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def worker_loop(job: Job) -> dict[str, Any] | None:
    """Runs on every Ray Train worker: this rank's data, the model and objective, then fit."""
    import ray.train
    from ray.train.torch import get_device

    from dpfah import methods
    from dpfah.model import DPFAH
    from dpfah.train import NonFiniteLoss, fit

    record("worker: process start to loop", process_start_time() or time.time(), None)
    record("worker: started", time.time(), None)
    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    train_batches, steps, bank_size = _batches(job, rank, size, device)
    train_batches = _epoch_hook(job, train_batches, rank, size)
    model = DPFAH.build(job.bits, job.num_classes, job.model, seed=job.seed)  # the same start on every rank
    objective = methods.build(job.method, job.hparams, bits=job.bits, num_classes=job.num_classes, train_size=bank_size)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(os.path.join(d, STATE_FILE))
    try:
        result = fit(
            job.train,
            model,
            objective,
            train_batches=train_batches,
            steps_per_epoch=steps,
            report=_reporter(job, rank, size),
            device=device,
            seed=job.seed,
            validate=_validator(job, rank, size, device) if job.validate else None,
            state=state,
        )
    except NonFiniteLoss as e:
        # Every rank stops at the same step (fit agrees on it). A report instead of an
        # exception, so that Ray Train does not restart a run that would diverge again; it
        # carries a checkpoint (a note, no state) because the driver's Result keeps the
        # metrics of the latest checkpoint only.
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as d:
            note = None
            if rank == 0:
                Path(d, "diverged.txt").write_text(f"{e}\n")
                note = Checkpoint.from_directory(d)
            ray.train.report({DIVERGED: str(e), "epoch": e.epoch, "step": e.step}, checkpoint=note)
        return None
    if rank == 0:
        return {"best_val_map": result.best_val_map, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
    return None


#: This rank's batches and its validation, for a training in one process without Ray Train
#: (pipeline.entry): the same data a group of one reads.
batches_for = _batches
validator_for = _validator
