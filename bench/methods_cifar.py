"""Every method through the pipeline on real CIFAR-10, side by side: one `dvc exp run`.

    python -m bench.methods_cifar --source cifar10-jpg.tar.gz [--methods dpfah,dsh,...] [--epochs 8] [--steps N]
                                  [--work DIR] [--out bench/results/methods_cifar.json]

Copies the project into ``--work``, points params.yaml at the CIFAR-10 archive and runs, as
a user would,

    dvc exp run -S 'train.methods=[...]' -S bits=[64] [-S train.epochs=E -S train.steps_per_epoch=N]

on the CPU profile (32 px, from scratch, AdamW 1e-3 onecycle, batch 64), which prepares the
split once and trains, evaluates and promotes every method. Then it reads what DVC and MLflow
recorded: per method, query mAP@ALL (metrics/*.json), the best validation mAP and its epoch
(runs/*.json), training images per second (the mean of the run's per-epoch ``images_per_s``)
and the training stage's wall time (MLflow run start to end). Prints a table and writes JSON.
The numbers are 32 px from scratch: not comparable to the paper's (ImageNet start, 224 px).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT = ["dvc.yaml", "params.yaml", "profiles", "pipeline", "dpfah", "tune", ".gitignore", ".dvcignore"]
ALL = ["dpfah", "dpsh", "dsh", "dhn", "hashnet", "dsdh", "dfh", "idhn", "dbdh", "lcdsh"]


def _copy(dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in PROJECT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        elif src.exists():
            shutil.copy(src, dst / name)


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.methods_cifar", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        default=os.environ.get("DPFAH_CIFAR10_SOURCE"),
        help="CIFAR-10 archive (default: $DPFAH_CIFAR10_SOURCE)",
    )
    parser.add_argument(
        "--methods", default=",".join(ALL), help="comma-separated methods or variants (default: all ten)"
    )
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: params.yaml's)")
    parser.add_argument("--steps", type=int, default=None, help="train.steps_per_epoch cap (default: the whole split)")
    parser.add_argument("--work", default="/tmp/dpfah-methods-bench")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "methods_cifar.json"))
    args = parser.parse_args(argv)
    if not args.source or not Path(args.source).exists():
        parser.error("--source: the CIFAR-10 archive is needed (or set DPFAH_CIFAR10_SOURCE)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    repo = work / "repo"
    _copy(repo)
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_AUTH_MODE="disabled",
        PYTHONPATH=str(repo),
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    _run(["git", "init", "-q"], repo, env)
    _run([str(BIN / "dvc"), "init", "-q"], repo, env)
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "bench"], repo, env)
    sets = [
        f"datasets.cifar10.source={Path(args.source).resolve()}",
        f"train.methods=[{','.join(methods)}]",
        f"bits=[{args.bits}]",
        "evaluate.grid_queries=0",
    ]
    if args.epochs:
        sets.append(f"train.epochs={args.epochs}")
    if args.steps:
        sets.append(f"train.steps_per_epoch={args.steps}")
    start = time.time()
    _run([str(BIN / "dvc"), "exp", "run", *sum((["-S", s] for s in sets), []), "promote"], repo, env)
    total = time.time() - start

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    rows = []
    for m in methods:
        stem = f"cifar10-{args.bits}-{m}-s0"
        record = json.loads((repo / "runs" / f"{stem}.json").read_text())
        metrics = json.loads((repo / "metrics" / f"{stem}.json").read_text())
        run = client.get_run(record["run_id"])
        speeds = [x.value for x in client.get_metric_history(record["run_id"], "train/images_per_s")]
        rows.append(
            {
                "method": m,
                "query_map": metrics["query_map"],
                "query_precision_within_radius": metrics.get("query_precision_within_radius"),
                "best_val_map": record["best_val_map"],
                "best_epoch": record["best_epoch"],
                "epochs": record["epochs"],
                "train_images_per_s": sum(speeds) / len(speeds) if speeds else None,
                "train_stage_s": (run.info.end_time - run.info.start_time) / 1000,
                "run_id": record["run_id"],
            }
        )
    lines = [
        f"CIFAR-10 (cifar10-59k), {args.bits} bits, CPU profile (32 px, from scratch), epochs "
        f"{args.epochs or 'params.yaml'}, "
        f"steps/epoch {args.steps or 'all'}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{total:.0f} s in all",
        f"{'method':14s} {'query mAP@ALL':>14s} {'P@H<=2':>8s} {'val mAP':>8s} {'best ep':>8s} {'img/s':>8s} "
        f"{'train s':>8s}",
    ]
    for r in rows:
        lines.append(
            f"{r['method']:14s} {r['query_map']:14.4f} {r['query_precision_within_radius'] or float('nan'):8.4f} "
            f"{r['best_val_map']:8.4f} "
            f"{r['best_epoch'] + 1:8d} {r['train_images_per_s'] or float('nan'):8.1f} {r['train_stage_s']:8.0f}"
        )
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": sets,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "total_s": total,
        "rows": rows,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
