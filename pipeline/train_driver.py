"""The driver side of a training (:func:`run_training`): resolve what to train, open the
MLflow run, fit a ``TorchTrainer`` whose workers run :func:`pipeline.train_worker.worker_loop`,
log the selected checkpoint as the run's model and write the run record. The train stage
runs it once; tune runs it for every trial."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dpfah.settings import TrainSettings, pick

from . import recipes
from .artifacts import write_json_atomic
from .cluster import check_request, ensure_ray, shutdown_if_started, started_here, train_run_defaults
from .config import Params
from .errors import ConfigError, PipelineError
from .leftovers import claim_run_folder, driver_tags, fail_abandoned_runs, remove_ended_run_folders
from .model_logging import log_trained_model
from .recipes import Recipe
from .registry import MODEL_NAME_TAG, model_name
from .runkey import RunKey
from .timing import record, span
from .tracking import (
    git_commit,
    log_dataset,
    resolve_uri,
    tracked_run,
    tracking_uri,
    training_metric,
)
from .train_worker import DIVERGED, STATE_FILE, Job, load_state, worker_loop

__all__ = ["FAIL_AT_EPOCH_ENV", "TrainOutcome", "TrainingFailed", "absolute", "fail_at_epoch", "run_training"]


#: AlexNet's stem and pools leave nothing of an image smaller than this (dpfah.model).
ALEXNET_MIN_SIZE = 63


class TrainingFailed(PipelineError):
    """The Ray Train run ended in an error (after its allowed retries)."""


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    model_uri: str
    best_val_map: float | None  # None: no validation split, the last epoch's model
    best_epoch: int
    epochs: int
    run_file: str | None
    checkpoint: str  # the last Ray Train checkpoint (state.pt inside)
    method: str = "dpfah"  # the method or variant trained


def _trainer(job: Job, params: Params, name: str, storage: str, callbacks: Sequence[Any]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = params.train
    return TorchTrainer(
        worker_loop,
        train_loop_config=job,
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


def _fit(trainer, name: str) -> tuple[dict[str, Any], str]:
    """Run the trainer; (the last checkpoint's state, its path)."""
    import ray.train

    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingFailed(f"training {name} failed: {e}") from e
    if DIVERGED in (result.metrics or {}):
        raise TrainingFailed(f"training {name}: {result.metrics[DIVERGED]}")
    if result.checkpoint is None:
        raise TrainingFailed(f"training {name} ended without a checkpoint")
    _drop_unregistered_checkpoints(result)
    with result.checkpoint.as_directory() as d:
        state = load_state(os.path.join(d, STATE_FILE))
    return state, result.checkpoint.path


def _drop_unregistered_checkpoints(result) -> None:
    """Delete checkpoint folders of the run that Ray Train does not keep: a worker that died
    right after uploading its checkpoint, before the controller registered it, leaves one
    behind (beyond CheckpointConfig.num_to_keep)."""
    import posixpath

    from pyarrow import fs as pafs

    kept = {posixpath.basename(c.path.rstrip("/")) for c, _ in (result.best_checkpoints or [])}
    kept.add(posixpath.basename(result.checkpoint.path.rstrip("/")))
    try:
        entries = result.filesystem.get_file_info(pafs.FileSelector(result.path, allow_not_found=True))
    except OSError:
        return
    for entry in entries:
        if (
            entry.type == pafs.FileType.Directory
            and entry.base_name.startswith("checkpoint_")
            and entry.base_name not in kept
        ):
            result.filesystem.delete_dir(entry.path)


def _log_params(job: Job, params: Params, dataset: str, manifest, name: str, recipe: Recipe) -> None:
    import mlflow

    from dpfah import kernels

    t = params.train
    mlflow.log_params({f"train.{k}": v for k, v in dataclasses.asdict(job.train).items()})
    mlflow.log_params({f"model.{k}": v for k, v in dataclasses.asdict(job.model).items()})
    from dpfah import methods

    # the method's hyper-parameters: its defaults (null: derived from the code length) and what params.yaml set
    mlflow.log_params({f"loss.{k}": v for k, v in {**methods.get(job.method).defaults, **job.hparams}.items()})
    mlflow.log_params(
        {
            "dataset": dataset,
            "bits": job.bits,
            "method": recipe.entry,
            "num_classes": job.num_classes,
            "seed": job.seed,
            "num_workers": t.num_workers,
            "use_gpu": t.use_gpu,
        }
    )
    mlflow.set_tags(
        {
            "git_commit": git_commit(),
            "dataset": dataset,
            "protocol": manifest.protocol,
            "manifest_sha256": manifest.sha256,
            "split_seed": str(manifest.seed),
            "ray_run_name": name,
            **driver_tags(),
            **{f"kernel.{k}": v for k, v in kernels.status().items()},
            "method": recipe.entry,  # what train.methods lists: a method or a variant
            "method.base": recipe.method,  # the dpfah.methods objective it runs
            "backbone": job.model.backbone,
            "pfa": str(job.model.pfa).lower(),
            "seed": str(job.seed),
            **recipe.source,
        }
    )


def _epoch_printer(uri: str, run_id: str, epochs: int, *, enabled: bool):
    """A line per epoch on the console, from the metrics the controller logs to MLflow."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    from mlflow.tracking import MlflowClient

    from .console import EpochPrinter

    client, seen = MlflowClient(uri), {}
    keys = ("val_map", "best_val_map", "best_epoch", "images_per_s", "epoch_s")

    def fetch() -> dict[int, dict[str, float]]:
        losses = {m.step: m.value for m in client.get_metric_history(run_id, training_metric("loss"))}
        if set(losses) - set(seen):
            for step, value in losses.items():
                seen.setdefault(step, {})["loss"] = value
            for key in keys:
                for m in client.get_metric_history(run_id, training_metric(key)):
                    seen.setdefault(m.step, {})[key] = m.value
        return {step: values for step, values in seen.items() if "loss" in values}

    return EpochPrinter(fetch, epochs)


def run_training(
    params: Params,
    key: RunKey,
    *,
    recipe: Recipe | None = None,
    run_name: str | None = None,
    write_run_file: bool = True,
    parent_run_id: str | None = None,
    callbacks: Sequence[Any] = (),
    batch_source: Callable | None = None,
    steps_per_epoch: int | None = None,
    validate: bool = True,
    log_model: bool = True,
    fit_here: Callable[[Job, str, str], dict[str, Any]] | None = None,
    record_extra: dict[str, Any] | None = None,
    root: str | os.PathLike = ".",
) -> TrainOutcome:
    """Fit one hashing model on Ray Train and record it in MLflow; returns the run's outcome.

    ``key`` names the training: its method (a method or variant) is resolved by
    ``pipeline.recipes`` unless ``recipe`` (an objective file's, or a Tune trial's) is
    given; its seed drives the weights, the data order and the augmentation.
    ``batch_source(epoch, rank, world_size)`` replaces the shard stream (tests use it to give
    every worker count the same global batches); ``callbacks`` go to Ray Train's RunConfig
    (Tune passes its report callback); ``parent_run_id`` nests the MLflow run (a run of the
    same name under it is reopened: a retried Tune trial continues its run).
    ``fit_here(job, tracking_uri, run_id)``, where given, trains in this process instead of a
    Ray Train group and returns the last epoch's state (:mod:`pipeline.entry`, one worker);
    ``record_extra`` joins the run record, written under ``root``.
    """
    with span("imports: torch, mlflow, ray"):
        import mlflow  # noqa: F401
        import ray.train  # noqa: F401
        import ray.train.torch  # noqa: F401
        import torch  # noqa: F401

        from .artifacts import prepared_manifest
        from .console import quiet_libraries

    quiet_libraries()
    t = params.train
    dataset, bits, method, seed = key.dataset, key.bits, key.method, key.seed
    params.dataset(dataset)
    if bits < 1:
        raise ConfigError(f"--bits {bits}: must be >= 1")
    shards = params.shards_dir(dataset)
    manifest = prepared_manifest(params, dataset)  # one line naming the directory when prepare has not run
    if recipe is None:
        recipe = recipes.resolve(params, dataset, bits, method)
    uri = tracking_uri(params)
    storage = resolve_uri(t.storage_path)
    name = (
        run_name or f"{dataset}-{bits}b-{recipe.entry}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    model = dataclasses.replace(params.model, **recipe.model)  # a variant's network changes
    if model.backbone == "alexnet" and t.image_size < ALEXNET_MIN_SIZE:
        raise ConfigError(
            f"train.image_size: {t.image_size} px is too small for {recipe.entry}'s AlexNet backbone (it needs >= "
            f"{ALEXNET_MIN_SIZE}); "
            f"e.g. --set train.image_size=64"
        )
    job = Job(
        train=pick(TrainSettings, t),
        model=dataclasses.replace(model, backbone_weights=absolute(model.backbone_weights)),
        method=recipe.method,
        hparams=dict(recipe.hparams),
        bits=bits,
        num_classes=manifest.num_classes,
        seed=seed,
        shards=shards,
        steps_cap=t.steps_per_epoch,
        loader_workers=t.loader_workers,
        eval_batch_size=t.eval_batch_size,
        validate=validate,
        batch_source=batch_source,
        steps_per_epoch=steps_per_epoch,
        fail_at_epoch=fail_at_epoch(t.epochs),
        fault_marker=os.path.join(storage, name, ".fault-injected") if "://" not in storage else None,
    )
    if run_name is None:  # a stage's training (a Tune trial's folder is Tune's: it resumes from it)
        claim_run_folder(storage, name)  # ours: a later training removes it once this driver has ended
        remove_ended_run_folders(storage, f"{dataset}-{bits}b-{recipe.entry}-s{seed}-", keep=name)

    validating = validate and manifest.splits.get("validation") is not None and manifest.split("validation").count > 0
    if validate and not validating:
        print(
            f"{dataset} has no validation split (validation: 0): training without validation; the last epoch's model "
            "stands"
        )
    job = dataclasses.replace(job, validate=validating)

    experiment = f"{params.mlflow.experiment}-{dataset}"
    started = False
    try:
        with span("ray: start or connect"):
            ensure_ray()
            started = started_here()
            check_request(
                t.num_workers, t.use_gpu, command=f"python -m pipeline.train --dataset {dataset} --bits {bits}"
            )
            train_run_defaults()
        opened = time.time()
        with tracked_run(uri, experiment, name, parent_run_id=parent_run_id, reopen=parent_run_id is not None) as run:
            record("mlflow: open the run", opened)
            run_id = run.info.run_id
            with span("mlflow: log params and tags"):
                _log_params(job, params, dataset, manifest, name, recipe)
                log_dataset(mlflow.tracking.MlflowClient(uri), run_id, dataset, manifest, shards)
                if parent_run_id is None:
                    fail_abandoned_runs(run.info.experiment_id, run_id, uri)
            with span("ray train: build the trainer"):
                # MLflow first: a Tune scheduler may stop the trial as soon as it sees the report
                from .train_callbacks import EpochMetricsToMlflow  # imports Ray Train: only when training

                trainer = (
                    _trainer(job, params, name, storage, [EpochMetricsToMlflow(uri, run_id, skip=DIVERGED), *callbacks])
                    if fit_here is None
                    else None
                )
            if parent_run_id is None:  # a stage run: a line per epoch (Tune reports its own way)
                print(
                    f"training {dataset} {bits} bits: {t.num_workers} worker(s) on {'GPU' if t.use_gpu else 'CPU'}, "
                    f"{t.epochs} epochs; MLflow run {run_id} ({uri})",
                    flush=True,
                )
            with span("ray train: fit"), _epoch_printer(uri, run_id, t.epochs, enabled=parent_run_id is None):
                if fit_here is None:
                    state, checkpoint_path = _fit(trainer, name)
                else:
                    try:
                        state, checkpoint_path = fit_here(job, uri, run_id), ""
                    except PipelineError as e:
                        raise TrainingFailed(f"training {name}: {e}") from None
            history = state["history"]
            last_epoch = int(state["epoch"])
            if validating:
                best_val_map, best_epoch = float(state["best_val_map"]), int(state["best_epoch"])
                selected = "best validation mAP"
            else:
                best_val_map, best_epoch, selected = None, last_epoch, "last epoch (no validation split)"
            import mlflow

            with span("mlflow: log the model"):
                mlflow.set_tag("model.selected_by", selected)
                # best_val_map and best_epoch came with every epoch's report when validating
                summary = {"epochs_run": len(history)} | ({} if validating else {"best_epoch": best_epoch})
                mlflow.log_metrics({training_metric(k): v for k, v in summary.items()}, step=last_epoch)
                logged_name = model_name(params, dataset, bits, recipe.entry)
                mlflow.set_tag(MODEL_NAME_TAG, logged_name)
                model_uri = (
                    log_trained_model(job, state, logged_name, t.image_size, last_epoch)
                    if log_model
                    else f"runs:/{run_id}/{logged_name}"
                )
                experiment_name = mlflow.get_experiment(run.info.experiment_id).name
            closing = time.time()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run ended KILLED above; stop our Ray too
        shutdown_if_started(started)
        raise
    record("mlflow: close the run", closing)

    outcome = TrainOutcome(
        run_id, model_uri, best_val_map, best_epoch, len(history), None, checkpoint_path, recipe.entry
    )
    if write_run_file:
        run_record = {
            "run_id": run_id,
            "model_uri": model_uri,
            # a local sqlite path stays as configured (relative): the file is kept beside the repository
            "tracking_uri": uri if not uri.startswith("sqlite:") else params.mlflow.tracking_uri,
            "experiment": experiment_name,
            "dataset": dataset,
            "bits": bits,
            "method": recipe.entry,
            "method_base": recipe.method,
            "seed": seed,
            "protocol": manifest.protocol,
            "manifest_sha256": manifest.sha256,
            "best_val_map": best_val_map,
            "best_epoch": best_epoch,
            "selected_by": selected,
            "epochs": len(history),
            **(record_extra or {}),
        }
        path = write_json_atomic(RunKey(dataset, bits, recipe.entry, seed).run_file(root), run_record)
        outcome = dataclasses.replace(outcome, run_file=str(path))
    return outcome


def absolute(path: str | None) -> str | None:
    """A local path made absolute (Ray workers run in another directory); None stays None."""
    return os.path.abspath(path) if path else None


#: A test hook, not a parameter: with it set to N, the last rank dies once as epoch N + 1
#: starts (epochs count from 0; N the last epoch: no fault, each rank only notes the epochs it
#: starts), and Ray Train must resume from epoch N's checkpoint (:mod:`pipeline.train_worker`).
FAIL_AT_EPOCH_ENV = "DPFAH_FAIL_AT_EPOCH"


def fail_at_epoch(epochs: int) -> int | None:
    """The epoch of ``$DPFAH_FAIL_AT_EPOCH`` (None when unset), checked against ``epochs``."""
    text = os.environ.get(FAIL_AT_EPOCH_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) >= epochs:
        raise ConfigError(
            f"{FAIL_AT_EPOCH_ENV}={text}: not an epoch of this training (epochs count from 0: 0..{epochs - 1})"
        )
    return int(text)
