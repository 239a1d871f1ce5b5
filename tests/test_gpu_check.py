"""bench/gpu_check.sh, run end to end on the CPU with tiny settings (GPU_CHECK_SMOKE=1) and
the toy dataset: every step runs, writes its file, and the summary reads them all. The GPU
numbers themselves come only from a GPU machine; this keeps the script ready for one."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_every_step_on_the_cpu(toy_dataset, tmp_path):
    work, _ = toy_dataset
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(
        OUT=str(out),
        GPU_CHECK_SMOKE="1",
        GPU_CHECK_SHARDS=str(work / "data" / "shards" / "toy"),
        PYTHON=str(Path(os.sys.executable)),
    )
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert {p.name for p in out.iterdir()} == {
        "device.txt",
        "build.log",
        "gpu_tests.log",
        "train_throughput.json",
        "cifar10.json",
        "gpu_check.json",
    }
    assert "skipped" in (out / "gpu_tests.log").read_text()  # no CUDA here: skipped, with the reason
    summary = json.loads((out / "gpu_check.json").read_text())
    train = summary["cifar10"]["train"]
    assert train["epochs"] >= 1 and 0 <= train["best_val_map"] <= 1 and 0 <= train["query_map_at_all"] <= 1
    assert summary["cifar10"]["encode"]["images"] > 0 and summary["train_throughput"]["ratio"] > 0
    assert "query mAP@ALL" in proc.stdout and "gpu_check: done" in proc.stdout
