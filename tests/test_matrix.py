"""The matrix stage (pipeline.matrix): every entry trained and evaluated as a Ray Tune trial in
one warm process, entries with unchanged inputs skipped, a failed entry named and the others kept."""

from __future__ import annotations

import json

import pytest

from pipeline.matrix import MatrixFailed, run_matrix
from pipeline.runkey import RunKey
from tests.helpers import toy_params

pytestmark = pytest.mark.slow


def _params(work, images, tmp_path, *extra):
    return toy_params(
        work,
        images,
        "train.epochs=1",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"train.storage_path={tmp_path / 'ray'}",
        "bits=[8]",
        *extra,
    )


def _most_at_once(reports) -> int:
    """The largest number of trials that ran at the same moment."""
    events = sorted([(r["started_at"], 1) for r in reports] + [(r["ended_at"], -1) for r in reports])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_each_entry_runs_once_and_only_what_changed_runs_again(ray_local, toy_dataset, tmp_path):
    """Three entries on the session's 2-CPU Ray, one CPU a trial: two train at once, the third
    queues; a rerun runs nothing, a new seed only itself, an evaluation setting only evaluations."""
    work, images = toy_dataset
    root = tmp_path / "repo"
    root.mkdir()
    first = run_matrix(_params(work, images, tmp_path, "train.seeds=[0,1,2]"), ["toy"], root)
    keys = [RunKey("toy", 8, "dpfah", s) for s in (0, 1, 2)]
    assert sorted(first.finished) == keys and not first.failed
    assert _most_at_once(first.finished.values()) == 2
    records = {k: json.loads(k.run_file(root).read_text()) for k in keys}
    for key in keys:
        evaluation = json.loads(key.evaluation_file(root).read_text())
        metrics = json.loads(key.metrics_file(root).read_text())
        assert evaluation["run_id"] == records[key]["run_id"] and evaluation["inputs"] == records[key]["inputs"]
        assert metrics["query_map"] == pytest.approx(first.finished[key]["query_map"], abs=0)
        assert key.query_codes_file(root).is_file() and key.plot_file("pr_radius", root).is_file()
    assert records[keys[0]]["run_id"] != records[keys[1]]["run_id"]

    # nothing changed: nothing runs
    again = run_matrix(_params(work, images, tmp_path, "train.seeds=[0,1,2]"), ["toy"], root)
    assert sorted(again.plan.done) == keys and not again.finished

    # one more seed: only it trains
    more = run_matrix(_params(work, images, tmp_path, "train.seeds=[0,1,2,3]"), ["toy"], root)
    assert more.plan.train == [RunKey("toy", 8, "dpfah", 3)] and sorted(more.plan.done) == keys
    assert {k: json.loads(k.run_file(root).read_text())["run_id"] for k in keys} == {
        k: r["run_id"] for k, r in records.items()
    }

    # an evaluation setting: evaluated again, not retrained
    radius = run_matrix(_params(work, images, tmp_path, "train.seeds=[0]", "evaluate.radius=1"), ["toy"], root)
    assert radius.plan.evaluate == [keys[0]] and not radius.plan.train
    assert json.loads(keys[0].evaluation_file(root).read_text())["radius"] == 1
    assert json.loads(keys[0].run_file(root).read_text())["run_id"] == records[keys[0]]["run_id"]


def test_a_failing_entry_is_named_and_the_others_are_kept(ray_local, toy_dataset, tmp_path):
    """An entry whose training cannot start (a method's knob out of range for it alone) fails
    after its retries; the other entry finishes and keeps its records."""
    work, images = toy_dataset
    root = tmp_path / "repo"
    root.mkdir()
    params = _params(work, images, tmp_path, "train.methods=[dpfah,broken]", "train.max_failures=0",
                     "variants={broken: {method: dsh, model: {backbone: alexnet}}}")  # fmt: skip
    with pytest.raises(MatrixFailed) as e:
        run_matrix(params, ["toy"], root)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("1 of 2 entries failed after 1 attempt(s) each (train.max_failures=0): toy-8-broken-s0 (")
    assert "the 1 others are kept" in message
    assert RunKey("toy", 8, "dpfah", 0).metrics_file(root).is_file()
    assert not RunKey("toy", 8, "broken", 0).run_file(root).exists()


def test_a_matrix_stopped_part_way_finishes_only_the_unfinished_entries(ray_local, toy_dataset, tmp_path):
    """`python -m pipeline.matrix` stopped (SIGTERM, as a killed job or Ctrl-C) once its first
    entry is done: Tune stops (the entries in flight may finish, a queued one never starts) and
    the stage exits 143; the rerun runs only the entries without complete records, and the
    finished ones keep their runs.

    Six entries, two at a time on 2 CPUs: the first two finish together and the next two start
    at once, so with four all of them were in flight by the SIGTERM and all finished (CI,
    2026-12-07); with six, two are still queued then."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.matrix import plan
    from tests.helpers import PARAMS_FILE, toy_overrides

    work, images = toy_dataset
    root = tmp_path / "repo"
    root.mkdir()
    sets = toy_overrides(
        work, images, "train.epochs=1", "bits=[8]", "train.seeds=[0,1,2,3,4,5]",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.storage_path={tmp_path / 'ray'}",
    )  # fmt: skip
    argv = [sys.executable, "-m", "pipeline.matrix", "--params", str(PARAMS_FILE)]
    for item in sets:
        argv += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_ADDRESS="local", RAY_AUTH_MODE="disabled", PYTHONPATH=str(PARAMS_FILE.parent))
    log = open(tmp_path / "matrix.log", "w")
    proc = subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    keys = [RunKey("toy", 8, "dpfah", s) for s in range(6)]
    deadline = time.time() + 300
    while not any(k.metrics_file(root).exists() for k in keys):
        assert proc.poll() is None, (tmp_path / "matrix.log").read_text()[-3000:]
        assert time.time() < deadline, "no entry finished in 300 s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    log_text = (tmp_path / "matrix.log").read_text()
    assert "matrix of toy: 6 entries; 6 to train, 0 to evaluate again, 0 unchanged" in log_text, log_text[-3000:]
    assert "Configuration for experiment" not in log_text and "tensorboard" not in log_text, log_text[-3000:]
    # an entry that was writing its last file as the job stopped may still finish: settle first
    done, settled = None, time.time() + 10
    while time.time() < settled:
        now = [k for k in keys if k.metrics_file(root).exists()]
        if now != done:
            done, settled = now, time.time() + 10
        time.sleep(0.5)
    assert 1 <= len(done) < len(keys), (done, (tmp_path / "matrix.log").read_text()[-3000:])
    runs = {k: json.loads(k.run_file(root).read_text())["run_id"] for k in done}

    from pipeline.config import load_params

    params = load_params(PARAMS_FILE, sets)
    again = plan(params, keys, root)
    # an entry stopped after its training (its run record written) is only evaluated again
    assert sorted(again.done) == done and sorted(again.train + again.evaluate) == [k for k in keys if k not in done]
    for key in again.evaluate:
        assert json.loads(key.run_file(root).read_text())["inputs"]["train"] == again.inputs[key]["train"]
    rest = run_matrix(params, ["toy"], root)
    assert sorted(rest.finished) == sorted(again.train + again.evaluate) and not rest.failed
    assert all(rest.finished[k]["trained"] is False for k in again.evaluate)
    assert {k: json.loads(k.run_file(root).read_text())["run_id"] for k in done} == runs
    assert all(k.metrics_file(root).is_file() for k in keys)


def test_the_store_and_experiments_exist_before_any_trial_opens_a_run(toy_dataset, tmp_path):
    """Trials that each found a new SQLite store created its tables at once and raced ("table
    webhooks already exists", or a half-migrated store that failed every retry): the matrix
    now creates the store and the experiments first, so concurrent trials only open runs."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from pipeline.matrix import open_experiments

    work, images = toy_dataset
    params = _params(work, images, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    open_experiments(params, ["toy"])
    assert MlflowClient(uri).get_experiment_by_name("dpfah-toy") is not None
    opener = (
        "import sys, mlflow; mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_experiment('dpfah-toy');"
        " mlflow.start_run(run_name=sys.argv[2]); mlflow.end_run()"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", opener, uri, f"trial-{i}"], stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("dpfah-toy").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"trial-{i}" for i in range(4)]


def test_an_entry_of_several_workers_trains_as_a_ray_train_group_from_its_trial(ray_local, toy_dataset, tmp_path):
    """train.num_workers 2: the trial holds no CPU and drives a Ray Train DDP group (as
    `python -m pipeline.train` runs it), then evaluates the logged model; the records are the same."""
    from mlflow.tracking import MlflowClient

    from pipeline.matrix import trial_resources

    work, images = toy_dataset
    root = tmp_path / "repo"
    root.mkdir()
    params = _params(work, images, tmp_path, "train.num_workers=2", "train.seeds=[0]")
    assert trial_resources(params)["cpu"] == 0
    outcome = run_matrix(params, ["toy"], root)
    key = RunKey("toy", 8, "dpfah", 0)
    assert sorted(outcome.finished) == [key] and not outcome.failed
    record = json.loads(key.run_file(root).read_text())
    assert json.loads(key.evaluation_file(root).read_text())["run_id"] == record["run_id"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(record["run_id"])
    assert run.data.params["num_workers"] == "2" and run.info.status == "FINISHED"
