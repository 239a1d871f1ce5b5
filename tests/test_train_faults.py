"""The train stage under faults, for real: a diverging loss, no validation split, a GPU
request on a CPU machine, SIGTERM, a driver that died with its run open."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runkey import RunKey
from pipeline.train_driver import FAIL_AT_EPOCH_ENV
from tests.helpers import failing_at_epoch, toy_overrides, toy_params

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _epochs_started(run_dir: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in (run_dir / ".epochs-started").read_text().splitlines() if line]


def test_non_finite_loss_stops_training_once_with_the_step(ray_local, toy_dataset, tmp_path):
    """lr=inf: both workers stop at the same step (no DDP hang), Ray Train does not restart
    the run, the error names the epoch and step, and the MLflow run ends FAILED."""
    from mlflow.tracking import MlflowClient

    from pipeline.train_driver import TrainingFailed, run_training

    work, images = toy_dataset
    params = toy_params(
        work,
        images,
        "train.num_workers=2",
        "train.optimizer=sgd",
        "train.lr=1.0e+30",  # config refuses inf itself; this overflows to inf in the first update
        "train.schedule=constant",
        "train.max_failures=2",
        f"train.storage_path={tmp_path / 'ray'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )
    with pytest.raises(TrainingFailed) as e, failing_at_epoch(1):  # the last epoch: the epoch log only
        run_training(params, RunKey("toy", 16), run_name="diverges", write_run_file=False)
    message = str(e.value)
    assert "the loss became non-finite at epoch 0, step " in message and "training stopped" in message, message
    assert sorted(_epochs_started(tmp_path / "ray" / "diverges")) == [(0, 0), (0, 1)]  # one attempt: not retried
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dpfah-toy").experiment_id])
    assert run.info.status == "FAILED"
    assert not client.get_metric_history(run.info.run_id, "train/loss")  # no epoch finished, none logged


def test_training_without_a_validation_split_keeps_the_last_epoch(ray_local, tmp_path, toy_dataset):
    """validation: 0 prepares no validation split; training says so once, runs without
    validation, and the run record and MLflow say the last epoch's model stands and why."""
    from mlflow.tracking import MlflowClient

    from pipeline.prepare import prepare
    from pipeline.train_driver import run_training

    _, images = toy_dataset
    params = toy_params(tmp_path, images, "datasets.toy.validation=0", "train.epochs=2")
    prepare(params, "toy", progress=False)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        outcome = run_training(params, RunKey("toy", 8), run_name="no-validation")
    finally:
        os.chdir(cwd)
    assert outcome.best_val_map is None and outcome.best_epoch == 1 and outcome.epochs == 2
    record = json.loads((tmp_path / outcome.run_file).read_text())
    assert record["best_val_map"] is None and record["best_epoch"] == 1
    assert record["selected_by"] == "last epoch (no validation split)"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["model.selected_by"] == "last epoch (no validation split)"
    assert "validation/map" not in run.data.metrics and "validation/best_map" not in run.data.metrics
    assert [m.step for m in client.get_metric_history(outcome.run_id, "train/loss")] == [0, 1]
    assert run.data.metrics["validation/best_epoch"] == 1


def _stage_env(work: Path) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    return env


def _train_cmd(work: Path, images: Path, *extra: str) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "pipeline.train",
        "--dataset",
        "toy",
        "--bits",
        "8",
        "--params",
        str(ROOT / "params.yaml"),
    ]
    for item in toy_overrides(work, images, *extra):
        argv += ["--set", item]
    return argv


def test_a_gpu_request_on_a_cpu_machine_fails_at_once(toy_dataset, tmp_path):
    """The stage starts its own local Ray: 4 GPU workers cannot be met here, so it says what
    was asked, what the machine has and the two ways out, in one line, exit 2."""
    work, images = toy_dataset
    cmd = _train_cmd(
        work, images, "train.use_gpu=true", "train.num_workers=4", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"
    )
    done = subprocess.run(cmd, cwd=tmp_path, env=_stage_env(work), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = errors[0]
    assert "train.num_workers=4 with train.use_gpu=true asks for 4 CPU(s) and 4 GPU(s)" in line, line
    assert "0 GPU(s)" in line and "--set train.use_gpu=false" in line and "ray job submit" in line, line


def test_sigterm_ends_the_run_killed_and_leaves_no_ray_processes(toy_dataset, tmp_path):
    """SIGTERM during training: exit 143, the MLflow run KILLED, the Ray instance the stage
    started stopped with all its processes (dashboard and agents included)."""
    import psutil
    from mlflow.tracking import MlflowClient

    work, images = toy_dataset
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    cmd = _train_cmd(
        work,
        images,
        "train.epochs=50",
        f"train.storage_path={storage}",
        f"mlflow.tracking_uri={uri}",
    )
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env={**_stage_env(work), FAIL_AT_EPOCH_ENV: "49"},  # the epoch log only
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        # killed once an epoch has been checkpointed (the folder the next training removes)
        while not list(storage.glob("*/checkpoint_*")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None and list(storage.glob("*/checkpoint_*")), "no epoch was checkpointed"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(c.cmdline()) for c in children if c.is_running())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err[-3000:]
    _, alive = psutil.wait_procs([c for c in children if c.is_running()], timeout=30)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dpfah-toy").experiment_id])
    assert run.info.status == "KILLED"

    # Its Ray Train folder (checkpoints) stays until the next training of the same entry.
    (killed,) = [p for p in storage.iterdir() if p.is_dir()]
    assert list(killed.glob("checkpoint_*"))
    again = _train_cmd(work, images, "train.epochs=1", f"train.storage_path={storage}", f"mlflow.tracking_uri={uri}")
    done = subprocess.run(again, cwd=tmp_path, env=_stage_env(work), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"removed 1 Ray Train folder(s) of earlier trainings of toy-8b-dpfah-s0: {killed}" in done.stdout
    assert not killed.exists() and len([p for p in storage.iterdir() if p.is_dir()]) == 1


def test_runs_left_running_by_a_dead_driver_are_marked_failed(tmp_path):
    """A run whose driver died (SIGKILL) stays RUNNING; the next training on the host finds
    it by its driver tags and marks it FAILED, and leaves a live driver's run alone."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.leftovers import driver_tags, fail_abandoned_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("dpfah-toy")
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    tags = driver_tags()
    abandoned = client.create_run(
        experiment, tags={**tags, "driver.pid": str(dead.pid)}, run_name="abandoned"
    ).info.run_id
    live = client.create_run(experiment, tags=tags, run_name="live").info.run_id  # this process: alive
    other_host = client.create_run(
        experiment, tags={**tags, "driver.pid": str(dead.pid), "driver.host": "elsewhere"}
    ).info.run_id
    current = client.create_run(experiment, tags=tags).info.run_id
    assert fail_abandoned_runs(experiment, current, uri) == [abandoned]
    assert client.get_run(abandoned).info.status == "FAILED"
    assert "ended without closing it" in client.get_run(abandoned).data.tags["failed_reason"]
    assert {client.get_run(r).info.status for r in (live, other_host, current)} == {"RUNNING"}
    del mlflow


def test_a_search_marks_a_stopped_trial_only_once_its_process_has_ended(tmp_path):
    """A trial the scheduler stopped ends after Tune's fit() returns: its exiting process marked
    its run FAILED once after the search had marked it KILLED (CI, 2026-12-07). The search now
    waits for the runs' driver processes on this host to end first; one on another host is
    not waited for."""
    import time

    from mlflow.tracking import MlflowClient

    from pipeline.leftovers import driver_tags, wait_for_drivers
    from pipeline.train_worker import process_start_time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("dpfah-toy")
    run_id = client.create_run(experiment, run_name="trial").info.run_id
    # the stopped trial: marks its run FAILED 2 s from now, as its interrupted training would
    script = (
        "import sys, time; from mlflow.tracking import MlflowClient; time.sleep(2); "
        "MlflowClient(sys.argv[1]).set_terminated(sys.argv[2], 'FAILED')"
    )
    trial = subprocess.Popen([sys.executable, "-c", script, uri, run_id])
    started = process_start_time(str(trial.pid))
    tags = {**driver_tags(), "driver.pid": str(trial.pid), "driver.started": f"{started or 0:.0f}"}
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    elsewhere = client.create_run(experiment, tags={**tags, "driver.host": "elsewhere"}).info.run_id
    runs = [client.get_run(run_id), client.get_run(elsewhere)]
    assert wait_for_drivers(runs, timeout_s=0) == [run_id]  # alive, not waited for
    t0 = time.monotonic()
    assert wait_for_drivers(runs, timeout_s=60) == []
    assert trial.wait(timeout=5) == 0 and time.monotonic() - t0 < 60
    assert client.get_run(run_id).info.status == "FAILED"  # its last word came before the wait ended
    client.set_terminated(run_id, "KILLED")  # what the search then writes stands
    time.sleep(0.5)
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_killed_trainings_folder_is_removed_by_the_next_training_of_its_entry(tmp_path, capsys):
    """Issue 28, case 8: a training killed with SIGKILL leaves its Ray Train folder (its
    checkpoints) under train.storage_path for good. The next training of the same entry
    (dataset, bits, method, seed) removes the folders its earlier drivers on this host left
    once those drivers have ended; nothing that is not ours, nor a live driver's, nor another
    entry's."""
    from pipeline.leftovers import OWNER_FILE, claim_run_folder, driver_tags, remove_ended_run_folders

    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    storage = tmp_path / "ray_results"
    owners = {
        "toy-8b-dpfah-s0-20261207-000000-aaaaaa": {**driver_tags(), "driver.pid": str(dead.pid)},  # killed
        "toy-8b-dpfah-s0-20261207-000001-bbbbbb": driver_tags(),  # this process: still running
        "toy-8b-dpfah-s0-20261207-000002-cccccc": {**driver_tags(), "driver.pid": str(dead.pid), "driver.host": "h2"},
        "toy-8b-dpfah-s1-20261207-000003-dddddd": {**driver_tags(), "driver.pid": str(dead.pid)},  # another seed
        "toy-8b-dpfah-s0-user-notes": None,  # not ours: no owner file
    }
    for name, owner in owners.items():
        (storage / name / "checkpoint_000001").mkdir(parents=True)
        (storage / name / "checkpoint_000001" / "state.pt").write_bytes(b"x" * 100)
        if owner is not None:
            (storage / name / OWNER_FILE).write_text(json.dumps(owner))
    new = "toy-8b-dpfah-s0-20261207-000009-eeeeee"
    claim_run_folder(str(storage), new)
    assert json.loads((storage / new / OWNER_FILE).read_text())["driver.pid"] == str(os.getpid())
    removed = remove_ended_run_folders(str(storage), "toy-8b-dpfah-s0-", keep=new)
    assert removed == [str(storage / "toy-8b-dpfah-s0-20261207-000000-aaaaaa")]
    assert sorted(p.name for p in storage.iterdir()) == sorted(
        {*owners, new} - {"toy-8b-dpfah-s0-20261207-000000-aaaaaa"}
    )
    assert capsys.readouterr().out.startswith("removed 1 Ray Train folder(s) of earlier trainings of toy-8b-dpfah-s0: ")
    assert remove_ended_run_folders("s3://bucket/ray", "toy-8b-dpfah-s0-", keep=new) == []  # remote: not ours to list


def test_checkpoints_the_controller_never_registered_are_deleted(tmp_path):
    """A worker that died after uploading a checkpoint but before Ray Train registered it
    leaves a folder beyond num_to_keep; the driver deletes it and nothing else."""
    from types import SimpleNamespace

    from pyarrow import fs

    from pipeline.train_driver import _drop_unregistered_checkpoints

    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_orphan", "other_dir"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_text("x")
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    kept = [SimpleNamespace(path=str(tmp_path / "checkpoint_a")), SimpleNamespace(path=str(tmp_path / "checkpoint_b"))]
    result = SimpleNamespace(
        path=str(tmp_path),
        checkpoint=kept[1],
        best_checkpoints=[(c, {}) for c in kept],
        filesystem=fs.LocalFileSystem(),
    )
    _drop_unregistered_checkpoints(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_a",
        "checkpoint_b",
        "checkpoint_manager_snapshot.json",
        "other_dir",
    ]


def test_a_variant_whose_network_cannot_take_the_image_size_is_refused_before_ray(toy_dataset, tmp_path):
    """dbdh-alexnet at the CPU profile's 32 px: one line naming the key and the fix, before
    any Ray worker would have failed (and been retried) on it."""
    from pipeline.errors import ConfigError
    from pipeline.recipes import read, resolve, write
    from pipeline.train_driver import run_training

    work, images = toy_dataset
    params = toy_params(work, images, f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(
        ConfigError,
        match=r"^train.image_size: 32 px is too small for dbdh-alexnet's AlexNet backbone \(it needs >= 63\); "
        r"e.g. --set train.image_size=64$",
    ):
        run_training(params, RunKey("toy", 8, "dbdh-alexnet"), write_run_file=False)
    recipe = resolve(params, "toy", 8, "dbdh-alexnet", root=tmp_path)
    path = write(recipe, "toy", 8, root=tmp_path)
    assert path.name == "toy-8-dbdh-alexnet.json" and read(path, "toy", 8).model == {
        "backbone": "alexnet",
        "pfa": False,
    }


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs (root only): room for a fresh MLflow database and a training's metrics,
    not for a model's 45 MB of weights."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_mlflow_store_fails_the_run_in_one_line_and_keeps_no_partial_model(toy_dataset, tmp_path, small_disk):
    """Issue 28, case 5: the store's disk fills while the model is logged. Was: 646 lines of
    tracebacks, the run left RUNNING, a PENDING logged model with its partial files kept.
    Now: one line naming the path and the space needed (exit 2), the partial files and the
    logged model removed, the run FAILED, no run record."""
    from mlflow.tracking import MlflowClient

    work, images = toy_dataset
    uri = f"sqlite:///{small_disk / 'mlflow.db'}"
    cmd = _train_cmd(
        work, images, "train.epochs=1", f"train.storage_path={tmp_path / 'ray'}", f"mlflow.tracking_uri={uri}"
    )
    done = subprocess.run(cmd, cwd=tmp_path, env=_stage_env(work), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (
        errors[0].startswith(f"error: {small_disk}/mlruns/")
        and "no space left on device while logging the model" in errors[0]
    )
    assert "(it needs about 45." in errors[0] and "the partial model was removed" in errors[0], errors[0]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dpfah-toy").experiment_id
    assert [r.info.status for r in client.search_runs([experiment])] == ["FAILED"]
    assert client.search_logged_models([experiment]) == []
    assert not [p for p in (small_disk / "mlruns").rglob("*") if p.is_file()]
    assert not (tmp_path / "runs").exists()
