"""The matrix as one Ray job against one training per stage: the same N entries, side by side.

    python -m bench.matrix [--entries 6] [--steps 5] [--out bench/results/matrix.json]

N trainings (one epoch capped at ``--steps`` steps, the seeds 0..N-1 of DPFAH on a 3-class toy
dataset of 32 px images), each then evaluated, both ways against one running Ray head
(`ray start --head`, 2 CPUs, started once and timed apart), each with a fresh SQLite store:

* ``per stage``: `python -m pipeline.train` then `python -m pipeline.evaluate` per entry, one
  after the other (what the DAG of one stage per training ran);
* ``matrix``: one `python -m pipeline.matrix`, its entries Ray Tune trials, as many at once as
  the head holds (one CPU each), each trained and evaluated in one process, a trial's process
  taking the next entry (Tune's actor reuse, the default);
* ``matrix, fresh processes``: the same with a new process per entry (DPFAH_MATRIX_REUSE_PROCESSES=0).

The table gives the wall time of each way, per entry, and the ratio; the JSON has the raw times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.run_overhead import BIN, RayHead, _settings  # noqa: E402
from tests.helpers import make_class_folder  # noqa: E402


def _run(module: str, args: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise SystemExit(f"{module} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - start


def _sets(work: Path, images: Path, steps: int) -> list[str]:
    return ["--params", str(REPO / "params.yaml"), *_settings(work, images, steps)]


def per_stage(work: Path, images: Path, entries: int, steps: int, env: dict[str, str]) -> dict:
    sets = _sets(work, images, steps)
    _run("pipeline.prepare", ["--dataset", "toy", *sets], work, env)
    times = []
    for seed in range(entries):
        key = ["--dataset", "toy", "--bits", "8", "--method", "dpfah", "--seed", str(seed)]
        times.append(
            {
                "train_s": _run("pipeline.train", [*key, *sets], work, env),
                "evaluate_s": _run("pipeline.evaluate", [*key, *sets], work, env),
            }
        )
    total = sum(t["train_s"] + t["evaluate_s"] for t in times)
    return {"total_s": total, "entries": times}


def matrix(work: Path, images: Path, entries: int, steps: int, env: dict[str, str]) -> dict:
    sets = _sets(work, images, steps)
    _run("pipeline.prepare", ["--dataset", "toy", *sets], work, env)
    seeds = f"[{','.join(str(s) for s in range(entries))}]"
    total = _run("pipeline.matrix", [*sets, "--set", "bits=[8]", "--set", f"train.seeds={seeds}"], work, env)
    records = [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*.json"))]
    if len(records) != entries:
        raise SystemExit(f"the matrix wrote {len(records)} run records, not {entries}")
    return {"total_s": total}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=6, help="trainings (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=5, help="training steps (one epoch)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "matrix.json"))
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env["PYTHONPATH"] = str(REPO)  # this checkout's code, in the stages and their Ray workers
    base = Path(tempfile.mkdtemp(prefix="dpfah-matrix-bench-"))
    head = RayHead()
    try:
        images = make_class_folder(base / "images")
        head.start(env)
        env["RAY_ADDRESS"] = head.address
        results = {}
        ways = (
            ("per stage", per_stage, {}),
            ("matrix", matrix, {}),
            ("matrix, fresh processes", matrix, {"DPFAH_MATRIX_REUSE_PROCESSES": "0"}),
        )
        for name, run, extra in ways:
            work = base / name.replace(" ", "-").replace(",", "")
            work.mkdir()
            results[name] = run(work, images, args.entries, args.steps, {**env, **extra})
    finally:
        head.stop()
        shutil.rmtree(base, ignore_errors=True)
    machine = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    load = os.getloadavg()
    n = args.entries
    print(
        f"{n} trainings of one epoch ({args.steps} steps) each evaluated, toy dataset, one Ray head of 2 CPUs, on "
        f"{machine} (load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})"
    )
    print(f"{'way':24s} {'wall s':>8s} {'s/entry':>8s} {'speed-up':>9s}")
    base_s = results["per stage"]["total_s"]
    for name, r in results.items():
        r["speedup"] = base_s / r["total_s"]
        print(f"{name:24s} {r['total_s']:8.1f} {r['total_s'] / n:8.1f} {r['speedup']:8.2f}x")
    ratio = results["matrix"]["speedup"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine, "load_average_at_end": load, "entries": n, "steps": args.steps, "results": results}
    out.write_text(json.dumps(doc | {"ray_head_start_s": head.seconds, "speedup": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
