"""The objective stage (python -m pipeline.objective): with use_tuned it writes the searched knobs of the length."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import PARAMS_FILE

REPO = Path(__file__).resolve().parents[1]


def test_objective_stage_with_use_tuned_writes_the_tuned_weights_of_the_code_length(tmp_path, monkeypatch, capsys):
    """use_tuned=true through `python -m pipeline.objective` (in process): eta and zeta
    from tune/<dataset>/best.json at the training's code length, the rest from params."""
    from pipeline import objective
    from tests.helpers import cli

    monkeypatch.chdir(tmp_path)
    best = tmp_path / "tune" / "cifar10" / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text(
        json.dumps(
            {
                "eta": 5.0,
                "zeta": 0.05,
                "bits": 64,
                "run_id": "t64",
                "search_run_id": "s",
                "by_bits": {
                    "16": {"eta": 15.0, "zeta": 1.0, "bits": 16, "run_id": "t16"},
                    "64": {"eta": 5.0, "zeta": 0.05, "bits": 64, "run_id": "t64"},
                },
            }
        )
    )
    args = ["--params", str(PARAMS_FILE), "--set", "use_tuned=true", "--set", "objectives.dpfah.delta=0.9"]
    for bits, want in ((16, (15.0, 1.0, "t16")), (64, (5.0, 0.05, "t64")), (32, (5.0, 0.05, "t64"))):
        code, text = cli(objective, ["--dataset", "cifar10", "--bits", str(bits), *args], capsys)
        assert code == 0 and "(from tune)" in text, text
        doc = json.loads((tmp_path / "objectives" / f"cifar10-{bits}-dpfah.json").read_text())
        assert (doc["hparams"]["eta"], doc["hparams"]["zeta"], doc["source"]["tuned_trial_run_id"]) == want
        assert doc["hparams"]["delta"] == 0.9 and doc["source"]["weights_from"] == "tune" and doc["method"] == "dpfah"
