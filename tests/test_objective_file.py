"""A hand-edited objective file (``--objective X.json``) is checked as params.yaml's
objectives are: one line naming the file and the key, exit 2, before MLflow or Ray start
(issue 28, case 7). Fast: nothing here starts Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, run_main
from pipeline.recipes import Recipe, read, write

REPO = Path(__file__).resolve().parents[1]
GOOD = {
    "dataset": "cifar10",
    "bits": 64,
    "entry": "dpfah",
    "method": "dpfah",
    "hparams": {"eta": 1.0},
    "model": {},
    "source": {"weights_from": "params"},
}


def _file(tmp_path: Path, **changes) -> Path:
    doc = {**GOOD, **changes}
    path = tmp_path / "objective.json"
    path.write_text(json.dumps({k: v for k, v in doc.items() if v is not None}))
    return path


def test_a_written_objective_reads_back(tmp_path):
    recipe = Recipe("resnet18", "dpfah", {"eta": 0.0, "pairs": "bank"}, {"pfa": False}, {"weights_from": "params"})
    path = write(recipe, "cifar10", 48, tmp_path)
    assert read(path, "cifar10", 48) == recipe


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"method": "nosuch"}, "method: unknown method 'nosuch' (known: dpfah, dpsh, dsh,"),
        ({"hparams": {"eta": -1}}, "hparams.eta: must be >= 0, got -1"),
        ({"hparams": {"eta": "abc"}}, "hparams.eta: expected a number, got 'abc'"),
        (
            {"hparams": {"etaa": 1.0}},
            "hparams.etaa: dpfah has no hyper-parameter 'etaa' (it has: delta, eta, pairs, zeta)",
        ),
        ({"hparams": {"alpha": 0.1}}, "hparams.alpha: dpfah has no hyper-parameter 'alpha'"),  # dsh's knob
        ({"hparams": {"pairs": "all"}}, "hparams.pairs: 'all' is not one of batch, memory, bank"),
        ({"hparams": {"eta": {"x": 1}}}, "hparams.eta: expected a value, got a mapping {'x': 1}"),
        ({"model": {"pfa": "yes"}}, "model.pfa: expected true or false, got 'yes'"),
        ({"model": {"depth": 3}}, "model.depth: unknown key (known: pfa, lam, backbone_weights, backbone)"),
        ({"model": {"backbone": "vgg"}}, "model.backbone: unknown backbone 'vgg' (choose resnet18 or alexnet)"),
        ({"bits": "64"}, "bits: expected an integer, got '64'"),
        ({"entry": None}, "entry: missing"),
        ({"extra": 1}, "extra: unknown key (known: dataset, bits, entry, method, hparams, model, source)"),
    ],
)
def test_a_bad_objective_file_is_one_line_naming_the_key(tmp_path, changes, message):
    path = _file(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        read(path, "cifar10", 64)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_not_an_objective_file(tmp_path, text):
    path = tmp_path / "objective.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}: (not an objective file|expected a mapping)"):
        read(path, "cifar10", 64)


def test_train_refuses_it_before_mlflow_or_ray_start(tmp_path, capsys, monkeypatch):
    """What a user sees: `python -m pipeline.train ... --objective X.json` exits 2 with the
    line, at once; no MLflow store is made and no Ray instance started."""
    from pipeline import cluster
    from pipeline.train import main

    def no_ray(*args, **kwargs):
        raise AssertionError("train started or joined Ray before refusing the objective file")

    monkeypatch.setattr(cluster, "ensure_ray", no_ray)  # the one way a stage starts or joins Ray
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "mlflow.db"
    for changes, line in (
        ({"method": "nosuch"}, "method: unknown method 'nosuch'"),
        ({"hparams": {"eta": -1}}, "hparams.eta: must be >= 0, got -1"),
        ({"model": {"pfa": "yes"}}, "model.pfa: expected true or false, got 'yes'"),
    ):
        path = _file(tmp_path, **changes)
        argv = ["--dataset", "cifar10", "--bits", "64", "--objective", str(path), "--params", str(REPO / "params.yaml")]
        code = run_main(main, [*argv, "--set", f"mlflow.tracking_uri=sqlite:///{store}"])
        err = capsys.readouterr().err
        assert (code, err) == (2, f"error: {path}: {line}" + err.split(line, 1)[1]) and err.count("\n") == 1, err
    assert not store.exists(), "no MLflow store made"
