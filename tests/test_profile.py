"""--profile paper applies every value it names and keeps every other."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from tests.helpers import PARAMS_FILE

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- profile and objective stage


def _flat(obj, prefix=""):
    out = {}
    for key, value in (dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj).items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def test_profile_paper_applies_every_value_it_names_and_keeps_every_other(tmp_path, monkeypatch):
    """--profile paper (load_params(profile="paper")): each value of profiles/paper.yaml is
    taken, also where the base file differs from the repository's (weight decay, zeta),
    every other parameter keeps the base file's value; through a stage's command line too."""
    from pipeline.config import load_params
    from pipeline.errors import run_main
    from pipeline.objective import main

    profile = _flat(yaml.safe_load((REPO / "profiles" / "paper.yaml").read_text()))
    assert len(profile) == 14  # bits, 11 train values, DPFAH's eta and zeta (null: its defaults, the paper's)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "paper.yaml").write_text((REPO / "profiles" / "paper.yaml").read_text())
    text = (
        PARAMS_FILE.read_text()
        .replace("  weight_decay: 1.0e-5", "  weight_decay: 0.25")
        .replace("  dpfah: {eta: 1.0}", "  dpfah: {eta: 1.0, zeta: 0.7, delta: 1.3}")
    )
    text = text.replace("  steps_per_epoch: null", "  steps_per_epoch: 9")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(text)
    base = _flat(load_params(params_file))
    assert (
        base["train.weight_decay"],
        base["objectives.dpfah.zeta"],
        base["train.steps_per_epoch"],
        base["objectives.dpfah.delta"],
    ) == (0.25, 0.7, 9, 1.3)
    paper = _flat(load_params(params_file, profile="paper"))
    assert paper.keys() == base.keys()
    for key, value in profile.items():
        assert paper[key] == value, key
    for key in base.keys() - profile.keys():
        assert paper[key] == base[key], key
    assert (paper["train.weight_decay"], paper["objectives.dpfah.zeta"]) == (1e-5, None)

    monkeypatch.chdir(tmp_path)
    assert (
        run_main(main, ["--dataset", "cifar10", "--bits", "48", "--params", str(params_file), "--profile", "paper"])
        == 0
    )
    doc = json.loads((tmp_path / "objectives" / "cifar10-48-dpfah.json").read_text())
    assert doc["hparams"] == {"delta": 1.3} and doc["source"] == {"weights_from": "params"}
    from dpfah import methods

    trained = methods.build(doc["method"], doc["hparams"], bits=48, num_classes=10)
    assert (trained.eta, trained.zeta, trained.delta) == (10.0, 0.1, 1.3)  # the paper's weights: DPFAH's defaults
