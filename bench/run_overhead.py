"""The fixed cost of a run: train, evaluate and promote on a tiny dataset, broken down.

    python -m bench.run_overhead [--steps 5] [--out bench/results/run_overhead.json]

Runs the stages as a user does (`python -m pipeline.<stage>` in a subprocess, a fresh SQLite
MLflow store, one training of one epoch capped at ``--steps`` steps on a 3-class toy dataset
of 32 px images), twice side by side:

* ``own Ray``: every stage starts its own local Ray instance (RAY_ADDRESS=local), what a
  plain `dvc repro` does on a machine where no Ray runs;
* ``running Ray``: a `ray start --head` started once beforehand, which every stage joins
  (what `ray start --head` before `dvc repro` gives; its own start is timed apart).

Each stage records where its time goes (``pipeline.timing``: DPFAH_TIMINGS); the table shows,
per stage, the wall time from process start to exit, its parts, and the fixed cost: for
train, the total minus the epoch's own work (its steps and its validation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
from tests.helpers import make_class_folder  # noqa: E402

TRAIN_PARTS = [
    ("python start, stage module imports", None),
    ("imports: torch, mlflow, ray", "imports: torch, mlflow, ray"),
    ("mlflow: open the run", "mlflow: open the run"),
    ("mlflow: log params and tags", "mlflow: log params and tags"),
    ("ray: start or connect", "ray: start or connect"),
    ("ray train: build the trainer", "ray train: build the trainer"),
    ("ray train: worker group start", None),
    ("  of which: worker process start to our loop", "worker: process start to loop"),
    ("worker: open the shards", "worker: open the shards"),
    ("worker: first batch", "worker: first batch"),
    ("worker: epoch steps (the work)", "worker: epoch steps"),
    ("worker: validation (the work)", "worker: validation"),
    ("worker: checkpoint and report", "worker: checkpoint and report"),
    ("controller: epoch metrics to mlflow (beside the workers)", "controller: epoch metrics to mlflow"),
    ("ray train: fit ends (after the last report)", None),
    ("mlflow: log the model", "mlflow: log the model"),
    ("mlflow: close the run", "mlflow: close the run"),
    ("exit: shutdown after the stage returned", None),
]
WORK = ("worker: epoch steps", "worker: validation")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(work: Path, images: Path, steps: int) -> list[str]:
    sets = {
        "data.root": work / "data",
        "prepare.datasets": "[toy]",
        "datasets.toy.kind": "custom",
        "datasets.toy.images": images,
        "datasets.toy.query_per_class": 4,
        "datasets.toy.train_per_class": 16,
        "datasets.toy.validation": 6,
        "datasets.toy.shard_size": 10,
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "train.storage_path": work / "ray_results",
        "train.epochs": 1,
        "train.steps_per_epoch": steps,
        "train.batch_size": 8,
        "train.image_size": 32,
        "train.loader_workers": 0,
        "train.eval_batch_size": 32,
        "evaluate.loader_workers": 0,
        "evaluate.batch_size": 32,
        "evaluate.grid_queries": 2,
    }
    out = []
    for key, value in sets.items():
        out += ["--set", f"{key}={value}"]
    return out


def _run_stage(
    stage: str, args: list[str], cwd: Path, env: dict[str, str], spans_file: Path
) -> tuple[float, float, list[dict]]:
    spans_file.unlink(missing_ok=True)
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}", *args], cwd=cwd, env={**env, "DPFAH_TIMINGS": str(spans_file)},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    end = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"pipeline.{stage} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()] if spans_file.exists() else []
    return start, end, spans


def _first(spans, name):
    return next((s for s in spans if s["name"] == name), None)


def _total(spans, name) -> float:
    return sum(s["end"] - s["start"] for s in spans if s["name"] == name)


def train_breakdown(start: float, end: float, spans: list[dict]) -> dict[str, float]:
    parts: dict[str, float] = {}
    main = _first(spans, "train: main entered")
    fit = _first(spans, "ray train: fit")
    run = _first(spans, "train: run_training")
    workers = [s for s in spans if s["name"].startswith("worker:")]
    for label, name in TRAIN_PARTS:
        if name is not None:
            parts[label] = _total(spans, name)
    parts["python start, stage module imports"] = (main["start"] - start) if main else float("nan")
    first_worker = min((s["start"] for s in spans if s["name"] == "worker: started"), default=None)
    parts["ray train: worker group start"] = (first_worker - fit["start"]) if fit and first_worker else float("nan")
    last_worker = max((s["end"] for s in workers), default=None)
    parts["ray train: fit ends (after the last report)"] = (
        (fit["end"] - last_worker) if fit and last_worker else float("nan")
    )
    parts["exit: shutdown after the stage returned"] = (end - run["end"]) if run else float("nan")
    total = end - start
    # "of which" rows are inside another row: not added again
    parts["(not broken down)"] = total - sum(
        v for k, v in parts.items() if v == v and not k.lstrip().startswith("of which")
    )
    work = sum(_total(spans, n) for n in WORK)
    return {"total": total, "work": work, "fixed": total - work, "parts": parts}


def simple_breakdown(stage: str, start: float, end: float, spans: list[dict], work_names=()) -> dict:
    main = _first(spans, f"{stage}: main entered")
    parts = {"python start, stage module imports": (main["start"] - start) if main else float("nan")}
    for s in spans:
        if s["name"] != f"{stage}: main entered":
            parts[s["name"]] = parts.get(s["name"], 0.0) + s["end"] - s["start"]
    last = max((s["end"] for s in spans), default=start)
    parts["exit: after the last recorded step"] = end - last
    total = end - start
    parts["(not broken down)"] = total - sum(v for v in parts.values() if v == v)
    work = sum(parts.get(n, 0.0) for n in work_names)
    return {"total": total, "work": work, "fixed": total - work, "parts": parts}


def run_mode(mode: str, base: Path, images: Path, steps: int, env: dict[str, str]) -> dict:
    work = base / mode.replace(" ", "_")
    work.mkdir(parents=True)
    sets = _settings(work, images, steps)
    params = ["--params", str(REPO / "params.yaml")]
    subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", "--dataset", "toy", *params, *sets],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    spans_file = work / "spans.jsonl"
    result = {}
    s, e, spans = _run_stage("train", ["--dataset", "toy", "--bits", "8", *params, *sets], work, env, spans_file)
    result["train"] = train_breakdown(s, e, spans)
    s, e, spans = _run_stage(
        "evaluate", ["--dataset", "toy", "--bits", "8", "--quiet", *params, *sets], work, env, spans_file
    )
    result["evaluate"] = simple_breakdown(
        "evaluate", s, e, spans, work_names=("encode the query and database splits", "retrieval metrics")
    )
    s, e, spans = _run_stage("promote", ["--dataset", "toy", "--bits", "8", *params, *sets], work, env, spans_file)
    result["promote"] = simple_breakdown("promote", s, e, spans)
    return result


class RayHead:
    """`ray start --head --block` in its own process group and temp dir, on free ports.

    Stopped by signalling the processes it started, never `ray stop`, which would stop every
    Ray instance on the machine (a test session's included)."""

    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay short
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.seconds = 0.0
        self.proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        t = time.perf_counter()
        cmd = [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
            "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={self.temp}", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}", f"--metrics-export-port={_free_port()}",
        ]  # fmt: skip
        log = open(Path(self.temp) / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        probe = [
            sys.executable,
            "-c",
            f"import ray; ray.init(address='{self.address}', log_to_driver=False); ray.shutdown()",
        ]
        while subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Ray head did not start: {(Path(self.temp) / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
        self.seconds = time.perf_counter() - t

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # `ray start --block` stops what it started on Ctrl-C
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


def _table(results: dict[str, dict], head_seconds: float) -> str:
    modes = list(results)
    lines = [f"{'':54s}" + "".join(f"{m:>14s}" for m in modes)]
    for stage in ("train", "evaluate", "promote"):
        names: list[str] = []
        for m in modes:
            names += [n for n in results[m][stage]["parts"] if n not in names]
        lines.append(f"{stage} (seconds)")
        for n in names:
            lines.append(
                f"  {n:52s}" + "".join(f"{results[m][stage]['parts'].get(n, float('nan')):14.2f}" for m in modes)
            )
        for key, label in (
            ("total", "total"),
            ("work", "the work (epoch steps + validation; encode + metrics)"),
            ("fixed", "fixed cost = total - work"),
        ):
            lines.append(f"  {label:52s}" + "".join(f"{results[m][stage][key]:14.2f}" for m in modes))
    lines.append(f"(`ray start --head` itself, once, before the running-Ray runs: {head_seconds:.1f} s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps (one epoch)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "run_overhead.json"))
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH")}
    # PYTHONPATH: the stages (and the Ray workers, which inherit it) run this checkout's code,
    # not whatever copy of the project the environment has installed (an editable install of
    # another checkout would otherwise be what is measured)
    env.update(
        RAY_AUTH_MODE="disabled",
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
    )
    base = Path(tempfile.mkdtemp(prefix="dpfah-overhead-"))
    try:
        images = make_class_folder(base / "images")  # the tests' toy images: 3 classes of 30 PNGs, 32 px
        results = {"own Ray": run_mode("own Ray", base, images, args.steps, {**env, "RAY_ADDRESS": "local"})}
        head = RayHead()
        head.start(env)
        try:
            results["running Ray"] = run_mode(
                "running Ray", base, images, args.steps, {**env, "RAY_ADDRESS": head.address}
            )
        finally:
            head.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    machine = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    load = os.getloadavg()
    print(
        f"fixed cost of a run, toy dataset, one epoch of {args.steps} steps, on {machine} (code: {REPO}; load average "
        f"at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})"
    )
    print(_table(results, head.seconds))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "code": str(REPO),
                "load_average_at_end": load,
                "steps": args.steps,
                "ray_head_start_s": head.seconds,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
