"""Train DPFAH with Ray Train (DDP over N workers) and record it in MLflow.

    python -m pipeline.train --dataset cifar10 --bits 64 [--params FILE] [--set key=value ...]

The driver (this process) reads the prepared dataset's manifest, opens the MLflow run, fits
a ``TorchTrainer`` whose workers all run ``dpfah.train.fit``, then logs the best validation
checkpoint as an MLflow model and writes ``runs/<dataset>-<bits>.json`` (run id, model URI)
for the evaluate and promote stages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import Params, add_config_args, config_from_args
from .errors import ConfigError, PipelineError, run_main

__all__ = ["TrainOutcome", "run_training", "settings_for", "main", "run_file"]

RUNS_DIR = "runs"
STATE_FILE = "state.pt"


class TrainingFailed(PipelineError):
    """The Ray Train run ended in an error (after its allowed retries)."""


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    model_uri: str
    best_val_map: float
    best_epoch: int
    epochs: int
    run_file: str | None
    checkpoint: str  # the last Ray Train checkpoint (state.pt inside)


def run_file(dataset: str, bits: int, root: str | os.PathLike = ".") -> Path:
    return Path(root) / RUNS_DIR / f"{dataset}-{bits}.json"


def resolve_uri(uri: str) -> str:
    """Absolute ``sqlite:///`` paths: Ray workers run in another directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    if "://" not in uri:
        return os.path.abspath(uri)
    return uri


def model_requirements() -> list[str]:
    """What loading the logged model needs, pinned to what trained it.

    Given explicitly: MLflow's inference loads the model in a subprocess, 9-12 s a training.
    The pickle also needs ``dpfah`` itself importable (this repository, or the cluster image).
    """
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "torchvision", "numpy")]


def git_commit() -> str:
    """The commit being trained; ``ray job submit`` ships no .git, so an env var wins."""
    env = os.environ.get("DPFAH_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def settings_for(params: Params, bits: int, num_classes: int, **changes: Any):
    """The library's TrainSettings from the ``train`` section (plus per-call changes)."""
    from dpfah.train import TrainSettings

    t = params.train
    settings = TrainSettings(
        bits=bits,
        num_classes=num_classes,
        epochs=t.epochs,
        batch_size=t.batch_size,
        image_size=t.image_size,
        optimizer=t.optimizer,
        lr=t.lr,
        weight_decay=t.weight_decay,
        momentum=t.momentum,
        schedule=t.schedule,
        eta=t.eta,
        zeta=t.zeta,
        delta=t.delta,
        pairs=t.pairs,
        pfa=t.pfa,
        lam=t.lam,
        backbone_weights=os.path.abspath(t.backbone_weights) if t.backbone_weights else None,
        freeze_bn=t.freeze_bn,
        sync_bn=t.sync_bn and t.use_gpu,
        precision=t.precision,
        crop_scale=tuple(t.crop_scale),
        seed=params.seed,
    )
    return replace(settings, **changes) if changes else settings


# ----------------------------------------------------------------------------- worker side


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: stream this rank's data and call dpfah.train.fit."""
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import get_device
    from torch.utils.data import DataLoader

    from dpfah.data import EvalStream, TrainStream
    from dpfah.train import TrainSettings, fit, validation_map

    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    settings = TrainSettings(**{**config["settings"], "crop_scale": tuple(config["settings"]["crop_scale"])})
    shards = config["shards"]
    loader_workers = config["loader_workers"]
    local_batch = settings.batch_size // size

    batch_source: Callable[[int], Any] | None = config.get("batch_source")
    if batch_source is None:
        stream = TrainStream(shards, local_batch, seed=settings.seed, rank=rank, world_size=size)
        loader = DataLoader(stream, batch_size=None, num_workers=loader_workers, pin_memory=device.type == "cuda")
        steps = len(stream) if not config.get("steps_cap") else min(len(stream), config["steps_cap"])

        def train_batches(epoch: int):
            stream.set_epoch(epoch)
            return loader

        bank_size = stream.manifest.split("train").count
    else:  # tests: a deterministic global batch sliced by rank
        steps = config["steps_per_epoch"]
        bank_size = config.get("bank_size")

        def train_batches(epoch: int):
            return batch_source(epoch, rank, size)

    validate = None
    if config.get("validate", True):
        eval_kwargs = dict(batch_size=config["eval_batch_size"], rank=rank, world_size=size)

        def validate(model):
            query = DataLoader(EvalStream(shards, "validation", **eval_kwargs), batch_size=None, num_workers=loader_workers)
            db = DataLoader(EvalStream(shards, "train", **eval_kwargs), batch_size=None, num_workers=loader_workers)
            return validation_map(model, query, db, device, settings.image_size, settings.precision)

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)

    mlflow_client = None
    if rank == 0 and config.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        mlflow_client = MlflowClient(config["tracking_uri"])

    fail_at = config.get("fail_at_epoch")
    marker = config.get("fault_marker")

    def report(metrics: dict[str, float], checkpoint_state: dict[str, Any] | None) -> None:
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if checkpoint_state is not None:
                torch.save(checkpoint_state, os.path.join(d, STATE_FILE))
                ckpt = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
        if mlflow_client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            step = int(metrics["epoch"])
            mlflow_client.log_batch(
                config["mlflow_run_id"],
                metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"],
            )
        # Fault injection (tests): the last rank dies once, hard, right after this epoch's
        # checkpoint; Ray Train must restart the group and resume from that checkpoint.
        if fail_at is not None and int(metrics["epoch"]) == fail_at and rank == size - 1 and marker and not os.path.exists(marker):
            Path(marker).write_text(f"killed rank {rank} after epoch {fail_at}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    result = fit(
        settings,
        train_batches=train_batches,
        steps_per_epoch=steps,
        report=report,
        device=device,
        validate=validate,
        state=state,
        bank_size=bank_size,
    )
    if rank == 0:
        return {"best_val_map": result.best_val_map, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
    return None


# ----------------------------------------------------------------------------- driver side


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Inside `ray job submit` this joins the job's cluster; elsewhere it starts a local one.
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


def manifest_sha256(manifest) -> str:
    """Identity of a prepared dataset: its manifest lists every shard's sha256."""
    return hashlib.sha256(json.dumps(manifest.raw, sort_keys=True).encode()).hexdigest()


def run_training(
    params: Params,
    dataset: str,
    bits: int,
    *,
    run_name: str | None = None,
    write_run_file: bool = True,
    settings_changes: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    callbacks: Sequence[Any] = (),
    batch_source: Callable | None = None,
    steps_per_epoch: int | None = None,
    validate: bool = True,
    log_model: bool = True,
) -> TrainOutcome:
    """Fit one DPFAH model on Ray Train and record it in MLflow; returns the run's outcome.

    ``batch_source(epoch, rank, world_size)`` replaces the shard stream (tests use it to give
    every worker count the same global batches); ``callbacks`` go to Ray Train's RunConfig
    (Tune passes its report callback); ``parent_run_id`` nests the MLflow run.
    """
    import mlflow
    import ray.train
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dpfah.data import read_manifest
    from dpfah.model import DPFAH

    t = params.train
    if dataset not in params.datasets:
        raise ConfigError(f"--dataset {dataset}: no such dataset in params (defined: {', '.join(params.datasets)})")
    if bits < 1:
        raise ConfigError(f"--bits {bits}: must be >= 1")
    shards = params.shards_dir(dataset)
    manifest = read_manifest(shards)  # a clear error when prepare has not run
    manifest_sha = manifest_sha256(manifest)
    changes, tuned_tags = dict(settings_changes or {}), {}
    if t.use_tuned:  # eta and zeta from the tune stage's best.json; explicit settings_changes still win
        from .tune import tuned_settings

        tuned, tuned_tags = tuned_settings(dataset, bits)
        changes = {**tuned, **changes}
    settings = settings_for(params, bits, manifest.num_classes, **changes)
    if settings.batch_size % t.num_workers:
        raise ConfigError(f"train.batch_size {settings.batch_size} must be divisible by train.num_workers {t.num_workers}")

    tracking_uri = resolve_uri(os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri)
    storage = resolve_uri(t.storage_path)
    name = run_name or f"{dataset}-{bits}b-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would outrank the
    # parameters of every later stage called in this process: put it back when done.
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)  # created here, once, before any worker touches it
    experiment = mlflow.set_experiment(f"{params.mlflow.experiment}-{dataset}")
    run = mlflow.start_run(run_name=name, parent_run_id=parent_run_id, experiment_id=experiment.experiment_id)
    run_id = run.info.run_id
    try:
        mlflow.log_params({f"train.{k}": v for k, v in settings.as_dict().items()})
        mlflow.log_params({"dataset": dataset, "bits": bits, "num_workers": t.num_workers, "use_gpu": t.use_gpu})
        mlflow.set_tags(
            {
                "git_commit": git_commit(),
                "dataset": dataset,
                "protocol": manifest.protocol,
                "manifest_sha256": manifest_sha,
                "split_seed": str(manifest.seed),
                "ray_run_name": name,
                **tuned_tags,
            }
        )
        _ensure_ray()
        config = {
            "settings": settings.as_dict(),
            "shards": shards,
            "loader_workers": t.loader_workers,
            "eval_batch_size": t.eval_batch_size,
            "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri,
            "fail_at_epoch": t.fail_at_epoch,
            "fault_marker": os.path.join(storage, name, ".fault-injected") if "://" not in storage else None,
            "validate": validate,
            "steps_cap": t.steps_per_epoch,
        }
        if batch_source is not None:
            config.update(batch_source=batch_source, steps_per_epoch=steps_per_epoch, bank_size=manifest.split("train").count)
        if config["fault_marker"]:
            os.makedirs(os.path.dirname(config["fault_marker"]), exist_ok=True)
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo", timeout_s=t.collective_timeout_s),
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=t.max_failures, controller_failure_limit=3),
                callbacks=list(callbacks),
            ),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise TrainingFailed(f"training {name} failed: {e}") from e
        if result.checkpoint is None:
            raise TrainingFailed(f"training {name} ended without a checkpoint")
        checkpoint_path = result.checkpoint.path
        with result.checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        best_state = state.get("best_model") or state["model"]
        history = state["history"]
        best_val_map, best_epoch = float(state["best_val_map"]), int(state["best_epoch"])
        if best_epoch < 0:  # no validation: the last epoch stands
            best_epoch = int(state["epoch"])
        mlflow.log_metrics({"best_val_map": best_val_map, "best_epoch": best_epoch, "epochs_run": len(history)})

        model_uri = f"runs:/{run_id}/model"
        if log_model:
            model = DPFAH(bits, manifest.num_classes, pfa=settings.pfa, lam=settings.lam)
            model.load_state_dict(best_state)
            model.eval()
            info = mlflow.pytorch.log_model(
                model, name="model", serialization_format="pickle", pip_requirements=model_requirements()
            )
            model_uri = info.model_uri
        mlflow.end_run("FINISHED")
    except BaseException:
        mlflow.end_run("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    finally:
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before

    outcome = TrainOutcome(run_id, model_uri, best_val_map, best_epoch, len(history), None, checkpoint_path)
    if write_run_file:
        path = run_file(dataset, bits)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "run_id": run_id,
            "model_uri": model_uri,
            "tracking_uri": tracking_uri if not tracking_uri.startswith("sqlite:") else params.mlflow.tracking_uri,
            "experiment": experiment.name,
            "dataset": dataset,
            "bits": bits,
            "protocol": manifest.protocol,
            "manifest_sha256": manifest_sha,
            "best_val_map": best_val_map,
            "best_epoch": best_epoch,
            "epochs": len(history),
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        outcome = replace(outcome, run_file=str(path))
    return outcome


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train DPFAH on a prepared dataset with Ray Train (DDP) and record the run, "
        "its per-epoch metrics and the best-validation model in MLflow. Writes runs/<dataset>-<bits>.json.",
        epilog="Profiles: the defaults in params.yaml train on a CPU in minutes; "
        "`--set profile=paper` selects the paper's settings (224 px, RMSProp 5e-5, batch 128, GPUs).",
    )
    parser.add_argument("--dataset", required=True, help="dataset name from params.yaml (its shards must be prepared)")
    parser.add_argument("--bits", type=int, required=True, help="code length, e.g. 16, 32, 48 or 64")
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    outcome = run_training(params, args.dataset, args.bits)
    print(
        f"trained {args.dataset} {args.bits} bits: best validation mAP {outcome.best_val_map:.4f} at epoch "
        f"{outcome.best_epoch}; MLflow run {outcome.run_id}; model {outcome.model_uri}; wrote {outcome.run_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
