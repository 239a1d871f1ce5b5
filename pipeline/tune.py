"""Search a method's hyper-parameters and the code length with Ray Tune; every trial is a Ray Train run.

    python -m pipeline.tune --dataset cifar10 [--params FILE] [--set key=value ...]

The search runs train.method over the knobs of ``tune.space`` and ``tune.ranges``, any
method alike (params.yaml gives DPFAH's eta and zeta); a knob the method does not have is
an error naming it and what the method has. The driver (this process) opens the search's MLflow run, then runs a Tune search whose
trials each fit a ``TorchTrainer`` through :func:`pipeline.train_driver.run_training` (the same
training as the train stage, its MLflow run nested under the search's). Rank 0's per-epoch
reports reach Tune through ``TuneReportCallback``; ASHA stops trials whose validation mAP
(``val_map``) lags. A trial that fails is retried (``tune.max_failures``) under the same
names: its Ray Train run resumes from its last checkpoint, its MLflow run is reopened.
Afterwards the driver marks the runs of stopped trials KILLED and writes
``tune/<dataset>/best.json`` (the best configuration by validation mAP, overall and per code
length: the trainings of that method read it when ``use_tuned`` is true, through ``pipeline.objective``) and a summary table
(``summary.md``, ``summary.csv``), also logged to the search's MLflow run.

The query set is never looked at: trials are compared on the validation split only.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .artifacts import TUNE_DIR, tune_dir, write_atomic, write_json_atomic
from .cluster import ensure_ray
from .config import Params, add_config_args, config_from_args
from .errors import ConfigError, PipelineError, run_main
from .registry import model_name
from .tracking import connect, git_commit, resolve_uri, tracked_run
from .train_driver import run_training

__all__ = [
    "TrialRow",
    "SearchOutcome",
    "searched_knobs",
    "search_space",
    "trial_recipe",
    "max_concurrency",
    "run_search",
    "summary_markdown",
    "summary_csv",
    "main",
]

METRIC = "val_map"  # validation mAP@ALL, reported by rank 0 after every epoch
STATUS_COMPLETED, STATUS_STOPPED, STATUS_ERROR = "completed", "stopped", "error"
TRIAL_MEMORY = 1 << 20  # bytes: the Tune trial's own (logical) resource request


class SearchFailed(PipelineError):
    """No trial of the search produced a validation mAP."""


@dataclass(frozen=True)
class TrialRow:
    """One trial of a search, as the summary and best.json see it."""

    trial_id: str
    hparams: dict[str, Any]  # the searched knobs' values
    bits: int
    val_map: float  # the best validation mAP over the epochs it ran (nan: none)
    best_epoch: int
    epochs: int  # epochs it ran
    status: str  # completed | stopped (by the scheduler) | error
    run_id: str  # its MLflow run ("" when none was found)
    run_name: str
    error: str = ""


@dataclass(frozen=True)
class SearchOutcome:
    name: str
    parent_run_id: str
    rows: tuple[TrialRow, ...]
    best: TrialRow
    best_file: str
    summary_md: str
    summary_csv: str


# ----------------------------------------------------------------------------- the search


def searched_knobs(params: Params) -> dict[str, tuple[str, tuple[Any, ...]]]:
    """What the search varies besides the code length: knob -> ("values", the values to
    try) or ("range", (low, high)) sampled log-uniformly, for train.method: the knobs of
    ``tune.space`` and ``tune.ranges`` (a knob in both: its range, with a random search).
    A ``ConfigError`` names a knob the method does not have (and lists what it has), a value
    of the wrong kind, a variant (its own settings would be overridden) and a method given
    nothing to search."""
    from .methods import as_declared, check_hyperparameters, declared_hyperparameters, tunable_hyperparameters

    c, method = params.tune, params.train.method
    if method in params.variants:
        raise ConfigError(
            f"train.method: {method} is a variant; the search varies a method's own hyper-parameters: set train.method to a method"
        )
    have = declared_hyperparameters(method)
    knobs: dict[str, tuple[str, tuple[Any, ...]]] = {}
    for section, entries in (("space", c.space), ("ranges", c.ranges)):
        for knob, value in entries.items():
            where = f"tune.{section}.{knob}"
            if knob not in have:
                raise ConfigError(
                    f"{where}: {method} has no hyper-parameter {knob!r} (it has: {', '.join(sorted(have))}; worth searching: {', '.join(tunable_hyperparameters(method))})"
                )
            if section == "space":
                for v in value:
                    check_hyperparameters(method, {knob: v}, "tune.space")
                value = tuple(as_declared(method, knob, v) for v in value)
                knobs[knob] = ("values", value)
            else:
                if isinstance(have[knob], (bool, str, tuple, list)):
                    raise ConfigError(
                        f"{where}: {knob} is not a number (its default is {have[knob]!r}): list its values under tune.space"
                    )
                knobs[knob] = ("range", value)  # a range (random search only) wins over the knob's list
    if not knobs:
        raise ConfigError(
            f"tune.space: empty, and {method} has no default search; give the values of one or more of its knobs, "
            f"e.g. --set 'tune.space.{tunable_hyperparameters(method)[0]}=[...]' (worth searching: {', '.join(tunable_hyperparameters(method))}; "
            f"it has: {', '.join(sorted(have))})"
        )
    return knobs


def search_space(params: Params, max_concurrent: int = 0) -> tuple[dict[str, Any], Any, int]:
    """(Tune param_space, search algorithm, num_samples) from the ``tune`` section.

    ``grid``: every combination of the searched knobs' values (:func:`searched_knobs`) and
    bits, once. ``random``: ``num_samples`` seeded draws, each knob from its values (or
    log-uniformly from its range), bits from its list.
    The generator itself bounds the trials running at once (Tune ignores
    ``TuneConfig.max_concurrent_trials`` when given a search algorithm of this kind)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    c = params.tune
    space: dict[str, Any] = {}
    for knob, (kind, value) in searched_knobs(params).items():
        if kind == "range":
            space[knob] = tune.loguniform(*value)
        else:
            space[knob] = tune.grid_search(list(value)) if c.search == "grid" else tune.choice(list(value))
    space["bits"] = tune.grid_search(list(c.bits)) if c.search == "grid" else tune.choice(list(c.bits))
    return space, BasicVariantGenerator(max_concurrent=max_concurrent, random_state=params.seed), c.num_samples


def max_concurrency(params: Params, resources: dict[str, float] | None = None) -> int:
    """Trials at once: ``tune.max_concurrent_trials``, else what the cluster holds now
    (GPUs, or CPUs on CPU workers, divided by the workers of one trial)."""
    if params.tune.max_concurrent_trials:
        return params.tune.max_concurrent_trials
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    unit = "GPU" if params.train.use_gpu else "CPU"
    return max(1, int(resources.get(unit, 0)) // params.train.num_workers)


def _absolute(params: Params) -> Params:
    """Paths resolved here, in the driver: trials and workers run in other directories."""
    t = params.train
    root = params.data.root if "://" in params.data.root else os.path.abspath(params.data.root)
    weights = params.model.backbone_weights
    model = replace(params.model, backbone_weights=os.path.abspath(weights) if weights else None)
    tracking = resolve_uri(os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri)
    return replace(
        params,
        data=replace(params.data, root=root),
        train=replace(t, storage_path=resolve_uri(t.storage_path)),
        model=model,
        mlflow=replace(params.mlflow, tracking_uri=tracking),
    )


def _shown(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _trial_run_name(search_name: str, trial_id: str, config: dict[str, Any]) -> str:
    """Unique per search, stable across retries of the trial (so a retry resumes its run)."""
    index = trial_id.rsplit("_", 1)[-1]
    knobs = "".join(f"-{k}{_shown(v)}" for k, v in config.items() if k != "bits")
    return f"{search_name}-t{index}{knobs}-{int(config['bits'])}b"


def trial_recipe(params: Params, dataset: str, config: dict[str, Any]):
    """What a trial trains: train.method with its knobs from params (never from best.json)
    and the searched ones (``config``, with ``bits``) from the search."""
    from . import recipes

    bits = int(config["bits"])
    base = recipes.resolve(replace(params, use_tuned=False), dataset, bits)
    searched = {k: v for k, v in config.items() if k != "bits"}
    return replace(base, hparams={**base.hparams, **searched}, source={"weights_from": "search"})


def _trial(config: dict[str, Any], *, params: Params, dataset: str, search_name: str, parent_run_id: str) -> None:
    """One Tune trial: a distributed training whose rank-0 reports reach Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ["MLFLOW_TRACKING_URI"] = params.mlflow.tracking_uri  # absolute, from the driver
    trial_id = tune.get_context().get_trial_id()
    run_training(
        params,
        dataset,
        int(config["bits"]),
        run_name=_trial_run_name(search_name, trial_id, config),
        write_run_file=False,
        recipe=trial_recipe(params, dataset, config),
        parent_run_id=parent_run_id,
        callbacks=[TuneReportCallback()],
    )


class _PlacementGroupJanitor:
    """Removes the placement groups of this job whose creator actor has died.

    When ASHA stops a trial, its Ray Train controller dies with it, and the worker group's
    placement group outlives it (non-detached placement groups live as long as their job).
    Ray Train's own cleaner, a detached actor, finds the cluster through the State API, which
    fails wherever more than one local Ray instance runs on the machine ("Found multiple
    active Ray instances"): the stopped trial's CPUs/GPUs then stay reserved and the next
    trial never starts its workers. This thread, in the driver, does the cleaner's job. It
    reads the GCS placement group table through Ray's internal accessor (the public table
    lacks the creator fields); if that API moves, it only warns.
    """

    def __init__(self, interval_s: float = 2.0):
        import threading

        self.interval_s = interval_s
        self.removed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="placement-group-janitor", daemon=True)

    def __enter__(self) -> _PlacementGroupJanitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sweep()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception as e:  # never take the search down
                print(f"warning: placement group janitor stopped: {type(e).__name__}: {e}", file=sys.stderr)
                return

    def sweep(self) -> int:
        import ray
        from ray._private import state as ray_state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        accessor = ray_state.state._connect_and_get_accessor()
        job = ray.get_runtime_context().get_job_id()
        removed = 0
        for raw in accessor.get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            # created by an actor (a driver's have no creator actor) that died, in this job
            by_actor = pg.creator_actor_id and not ray.ActorID(pg.creator_actor_id).is_nil()
            orphaned = by_actor and pg.creator_actor_dead and not pg.is_detached and pg.creator_job_id.hex() == job
            if not orphaned or pg.state == gcs_pb2.PlacementGroupTableData.REMOVED:
                continue
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                removed += 1
            except Exception:  # removed meanwhile (by Ray Train's cleaner)
                pass
        self.removed += removed
        return removed


def _check_search(params: Params, dataset: str):
    from .artifacts import prepared_manifest

    params.dataset(dataset)
    searched_knobs(params)
    manifest = prepared_manifest(params, dataset)
    if manifest.split("validation").count == 0:
        raise ConfigError(
            f"datasets.{dataset}.validation: the search compares trials on the validation split, which is empty (prepare it with validation > 0)"
        )
    epochs, c = params.train.epochs, params.tune
    if c.scheduler == "asha" and c.grace_period >= epochs:
        raise ConfigError(
            f"tune.grace_period: {c.grace_period} must be < train.epochs {epochs} (ASHA stops a trial only before its last "
            "epoch; use tune.scheduler=none to run every trial to the end)"
        )
    return manifest


def _scheduler(params: Params):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    c, t = params.tune, params.train
    if c.scheduler != "asha":
        return FIFOScheduler()
    # Rungs stop before the last epoch (max_t = epochs - 1, stop_last_trials=False): a trial
    # that reaches its last epoch always finishes and logs its model.
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=t.epochs - 1,
        grace_period=c.grace_period,
        reduction_factor=c.reduction_factor,
        stop_last_trials=False,
    )


def _concurrency(params: Params) -> int:
    """Trials at once, with a note when the cluster cannot hold even one trial now."""
    c, t = params.tune, params.train
    concurrency = max_concurrency(params)
    if not c.max_concurrent_trials:
        import ray

        unit = "GPU" if t.use_gpu else "CPU"
        if ray.cluster_resources().get(unit, 0) < t.num_workers:
            print(
                f"note: the cluster has fewer {unit}s now than one trial needs ({t.num_workers}); running one trial at a "
                "time. On an autoscaling cluster set tune.max_concurrent_trials to what it can grow to.",
                file=sys.stderr,
            )
    return concurrency


def _tuner(params: Params, dataset: str, search_name: str, parent_id: str, concurrency: int, verbose: int):
    from ray import tune

    c, t = params.tune, params.train
    space, search_alg, num_samples = search_space(params, concurrency)
    # The trials' Ray Train runs go beside the Tune experiment: <storage>/<search>/<trial run>.
    trial_params = replace(params, train=replace(t, storage_path=f"{t.storage_path.rstrip('/')}/{search_name}"))
    trainable = tune.with_parameters(
        _trial, params=trial_params, dataset=dataset, search_name=search_name, parent_run_id=parent_id
    )
    return tune.Tuner(
        # The Train workers hold the CPUs/GPUs; the trial itself only waits on them. A token of
        # memory instead of the usual 0.01 CPU: with CPU workers that fill a node exactly
        # (2 workers, 2 CPUs), 0.01 CPU leaves 1.99 and the worker group never starts.
        tune.with_resources(trainable, {"cpu": 0, "memory": TRIAL_MEMORY}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=search_alg, scheduler=_scheduler(params), num_samples=num_samples
        ),
        run_config=tune.RunConfig(
            name=search_name,
            storage_path=t.storage_path,
            failure_config=tune.FailureConfig(max_failures=c.max_failures),
            verbose=verbose,
        ),
    )


def _write_outputs(out: Path, rows: list[TrialRow], best: TrialRow | None, meta: dict[str, Any]) -> tuple[Path, Path]:
    """summary.md and summary.csv, written and logged to the search's run."""
    import mlflow

    out.mkdir(parents=True, exist_ok=True)
    md_path = write_atomic(out / "summary.md", summary_markdown(rows, meta, best, pivots=meta["search"] == "grid"))
    csv_path = write_atomic(out / "summary.csv", summary_csv(rows, meta["knobs"]))
    mlflow.log_artifact(str(md_path), artifact_path="summary")
    mlflow.log_artifact(str(csv_path), artifact_path="summary")
    mlflow.log_metrics(
        {
            "trials": len(rows),
            "trials_completed": sum(r.status == STATUS_COMPLETED for r in rows),
            "trials_stopped": sum(r.status == STATUS_STOPPED for r in rows),
            "trials_failed": sum(r.status == STATUS_ERROR for r in rows),
        }
    )
    return md_path, csv_path


def run_search(
    params: Params,
    dataset: str,
    *,
    out_dir: str | os.PathLike | None = None,
    name: str | None = None,
    verbose: int = 1,
) -> SearchOutcome:
    """Run the search described by ``params.tune`` on ``dataset``; see the module docstring.

    ``out_dir`` (default ``tune/<dataset>``) receives best.json, summary.md and summary.csv.
    ``name`` names the search (Tune experiment, MLflow parent run, prefix of the trials'
    Ray Train runs); it must be new: by default a timestamp and a random suffix."""
    import mlflow

    manifest = _check_search(params, dataset)
    knobs = searched_knobs(params)
    p = _absolute(params)
    c, t = p.tune, p.train
    out = Path(out_dir) if out_dir is not None else tune_dir(dataset)
    search_name = name or f"tune-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    uri = p.mlflow.tracking_uri

    # The store is created here, once, before any trial.
    with tracked_run(uri, f"{p.mlflow.experiment}-{dataset}", search_name) as parent:
        parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
        client = connect(uri)
        try:
            mlflow.set_tags(
                {
                    "kind": "tune-search",
                    "git_commit": git_commit(),
                    "dataset": dataset,
                    "protocol": manifest.protocol,
                    "manifest_sha256": manifest.sha256,
                    "ray_run_name": search_name,
                }
            )
            mlflow.log_params(
                {f"tune.{k}": list(v) if isinstance(v, tuple) else v for k, v in asdict(c).items() if k != "datasets"}
            )
            mlflow.log_params(
                {"dataset": dataset, "train.epochs": t.epochs, "num_workers": t.num_workers, "use_gpu": t.use_gpu}
            )
            ensure_ray()
            concurrency = _concurrency(p)
            mlflow.log_params({"max_concurrent_trials": concurrency})
            with _PlacementGroupJanitor() as janitor:
                results = _tuner(p, dataset, search_name, parent_id, concurrency, verbose).fit()
            if janitor.removed:
                mlflow.set_tag("placement_groups_cleaned", str(janitor.removed))

            rows = _collect(results, client, experiment_id, parent_id, search_name, t.epochs, list(knobs))
            best = _select_best(rows)
            meta = {
                "name": search_name,
                "method": p.train.method,
                "knobs": list(knobs),
                "dataset": dataset,
                "protocol": manifest.protocol,
                "search": c.search,
                "scheduler": c.scheduler,
                "epochs": t.epochs,
                "image_size": t.image_size,
                "num_workers": t.num_workers,
            }
            md_path, csv_path = _write_outputs(out, rows, best, meta)
            if best is None:
                raise SearchFailed(
                    f"search {search_name}: no trial completed or was stopped early with a validation mAP{_failures(rows, c.max_failures)} (see {md_path} and the MLflow runs)"
                )
            experiment_name = mlflow.get_experiment(experiment_id).name
            record = _best_record(
                rows,
                best,
                search_name,
                parent_id,
                uri,
                params.mlflow.tracking_uri,
                experiment_name,
                manifest.sha256,
                dataset,
                params,
                p.train.method,
            )
            best_path = write_json_atomic(out / "best.json", record)
            mlflow.log_artifact(str(best_path), artifact_path="summary")
            numeric = {
                f"search/best_{k}": float(v)
                for k, v in best.hparams.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            mlflow.log_metrics({"validation/best_map": best.val_map, **numeric, "search/best_bits": best.bits})
            mlflow.set_tags({"best_run_id": best.run_id, "best_run_name": best.run_name})
        finally:
            _close_children(client, experiment_id, parent_id)
    return SearchOutcome(search_name, parent_id, tuple(rows), best, str(best_path), str(md_path), str(csv_path))


def _children(client, experiment_id: str, parent_id: str) -> list:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10000
    )


def _close_children(client, experiment_id: str, parent_id: str) -> None:
    """Runs the scheduler stopped (or an interruption left behind) end KILLED, not RUNNING."""
    for run in _children(client, experiment_id, parent_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")


def _collect(
    results, client, experiment_id: str, parent_id: str, search_name: str, epochs: int, knobs: Sequence[str]
) -> list[TrialRow]:
    by_name: dict[str, list] = {}
    for run in _children(client, experiment_id, parent_id):
        by_name.setdefault(run.data.tags.get("ray_run_name", ""), []).append(run)
    rows = []
    for result in results:
        config = result.config or {}
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        frame = result.metrics_dataframe
        val_map, best_epoch, ran = math.nan, -1, 0
        if frame is not None and METRIC in frame and frame[METRIC].notna().any():
            i = frame[METRIC].astype(float).idxmax()
            val_map, best_epoch = float(frame[METRIC][i]), int(frame["epoch"][i])
            ran = int(frame["epoch"].max()) + 1
        if result.error is not None:
            status = STATUS_ERROR
        elif ran < epochs:
            status = STATUS_STOPPED
        else:
            status = STATUS_COMPLETED
        run_name = _trial_run_name(search_name, trial_id, config) if config else ""
        runs = sorted(by_name.get(run_name, []), key=lambda r: r.info.start_time)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        run = (finished or runs or [None])[-1]
        for attempt in runs:
            client.set_tag(attempt.info.run_id, "tune.trial_id", trial_id)
            client.set_tag(attempt.info.run_id, "tune.status", status)
            if status == STATUS_STOPPED and attempt is run:
                # Stopped by the scheduler: the run is left RUNNING (its process killed) or
                # FAILED (its trainer interrupted); either way it was KILLED.
                if attempt.info.status != "KILLED":
                    client.set_terminated(attempt.info.run_id, "KILLED")
            elif attempt.info.status == "RUNNING":  # an attempt that died (then retried, or the trial failed)
                client.set_terminated(attempt.info.run_id, "FAILED")
        rows.append(
            TrialRow(
                trial_id=trial_id,
                hparams={k: config.get(k, math.nan) for k in knobs},
                bits=int(config.get("bits", 0)),
                val_map=val_map,
                best_epoch=best_epoch,
                epochs=ran,
                status=status,
                run_id=run.info.run_id if run is not None else "",
                run_name=run_name,
                error=_one_line(result.error) if result.error is not None else "",
            )
        )
    rows.sort(key=lambda r: (r.bits, *(_order(r.hparams[k]) for k in knobs), r.trial_id))
    return rows


def _order(value: Any) -> tuple:
    """Sort key for knob values of any kind (numbers before strings)."""
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _one_line(error: BaseException) -> str:
    """A trial's error in a line: the error the trial raised (not Ray's wrapper around it) and
    its first line, continued by the first detail line when it ends with a colon
    ("... failed due to worker errors: A worker health check failed.")."""
    cause = getattr(error, "cause", None)  # a RayTaskError wraps what the trial raised
    error = cause if isinstance(cause, BaseException) else error
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":"):
        text = " ".join([text, *[line for line in lines[1:] if not line.startswith("[")][:1]])
    return f"{type(error).__name__}: {text}"[:300]


def _failures(rows: Sequence[TrialRow], max_failures: int) -> str:
    """``"; N of M trials failed ..."`` naming the first error, or "" when none failed."""
    failed = [r for r in rows if r.status == STATUS_ERROR]
    if not failed:
        return ""
    tries = f"{max_failures + 1} attempts each (tune.max_failures={max_failures})"
    return f"; {len(failed)} of {len(rows)} trial(s) failed after {tries}, e.g. {failed[0].run_name or failed[0].trial_id}: {failed[0].error}"


def _select_best(rows: Sequence[TrialRow], among: str | None = None) -> TrialRow | None:
    """Highest validation mAP among the trials that ran to the end (their model is logged);
    a trial the scheduler stopped counts only when none completed, a failed trial never
    (its last retry failed too: it may have diverged)."""
    scored = [r for r in rows if not math.isnan(r.val_map) and r.status != STATUS_ERROR]
    completed = [r for r in scored if r.status == STATUS_COMPLETED]
    pool = completed or scored
    if not pool:
        return None
    return max(pool, key=lambda r: (r.val_map, -r.bits, r.trial_id))


def _best_record(
    rows, best, search_name, parent_id, tracking_uri, configured_uri, experiment, manifest_sha, dataset, params, method
) -> dict[str, Any]:
    def entry(r: TrialRow) -> dict[str, Any]:
        return {
            **r.hparams,
            "bits": r.bits,
            "val_map": r.val_map,
            "best_epoch": r.best_epoch,
            "run_id": r.run_id,
            # the trial's logged model, named as pipeline.train names it (a trial trains `method`)
            "model_uri": f"runs:/{r.run_id}/{model_name(params, dataset, r.bits, method)}"
            if r.run_id and r.status == STATUS_COMPLETED
            else None,
            "status": r.status,
        }

    by_bits = {}
    for bits in sorted({r.bits for r in rows}):
        top = _select_best([r for r in rows if r.bits == bits])
        if top is not None:
            by_bits[str(bits)] = entry(top)
    return {
        **entry(best),
        "method": method,
        "knobs": list(best.hparams),
        "metric": "validation mAP@ALL (validation split against the training images)",
        "dataset": dataset,
        "manifest_sha256": manifest_sha,
        "search_name": search_name,
        "search_run_id": parent_id,
        "experiment": experiment,
        # a local sqlite path stays as configured (relative): the file is kept by DVC
        "tracking_uri": configured_uri if tracking_uri.startswith("sqlite:") else tracking_uri,
        "by_bits": by_bits,
    }


# ----------------------------------------------------------------------------- summary tables


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _cell(rows: Sequence[TrialRow]) -> str:
    scored = [r for r in rows if not math.isnan(r.val_map)]
    if not scored:
        return "failed" if rows else ""
    top = max(scored, key=lambda r: r.val_map)
    return f"{top.val_map:.4f}" + ("*" if top.status == STATUS_STOPPED else "")


def _pivot(rows: Sequence[TrialRow], key, label: str, bit_lengths: Sequence[int]) -> list[str]:
    values = sorted({key(r) for r in rows}, key=lambda v: tuple(map(_order, v)) if isinstance(v, tuple) else _order(v))
    lines = [
        f"| {label} | " + " | ".join(f"{b} bits" for b in bit_lengths) + " |",
        "|---" * (len(bit_lengths) + 1) + "|",
    ]
    for v in values:
        cells = [_cell([r for r in rows if key(r) == v and r.bits == b]) for b in bit_lengths]
        shown = ", ".join(_fmt(x) for x in v) if isinstance(v, tuple) else _fmt(v)
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(
    rows: Sequence[TrialRow], meta: dict[str, Any], best: TrialRow | None, *, pivots: bool = True
) -> str:
    """The search as Markdown: validation mAP by each searched knob against the code length
    (for DPFAH's eta and zeta the shape of the paper's Tables 3 and 4), the full grid, and
    every trial. ``meta["knobs"]``: the searched knobs (default: those of the rows)."""
    bit_lengths = sorted({r.bits for r in rows})
    knobs = list(meta.get("knobs") or _knobs(rows))
    lines = [
        f"# Tune search `{meta['name']}`",
        "",
        f"Dataset `{meta['dataset']}` ({meta['protocol']}); {meta['search']} search, {len(rows)} trials, "
        f"scheduler {meta['scheduler']}; each trial {meta['epochs']} epochs at {meta['image_size']} px on "
        f"{meta['num_workers']} worker(s).",
        "",
        "Values: validation mAP@ALL (validation split against the training images) at each trial's best "
        "epoch; the query set is not used. `*`: the trial was stopped early by the scheduler (its mAP after "
        "fewer epochs).",
        "",
    ]
    if best is not None:
        shown = ", ".join(f"{k} {_fmt(best.hparams.get(k))}" for k in knobs)
        lines += [f"Best: {shown}, {best.bits} bits: {best.val_map:.4f} (MLflow run `{best.run_id}`).", ""]
    if pivots and rows:
        for knob in knobs:
            others = " and ".join(k for k in knobs if k != knob)
            lines += [f"## Validation mAP by {knob} and code length" + (f" (best over {others})" if others else ""), ""]
            lines += _pivot(rows, lambda r, k=knob: r.hparams.get(k), knob, bit_lengths) + [""]
        if len(knobs) > 1:
            lines += [f"## Every ({', '.join(knobs)})", ""]
            lines += _pivot(rows, lambda r: tuple(r.hparams.get(k) for k in knobs), ", ".join(knobs), bit_lengths) + [
                ""
            ]
    head = " | ".join(knobs)
    lines += [
        "## Trials, best first",
        "",
        f"| {head} | bits | val mAP | best epoch | epochs | status | MLflow run |",
        "|---" * (len(knobs) + 6) + "|",
    ]
    ranked = sorted(rows, key=lambda r: (math.isnan(r.val_map), -(r.val_map if not math.isnan(r.val_map) else 0)))
    for r in ranked:
        shown = "" if math.isnan(r.val_map) else f"{r.val_map:.4f}"
        status = r.status + (f" ({r.error})" if r.error else "")
        lines.append(
            f"| {' | '.join(_fmt(r.hparams.get(k)) for k in knobs)} | {r.bits} | {shown} | {r.best_epoch} | {r.epochs} | {status} | `{r.run_id}` |"
        )
    return "\n".join(lines) + "\n"


def _knobs(rows: Sequence[TrialRow]) -> list[str]:
    """The searched knobs of ``rows``, in the order the trials give them."""
    return list(dict.fromkeys(k for r in rows for k in r.hparams))


def summary_csv(rows: Sequence[TrialRow], knobs: Sequence[str] | None = None) -> str:
    knobs = list(knobs or _knobs(rows))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial_id", *knobs, "bits", "val_map", "best_epoch", "epochs", "status", "run_id"])
    for r in rows:
        writer.writerow(
            [
                r.trial_id,
                *(r.hparams.get(k, "") for k in knobs),
                r.bits,
                "" if math.isnan(r.val_map) else f"{r.val_map:.6f}",
                r.best_epoch,
                r.epochs,
                r.status,
                r.run_id,
            ]
        )
    return buf.getvalue()


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tune",
        description="Search train.method's hyper-parameters (tune.space, tune.ranges) and the code length with Ray Tune on a prepared "
        "dataset: every trial is a distributed training (the train stage's settings), ASHA stops trials whose "
        "validation mAP lags, and MLflow keeps the search as a parent run with one child run per trial. "
        "Writes tune/<dataset>/best.json (the best by validation mAP; use_tuned=true makes the "
        "method's trainings use it) and tune/<dataset>/summary.md and summary.csv.",
        epilog="The search space and scheduler are params.yaml's `tune` section, e.g. "
        "--set 'tune.space.eta=[1,5,10,15]' --set 'tune.space.zeta=[0.05,0.1,0.5,1]' --set 'tune.bits=[16,32,48,64]' "
        "(the paper's grid for DPFAH), or --set tune.search=random --set tune.num_samples=20 --set 'tune.ranges.eta=[0.5,20]'. "
        "Another method's knobs replace the mapping: --set train.method=dsh --set 'tune.space={alpha: [0.01, 0.1]}' (a knob the method lacks is an error). "
        "Trials run at once: tune.max_concurrent_trials, by default the cluster's GPUs (CPUs) // train.num_workers.",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="dataset name from params.yaml (its shards must be prepared, with a validation split)",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=None, help=f"where best.json and the summary go (default: {TUNE_DIR}/<dataset>)"
    )
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    outcome = run_search(params, args.dataset, out_dir=args.out)
    b = outcome.best
    stopped = sum(r.status == STATUS_STOPPED for r in outcome.rows)
    failed = sum(r.status == STATUS_ERROR for r in outcome.rows)
    if failed:
        print(
            f"warning: search {outcome.name}{_failures(outcome.rows, params.tune.max_failures)} (see {outcome.summary_md})",
            file=sys.stderr,
        )
    print(
        f"search {outcome.name}: {len(outcome.rows)} trials ({stopped} stopped early, {failed} failed); best {', '.join(f'{k} {_fmt(v)}' for k, v in b.hparams.items())}, "
        f"{b.bits} bits: validation mAP {b.val_map:.4f} (MLflow run {b.run_id}); wrote {outcome.best_file}, {outcome.summary_md}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
