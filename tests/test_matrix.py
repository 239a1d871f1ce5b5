"""The matrix stage (pipeline.matrix): every entry trained and evaluated as a Ray Tune trial in
one warm process, entries with unchanged inputs skipped, a failed entry named and the others kept."""

from __future__ import annotations

import json

import pytest

from pipeline.matrix import MatrixFailed, run_matrix
from pipeline.runkey import RunKey
from tests.helpers import toy_params

pytestmark = pytest.mark.slow


def _params(work, images, tmp_path, *extra):
    return toy_params(
        work,
        images,
        "train.epochs=1",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"train.storage_path={tmp_path / 'ray'}",
        "bits=[8]",
        *extra,
    )


def test_each_entry_runs_once_and_only_what_changed_runs_again(ray_local, toy_dataset, tmp_path):
    work, images = toy_dataset
    root = tmp_path / "repo"
    root.mkdir()
    first = run_matrix(_params(work, images, tmp_path, "train.seeds=[0,1]"), ["toy"], root)
    keys = [RunKey("toy", 8, "dpfah", 0), RunKey("toy", 8, "dpfah", 1)]
    assert sorted(first.finished) == keys and not first.failed
    records = {k: json.loads(k.run_file(root).read_text()) for k in keys}
    for key in keys:
        evaluation = json.loads(key.evaluation_file(root).read_text())
        metrics = json.loads(key.metrics_file(root).read_text())
        assert evaluation["run_id"] == records[key]["run_id"] and evaluation["inputs"] == records[key]["inputs"]
        assert metrics["query_map"] == pytest.approx(first.finished[key]["query_map"], abs=0)
        assert key.query_codes_file(root).is_file() and (key.plots_dir(root) / "pr_radius.csv").is_file()
    assert records[keys[0]]["run_id"] != records[keys[1]]["run_id"]

    # nothing changed: nothing runs
    again = run_matrix(_params(work, images, tmp_path, "train.seeds=[0,1]"), ["toy"], root)
    assert sorted(again.plan.done) == keys and not again.finished

    # one more seed: only it trains
    more = run_matrix(_params(work, images, tmp_path, "train.seeds=[0,1,2]"), ["toy"], root)
    assert more.plan.train == [RunKey("toy", 8, "dpfah", 2)] and sorted(more.plan.done) == keys
    assert {k: json.loads(k.run_file(root).read_text())["run_id"] for k in keys} == {
        k: r["run_id"] for k, r in records.items()
    }

    # an evaluation setting: evaluated again, not retrained
    radius = run_matrix(_params(work, images, tmp_path, "train.seeds=[0]", "evaluate.radius=1"), ["toy"], root)
    assert radius.plan.evaluate == [keys[0]] and not radius.plan.train
    assert json.loads(keys[0].evaluation_file(root).read_text())["radius"] == 1
    assert json.loads(keys[0].run_file(root).read_text())["run_id"] == records[keys[0]]["run_id"]


def test_a_failing_entry_is_named_and_the_others_are_kept(ray_local, toy_dataset, tmp_path):
    """An entry whose training cannot start (a method's knob out of range for it alone) fails
    after its retries; the other entry finishes and keeps its records."""
    work, images = toy_dataset
    root = tmp_path / "repo"
    root.mkdir()
    params = _params(work, images, tmp_path, "train.methods=[dpfah,broken]", "train.max_failures=0",
                     "variants={broken: {method: dsh, model: {backbone: alexnet}}}")  # fmt: skip
    with pytest.raises(MatrixFailed) as e:
        run_matrix(params, ["toy"], root)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("1 of 2 entries failed after 1 attempt(s) each (train.max_failures=0): toy-8-broken-s0 (")
    assert "the 1 others are kept" in message
    assert RunKey("toy", 8, "dpfah", 0).metrics_file(root).is_file()
    assert not RunKey("toy", 8, "broken", 0).run_file(root).exists()
