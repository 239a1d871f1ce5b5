"""pipeline.runkey: one training's name, files, arguments and record checks, and the one record reader."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.runkey import MAX_RECORD_BYTES, RecordError, RunKey, add_key_args, read_record
from tests.helpers import PARAMS_FILE

REPO = Path(__file__).resolve().parents[1]
KEY = RunKey("cifar10", 64, "dsh", 2)


def _outs(stage: dict) -> dict[str, dict]:
    """A stage's outputs (outs and metrics): path -> its flags."""
    found = {}
    for section in ("outs", "metrics"):
        for entry in stage.get(section, []):
            path, flags = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            found[path] = flags or {}
    return found


def test_every_file_of_a_training_is_in_a_folder_dvc_yaml_tracks():
    """The matrix (dvc.yaml's train stage) writes each entry's files into folders it declares as
    persistent outputs (DVC must not delete the finished entries before the stage runs), the
    promotions go to promote's folder, and each curve's folder is a top-level plot definition."""
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    train = _outs(doc["stages"]["train"])
    for path in (KEY.run_file(), KEY.metrics_file(), KEY.evaluation_file(), KEY.query_codes_file()):
        folder = path.parts[0]
        assert folder in train and train[folder].get("persist") is True, (path, train)
    for curve in RunKey.CURVES:
        assert KEY.plot_file(curve).parts[0] in train
    plotted = {next(iter(entry)) for entry in doc["plots"]}
    assert plotted == {str(KEY.plot_file(curve).parent) for curve in RunKey.CURVES}
    assert KEY.promotion_file().parts[0] in _outs(doc["stages"]["promote"])
    assert KEY.stem == "cifar10-64-dsh-s2"
    assert KEY.plot_file("p_at_n") == Path("plots/p_at_n/cifar10-64-dsh-s2.csv")
    assert KEY.objective_file() == Path("objectives/cifar10-64-dsh.json")  # one objective for every seed


def test_the_arguments_of_a_key_name_the_same_key_on_a_stage_command_line():
    parser = argparse.ArgumentParser()
    add_key_args(parser)
    params = load_params(PARAMS_FILE)
    assert RunKey.from_args(parser.parse_args(KEY.argv()), params) == KEY
    defaulted = RunKey.from_args(parser.parse_args(["--dataset", "cifar10", "--bits", "16"]), params)
    assert defaulted == RunKey("cifar10", 16, params.train.method, params.seed)
    assert KEY.command("evaluate") == "python -m pipeline.evaluate --dataset cifar10 --bits 64 --method dsh --seed 2"


def test_a_record_of_another_training_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "r.json"
    KEY.check({"dataset": "cifar10", "bits": 64, "method": "dsh", "seed": 2}, path)
    KEY.check({"dataset": "cifar10", "bits": 64}, path)  # older records name no method or seed
    with pytest.raises(RecordError, match=r"records dataset 'cifar10' at 32 bits, not 'cifar10' at 64 bits$"):
        KEY.check({"dataset": "cifar10", "bits": 32}, path)
    with pytest.raises(RecordError, match=r"records seed 0, not 2$"):
        KEY.check({"dataset": "cifar10", "bits": 64, "method": "dsh", "seed": 0}, path)


def test_read_record_says_in_one_line_what_is_wrong_with_the_file(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"run_id": "abc"}))
    assert read_record(good, "run record", missing="train first") == {"run_id": "abc"}

    def check(path, message, **kw):
        with pytest.raises(RecordError) as e:
            read_record(path, "run record", missing="train first", **kw)
        assert str(e.value) == f"{path}: {message}" and "\n" not in str(e.value)

    check(tmp_path / "absent.json", "no run record (train first)")
    (tmp_path / "list.json").write_text("[1, 2]")
    check(tmp_path / "list.json", "not a run record (expected a JSON object)")
    (tmp_path / "cut.json").write_text('{"run_id": ')
    with pytest.raises(RecordError, match=r"cut.json: unreadable run record \(JSONDecodeError: "):
        read_record(tmp_path / "cut.json", "run record", missing="x")
    check(good, "no model_uri", valid=lambda doc: None if "model_uri" in doc else "no model_uri")
    check(tmp_path, "not a regular file (a run record is a small JSON file)")
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_RECORD_BYTES + 1)  # sparse: no disk used
    check(big, f"{MAX_RECORD_BYTES + 1:,} bytes, too large for a run record (at most {MAX_RECORD_BYTES:,})")


def test_read_record_never_opens_a_fifo(tmp_path):
    """A FIFO named as a record would block a reader forever: it is refused unopened."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(RecordError, match=r"fifo.json: not a regular file"):
        read_record(fifo, "run record", missing="x")
