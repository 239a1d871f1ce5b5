"""The tune stage: the search space, the summary, the best-configuration file, the DVC stage,
and one real search on a local Ray cluster (2-worker trials, ASHA stopping one early, the
other failing once and retried), and a search whose one trial fails with no retry left."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpfah.model import DPFAH
from pipeline.errors import ConfigError
from pipeline.runkey import RunKey
from tests.helpers import PARAMS_FILE, failing_at_epoch, toy_overrides, toy_params

REPO = Path(__file__).resolve().parents[1]

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _tracking(uri: str):
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, which outranks params in the
    stages: put both back afterwards so no later test writes to this database."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is not None:
            mlflow.set_tracking_uri(before)


def _row(eta, zeta, bits, val_map, status="completed", epochs=4, trial="t"):
    from pipeline.tune import TrialRow

    return TrialRow(
        f"{trial}-{eta}-{zeta}-{bits}",
        {"eta": eta, "zeta": zeta},
        bits,
        val_map,
        1,
        epochs,
        status,
        f"run-{eta}-{zeta}-{bits}",
        "name",
    )


# ----------------------------------------------------------------------------- config and space


def test_tune_section_defaults_and_errors_name_the_key():
    from pipeline.config import load_params

    p = load_params(ROOT / "params.yaml")
    assert p.tune.search == "grid" and p.tune.scheduler == "asha" and p.use_tuned is False
    assert p.tune.space == {"eta": (1.0, 10.0), "zeta": (0.1, 1.0)} and p.tune.ranges == {}
    assert p.tune.datasets == ()  # opt in: no tune@ stage by default
    for override, key in [
        ("tune.ranges.eta=[1,10]", "tune.ranges.eta"),  # ranges are for random search
        ("tune.reduction_factor=1", "tune.reduction_factor"),
        ("tune.bits=[0]", "tune.bits"),
        ("tune.space.zeta=[]", "tune.space.zeta"),
        ("tune.scheduler=hyperband", "tune.scheduler"),
        ("tune.max_concurrent_trials=0", "tune.max_concurrent_trials"),
        ("tune.budget=3", "tune.budget"),
        ("tune.num_samples=2", "tune.num_samples"),  # a seeded grid point twice is the same run
    ]:
        with pytest.raises(ConfigError, match=rf"^{key}"):
            load_params(ROOT / "params.yaml", [override])
    with pytest.raises(ConfigError, match="^tune.ranges.zeta"):
        load_params(ROOT / "params.yaml", ["tune.search=random", "tune.ranges.zeta=[1,0.1]"])


def test_search_space_grid_and_random():
    from ray.tune.search.sample import Categorical, Float

    from pipeline.config import load_params
    from pipeline.tune import search_space

    grid = load_params(ROOT / "params.yaml", ["tune.space.eta=[1,5]", "tune.space.zeta=[0.1]", "tune.bits=[16,32,64]"])
    space, alg, n = search_space(grid, max_concurrent=3)
    assert space == {
        "eta": {"grid_search": [1.0, 5.0]},
        "zeta": {"grid_search": [0.1]},
        "bits": {"grid_search": [16, 32, 64]},
    }
    assert n == 1 and alg.max_concurrent == 3

    rnd = load_params(ROOT / "params.yaml", ["tune.search=random", "tune.ranges.eta=[0.5,20]", "tune.num_samples=7"])
    space, alg, n = search_space(rnd)
    assert isinstance(space["eta"], Float) and (space["eta"].lower, space["eta"].upper) == (0.5, 20.0)
    assert "LogUniform" in type(space["eta"].get_sampler()).__name__
    assert isinstance(space["zeta"], Categorical) and list(space["zeta"].categories) == list(rnd.tune.space["zeta"])
    assert isinstance(space["bits"], Categorical) and n == 7


def test_concurrency_is_bounded_by_gpus_or_cpus_per_trial():
    from pipeline.config import load_params
    from pipeline.tune import max_concurrency

    def params(*o):
        return load_params(ROOT / "params.yaml", list(o))

    assert max_concurrency(params("train.num_workers=2"), {"CPU": 2.0}) == 1
    assert max_concurrency(params("train.num_workers=2"), {"CPU": 16.0}) == 8
    gpu = params("train.use_gpu=true", "train.num_workers=4")
    assert max_concurrency(gpu, {"CPU": 96.0, "GPU": 8.0}) == 2
    assert max_concurrency(gpu, {"CPU": 4.0}) == 1  # an autoscaling cluster with no GPU node yet
    assert max_concurrency(params("tune.max_concurrent_trials=5"), {"CPU": 2.0}) == 5


# ----------------------------------------------------------------------------- summary and best


def test_summary_tables_like_the_papers_tables_3_and_4():
    from pipeline.tune_results import select_best, summary_csv, summary_markdown

    rows = [
        _row(1.0, 0.1, 16, 0.50),
        _row(1.0, 1.0, 16, 0.60),
        _row(10.0, 0.1, 16, 0.70),
        _row(10.0, 1.0, 16, 0.40, status="stopped", epochs=1),
        _row(1.0, 0.1, 64, 0.55),
        _row(1.0, 1.0, 64, 0.80, status="stopped", epochs=2),
        _row(10.0, 0.1, 64, 0.75),
        _row(10.0, 1.0, 64, math.nan, status="error", epochs=0),
    ]
    best = select_best(rows)
    assert (best.hparams, best.bits) == ({"eta": 10.0, "zeta": 0.1}, 64)  # 0.80 was stopped early: completed trials win
    meta = {
        "name": "s",
        "dataset": "d",
        "protocol": "p",
        "search": "grid",
        "scheduler": "asha",
        "epochs": 4,
        "image_size": 32,
        "num_workers": 2,
    }
    md = summary_markdown(rows, meta, best)
    by_eta = md.split("## Validation mAP by eta")[1].split("##")[0]
    assert "| eta | 16 bits | 64 bits |" in by_eta
    assert "| 1 | 0.6000 | 0.8000* |" in by_eta  # best over zeta; * = stopped early
    assert "| 10 | 0.7000 | 0.7500 |" in by_eta
    by_zeta = md.split("## Validation mAP by zeta")[1].split("##")[0]
    assert "| 0.1 | 0.7000 | 0.7500 |" in by_zeta and "| 1 | 0.6000 | 0.8000* |" in by_zeta
    assert "| 10, 1 | 0.4000* | failed |" in md
    assert "Best: eta 10, zeta 0.1, 64 bits: 0.7500" in md

    table = list(csv.DictReader(io.StringIO(summary_csv(rows))))
    assert len(table) == 8 and table[7]["val_map"] == "" and table[7]["status"] == "error"
    assert float(table[0]["val_map"]) == 0.5 and table[0]["eta"] == "1.0" and table[0]["bits"] == "16"


def test_objective_takes_the_tuned_weights_at_the_same_code_length(toy_dataset, tmp_path):
    from pipeline import recipes
    from pipeline.artifacts import best_file

    work, images = toy_dataset
    tuned = toy_params(work, images, "use_tuned=true", "objectives.dpfah.eta=7", "objectives.dpfah.delta=2")
    with pytest.raises(ConfigError, match=r"^use_tuned: .*best.json not found"):
        recipes.resolve(tuned, "toy", 16, root=tmp_path)
    path = best_file("toy", tmp_path)
    path.parent.mkdir(parents=True)
    record = {
        "eta": 10.0, "zeta": 0.1, "bits": 64, "run_id": "r64", "search_run_id": "parent",
        "by_bits": {
            "16": {"eta": 1.0, "zeta": 1.0, "bits": 16, "run_id": "r16"},
            "64": {"eta": 10.0, "zeta": 0.1, "bits": 64, "run_id": "r64"},
        },
    }  # fmt: skip
    path.write_text(json.dumps(record))
    got = recipes.resolve(tuned, "toy", 16, root=tmp_path)  # a record without "method"/"knobs": DPFAH's eta, zeta
    assert got.hparams == {"eta": 1.0, "zeta": 1.0, "delta": 2.0}  # eta, zeta from the search; the rest from params
    source = got.source
    assert (
        source["tuned_trial_run_id"] == "r16"
        and source["tuned_search_run_id"] == "parent"
        and source["weights_from"] == "tune"
    )
    got = recipes.resolve(tuned, "toy", 32, root=tmp_path)  # not searched at 32 bits: the overall best
    assert (got.hparams["eta"], got.hparams["zeta"]) == (10.0, 0.1) and got.source["tuned_bits"] == "64"
    got = recipes.resolve(toy_params(work, images, "objectives.dpfah.eta=7"), "toy", 16, root=tmp_path)
    assert (got.hparams, got.source) == (
        {"eta": 7.0},
        {"weights_from": "params"},
    )  # use_tuned off: best.json is not read
    dsh = recipes.resolve(
        toy_params(work, images, "use_tuned=true", "objectives.dsh.alpha=0.5"), "toy", 16, "dsh", root=tmp_path
    )
    assert (dsh.hparams, dsh.source) == (
        {"alpha": 0.5},
        {"weights_from": "params"},
    )  # a search over dpfah: dsh keeps its knobs

    # The file the train stage reads under DVC round-trips, and names what it belongs to.
    recipe = recipes.resolve(tuned, "toy", 16, root=tmp_path)
    assert (recipe.entry, recipe.method, recipe.hparams["eta"], recipe.source["weights_from"]) == (
        "dpfah",
        "dpfah",
        1.0,
        "tune",
    )
    written = recipes.write(recipe, "toy", 16, root=tmp_path)
    assert written.name == "toy-16-dpfah.json" and recipes.read(written, "toy", 16) == recipe
    with pytest.raises(ConfigError, match="not 'toy' at 32"):
        recipes.read(written, "toy", 32)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="^use_tuned: .* is not a tune result"):
        recipes.resolve(tuned, "toy", 16, root=tmp_path)


def test_train_without_the_search_result_it_is_told_to_use_stops_before_ray(toy_dataset, tmp_path, monkeypatch):
    """use_tuned=true and no tune/<dataset>/best.json: one error naming the key, before
    any MLflow run or Ray start. (A real fit with the tuned eta and zeta: conftest's
    ``ray_trained``, checked in test_stage_train.)"""
    import pipeline.train_driver as train

    work, images = toy_dataset
    monkeypatch.chdir(tmp_path)
    params = toy_params(work, images, "use_tuned=true", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match="^use_tuned: .*best.json not found"):
        train.run_training(params, RunKey("toy", 16), write_run_file=False)
    assert not (tmp_path / "mlflow.db").exists()


def test_search_rejects_a_grace_period_that_leaves_nothing_to_stop(toy_dataset):
    from pipeline.tune import run_search

    work, images = toy_dataset
    params = toy_params(work, images, "train.epochs=2", "tune.grace_period=2")
    with pytest.raises(ConfigError, match=r"^tune.grace_period: 2 must be < train.epochs 2"):
        run_search(params, "toy")
    with pytest.raises(ConfigError, match=r"^datasets.nope"):
        run_search(params, "nope")


def test_cli_help_and_user_errors(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.tune", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0 and "validation mAP" in out.stdout and "--dataset" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.tune", "--dataset", "nope", "--set", f"data.root={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: datasets.nope")


# ----------------------------------------------------------------------------- the DVC stage


def test_dvc_tune_stage_reads_everything_but_what_the_search_owns(tmp_path):
    from pipeline.config import TuneConfig

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stage = stages["tune"]
    assert stage["foreach"] == "${tune.datasets}"
    do = stage["do"]
    assert do["cmd"] == "python -m pipeline.tune --dataset ${item}"
    params = do["params"]
    # Whole sections for what a trial trains with (a method's knobs: `objectives`, any method
    # alike, no hand-split per method); never `bits` (the search has its own) or use_tuned.
    assert set(params) == {"seed", "tune", "train", "model", "mlflow", "objectives"}
    assert "${data.root}/shards/${item}" in do["deps"] and "pipeline/tune.py" in do["deps"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in do["outs"]}
    assert outs == {"tune/${item}/best.json", "tune/${item}/summary.md", "tune/${item}/summary.csv"}
    assert {f.name for f in dataclasses.fields(TuneConfig)} >= {"datasets", "space", "ranges", "bits"}
    # The matrix (the train stage) reads the search's folder (use_tuned) and `objectives`, and
    # compares each entry's resolved objective with its record's: a new search result retrains
    # only the entries whose objective it changes (tests/test_dag.py, step 4).
    train = stages["train"]
    assert "tune" in train["deps"] and {"objectives", "variants", "use_tuned"} <= set(train["params"])
    # It reads the whole `train` section (the matrix lists too: they say which entries exist; an
    # entry's digest leaves them out, so adding a seed retrains nothing that exists).
    assert "train" in train["params"] and "seed" not in train["params"]

    # DVC itself resolves the stage once a dataset is listed, and orders it before the matrix.
    assert (ROOT / "tune" / "README.md").is_file(), "the tune folder must exist in git: the train stage depends on it"
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "README.md").write_text("kept\n")
    (tmp_path / "params.yaml").write_text(
        (ROOT / "params.yaml").read_text().replace("  datasets: []  ", "  datasets: [cifar10]  ")
    )
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True, timeout=120)
    out = subprocess.run([dvc, "stage", "list"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tune@cifar10" in out.stdout
    dag = subprocess.run([dvc, "dag", "--dot", "train"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert dag.returncode == 0, dag.stderr
    assert '"tune@cifar10" -> "train"' in dag.stdout, dag.stdout


# ----------------------------------------------------------------------------- a real search


SEARCH = "search"  # the search's name: its trials' Ray Train runs are <storage>/search/<trial run name>


def _trial_dir(out: Path, index: int, bits: int) -> Path:
    """The Ray Train run folder of trial ``index`` (Tune numbers a grid's trials 00000, 00001, ...)."""
    from pipeline.tune_space import trial_run_name

    return out / "ray" / SEARCH / trial_run_name(SEARCH, f"t_{index:05d}", {"eta": 1.0, "zeta": 1.0, "bits": bits})


@contextlib.contextmanager
def _searching_in(out: Path):
    """Run a search from ``out`` (its relative outputs land there), MLFLOW_TRACKING_URI unset
    (it would outrank params) and put back afterwards."""
    cwd, uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(out)
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = uri


@pytest.fixture(scope="module")
def search(ray_local, toy_dataset, tmp_path_factory):
    """2 trials of 2 epochs, 2 CPU workers each, one at a time. The grid runs 16 bits first,
    then 1 bit: a 1-bit code can't separate 3 classes (2 codes), so ASHA (rung at epoch 1,
    reduction factor 2) stops the 1-bit trial, whose validation mAP at epoch 1 is below the
    16-bit trial's.

    The 16-bit trial fails once for real: its last worker dies as epoch 1 starts
    (``DPFAH_FAIL_AT_EPOCH=0``), Ray Train does not replace it (``train.max_failures=0``), so
    the trial itself fails and Tune retries it (``tune.max_failures=1``). The 1-bit trial's
    fault is marked done beforehand, so ASHA alone ends it."""
    from pipeline.tune import run_search

    work, images = toy_dataset
    out = tmp_path_factory.mktemp("tune")
    params = toy_params(
        work,
        images,
        "train.num_workers=2",
        "train.epochs=2",
        f"train.storage_path={out / 'ray'}",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        "tune.space.eta=[1]",
        "tune.space.zeta=[1]",
        "tune.bits=[16,1]",
        "tune.grace_period=1",
        "tune.reduction_factor=2",
        "train.max_failures=0",
        "tune.max_failures=1",
    )
    spared = _trial_dir(out, 1, 1)
    spared.mkdir(parents=True)
    (spared / ".fault-injected").write_text("no fault in the 1-bit trial\n")
    live_before = _live_placement_groups()
    with _searching_in(out), failing_at_epoch(0):
        outcome = run_search(params, "toy", out_dir=out / "tune" / "toy", name=SEARCH, verbose=0)
    return outcome, out, live_before


def _live_placement_groups() -> set[str]:
    import ray

    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


@pytest.mark.slow
def test_search_stops_a_trial_early_and_finishes_the_others(search):
    outcome, out, _ = search
    rows = {r.bits: r for r in outcome.rows}
    assert sorted(rows) == [1, 16]
    assert all(r.hparams == {"eta": 1.0, "zeta": 1.0} for r in rows.values())
    assert rows[16].status == "completed" and rows[16].epochs == 2
    assert rows[1].status == "stopped" and rows[1].epochs == 1
    assert not [r for r in outcome.rows if r.status == "error"]
    assert rows[16].val_map > rows[1].val_map
    assert outcome.best.bits == 16


def _epochs_started(run_dir: Path, rank: int) -> list[int]:
    return [
        int(e)
        for e, r in (line.split() for line in (run_dir / ".epochs-started").read_text().splitlines() if line)
        if int(r) == rank
    ]


@pytest.mark.slow
def test_a_failed_trial_is_retried_from_its_last_checkpoint(search):
    """tune.max_failures: the 16-bit trial failed once (its worker killed as epoch 1
    started) and Tune retried it; the retry resumed from epoch 0's checkpoint (epoch 0 is not
    run again) and ran to the end, in the trial's one MLflow run."""
    from mlflow.tracking import MlflowClient

    from pipeline.train_worker import load_state

    outcome, out, _ = search
    row = next(r for r in outcome.rows if r.bits == 16)
    run_dir = _trial_dir(out, 0, 16)
    assert (run_dir / ".fault-injected").read_text().startswith("killed rank 1 as epoch 1 started")
    assert row.status == "completed" and row.epochs == 2 and not row.error
    for rank in (0, 1):
        assert _epochs_started(run_dir, rank) == [0, 1, 1], f"rank {rank}"  # epoch 1 again, epoch 0 not
    states = [load_state(str(c / "state.pt")) for c in run_dir.glob("checkpoint_*") if c.is_dir()]
    assert [h["epoch"] for h in max(states, key=lambda s: s["epoch"])["history"]] == [0, 1]  # each epoch once
    # The trial itself failed once (Ray Train did not replace the worker), as Tune recorded.
    (error,) = (out / "ray" / SEARCH).glob(f"_trial_{row.trial_id}_*/error.txt")
    assert "Failure # 1 " in error.read_text() and "Failure # 2 " not in error.read_text()
    assert "TrainingFailed" in error.read_text()

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    named = client.search_runs(
        [client.get_run(outcome.parent_run_id).info.experiment_id],
        filter_string=f"attributes.run_name = '{row.run_name}'",
    )
    assert [r.info.run_id for r in named] == [row.run_id]  # one run for both attempts
    run = named[0]
    assert run.info.status == "FINISHED" and run.data.tags["tune.status"] == "completed"
    steps = [m.step for m in client.get_metric_history(row.run_id, "validation/map")]
    assert sorted(steps) == [0, 1]  # epoch 0 from the first attempt, epoch 1 from the retry


@pytest.mark.slow
def test_without_retries_a_failed_trial_fails_the_search_and_says_why(ray_local, toy_dataset, tmp_path, capsys):
    """tune.max_failures=0: the same failure (the worker killed as epoch 1 starts) ends the
    trial as failed, not retried; with no other trial the command fails naming the trial, the
    error and the setting. A failed trial is never the best (no best.json)."""
    from mlflow.tracking import MlflowClient

    from pipeline.errors import run_main
    from pipeline.tune import main

    work, images = toy_dataset
    overrides = toy_overrides(
        work, images, "train.num_workers=1", "train.epochs=2", f"train.storage_path={tmp_path / 'ray'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tune.space.eta=[1]", "tune.space.zeta=[1]",
        "tune.bits=[16]", "tune.scheduler=none", "train.max_failures=0", "tune.max_failures=0",
    )  # fmt: skip
    with _searching_in(tmp_path), failing_at_epoch(0):
        code = run_main(
            main,
            [
                "--dataset",
                "toy",
                "--params",
                str(PARAMS_FILE),
                "--out",
                str(tmp_path / "out"),
                *(a for o in overrides for a in ("--set", o)),
            ],
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert re.match(
        r"error: search \S+: no trial completed or was stopped early with a validation mAP; 1 of 1 trial\(s\) "
        r"failed after 1 attempts each \(tune.max_failures=0\), e\.g\. (\S+-16b): TrainingFailed: training \1 failed: ",
        err[-1],
    ), err[-1]
    (run_dir,) = [p.parent for p in (tmp_path / "ray").glob("*/*/.fault-injected")]
    assert _epochs_started(run_dir, 0) == [0, 1]  # not retried
    assert not (tmp_path / "out" / "best.json").exists()
    assert re.search(
        r"^\| 1 \| 1 \| 16 \| [0-9.]* \| -?\d \| [01] \| error \(TrainingFailed: ",
        (tmp_path / "out" / "summary.md").read_text(),
        re.M,
    )

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("kind") == "tune-search")
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert (parent.info.status, parent.data.metrics["trials_failed"], parent.data.metrics["trials_completed"]) == (
        "FAILED",
        1,
        0,
    )
    assert (child.info.status, child.data.tags["tune.status"]) == ("FAILED", "error")


@pytest.mark.slow
def test_search_is_one_mlflow_parent_with_a_child_run_per_trial(search):
    from mlflow.tracking import MlflowClient

    outcome, out, _ = search
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "tune-search"
    assert parent.data.params["tune.bits"] == "[16, 1]"
    assert parent.data.metrics["validation/best_map"] == pytest.approx(outcome.best.val_map)
    assert parent.data.metrics["trials_stopped"] >= 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert artifacts == {"summary/summary.md", "summary/summary.csv", "summary/best.json"}

    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    assert len(children) == len(outcome.rows) == 2
    expected_status = {"completed": "FINISHED", "stopped": "KILLED"}
    for row in outcome.rows:
        run = client.get_run(row.run_id)
        assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert run.info.status == expected_status[row.status], (row, run.info.status)
        assert run.data.tags["tune.status"] == row.status and run.data.tags["tune.trial_id"] == row.trial_id
        assert run.data.params["loss.eta"] == "1.0" and run.data.params["loss.zeta"] == "1.0"
        assert run.data.tags["weights_from"] == "search"
        assert run.data.params["bits"] == str(row.bits) and run.data.params["num_workers"] == "2"
        steps = sorted(m.step for m in client.get_metric_history(row.run_id, "validation/map"))
        assert steps == list(range(row.epochs))  # per-epoch metrics, one per epoch it ran
        assert max(m.value for m in client.get_metric_history(row.run_id, "validation/map")) == pytest.approx(
            row.val_map
        )
    # Nothing of the search is left RUNNING.
    assert not client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")


@pytest.mark.slow
def test_best_configuration_file_and_summary(search):
    import mlflow

    from pipeline import recipes
    from pipeline.model_files import load_encoder

    outcome, out, _ = search
    best = json.loads(Path(outcome.best_file).read_text())
    top = outcome.best
    assert (best["eta"], best["zeta"], best["bits"], best["run_id"]) == (1.0, 1.0, 16, top.run_id)
    assert best["val_map"] == pytest.approx(top.val_map) and best["search_run_id"] == outcome.parent_run_id
    assert set(best["by_bits"]) == {"1", "16"} and best["by_bits"]["1"]["status"] == "stopped"
    assert best["dataset"] == "toy" and len(best["manifest_sha256"]) == 64
    # The trainings read it (use_tuned, through the objective stage).
    from pipeline.config import load_params

    params = load_params(ROOT / "params.yaml", ["datasets.toy.kind=custom", "use_tuned=true"])
    recipe = recipes.resolve(params, "toy", 16, root=out)
    assert recipe.hparams == {"eta": 1.0, "zeta": 1.0} and recipe.source["tuned_trial_run_id"] == top.run_id
    # The best trial's model is in MLflow.
    with _tracking(f"sqlite:///{out / 'mlflow.db'}"):
        model = load_encoder(best["model_uri"], mlflow.get_tracking_uri())
    assert isinstance(model.net, DPFAH) and model.bits == 16

    table = list(csv.DictReader(open(outcome.summary_csv)))
    assert {(int(r["bits"]), r["status"]) for r in table} == {(r.bits, r.status) for r in outcome.rows}
    md = Path(outcome.summary_md).read_text()
    assert "| eta | 1 bits | 16 bits |" in md
    assert f"{outcome.rows[0].val_map:.4f}*" in md  # the 1-bit trial, stopped early


@pytest.mark.slow
def test_search_leaves_no_placement_group_behind(search):
    """Stopped trials' worker groups are released (the next trial could start), and nothing
    of the search holds CPUs afterwards."""
    import time

    live_before = search[2]
    deadline = time.time() + 30
    while time.time() < deadline and _live_placement_groups() - live_before:
        time.sleep(1)
    assert not _live_placement_groups() - live_before


def test_search_refuses_knobs_the_method_does_not_have(toy_dataset):
    """The search varies the knobs train.method declares: one it lacks is refused, naming the
    knob and what the method has; so is a method given nothing to search, and a variant (the
    search would override it). Checked before Ray starts."""
    from pipeline.tune import run_search

    work, images = toy_dataset
    with pytest.raises(
        ConfigError,
        match=r"^tune.space.zeta: dsh has no hyper-parameter 'zeta' "
        r"\(it has: alpha, margin, pairs; worth searching: alpha\)",
    ):
        run_search(toy_params(work, images, "train.method=dsh", "tune.space={zeta: [0.1]}"), "toy")
    # params.yaml's space is DPFAH's knobs: another method replaces the mapping, or is told
    with pytest.raises(ConfigError, match=r"^tune.space.eta: dsh has no hyper-parameter 'eta'"):
        run_search(toy_params(work, images, "train.method=dsh", "tune.space.alpha=[0.1]"), "toy")
    with pytest.raises(
        ConfigError, match=r"^tune.ranges.gamma: dpsh has no hyper-parameter 'gamma' \(it has: eta, pairs"
    ):
        run_search(
            toy_params(
                work, images, "train.method=dpsh", "tune.search=random", "tune.space={}", "tune.ranges.gamma=[0.1,1]"
            ),
            "toy",
        )
    with pytest.raises(
        ConfigError,
        match=r"^tune.space: empty, and dsh has no default search.*tune.space.alpha=.*it has: alpha, margin, pairs",
    ):
        run_search(toy_params(work, images, "train.method=dsh", "tune.space={}"), "toy")
    with pytest.raises(
        ConfigError,
        match=r"^tune.space.lam: dpfah has no hyper-parameter 'lam' "
        r"\(it has: delta, eta, pairs, zeta; worth searching: eta, zeta\)",
    ):
        run_search(toy_params(work, images, "tune.space.lam=[1]"), "toy")
    with pytest.raises(ConfigError, match=r"^tune.space.pairs: 'nope' is not one of"):
        run_search(toy_params(work, images, "train.method=dsh", "tune.space={pairs: [batch, nope]}"), "toy")
    with pytest.raises(ConfigError, match=r"^tune.ranges.pairs: pairs is not a number"):
        run_search(
            toy_params(
                work, images, "train.method=dsh", "tune.search=random", "tune.space={}", "tune.ranges.pairs=[1,2]"
            ),
            "toy",
        )
    with pytest.raises(ConfigError, match=r"^train.method: resnet18 is a variant"):
        run_search(toy_params(work, images, "train.method=resnet18"), "toy")


def test_search_space_and_trials_of_another_method(toy_dataset):
    """tune.space/tune.ranges for any method, DPFAH's the same way: its declared knobs make
    the grid (or the random draws), and a trial trains that method with the searched values
    over objectives.<method> and the method's defaults."""
    from ray.tune.search.sample import Categorical, Float

    from pipeline.tune import search_space, searched_knobs, trial_recipe

    work, images = toy_dataset
    grid = toy_params(
        work,
        images,
        "train.method=dsh",
        "tune.space={alpha: [0.01, 1], pairs: [batch, memory]}",
        "tune.bits=[8]",
        "objectives.dsh.margin=3",
    )
    assert searched_knobs(grid) == {
        "alpha": ("values", (0.01, 1.0)),
        "pairs": ("values", ("batch", "memory")),
    }  # 1 -> 1.0: alpha is a float
    space, _, samples = search_space(grid)
    assert space == {
        "alpha": {"grid_search": [0.01, 1.0]},
        "pairs": {"grid_search": ["batch", "memory"]},
        "bits": {"grid_search": [8]},
    }
    recipe = trial_recipe(grid, "toy", {"alpha": 1.0, "pairs": "memory", "bits": 8})
    assert (recipe.method, recipe.hparams, recipe.source) == (
        "dsh",
        {"margin": 3, "alpha": 1.0, "pairs": "memory"},
        {"weights_from": "search"},
    )

    rnd = toy_params(
        work,
        images,
        "train.method=hashnet",
        "tune.search=random",
        "tune.num_samples=5",
        "tune.ranges.alpha=[0.01,1]",
        "tune.space={gamma: [0.5]}",
    )
    space, _, samples = search_space(rnd)
    assert samples == 5 and set(space) == {"alpha", "gamma", "bits"}
    assert isinstance(space["alpha"], Float) and (space["alpha"].lower, space["alpha"].upper) == (0.01, 1.0)
    assert isinstance(space["gamma"], Categorical) and list(space["gamma"].categories) == [0.5]

    # DPFAH: its knobs of tune.space like any method's; a trial never reads best.json
    dpfah = toy_params(
        work,
        images,
        "tune.space.eta=[2]",
        "tune.space.zeta=[0.5]",
        "tune.space.delta=[1.5]",
        "use_tuned=true",
        "objectives.dpfah.pairs=bank",
    )
    assert searched_knobs(dpfah) == {"eta": ("values", (2.0,)), "zeta": ("values", (0.5,)), "delta": ("values", (1.5,))}
    recipe = trial_recipe(dpfah, "toy", {"eta": 2.0, "zeta": 0.5, "delta": 1.5, "bits": 16})
    assert (recipe.method, recipe.hparams) == ("dpfah", {"eta": 2.0, "zeta": 0.5, "delta": 1.5, "pairs": "bank"})
    # a range (random search) wins over the knob's list: params.yaml lists eta, a user draws it
    drawn = toy_params(work, images, "tune.search=random", "tune.ranges.eta=[0.5,20]")
    assert searched_knobs(drawn) == {"eta": ("range", (0.5, 20.0)), "zeta": ("values", (0.1, 1.0))}


def test_summary_of_a_search_over_other_knobs():
    """The summary pivots by each searched knob and names the knobs in the CSV header."""
    from pipeline.tune import TrialRow, summary_csv, summary_markdown

    rows = [
        TrialRow(f"t{i}", {"alpha": a, "pairs": p}, 16, v, 1, 4, "completed", f"r{i}", "n")
        for i, (a, p, v) in enumerate(
            [(0.01, "batch", 0.5), (0.01, "memory", 0.6), (1.0, "batch", 0.7), (1.0, "memory", 0.4)]
        )
    ]
    meta = {
        "name": "s",
        "dataset": "d",
        "protocol": "p",
        "search": "grid",
        "scheduler": "asha",
        "epochs": 4,
        "image_size": 32,
        "num_workers": 1,
        "knobs": ["alpha", "pairs"],
    }
    md = summary_markdown(rows, meta, rows[2])
    assert "Best: alpha 1, pairs batch, 16 bits: 0.7000" in md
    by_alpha = md.split("## Validation mAP by alpha and code length (best over pairs)")[1].split("##")[0]
    assert "| 0.01 | 0.6000 |" in by_alpha and "| 1 | 0.7000 |" in by_alpha
    by_pairs = md.split("## Validation mAP by pairs")[1].split("##")[0]
    assert "| batch | 0.7000 |" in by_pairs and "| memory | 0.6000 |" in by_pairs
    assert "| alpha | pairs | bits | val mAP |" in md
    table = list(csv.DictReader(io.StringIO(summary_csv(rows, ["alpha", "pairs"]))))
    assert (table[3]["alpha"], table[3]["pairs"], table[3]["val_map"]) == ("1.0", "memory", "0.400000")


def test_use_tuned_takes_a_search_s_knobs_for_its_method_only(toy_dataset, tmp_path, capsys):
    """use_tuned, any method alike: a search over dsh gives dsh's trainings its knobs (over
    objectives.dsh), and leaves DPFAH's with theirs, saying so."""
    from pipeline import recipes

    work, images = toy_dataset
    (tmp_path / "tune" / "toy").mkdir(parents=True)
    record = {
        "method": "dsh",
        "knobs": ["alpha"],
        "alpha": 0.1,
        "bits": 16,
        "by_bits": {"16": {"alpha": 0.3, "bits": 16, "run_id": "r"}},
    }
    (tmp_path / "tune" / "toy" / "best.json").write_text(json.dumps(record))
    params = toy_params(work, images, "use_tuned=true", "objectives.dsh.margin=3")
    dsh = recipes.resolve(params, "toy", 16, "dsh", root=tmp_path)
    assert (
        dsh.hparams == {"margin": 3, "alpha": 0.3}
        and dsh.source["weights_from"] == "tune"
        and dsh.source["tuned_trial_run_id"] == "r"
    )
    dpfah = recipes.resolve(params, "toy", 16, "dpfah", root=tmp_path)
    assert (dpfah.hparams, dpfah.source) == ({"eta": 1.0}, {"weights_from": "params"})
    assert "best.json is a search over dsh's knobs; dpfah keeps objectives.dpfah" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tune: random search, no scheduler


def test_tune_scheduler_none_runs_every_trial_to_the_end_and_asha_stops_before_the_last_epoch(toy_dataset):
    """tune.scheduler: none is a FIFO scheduler (stops nothing), so a grace period as long as
    the training is allowed; asha's rungs end before the last epoch."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipeline.errors import ConfigError
    from pipeline.tune import _check_search, _scheduler

    work, images = toy_dataset
    none = toy_params(work, images, "train.epochs=2", "tune.scheduler=none", "tune.grace_period=5")
    assert type(_scheduler(none)) is FIFOScheduler
    _check_search(none, "toy")  # no complaint about the grace period: nothing is stopped
    asha = toy_params(work, images, "train.epochs=4", "tune.grace_period=2", "tune.reduction_factor=3")
    scheduler = _scheduler(asha)
    assert isinstance(scheduler, ASHAScheduler) and scheduler._max_t == 3 and scheduler._reduction_factor == 3
    with pytest.raises(ConfigError, match="^tune.grace_period"):
        _check_search(toy_params(work, images, "train.epochs=2", "tune.grace_period=2"), "toy")


@pytest.mark.slow
def test_random_search_without_scheduler_on_ray(ray_local, toy_dataset, tmp_path, monkeypatch):
    """tune.search random with tune.ranges.eta and scheduler none, for real on the local Ray: the
    one trial's eta is drawn log-uniformly inside the range (not a grid value), zeta
    and bits come from their lists, the trial runs all its epochs, and best.json names it.
    tune.ranges adds another of the method's knobs (DPFAH's delta), drawn and trained with."""
    from mlflow.tracking import MlflowClient

    from pipeline.tune import run_search

    work, images = toy_dataset
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = toy_params(
        work,
        images,
        "train.epochs=2",
        f"train.storage_path={tmp_path / 'ray'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tune.search=random",
        "tune.ranges.eta=[0.3,3]",
        "tune.space.zeta=[0.2]",
        "tune.bits=[8]",
        "tune.num_samples=1",
        "tune.scheduler=none",
        "tune.max_failures=0",
        "tune.ranges.delta=[1.05,1.5]",
    )
    try:
        outcome = run_search(params, "toy", out_dir=tmp_path / "out", verbose=0)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    (row,) = outcome.rows
    assert row.status == "completed" and row.epochs == 2 and 0 <= row.val_map <= 1
    eta = row.hparams["eta"]
    assert 0.3 <= eta <= 3 and eta not in (1.0, 10.0) and (row.hparams["zeta"], row.bits) == (0.2, 8)
    best = json.loads(Path(outcome.best_file).read_text())
    assert (best["eta"], best["zeta"], best["bits"], best["run_id"]) == (eta, 0.2, 8, row.run_id)
    delta = row.hparams["delta"]
    assert 1.05 <= delta <= 1.5 and best["delta"] == delta and best["knobs"] == ["eta", "zeta", "delta"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(row.run_id)
    assert float(run.data.params["loss.eta"]) == pytest.approx(eta) and run.info.status == "FINISHED"
    assert float(run.data.params["loss.delta"]) == pytest.approx(delta)
    parent = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(outcome.parent_run_id)
    assert (parent.data.params["tune.search"], parent.data.params["tune.scheduler"]) == ("random", "none")
