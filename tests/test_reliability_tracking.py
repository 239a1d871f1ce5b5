"""The stages against the tracking store, as a user runs them: real stage processes, a real
``mlflow server`` (started here, then killed), real SQLite files.

* An unusable store (a dead server, a port nothing listens on, a corrupt SQLite file, a path
  that cannot be created) fails every stage within seconds: exit 2, one line naming the URI
  and the cause, no traceback.
* Concurrent promotions (several processes released at once) give one version per run, and
  the alias ends on the best model without ever moving to a worse one than it held.
* An evaluation that failed after logging its metrics is not promoted; a model with
  non-finite weights is refused by evaluate.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    BITS,
    NAME,
    evaluated_run,
    fake_training_run,
    registry_state,
    start_mlflow_server,
    stop_mlflow_server,
    toy_overrides,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
#: A stage that fails on the store does so before any work; its imports (torch, MLflow, Ray)
#: take 5-8 s on 2 busy cores. Without the check: about four minutes (MLflow's retries).
FAIL_FAST_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["RAY_AUTH_MODE"] = "disabled"
    env.update(extra)
    return env


def _stage(module: str, args: list[str], cwd: Path, timeout: float = 300, **env: str) -> tuple[int, str, float]:
    """(exit status, stdout + stderr, seconds) of ``python -m pipeline.<module> args``."""
    t = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", f"pipeline.{module}", *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - t


def _sets(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


def _promote_args(uri: str) -> list[str]:
    return ["--dataset", "toy", "--bits", str(BITS), "--params", str(PARAMS)] + _sets(
        [
            "prepare.datasets=[toy]",
            "datasets.toy.kind=custom",
            "datasets.toy.images=/nonexistent",
            f"mlflow.tracking_uri={uri}",
        ]
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ``mlflow server`` of this module's own (the last test kills it)."""
    uri, proc = start_mlflow_server(tmp_path_factory.mktemp("server"), env=_env())
    state = {"uri": uri, "proc": proc}
    yield state
    stop_mlflow_server(proc)


# ----------------------------------------------------------------------------- concurrency

#: A promote process that does its imports, says it is ready, and waits for the start signal,
#: so that every process reaches the registry at the same moment; then the stage's own main.
RACER = r"""
import os, sys, time
import mlflow, torch
from pipeline import promote
from pipeline.errors import run_main
ready, go = sys.argv[1], sys.argv[2]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
sys.exit(run_main(promote.main, sys.argv[3:]))
"""


class AliasWatcher(threading.Thread):
    """Polls the alias and records every version it saw holding it, in order."""

    def __init__(self, uri: str):
        super().__init__(daemon=True)
        from mlflow.tracking import MlflowClient

        self.client, self.seen, self.stop = MlflowClient(uri), [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                held = (self.client.get_registered_model(NAME).aliases or {}).get("champion")
            except Exception:  # a locked SQLite file for a moment, or no model yet
                held = None
            if held is not None and (not self.seen or self.seen[-1] != int(held)):
                self.seen.append(int(held))
            time.sleep(0.005)


def _race(uri: str, root: Path, values: list[float], copies: int) -> tuple[dict, list[int], dict]:
    """A champion at 0.6, then each run of ``values`` promoted by ``copies`` processes at once.
    Returns the runs by value, the versions the watcher saw hold the alias, and the registry."""
    from mlflow.tracking import MlflowClient

    champion = evaluated_run(uri, root, 0.6, write_files=False)
    code, text, _ = _stage("promote", [*_promote_args(uri), "--run-id", champion["run_id"]], root)
    # The first promotion into a fresh store prints our one line, nothing of MLflow's ("Registered
    # model ... already exists. Creating a new version", INFO lines, warnings): stdout and stderr.
    assert (code, text) == (
        0,
        f"{NAME} version 1 (new): query_map 0.6000 (no champion before): champion -> version 1; "
        "wrote promotions/toy-8-dpfah-s0.json\n",
    )
    runs = {0.6: champion["run_id"], **{v: evaluated_run(uri, root, v, write_files=False)["run_id"] for v in values}}
    go = root / "go"
    procs = []
    for i, value in enumerate(values * copies):
        argv = [
            sys.executable,
            "-c",
            RACER,
            str(root / f"ready-{i}"),
            str(go),
            *_promote_args(uri),
            "--run-id",
            runs[value],
        ]
        procs.append(
            subprocess.Popen(argv, cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    deadline = time.monotonic() + 240
    while not all((root / f"ready-{i}").exists() for i in range(len(procs))):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
            p.communicate()[0] for p in procs if p.poll() is not None
        ]
        time.sleep(0.05)
    watcher = AliasWatcher(uri)
    watcher.start()
    go.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    time.sleep(0.3)
    watcher.stop.set()
    watcher.join()
    assert all(p.returncode == 0 for p in procs), [
        f"exit {p.returncode}: {out[-800:]}" for p, out in zip(procs, outputs) if p.returncode
    ]
    client = MlflowClient(uri)
    by_version = {int(v.version): v.run_id for v in client.search_model_versions(f"name = '{NAME}'")}
    return (
        runs,
        watcher.seen,
        {
            "state": registry_state(uri),
            "by_version": by_version,
            "names": [m.name for m in client.search_registered_models()],
        },
    )


def _check_race(runs: dict, seen: list[int], registry: dict, *, watch: bool) -> None:
    aliases, versions = registry["state"]
    per_run = sorted(run_id for _, run_id in versions)
    assert per_run == sorted(runs.values()), f"one version per run, got {versions}"
    value_of = {run_id: value for value, run_id in runs.items()}
    assert value_of[registry["by_version"][aliases["champion"]]] == max(runs)  # the best holds it
    assert registry["names"] == [NAME]  # no lock left behind
    if watch:
        held = [value_of[registry["by_version"][v]] for v in seen]
        assert held and held == sorted(held), f"the alias held, in order, models of {held}: it moved to a worse one"
        assert min(held) >= 0.6, f"the alias held a model worse than the champion it started from: {held}"


def test_concurrent_promotions_on_sqlite(tmp_path, monkeypatch):
    """Three runs (one worse than the champion, two better), each promoted by two processes
    at once, on a local SQLite store: the file lock beside it serialises them."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs, seen, registry = _race(uri, tmp_path, [0.5, 0.7, 0.9], copies=2)
    _check_race(runs, seen, registry, watch=True)


def test_concurrent_promotions_on_a_server(server, tmp_path, monkeypatch):
    """The same race against a real tracking server: the lock is a registry entry there."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs, seen, registry = _race(server["uri"], tmp_path, [0.5, 0.7, 0.9], copies=2)
    _check_race(runs, seen, registry, watch=True)


def test_registry_lock_released_while_the_store_words_its_conflict(tmp_path, monkeypatch):
    """The interleaving that failed a CI run of the server race: the lock's name is taken when
    MLflow's SQL registry tries to insert it, and its holder deletes it before MLflow reads it
    back to word the "already exists" error, so the create answers RESOURCE_DOES_NOT_EXIST. The
    waiter must take that as "released" and try again, not fail the promotion. Forced here on
    the registry store the server runs (MLflow's SqlAlchemyStore): the holder releases at the
    moment that read back starts."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    from pipeline.promotion_lock import LOCK_SUFFIX, registry_lock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder, waiter = MlflowClient(uri, registry_uri=uri), MlflowClient(uri, registry_uri=uri)
    lock = "m" + LOCK_SUFFIX
    holder.create_registered_model(lock, tags={"owner": "the holder"})
    read_back = SqlAlchemyStore.get_registered_model
    released = []

    def holder_releases_first(store, name):
        if name == lock and not released:
            released.append(name)  # first: the delete reads the model too
            holder.delete_registered_model(lock)
        return read_back(store, name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", holder_releases_first)
    with registry_lock(waiter, uri, "m"):
        owner = waiter.get_registered_model(lock).tags["owner"]
    assert released == [lock], "the interleaving did not happen: the test proves nothing"
    assert owner.startswith(f"{socket.gethostname()} pid {os.getpid()} ")
    assert [m.name for m in waiter.search_registered_models()] == []  # released after the block


def test_a_run_on_a_server_ends_without_mlflow_links(server, monkeypatch, capsys):
    """MLflow prints "🏃 View run ... at: http://..." and "🧪 View experiment at: ..." to stdout
    when a run on a tracking server ends; a stage's run (train, report, tune) does not."""
    from pipeline.tracking import tracked_run

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.delenv("DPFAH_VERBOSE", raising=False)
    capsys.readouterr()
    with tracked_run(server["uri"], "dpfah-console", "quiet"):
        pass
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- evaluate


def _evaluate_args(toy_dataset, uri: str, *extra: str) -> list[str]:
    work, images = toy_dataset
    return ["--dataset", "toy", "--bits", str(BITS), "--params", str(PARAMS), "--quiet"] + _sets(
        toy_overrides(work, images, f"mlflow.tracking_uri={uri}", *extra)
    )


def _shards_sha(toy_dataset) -> str:
    from dpfah.data import read_manifest

    return read_manifest(toy_dataset[0] / "data" / "shards" / "toy").sha256


def test_failed_evaluation_is_not_promoted(toy_dataset, tmp_path, monkeypatch):
    """evaluate fails after logging its metrics and eval.* tags (an injected crash before the
    completion marker): promote refuses the run and says to re-run evaluate; after a full
    evaluation it promotes."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = fake_training_run(uri, _shards_sha(toy_dataset), root=tmp_path, seed=3)
    run_id = record["run_id"]
    code, text, _ = _stage("evaluate", _evaluate_args(toy_dataset, uri), tmp_path, DPFAH_EVALUATE_FAULT="before-marker")
    assert code == 1 and "injected fault after logging evaluation" in text
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert "eval.map_at" in tags and "eval.complete" not in tags  # what used to be promoted
    code, text, _ = _stage("promote", _promote_args(uri), tmp_path)
    assert code == 2 and text.count("\n") == 1 and "Traceback" not in text
    assert text.startswith(
        f"error: MLflow run {run_id} (from runs/toy-8-dpfah-s0.json): its last evaluation ({tags['eval.id']}) "
        "has no completion marker"
    )
    assert text.rstrip().endswith(
        "re-run python -m pipeline.evaluate --dataset toy --bits 8 --method dpfah --seed 0, then promote"
    )
    assert not MlflowClient(uri).search_registered_models()

    code, text, _ = _stage("evaluate", _evaluate_args(toy_dataset, uri), tmp_path)
    assert code == 0, text
    code, text, _ = _stage("promote", _promote_args(uri), tmp_path)
    assert code == 0 and "champion -> version 1" in text, text


def test_evaluate_refuses_non_finite_weights(toy_dataset, tmp_path, monkeypatch):
    from dpfah.model import DPFAH

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torch.manual_seed(0)
    model = DPFAH(BITS, 3).eval()
    name, param = list(model.named_parameters())[-1]
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    record = fake_training_run(uri, _shards_sha(toy_dataset), root=tmp_path, model=model)
    code, text, _ = _stage("evaluate", _evaluate_args(toy_dataset, uri), tmp_path)
    assert code == 2 and text.count("\n") == 1 and "Traceback" not in text
    assert text.startswith(
        f"error: MLflow run {record['run_id']}: model {record['model_uri']} has non-finite weights: "
        f"parameter {name} holds 1 NaN"
    )
    assert not (tmp_path / "metrics").exists()


# ----------------------------------------------------------------------------- an unusable store


def _store_cases(server, tmp_path: Path) -> list[tuple[str, str, dict[str, str]]]:
    """(label, URI, the cause each stage names) for every kind of unusable store."""
    os.killpg(server["proc"].pid, signal.SIGKILL)  # a server that was there and died
    server["proc"].wait()
    refused = (
        "cannot be reached ([Errno 111] Connection refused); start it, or set mlflow.tracking_uri / MLFLOW_TRACKING_URI"
    )
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(os.urandom(8192))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    under_file = f"sqlite:///{blocker / 'sub' / 'mlflow.db'}"
    no_file = (
        "no such file (train first, or point mlflow.tracking_uri / MLFLOW_TRACKING_URI at the store that holds the "
        "runs)"
    )
    cases = [
        ("dead server", server["uri"], dict.fromkeys(("train", "tune", "evaluate", "promote"), refused)),
        (
            "closed port",
            f"http://127.0.0.1:{_free_port()}",
            dict.fromkeys(("train", "tune", "evaluate", "promote"), refused),
        ),
        (
            "corrupt sqlite",
            f"sqlite:///{corrupt}",
            dict.fromkeys(
                ("train", "tune", "evaluate", "promote"),
                "cannot be used: file is not a database (corrupt, or not an MLflow SQLite store)",
            ),
        ),
        (
            "sqlite under a file",
            under_file,
            {
                "train": f"cannot be created: {blocker} is a file, not a directory",
                "tune": f"cannot be created: {blocker} is a file, not a directory",
                "evaluate": no_file,
                "promote": no_file,
            },
        ),
    ]
    if os.geteuid() != 0:  # root creates files in a directory without write permission
        locked = tmp_path / "no-write"
        locked.mkdir(mode=0o555)
        denied = f"cannot be created: Permission denied: {locked}"
        expected = {"train": denied, "tune": denied, "evaluate": no_file, "promote": no_file}
        cases.append(("directory without write permission", f"sqlite:///{locked / 'mlflow.db'}", expected))
    return cases


def test_every_stage_fails_fast_on_an_unusable_store(server, toy_dataset, tmp_path, monkeypatch):
    """Last in this module: it kills the server. Each stage as a user runs it, each store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work, images = toy_dataset
    run_id = "0123456789abcdef0123456789abcdef"
    failures, timings = [], []
    for label, uri, causes in _store_cases(server, tmp_path):
        trainish = ["--dataset", "toy", "--params", str(PARAMS)] + _sets(
            toy_overrides(work, images, f"mlflow.tracking_uri={uri}", "tune.datasets=[toy]")
        )
        commands = {
            "train": ["--bits", str(BITS), *trainish],
            "tune": trainish,
            "evaluate": [*_evaluate_args(toy_dataset, uri), "--run-id", run_id],
            "promote": [*_promote_args(uri), "--run-id", run_id],
        }
        for stage, args in commands.items():
            # A closed port is the dead server's case again: on evaluate and promote only
            # (a train or tune start costs about 4 s of imports).
            if label == "closed port" and stage in ("train", "tune"):
                continue
            code, text, seconds = _stage(stage, args, tmp_path, timeout=240)
            timings.append(f"{stage} / {label}: {seconds:.1f} s")
            expected = f"error: MLflow {'tracking server' if uri.startswith('http') else 'store'} {uri}"
            line = text.strip()
            if not (
                code == 2
                and seconds < FAIL_FAST_S
                and "\n" not in line
                and "Traceback" not in text
                and line.startswith(expected)
                and causes[stage] in line
            ):
                failures.append(f"{stage} / {label}: exit {code} after {seconds:.1f} s: {text[-1500:]}")
    print("\n".join(timings))
    assert not failures, "\n\n".join(failures)
    assert not (tmp_path / "a-file.d").exists() and not list(tmp_path.glob("**/.dpfah-store-probe-*"))
