"""The stages meet missing or misplaced inputs with one line and status 2 (issue #11): training
before prepare, and evaluate finding the run where its run record says it was logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dpfah.data import read_manifest
from tests.helpers import BITS, PARAMS_FILE, fake_training_run, toy_overrides, write_record


def _stage(module: str, argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", f"pipeline.{module}", *argv, "--params", str(PARAMS_FILE)],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_and_tune_before_prepare_say_what_to_run(tmp_path):
    shards = tmp_path / "data" / "shards" / "cifar10"
    for module in ("train", "tune"):
        proc = _stage(module, ["--dataset", "cifar10", *(["--bits", "64"] if module == "train" else [])], tmp_path)
        assert (proc.returncode, proc.stderr) == (
            2,
            f"error: {shards}: no prepared dataset (no manifest.json); "
            "prepare it first: python -m pipeline.prepare --dataset cifar10\n",
        ), module
    elsewhere = tmp_path / "elsewhere"
    proc = _stage("train", ["--dataset", "cifar10", "--bits", "64", "--set", f"data.root={elsewhere}"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.endswith(
        f"prepare it first: python -m pipeline.prepare --dataset cifar10 --set data.root={elsewhere}\n"
    )
    assert os.listdir(tmp_path) == [], "no MLflow store, no Ray results: nothing started"


def test_evaluate_uses_the_tracking_uri_of_the_run_record(toy_dataset, tmp_path):
    """Trained against another store (e.g. MLFLOW_TRACKING_URI at training time): evaluate
    finds the run where the record says, unless a store is given explicitly."""
    work, images = toy_dataset
    sha = read_manifest(work / "data" / "shards" / "toy").sha256
    store = f"sqlite:///{tmp_path / 'team.db'}"
    record = fake_training_run(store, sha, root=tmp_path)
    sets = [x for o in toy_overrides(work, images) if not o.startswith("mlflow.tracking_uri=") for x in ("--set", o)]
    argv = ["--dataset", "toy", "--bits", str(BITS), "--quiet", *sets]

    proc = _stage("evaluate", argv, tmp_path)  # params: the default sqlite:///mlflow.db, which does not hold the run
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"evaluated toy {BITS} bits (run {record['run_id']}, 12 queries x 78):")
    assert (
        json.loads((tmp_path / "evaluations" / f"toy-{BITS}-dpfah-s0.json").read_text())["run_id"] == record["run_id"]
    )
    assert not (tmp_path / "mlflow.db").exists()

    other = tmp_path / "other.db"  # a store given explicitly wins over the record
    proc = _stage("evaluate", argv, tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{other}")
    assert (proc.returncode, proc.stderr.splitlines()[-1]) == (
        2,
        f"error: MLflow store sqlite:///{other}: no such file (train first, or point mlflow.tracking_uri / "
        "MLFLOW_TRACKING_URI at the store that holds the runs)",
    )
    proc = _stage("evaluate", [*argv, "--set", f"mlflow.tracking_uri=sqlite:///{other}"], tmp_path)
    assert proc.returncode == 2 and f"error: MLflow store sqlite:///{other}: no such file" in proc.stderr
    write_record(tmp_path, {**record, "tracking_uri": None})  # an older record without one: the parameters' store
    proc = _stage("evaluate", argv, tmp_path)
    assert (
        proc.returncode == 2 and f"error: MLflow store sqlite:///{tmp_path / 'mlflow.db'}: no such file" in proc.stderr
    )
