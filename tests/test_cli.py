"""Every stage answers --help (exit 0, its usage and its options) without starting Ray, MLflow or DVC."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- --help of every stage

HELP = {
    "prepare": ["--dataset", "--params", "--profile", "--set", "--quiet", "shards"],
    "objective": [
        "--dataset",
        "--bits",
        "--method",
        "--params",
        "--profile",
        "--set",
        "objectives/<dataset>-<bits>-<method>.json",
        "use_tuned",
    ],
    "train": [
        "--dataset",
        "--bits",
        "--method",
        "--seed",
        "--objective",
        "--params",
        "--profile",
        "--set",
        "--verbose",
        "runs/<dataset>-<bits>-<method>-s<seed>.json",
    ],
    "evaluate": [
        "--dataset",
        "--bits",
        "--method",
        "--seed",
        "--run-id",
        "--quiet",
        "--params",
        "--profile",
        "--set",
        "metrics/<dataset>-<bits>-<method>-s<seed>.json",
    ],
    "promote": [
        "--dataset",
        "--bits",
        "--method",
        "--seed",
        "--run-id",
        "--params",
        "--profile",
        "--set",
        "promote.alias",
        "promote.metric",
        "promote.model_name",
    ],
    "tune": ["--dataset", "--out", "--params", "--profile", "--set", "tune/<dataset>/best.json", "tune.search=random"],
    "profile": ["name", "--params", "--dry-run"],
    "report": ["--dataset", "--out", "--no-mlflow", "--params", "--profile", "--set", "reports/<dataset>", "Table 6"],
    "index": [
        "--dataset",
        "--bits",
        "--method",
        "--model",
        "--split",
        "--images",
        "--root",
        "--out",
        "--set",
        "index.on_bad_image",
        "ray job submit",
    ],
    "search": ["INDEX", "IMAGE", "--key", "-k", "--radius", "--grid", "--verify", "--set"],
}


@pytest.mark.parametrize("stage", sorted(HELP))
def test_every_stage_answers_help(stage):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m pipeline.{stage} ") and not out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for option in HELP[stage]:
        assert option in text, (stage, option)
