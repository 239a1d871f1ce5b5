"""The matrix stage: every training of the datasets (methods and variants x code lengths x seeds)
as one job on the Ray cluster, scheduled by Ray Tune, each trained and evaluated in one warm process.

    python -m pipeline.matrix [--dataset NAME ...] [--params FILE] [--profile NAME] [--set key=value ...]

An entry whose inputs (shards, objective, train/model/mlflow settings, code) are those its records
were written with is skipped; one whose evaluation settings alone changed is evaluated again.
See docs/pipeline.md ("The matrix").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import recipes
from .codegraph import code_digest
from .config import Params, add_config_args, config_from_args
from .errors import ConfigError, PipelineError, Terminated, run_main
from .runkey import RecordError, RunKey, read_record

__all__ = ["MatrixFailed", "Plan", "inputs_of", "plan", "run_matrix", "main"]

#: The keys of ``train`` that list the matrix (or name its default entry) rather than set how
#: one entry trains: changing them adds or drops entries, never retrains one.
MATRIX_KEYS = ("methods", "seeds", "method")
#: A trial that only drives a Ray Train group: its (logical) memory request, in bytes.
TRIAL_MEMORY = 1 << 20
#: What an entry runs (its code digest covers every module this one imports, transitively).
ENTRY_MODULE = "pipeline.entry"


class MatrixFailed(PipelineError):
    """Some entries failed for good (after their retries); the others are kept."""


def _plain(value: Any) -> Any:
    """Settings as plain JSON values (dataclasses, pydantic models, tuples)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def inputs_of(params: Params, key: RunKey, recipe: recipes.Recipe, shards_sha: str) -> dict[str, str]:
    """The digests an entry's records carry: ``train`` over everything its training reads
    (the shards, its objective, ``train`` but the matrix lists, ``model``, ``mlflow``, the
    code an entry runs), ``evaluate`` over that and the ``evaluate`` settings."""
    train = {k: v for k, v in _plain(params.train).items() if k not in MATRIX_KEYS}
    reads = {
        "key": dataclasses.asdict(key),
        "shards": shards_sha,
        "objective": _plain(dataclasses.asdict(recipe) | {"source": None}),
        "train": train,
        "model": _plain(params.model),
        "mlflow": _plain(params.mlflow),
        "code": code_digest(ENTRY_MODULE),
    }
    trained = _digest(reads)
    return {"train": trained, "evaluate": _digest({"train": trained, "evaluate": _plain(params.evaluate)})}


@dataclass(frozen=True)
class Plan:
    """What a run of the matrix does with each entry."""

    train: list[RunKey]  # no records, or records of other inputs: train and evaluate
    evaluate: list[RunKey]  # trained with these inputs, evaluated with other settings
    done: list[RunKey]  # trained and evaluated with these inputs: skipped
    recipes: dict[RunKey, recipes.Recipe]
    inputs: dict[RunKey, dict[str, str]]


def _recorded(path: Path) -> dict[str, Any] | None:
    """A record's ``inputs`` digests, or None (absent, unreadable, or written without them)."""
    try:
        doc = read_record(path, "record", missing="-")
    except RecordError:
        return None
    inputs = doc.get("inputs")
    return inputs if isinstance(inputs, dict) else None


def plan(params: Params, keys: Sequence[RunKey], root: str | os.PathLike = ".") -> Plan:
    """Each entry's inputs compared with its records under ``root``."""
    from .artifacts import prepared_manifest

    todo: dict[str, list[RunKey]] = {"train": [], "evaluate": [], "done": []}
    made: dict[RunKey, recipes.Recipe] = {}
    inputs: dict[RunKey, dict[str, str]] = {}
    shards: dict[str, str] = {}
    for key in keys:
        if key.dataset not in shards:
            shards[key.dataset] = prepared_manifest(params, key.dataset).sha256
        recipe = made[key] = recipes.resolve(params, key.dataset, key.bits, key.method, root)
        now = inputs[key] = inputs_of(params, key, recipe, shards[key.dataset])
        trained = _recorded(key.run_file(root))
        evaluated = _recorded(key.evaluation_file(root))
        if trained is None or trained.get("train") != now["train"]:
            todo["train"].append(key)
        elif evaluated is None or evaluated.get("evaluate") != now["evaluate"] or not key.metrics_file(root).is_file():
            todo["evaluate"].append(key)
        else:
            todo["done"].append(key)
    return Plan(todo["train"], todo["evaluate"], todo["done"], made, inputs)


def trial_resources(params: Params) -> dict[str, float]:
    """What one trial holds: with ``train.num_workers`` 1 the entry trains in the trial's own
    process, holding what one Ray Train worker holds (one CPU, and one GPU with train.use_gpu;
    its train.loader_workers reader processes are not reserved, as under Ray Train), so it
    trains with the same threads, and numbers, as ``python -m pipeline.train``; with more
    workers the trial only drives a Ray Train group that requests its own (the trial holds no CPU)."""
    t = params.train
    if t.num_workers > 1:
        # no CPU (even 0.01 would leave a node one CPU short of its last worker); a logical byte
        # of memory, as Tune wants some resource per trial (pipeline.tune does the same)
        return {"cpu": 0, "memory": TRIAL_MEMORY}
    return {"cpu": 1, "gpu": 1 if t.use_gpu else 0}


def _trial(config: dict[str, Any], *, params: Params, root: str, chosen: Plan) -> None:
    """One entry, in a Ray Tune trial's process: train and evaluate (or evaluate again)."""
    from ray import tune

    from .entry import evaluate_again, train_and_evaluate

    started = time.time()
    os.chdir(root)  # the records' relative paths and a relative SQLite store resolve as in the stage
    key = RunKey(**config["key"])
    if key in chosen.evaluate:
        outcome = evaluate_again(params, key, chosen.inputs[key], root)
    else:
        outcome = train_and_evaluate(params, key, chosen.recipes[key], chosen.inputs[key], root)
    seconds = {f"{k}_s": v for k, v in outcome.seconds.items()}
    report = {"query_map": outcome.query_map, "trained": outcome.trained, **seconds}
    tune.report(report | {"started_at": started, "ended_at": time.time()})


def _one_line(error: BaseException | None) -> str:
    text = str(error or "unknown error").strip().splitlines()
    # Ray wraps the trial's exception: its last line names it
    last = next((line for line in reversed(text) if line.strip()), "unknown error")
    return last.strip()[:300]


@dataclass(frozen=True)
class MatrixOutcome:
    plan: Plan
    finished: dict[RunKey, dict[str, Any]]  # the trial's last report
    failed: dict[RunKey, str]  # the error, in one line
    seconds: float


def run_matrix(params: Params, datasets: Sequence[str], root: str | os.PathLike = ".") -> MatrixOutcome:
    """Train and evaluate every entry of ``datasets`` not done yet, as Ray Tune trials on the
    cluster this process is connected to (or a local one); raises MatrixFailed naming the
    entries that failed for good, after the others finished."""
    t0 = time.perf_counter()
    root = os.path.abspath(root)
    for name in datasets:
        params.dataset(name)
    keys = RunKey.matrix(params, datasets)
    chosen = plan(params, keys, root)
    pending = chosen.train + chosen.evaluate
    print(
        f"matrix of {', '.join(datasets)}: {len(keys)} entries; {len(chosen.train)} to train, "
        f"{len(chosen.evaluate)} to evaluate again, {len(chosen.done)} unchanged since their records",
        flush=True,
    )
    if not pending:
        return MatrixOutcome(chosen, {}, {}, time.perf_counter() - t0)
    open_experiments(params, datasets)
    finished, failed = _run_trials(params, chosen, pending, root)
    outcome = MatrixOutcome(chosen, finished, failed, time.perf_counter() - t0)
    if failed:
        t = params.train
        names = "; ".join(f"{key.stem} ({why})" for key, why in sorted(failed.items()))
        raise MatrixFailed(
            f"{len(failed)} of {len(pending)} entries failed after {t.max_failures + 1} attempt(s) each "
            f"(train.max_failures={t.max_failures}): {names}; the {len(finished)} others are kept, and a rerun "
            "runs only the unfinished entries"
        )
    return outcome


#: Off ("0") runs each entry in a fresh process; on (the default) a trial's process, its imports
#: done, takes the next entry that fits it (Tune's actor reuse). bench/matrix.py compares both.
REUSE_ENV = "DPFAH_MATRIX_REUSE_PROCESSES"


def _reuse_processes() -> bool:
    return os.environ.get(REUSE_ENV, "1").strip() != "0"


def open_experiments(params: Params, datasets: Sequence[str]) -> None:
    """The tracking store (its tables) and each dataset's experiment, created here, in the driver,
    before the trials open their runs: trials that each found a new SQLite store created its
    tables at once and raced ("table webhooks already exists"), which could leave it
    half-migrated for every retry."""
    from .console import quiet_libraries
    from .tracking import check_store, mlflow_errors, open_experiment, tracking_uri, using_tracking_uri

    quiet_libraries()  # MLflow's INFO lines as it creates a store's tables
    uri = tracking_uri(params)
    check_store(uri, create=True)
    with using_tracking_uri(uri):
        for name in datasets:
            experiment = f"{params.mlflow.experiment}-{name}"
            with mlflow_errors(f"creating experiment {experiment}", uri):
                open_experiment(experiment, uri)


@contextlib.contextmanager
def _stopped_by_sigterm():
    """Inside the block, SIGTERM asks Tune to stop (its SIGUSR1 handler: a flag it checks, so the
    trials end and fit returns) and is noted in the yielded list; the stage then exits as
    terminated. An exception raised from a signal handler, as errors.terminate does, can land in
    a finalizer (an actor handle's __del__) where Python ignores it: the matrix then ran on."""
    stopped: list[int] = []
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        yield stopped
        return

    def on_sigterm(signum, frame):
        stopped.append(signum)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_trials(
    params: Params, chosen: Plan, pending: list[RunKey], root: str
) -> tuple[dict[RunKey, dict[str, Any]], dict[RunKey, str]]:
    import functools

    # Tune's own console output (its configuration box, the results folder, a TensorBoard hint, the
    # trial table) off: the stage prints a line per entry. Read when Tune starts, so set first.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("AIR_VERBOSITY", "0")
    from ray import tune

    from .cluster import ensure_ray, shutdown_if_started, started_here
    from .console import quiet_libraries
    from .tracking import resolve_uri

    quiet_libraries()
    t = params.train
    started = False
    try:
        ensure_ray()
        started = started_here()
        trainable = tune.with_resources(
            functools.partial(_trial, params=params, root=root, chosen=chosen), trial_resources(params)
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"key": tune.grid_search([dataclasses.asdict(k) for k in pending])},
            tune_config=tune.TuneConfig(num_samples=1, reuse_actors=_reuse_processes()),
            run_config=tune.RunConfig(
                name=f"matrix-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                storage_path=resolve_uri(t.storage_path),
                failure_config=tune.FailureConfig(max_failures=t.max_failures),
                callbacks=[_progress(len(pending))],
                verbose=0,
            ),
        )
        with _stopped_by_sigterm() as stopped:
            results = tuner.fit()
        if stopped:
            raise Terminated()
    except KeyboardInterrupt:
        shutdown_if_started(started)
        raise
    finished, failed = {}, {}
    for result in results:
        key = RunKey(**result.config["key"])
        if result.error is not None:
            failed[key] = _one_line(result.error)
        elif result.metrics and "query_map" in result.metrics:
            finished[key] = dict(result.metrics)
        else:
            failed[key] = "ended without a report"
    return finished, failed


def _progress(total: int):
    """A Tune callback printing a line per finished or failed entry (Tune's own table is off)."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            self.done = 0

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.done += 1
            key = RunKey(**trial.config["key"])
            what = "trained and evaluated" if result.get("trained") else "evaluated again"
            print(f"[{self.done}/{total}] {key.stem}: {what}, query mAP {result['query_map']:.4f}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            key = RunKey(**trial.config["key"])
            print(f"[-/{total}] {key.stem}: failed (the error follows at the end)", file=sys.stderr, flush=True)

    return Progress()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.matrix",
        description="Train and evaluate every entry of the matrix (bits x train.methods x train.seeds) of each "
        "dataset as Ray Tune trials on the Ray cluster (RAY_ADDRESS, a running `ray start --head`, or a local "
        "one): as many at once as the cluster holds, each trained and evaluated in one process. Entries whose "
        "inputs are unchanged since their records were written are skipped.",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        metavar="NAME",
        help="a dataset of params.yaml (repeatable; default: every dataset in prepare.datasets)",
    )
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    datasets = args.dataset or list(params.prepare.datasets)
    if not datasets:
        raise ConfigError("no dataset: give --dataset NAME or list datasets in prepare.datasets")
    from .tracking import check_store, tracking_uri

    check_store(tracking_uri(params), create=True)  # before Ray: fail in a second
    outcome = run_matrix(params, datasets)
    print(
        f"matrix done in {outcome.seconds:.0f} s: {len(outcome.finished)} entries run, "
        f"{len(outcome.plan.done)} unchanged",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
