"""Search a method's hyper-parameters and the code length with Ray Tune; every trial is a Ray Train run.

    python -m pipeline.tune --dataset cifar10 [--params FILE] [--set key=value ...]

The search runs train.method over the knobs of ``tune.space`` and ``tune.ranges``
(:mod:`pipeline.tune_space`); each trial fits a ``TorchTrainer`` through
:func:`pipeline.train_driver.run_training`, its MLflow run nested under the search's, and
ASHA stops trials whose validation mAP lags. Afterwards (:mod:`pipeline.tune_results`) the
driver writes ``tune/<dataset>/best.json`` and a summary table; docs/tune.md tells the rest.
The query set is never looked at: trials are compared on the validation split only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .artifacts import TUNE_DIR, tune_dir, write_atomic, write_json_atomic
from .cluster import PlacementGroupJanitor, ensure_ray
from .config import Params, add_config_args, config_from_args
from .errors import ConfigError, PipelineError, run_main
from .runkey import RunKey
from .tracking import connect, git_commit, resolve_uri, tracked_run
from .train_driver import FAIL_AT_EPOCH_ENV, absolute, run_training
from .tune_results import (
    METRIC,
    STATUS_COMPLETED,
    STATUS_ERROR,
    STATUS_STOPPED,
    TrialRow,
    best_record,
    close_children,
    collect,
    failures,
    fmt,
    select_best,
    summary_csv,
    summary_markdown,
)
from .tune_space import max_concurrency, search_space, searched_knobs, trial_recipe, trial_run_name

__all__ = ["SearchFailed", "SearchOutcome", "run_search", "build_parser", "main"]

TRIAL_MEMORY = 1 << 20  # bytes: the Tune trial's own (logical) resource request


class SearchFailed(PipelineError):
    """No trial of the search produced a validation mAP."""


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


def _resolved(params: Params) -> Params:
    """Paths resolved here, in the driver: trials and workers run in other directories."""
    t = params.train
    root = params.data.root if "://" in params.data.root else absolute(params.data.root)
    model = replace(params.model, backbone_weights=absolute(params.model.backbone_weights))
    tracking = resolve_uri(os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri)
    return replace(
        params,
        data=replace(params.data, root=root),
        train=replace(t, storage_path=resolve_uri(t.storage_path)),
        model=model,
        mlflow=replace(params.mlflow, tracking_uri=tracking),
    )


def _trial(
    config: dict[str, Any], *, params: Params, dataset: str, search_name: str, parent_run_id: str, env: dict[str, str]
) -> None:
    """One Tune trial: a distributed training whose rank-0 reports reach Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ.update(env)  # from the driver (the trial's process may belong to a cluster started before)
    trial_id = tune.get_context().get_trial_id()
    recipe = trial_recipe(params, dataset, config)
    run_training(
        params,
        RunKey(dataset, int(config["bits"]), recipe.entry, params.seed),
        run_name=trial_run_name(search_name, trial_id, config),
        write_run_file=False,
        recipe=recipe,
        parent_run_id=parent_run_id,
        callbacks=[TuneReportCallback()],
    )


def _check_search(params: Params, dataset: str):
    from .artifacts import prepared_manifest

    params.dataset(dataset)
    searched_knobs(params)
    manifest = prepared_manifest(params, dataset)
    if manifest.split("validation").count == 0:
        raise ConfigError(
            f"datasets.{dataset}.validation: the search compares trials on the validation split, which is empty "
            "(prepare it with validation > 0)"
        )
    epochs, c = params.train.epochs, params.tune
    if c.scheduler == "asha" and c.grace_period >= epochs:
        raise ConfigError(
            f"tune.grace_period: {c.grace_period} must be < train.epochs {epochs} (ASHA stops a trial only before its "
            "last "
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
                f"note: the cluster has fewer {unit}s now than one trial needs ({t.num_workers}); running one trial "
                "at a "
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
    env = {"MLFLOW_TRACKING_URI": params.mlflow.tracking_uri}  # absolute, resolved in the driver
    if os.environ.get(FAIL_AT_EPOCH_ENV):  # a test hook
        env[FAIL_AT_EPOCH_ENV] = os.environ[FAIL_AT_EPOCH_ENV]
    trainable = tune.with_parameters(
        _trial, params=trial_params, dataset=dataset, search_name=search_name, parent_run_id=parent_id, env=env
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
    p = _resolved(params)
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
            with PlacementGroupJanitor() as janitor:
                results = _tuner(p, dataset, search_name, parent_id, concurrency, verbose).fit()
            if janitor.removed:
                mlflow.set_tag("placement_groups_cleaned", str(janitor.removed))

            rows = collect(results, client, experiment_id, parent_id, search_name, t.epochs, list(knobs))
            best = select_best(rows)
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
                    f"search {search_name}: no trial completed or was stopped early with a validation "
                    f"mAP{failures(rows, c.max_failures)} (see {md_path} and the MLflow runs)"
                )
            experiment_name = mlflow.get_experiment(experiment_id).name
            record = best_record(
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
            close_children(client, experiment_id, parent_id)
    return SearchOutcome(search_name, parent_id, tuple(rows), best, str(best_path), str(md_path), str(csv_path))


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tune",
        description="Search train.method's hyper-parameters (tune.space, tune.ranges) and the code length with Ray "
        "Tune on a prepared dataset: every trial is a distributed training (the train stage's settings), ASHA stops "
        "trials whose validation mAP lags, and MLflow keeps the search as a parent run with one child run per trial. "
        "Writes tune/<dataset>/best.json (the best by validation mAP; use_tuned=true makes the "
        "method's trainings use it) and tune/<dataset>/summary.md and summary.csv.",
        epilog="The search space and scheduler are params.yaml's `tune` section, e.g. "
        "--set 'tune.space.eta=[1,5,10,15]' --set 'tune.space.zeta=[0.05,0.1,0.5,1]' --set 'tune.bits=[16,32,48,64]' "
        "(the paper's grid for DPFAH), or --set tune.search=random --set tune.num_samples=20 --set "
        "'tune.ranges.eta=[0.5,20]'. "
        "Another method's knobs replace the mapping: --set train.method=dsh --set 'tune.space={alpha: [0.01, 0.1]}' "
        "(a knob the method lacks is an error). "
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
            f"warning: search {outcome.name}{failures(outcome.rows, params.tune.max_failures)} (see "
            f"{outcome.summary_md})",
            file=sys.stderr,
        )
    print(
        f"search {outcome.name}: {len(outcome.rows)} trials ({stopped} stopped early, {failed} failed); best "
        f"{', '.join(f'{k} {fmt(v)}' for k, v in b.hparams.items())}, "
        f"{b.bits} bits: validation mAP {b.val_map:.4f} (MLflow run {b.run_id}); wrote {outcome.best_file}, "
        f"{outcome.summary_md}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
