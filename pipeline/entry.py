"""One entry of the matrix in one warm process: train on one worker without Ray Train, then
evaluate the model still in memory, writing the same records as the train and evaluate stages.

A Ray Tune trial of :mod:`pipeline.matrix` runs :func:`train_and_evaluate`; an entry with
``train.num_workers`` > 1 trains through Ray Train's DDP as the train stage does, then is
evaluated in the trial's process all the same.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from .config import Params
from .errors import PipelineError
from .recipes import Recipe
from .runkey import RunKey
from .tracking import training_metric
from .train_worker import DIVERGED, Job

__all__ = ["EntryOutcome", "fit_in_process", "train_and_evaluate", "evaluate_again"]


@dataclass(frozen=True)
class EntryOutcome:
    key: RunKey
    run_id: str
    query_map: float
    trained: bool  # False: the model of the run record was evaluated again
    seconds: dict[str, float]


def _device(params: Params):
    import torch

    return torch.device("cuda" if params.train.use_gpu and torch.cuda.is_available() else "cpu")


def fit_in_process(job: Job, uri: str, run_id: str, device) -> dict[str, Any]:
    """The whole training in this process, as a Ray Train group of one would run it: this
    rank's data, the network and the objective, then ``dpfah.train.fit``, each epoch's metrics
    logged to the MLflow run at step = epoch. Returns the last epoch's state (a checkpoint's
    content). A loss that became NaN or infinite raises PipelineError naming the step."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from dpfah import methods
    from dpfah.model import DPFAH
    from dpfah.train import NonFiniteLoss, fit

    from .train_worker import batches_for, validator_for

    client = MlflowClient(uri)
    train_batches, steps, bank_size = batches_for(job, 0, 1, device)
    model = DPFAH.build(job.bits, job.num_classes, job.model, seed=job.seed)
    objective = methods.build(job.method, job.hparams, bits=job.bits, num_classes=job.num_classes, train_size=bank_size)
    last: dict[str, Any] = {}

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        now, step = int(time.time() * 1000), int(metrics["epoch"])
        client.log_batch(
            run_id,
            metrics=[Metric(training_metric(k), float(v), now, step) for k, v in metrics.items() if k != "epoch"],
        )
        if state is not None:
            last["state"] = state

    try:
        fit(
            job.train,
            model,
            objective,
            train_batches=train_batches,
            steps_per_epoch=steps,
            report=report,
            device=device,
            seed=job.seed,
            validate=validator_for(job, 0, 1, device) if job.validate else None,
        )
    except NonFiniteLoss as e:
        raise PipelineError(f"{DIVERGED}: {e}") from None
    return last["state"]


def _subject(params: Params, key: RunKey, recipe: Recipe, outcome, state: dict[str, Any], device):
    """What evaluate encodes with, from the training just finished: its run and the network
    with the selected weights, built here (no reload through MLflow)."""
    from dpfah.model import DPFAH

    from .artifacts import prepared_manifest
    from .registry import Subject
    from .tracking import connect, tracking_uri

    manifest = prepared_manifest(params, key.dataset)
    net = DPFAH.build(key.bits, manifest.num_classes, dataclasses.replace(params.model, **recipe.model))
    net.load_state_dict(state.get("best_model") or state["model"])
    net.to(device).eval()
    uri = tracking_uri(params)
    record = {"run_id": outcome.run_id, "model_uri": outcome.model_uri, "dataset": key.dataset, "bits": key.bits}
    shards = params.shards_dir(key.dataset)
    image_size = params.train.image_size
    return Subject(
        outcome.run_id, record, uri, connect(uri), manifest, shards, outcome.model_uri, net, image_size, device
    )


def train_and_evaluate(params: Params, key: RunKey, recipe: Recipe, inputs: dict[str, str], root) -> EntryOutcome:
    """Train ``key`` (its objective ``recipe``), log the model, write its run record, then
    evaluate the selected weights in this process and write its metrics, evaluation record,
    curves and query codes. ``inputs`` (the digests :mod:`pipeline.matrix` compares) go into
    both records. With ``train.num_workers`` > 1 the training is Ray Train's DDP run, and the
    model is evaluated from MLflow."""
    from .evaluation import evaluate
    from .train_driver import run_training

    t0 = time.perf_counter()
    device = _device(params)
    kept: dict[str, Any] = {}

    def here(job: Job, uri: str, run_id: str) -> dict[str, Any]:
        kept["state"] = fit_in_process(job, uri, run_id, device)
        return kept["state"]

    outcome = run_training(
        params,
        key,
        recipe=recipe,
        fit_here=here if params.train.num_workers == 1 else None,
        record_extra={"inputs": inputs},
        root=root,
    )
    trained_s = time.perf_counter() - t0
    subject = _subject(params, key, recipe, outcome, kept["state"], device) if kept else None
    evaluation = evaluate(
        params,
        key,
        root=root,
        progress=False,
        subject=subject,
        record_extra={"inputs": inputs},
    )
    seconds = {"train": trained_s, "evaluate": time.perf_counter() - t0 - trained_s}
    return EntryOutcome(key, outcome.run_id, float(evaluation.doc["query_map"]), True, seconds)


def evaluate_again(params: Params, key: RunKey, inputs: dict[str, str], root) -> EntryOutcome:
    """The training of ``key`` stands (its inputs unchanged); only what evaluates it changed:
    evaluate the model of its run record again (loaded from MLflow, without unpickling)."""
    from .evaluation import evaluate

    t0 = time.perf_counter()
    evaluation = evaluate(
        params,
        key,
        root=root,
        progress=False,
        record_extra={"inputs": inputs},
    )
    run_id = evaluation.doc["run_id"]
    return EntryOutcome(key, run_id, float(evaluation.doc["query_map"]), False, {"evaluate": time.perf_counter() - t0})
