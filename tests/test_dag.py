"""End to end: the whole DAG under `dvc repro` in a temporary git repository, and the train
stage as a `ray job submit` job against a local Ray head.

Both run the stages as a user would, in subprocesses, on a copy of the project files; the
Ray Train fit inside `train` starts its own Ray (never the test session's)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.runkey import RunKey
from tests.helpers import free_port, wait_answering

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: python, dvc, ray
PROJECT = ["dvc.yaml", "params.yaml", "profiles", "pipeline", "dpfah", "tune", ".gitignore", ".dvcignore"]
BITS = 8


def copy_project(dst: Path) -> Path:
    """The files the stages need (dpfah/*.so included: the compiled kernels)."""
    dst.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PROJECT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dst / name)
    return dst


def stage_env(**extra: str) -> dict[str, str]:
    """The environment of a stage subprocess: the venv first on PATH (dvc.yaml says `python`),
    no outside Ray cluster, no token auth, no MLflow URI from the test session."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="disabled",
        # Ray's address "local" always starts a new local instance: never the test session's
        # Ray, nor a cluster some other process started on this machine.
        RAY_ADDRESS="local",
        DVC_NO_ANALYTICS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 400) -> str:
    t = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    print(f"{time.monotonic() - t:6.1f} s  {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:4]))}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}"
    return out


def toy_settings(work: Path, images: Path) -> dict:
    """The tiny configuration: a 3-class custom dataset, one epoch at 8 bits, CPU."""
    return {
        "prepare.datasets": ["toy"],
        "datasets.toy": {
            "kind": "custom",
            "images": str(images),
            "query_per_class": 4,
            "train_per_class": 16,
            "validation": 6,
            "shard_size": 10,
        },
        "bits": [BITS],
        "train.epochs": 1,
        "train.batch_size": 8,
        "train.image_size": 32,
        "train.loader_workers": 0,
        "train.eval_batch_size": 32,
        "train.collective_timeout_s": 60,
        "train.storage_path": str(work / "ray_results"),
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "evaluate.loader_workers": 0,
        "evaluate.batch_size": 32,
        "evaluate.grid_queries": 2,
    }


def edit_params(path: Path, settings: dict) -> None:
    raw = yaml.safe_load(path.read_text())
    for dotted, value in settings.items():
        node = raw
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


# ----------------------------------------------------------------------------- dvc repro


def _local_ray_sessions() -> set[str]:
    """Session folders of the Ray instances started on this machine in Ray's default temp dir
    (RAY_TMPDIR, else TMPDIR, else /tmp on Linux)."""
    return {
        p.name
        for p in Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray").glob("session_2*")
    }


def _matrix_line(output: str) -> str:
    """The matrix stage's plan line: ``matrix of toy: N entries; a to train, b to evaluate again, c unchanged ...``."""
    return next(line for line in output.splitlines() if line.startswith("matrix of "))


def test_dvc_repro_runs_the_dag_then_nothing_then_only_what_a_parameter_touches(ray_head, tmp_path):
    """The DAG under `dvc repro` and `dvc exp run`, with a Ray head started once (`ray start
    --head`, docs/pipeline.md) that every stage joins instead of starting its own instance
    (checked: none started a local one). The matrix stage reruns whenever an input changes,
    and then trains only the entries whose inputs changed."""
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts import metric_values
    from tests.helpers import make_class_folder

    images = make_class_folder(tmp_path / "images")
    repo = copy_project(tmp_path / "repo")
    edit_params(repo / "params.yaml", toy_settings(tmp_path, images))
    env = stage_env(RAY_ADDRESS=ray_head.gcs)
    sessions_before = _local_ray_sessions()
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run(["git", "init", "-q"], repo, env)
    run([str(BIN / "dvc"), "init", "-q"], repo, env)
    run([*git, "add", "-A"], repo, env)
    run([*git, "commit", "-qm", "project"], repo, env)
    key = RunKey("toy", BITS)

    # 1. The whole DAG up to promotion.
    first = run([str(BIN / "dvc"), "repro", "promote"], repo, env)
    assert ran_stages(first) == {"prepare@toy", "train", "promote"}, first
    assert _matrix_line(first).startswith("matrix of toy: 1 entries; 1 to train, 0 to evaluate again, 0 unchanged")
    record = json.loads(key.run_file(repo).read_text())
    metrics = json.loads(key.metrics_file(repo).read_text())
    promotion = json.loads(key.promotion_file(repo).read_text())
    evaluation = json.loads(key.evaluation_file(repo).read_text())
    assert evaluation["run_id"] == record["run_id"] == promotion["run_id"]
    assert evaluation["inputs"] == record["inputs"]  # the digests the next runs compare
    assert set(metrics) == set(metric_values(metrics)), metrics  # the DVC metrics file: numbers only
    assert (promotion["decision"], promotion["version"], promotion["model_name"]) == (
        "promoted",
        1,
        f"dpfah-toy-{BITS}b",
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_data = client.get_run(record["run_id"]).data
    for name, value in metric_values(metrics).items():
        assert run_data.metrics[name] == value, name
    assert run_data.tags["promote.decision"] == "promoted"
    assert client.get_model_version_by_alias(f"dpfah-toy-{BITS}b", "champion").run_id == record["run_id"]
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], repo, env)
    assert repr(metrics["query_map"]) in shown and str(key.metrics_file()) in shown, shown
    plots = run([str(BIN / "dvc"), "plots", "show", "--json"], repo, env)
    for curve in RunKey.CURVES:
        assert str(key.plot_file(curve)) in plots, plots[-2000:]
    run([*git, "add", "-A"], repo, env)
    run([*git, "commit", "-qm", "first repro"], repo, env)

    # 2. Nothing changed: nothing runs.
    again = run([str(BIN / "dvc"), "repro", "promote"], repo, env)
    assert ran_stages(again) == set(), again
    assert "Data and pipelines are up to date." in again, again

    # 3. An evaluation parameter: the entry is evaluated again, not retrained; the same run
    #    promoted again is no new version.
    promotion_bytes = key.promotion_file(repo).read_bytes()
    exp = run([str(BIN / "dvc"), "exp", "run", "-S", "evaluate.radius=1", "promote"], repo, env)
    assert ran_stages(exp) == {"train", "promote"}, exp
    assert _matrix_line(exp).startswith("matrix of toy: 1 entries; 0 to train, 1 to evaluate again, 0 unchanged")
    evaluation2 = json.loads(key.evaluation_file(repo).read_text())
    assert evaluation2["radius"] == 1 and evaluation2["run_id"] == record["run_id"]
    run_data = client.get_run(record["run_id"]).data
    for name, value in metric_values(json.loads(key.metrics_file(repo).read_text())).items():
        assert run_data.metrics[name] == value, name
    assert key.promotion_file(repo).read_bytes() == promotion_bytes
    assert [int(v.version) for v in client.search_model_versions(f"name = 'dpfah-toy-{BITS}b'")] == [1]

    # 4. A search result appears (what tune@toy writes): the trainings do not use it
    #    (use_tuned is false), so the matrix trains nothing and promote does not run.
    best = {"eta": 5.0, "zeta": 0.5, "bits": BITS, "run_id": "trial", "search_run_id": "search", "by_bits": {}}
    (repo / "tune" / "toy").mkdir()
    (repo / "tune" / "toy" / "best.json").write_text(json.dumps(best))
    tuned = run([str(BIN / "dvc"), "repro", "promote"], repo, env)
    assert ran_stages(tuned) == {"train"}, tuned
    assert _matrix_line(tuned).startswith("matrix of toy: 1 entries; 0 to train, 0 to evaluate again, 1 unchanged")

    # 5. One more seed and one more code length: only the new entries train; the first keeps its run.
    more = run(
        [str(BIN / "dvc"), "exp", "run", "-S", "train.seeds=[0,1]", "-S", f"bits=[{BITS},4]", "promote"], repo, env
    )
    assert ran_stages(more) == {"train", "promote"}, more
    assert _matrix_line(more).startswith("matrix of toy: 4 entries; 3 to train, 0 to evaluate again, 1 unchanged")
    assert json.loads(key.run_file(repo).read_text())["run_id"] == record["run_id"]
    assert json.loads(RunKey("toy", 4, "dpfah", 1).evaluation_file(repo).read_text())["bits"] == 4
    # seed 1 at 8 bits joined dpfah-toy-8b: the champion is the better of the two by query mAP
    maps = {s: json.loads(RunKey("toy", BITS, "dpfah", s).metrics_file(repo).read_text())["query_map"] for s in (0, 1)}
    best = json.loads(RunKey("toy", BITS, "dpfah", max(maps, key=maps.get)).run_file(repo).read_text())["run_id"]
    dpfah_champion = client.get_model_version_by_alias(f"dpfah-toy-{BITS}b", "champion").run_id
    assert dpfah_champion == (best if maps[0] != maps[1] else record["run_id"])

    # 6. A second method beside DPFAH: only its entry trains, through the same loop, and it is
    #    promoted into its own registered model; DPFAH's records and champion stay.
    second = run(
        [str(BIN / "dvc"), "exp", "run", "-S", f"bits=[{BITS}]", "-S", "train.seeds=[0]",
         "-S", "train.methods=[dpfah,dsh]", "promote"],
        repo, env,
    )  # fmt: skip
    assert _matrix_line(second).startswith("matrix of toy: 2 entries; 1 to train, 0 to evaluate again, 1 unchanged")
    dsh_key = RunKey("toy", BITS, "dsh", 0)
    dsh = json.loads(dsh_key.run_file(repo).read_text())
    assert (dsh["method"], dsh["method_base"], dsh["seed"]) == ("dsh", "dsh", 0) and dsh["run_id"] != record["run_id"]
    dsh_run = client.get_run(dsh["run_id"])
    assert (dsh_run.data.tags["method"], dsh_run.data.tags["backbone"], dsh_run.data.params["loss.alpha"]) == (
        "dsh",
        "resnet18",
        "0.01",
    )
    assert json.loads(dsh_key.promotion_file(repo).read_text())["model_name"] == f"dsh-toy-{BITS}b"
    assert client.get_model_version_by_alias(f"dsh-toy-{BITS}b", "champion").run_id == dsh["run_id"]
    assert client.get_model_version_by_alias(f"dpfah-toy-{BITS}b", "champion").run_id == dpfah_champion

    # 7. One method's knob: only that method's entry retrains.
    knob = run(
        [str(BIN / "dvc"), "exp", "run", "-S", f"bits=[{BITS}]", "-S", "train.seeds=[0]",
         "-S", "train.methods=[dpfah,dsh]", "-S", "+objectives.dsh.alpha=0.05", "promote"],
        repo, env,
    )  # fmt: skip
    assert _matrix_line(knob).startswith("matrix of toy: 2 entries; 1 to train, 0 to evaluate again, 1 unchanged")
    assert json.loads(dsh_key.run_file(repo).read_text())["run_id"] != dsh["run_id"]
    assert json.loads(key.run_file(repo).read_text())["run_id"] == record["run_id"]
    assert client.get_run(json.loads(dsh_key.run_file(repo).read_text())["run_id"]).data.params["loss.alpha"] == "0.05"
    # Every stage joined the head: none started a local instance of its own.
    assert _local_ray_sessions() == sessions_before


def test_a_profile_written_into_params_is_what_dvc_plans(tmp_path):
    """`python -m pipeline.profile paper` puts the paper's code lengths (and every other
    value of the profile) where DVC reads them: `dvc stage list` plans an index of each of the
    four code lengths (the matrix stage trains them all)."""
    repo = copy_project(tmp_path / "repo")
    env = stage_env()
    run([str(BIN / "dvc"), "init", "--no-scm", "-q"], repo, env)
    listed = run([str(BIN / "dvc"), "stage", "list"], repo, env)
    assert {line.split()[0] for line in listed.splitlines() if line.split()} >= {"prepare@cifar10", "train", "promote"}
    # the index of the champion comes after the promotions (dvc repro ends with a searchable index)
    assert {line.split()[0] for line in listed.splitlines() if line.startswith("index@")} == {"index@cifar10-64"}
    upstream = run([str(BIN / "dvc"), "dag", "--md", "index@cifar10-64"], repo, env)
    assert "promote" in upstream and "train" in upstream and "prepare@cifar10" in upstream, upstream
    run([sys.executable, "-m", "pipeline.profile", "paper"], repo, env)
    listed = run([str(BIN / "dvc"), "stage", "list"], repo, env)
    indexes = {line.split()[0] for line in listed.splitlines() if line.startswith("index@")}
    assert indexes == {f"index@cifar10-{b}" for b in (16, 32, 48, 64)}, listed
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # DPFAH's eta and zeta back to its own defaults (null), the paper's 10 and 0.1
    assert (params["train"]["image_size"], params["train"]["optimizer"], params["objectives"]["dpfah"]) == (
        224,
        "rmsprop",
        {"eta": None, "zeta": None},
    )


# ----------------------------------------------------------------------------- ray job submit


def _our_processes(marker: str) -> list[int]:
    """Pids of processes whose command line names ``marker`` (our head's temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback with the dashboard (the job server), in its own temp dir so
    that no other process on this machine finds it through /tmp/ray/ray_current_cluster.

    Stopped by signalling the processes it started (its process group, then anything left
    that names its temp dir), not with `ray stop`, which would stop every Ray instance on
    the machine, the test session's included."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dash = free_port(), free_port()
    env = stage_env()
    env.pop("RAY_ADDRESS")
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            # Its own ports for everything else too: on the defaults, the agent of a second Ray
            # instance on this machine (the test session's) can fail to register for minutes.
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--temp-dir={temp}", "--disable-usage-stats",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        if not wait_answering(f"{address}/api/version", proc, 120):
            raise RuntimeError(f"the Ray head did not start:\n{(Path(temp) / 'head.log').read_text()[-3000:]}")
        yield SimpleNamespace(jobs=address, gcs=f"127.0.0.1:{port}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # `ray start --block` cleans up its processes on Ctrl-C
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we started (new session)
        except ProcessLookupError:
            pass
        proc.wait()
        for pid in _our_processes(temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_train_stage_runs_as_a_ray_job(ray_head, toy_dataset, tmp_path, monkeypatch):
    """`ray job submit --working-dir <project> -- python -m pipeline.train ...`: the job gets
    no .git and none of the .gitignore'd files, so the shards come from an absolute URL
    (file://, read through fsspec as s3:// would be) and the commit from DPFAH_GIT_COMMIT.
    The job's run record dies with its working dir: evaluate and promote take --run-id."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_params
    from pipeline.evaluation import evaluate
    from pipeline.promotion import promote

    work, images = toy_dataset
    project = copy_project(tmp_path / "project")
    db = tmp_path / "mlflow.db"
    sets = {
        "data.root": f"file://{work / 'data'}",
        "prepare.datasets": "[toy]",
        "datasets.toy.kind": "custom",
        "datasets.toy.images": str(images),
        "train.epochs": "1",
        "train.batch_size": "8",
        "train.image_size": "32",
        "train.loader_workers": "0",
        "train.eval_batch_size": "32",
        "train.collective_timeout_s": "60",
        "train.storage_path": str(tmp_path / "ray_results"),
        "mlflow.tracking_uri": f"sqlite:///{db}",
    }
    runtime_env = {"env_vars": {"DPFAH_GIT_COMMIT": "0123abc-test", "RAY_AUTH_MODE": "disabled"}}
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head.jobs, "--working-dir", str(project),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "-m", "pipeline.train", "--dataset", "toy", "--bits", str(BITS),
    ]  # fmt: skip
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = stage_env()
    env.pop("RAY_ADDRESS")
    # The job server answers before the node's agent has registered with it; on a loaded
    # 2-core machine that took more than 90 s in CI, so wait up to 5 minutes.
    deadline = time.monotonic() + 300
    while True:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or "No available agent to submit job" not in out or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, f"ray job submit exited {proc.returncode}:\n{out[-6000:]}"
    assert "succeeded" in out, out[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("trained toy 8 bits"))
    run_id = line.split("MLflow run ")[1].split(";")[0]

    client = MlflowClient(f"sqlite:///{db}")
    run_info = client.get_run(run_id)
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags["git_commit"] == "0123abc-test"
    assert run_info.data.params["dataset"] == "toy" and run_info.data.params["bits"] == str(BITS)
    assert [m.step for m in client.get_metric_history(run_id, "validation/map")] == [0]
    assert run_info.outputs.model_outputs, "no model logged"
    # The job ran from an upload of the project without the built extensions (git-ignored):
    # the compiled kernels of the installed package still served it, not the numpy fallback.
    from dpfah import kernels

    assert kernels.status()["ranking"] != "numpy", "the test environment itself has no compiled kernels"
    assert (run_info.data.tags["kernel.hamming"], run_info.data.tags["kernel.ranking"]) == (
        kernels.status()["hamming"],
        kernels.status()["ranking"],
    )

    # The rest of the chain by run id (in this process: the job machinery is shown above).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(
        REPO / "params.yaml",
        [f"{k}={v}" for k, v in sets.items()] + ["evaluate.loader_workers=0", "evaluate.grid_queries=1"],
    )
    result = evaluate(params, RunKey("toy", BITS), run_id=run_id, progress=False, root=tmp_path)
    assert result.doc["run_id"] == run_id
    assert client.get_run(run_id).data.metrics["query_map"] == result.doc["query_map"]
    # ... of the model the job trained: its metrics are those of the MLflow model's codes,
    # computed here (tarfile, PIL, per-query loops; 32 px, the stored size)
    import mlflow

    from pipeline.model_files import load_encoder
    from pipeline.tracking import using_tracking_uri
    from tests.helpers import plain_codes, plain_metrics, read_split_plain

    with using_tracking_uri(f"sqlite:///{db}"):
        model = load_encoder(line.split("; model ")[1].split(";")[0], mlflow.get_tracking_uri()).net
    shards = work / "data" / "shards" / "toy"
    (q_img, q_lab), (d_img, d_lab) = read_split_plain(shards, "query"), read_split_plain(shards, "database")
    from dpfah.codes import unpack_codes
    from pipeline.codefiles import load_codes

    logged = Path(client.download_artifacts(run_id, "evaluation/codes", str(tmp_path / "codes-dl")))
    qc = plain_codes(model, q_img, logged=unpack_codes(load_codes(logged / "query.parquet")[0], BITS))
    dc = plain_codes(model, d_img, logged=unpack_codes(load_codes(logged / "database.parquet")[0], BITS))
    ref = plain_metrics(qc, dc, q_lab, d_lab, topk=78, radius=2, n=10)
    assert result.doc["query_map"] == pytest.approx(ref["map"], abs=1e-12)
    assert result.doc["query_precision_within_radius"] == pytest.approx(ref["ball"], abs=1e-12)
    promoted = promote(params, RunKey("toy", BITS), run_id=run_id, root=tmp_path)
    assert promoted.record["decision"] == "promoted" and promoted.record["version"] == 1
    assert client.get_model_version_by_alias(f"dpfah-toy-{BITS}b", "champion").run_id == run_id
