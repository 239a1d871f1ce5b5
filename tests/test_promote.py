"""The promote stage: the champion alias moves only to a better model, decisions are recorded,
a second run changes nothing, and a missing or foreign evaluation moves nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.runkey import RunKey
from tests.helpers import (
    NAME,
    PARAMS_FILE,
    SHA,
    cli,
    evaluated_run,
    fake_training_run,
    registry_state,
    write_metrics,
    write_record,
)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def toy_params(uri: str, *extra: str):
    from pipeline.config import load_params

    return load_params(
        Path(__file__).resolve().parents[1] / "params.yaml",
        [
            "prepare.datasets=[toy]",
            "datasets.toy.kind=custom",
            "datasets.toy.images=/nonexistent",
            f"mlflow.tracking_uri={uri}",
            *extra,
        ],
    )


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # params name the store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, tmp_path


def test_champion_moves_only_to_a_better_model(store):
    from mlflow.tracking import MlflowClient

    from pipeline.promotion import promote

    uri, root = store
    params = toy_params(uri)
    client = MlflowClient(uri)

    first = evaluated_run(uri, root, 0.60)
    result = promote(params, RunKey("toy", 8), root=root)
    assert result.registered and result.moved and result.record["decision"] == "promoted"
    assert registry_state(uri) == ({"champion": 1}, [(1, first["run_id"])])
    tags = client.get_run(first["run_id"]).data.tags
    assert "promote.champion_query_map" not in tags and "promote.champion_version" not in tags  # no empty tags
    description = client.get_model_version(NAME, "1").description  # what the version is, in words
    first_line = description.splitlines()[0]  # what the version list shows, raw: no markdown there
    # numbers first: the list cuts it after about 32 characters
    assert first_line.startswith("mAP@ALL 0.6000, P@H<=2 not measured: dpfah on toy, 8 bits (protocol custom")
    assert not any(mark in first_line for mark in ("**", "`", "#"))
    assert "Query mAP@ALL: **0.6000**" in description and "evaluation/pr_curves.png" in description
    assert client.get_run(first["run_id"]).data.tags["champion"] == NAME  # the runs table shows who holds it

    second = evaluated_run(uri, root, 0.55)  # worse
    result = promote(params, RunKey("toy", 8), root=root)
    assert result.registered and not result.moved
    rec = json.loads((root / "promotions" / "toy-8-dpfah-s0.json").read_text())
    assert rec == result.record
    assert (rec["decision"], rec["version"], rec["value"], rec["alias_version"]) == ("kept", 2, 0.55, 1)
    assert rec["previous"] == {"version": 1, "run_id": first["run_id"], "value": 0.60}
    assert registry_state(uri) == ({"champion": 1}, [(1, first["run_id"]), (2, second["run_id"])])
    tags = client.get_run(second["run_id"]).data.tags
    assert (tags["promote.decision"], tags["promote.query_map"], tags["promote.champion_query_map"]) == (
        "kept",
        "0.55",
        "0.6",
    )
    assert (tags["promote.version"], tags["promote.champion_version"], tags["promote.alias_version"]) == ("2", "1", "1")

    tie = evaluated_run(uri, root, 0.60)  # equal is not better
    assert promote(params, RunKey("toy", 8), root=root).record["decision"] == "kept"

    third = evaluated_run(uri, root, 0.70)  # better
    result = promote(params, RunKey("toy", 8), root=root)
    assert result.moved and result.record["decision"] == "promoted" and result.record["previous"]["version"] == 1
    aliases, versions = registry_state(uri)
    assert aliases == {"champion": 4} and [v for v, _ in versions] == [1, 2, 3, 4]
    assert client.get_model_version_by_alias(NAME, "champion").run_id == third["run_id"]
    # The run tag moved with the alias: the runs table filters the champion's run.
    experiment = client.get_run(third["run_id"]).info.experiment_id
    holders = client.search_runs([experiment], filter_string=f"tags.champion = '{NAME}'")
    assert [r.info.run_id for r in holders] == [third["run_id"]]
    assert "champion" not in client.get_run(first["run_id"]).data.tags
    # The alias moved by hand (outside promote): the next promotion puts the tag right.
    client.set_registered_model_alias(NAME, "champion", "2")
    assert promote(params, RunKey("toy", 8), run_id=second["run_id"], root=root).record["decision"] == "unchanged"
    holders = client.search_runs([experiment], filter_string="tags.champion LIKE '%'")
    assert [r.info.run_id for r in holders] == [second["run_id"]]
    client.set_registered_model_alias(NAME, "champion", "4")
    assert promote(params, RunKey("toy", 8), root=root).record["alias_version"] == 4
    assert client.get_run(third["run_id"]).data.tags["champion"] == NAME
    assert "champion" not in client.get_run(second["run_id"]).data.tags
    tags = client.get_run(third["run_id"]).data.tags
    assert (tags["promote.decision"], tags["promote.query_map"], tags["promote.champion_query_map"]) == (
        "promoted",
        "0.7",
        "0.6",
    )

    # Idempotent: the same run again registers nothing, moves nothing, rewrites the same file.
    before = (root / "promotions" / "toy-8-dpfah-s0.json").read_bytes()
    result = promote(params, RunKey("toy", 8), root=root)
    assert not result.registered and not result.moved
    assert (root / "promotions" / "toy-8-dpfah-s0.json").read_bytes() == before
    assert registry_state(uri) == (aliases, versions)

    # An earlier, worse run promoted again (by run id): found again by its run id, and now
    # compared with the new champion.
    result = promote(params, RunKey("toy", 8), run_id=second["run_id"], root=root)
    assert not result.registered and result.record["decision"] == "kept" and result.record["previous"]["version"] == 4
    assert registry_state(uri) == (aliases, versions)
    del tie

    # The champion loads by alias.
    import mlflow

    from pipeline.model_files import load_encoder
    from pipeline.tracking import using_tracking_uri

    with using_tracking_uri(uri):
        assert load_encoder(f"models:/{NAME}@champion", mlflow.get_tracking_uri()).bits == 8


def test_missing_or_foreign_evaluation_moves_nothing(store, monkeypatch, capsys):
    from pipeline import promote as stage

    uri, root = store
    monkeypatch.chdir(root)
    base = ["--dataset", "toy", "--bits", "8", "--params", str(Path(__file__).resolve().parents[1] / "params.yaml")]
    for item in [
        "prepare.datasets=[toy]",
        "datasets.toy.kind=custom",
        "datasets.toy.images=/nonexistent",
        f"mlflow.tracking_uri={uri}",
    ]:
        base += ["--set", item]
    champion = evaluated_run(uri, root, 0.5)
    assert cli(stage, base, capsys)[0] == 0
    state = registry_state(uri)

    # A new, better training whose evaluation has not run (or failed): the metrics file
    # still belongs to the champion's run.
    fresh = evaluated_run(uri, root, 0.9, write_files=False)
    write_record(root, fresh)
    code, text = cli(stage, base, capsys)
    assert code == 2 and text.count("\n") == 1
    assert (
        f"error: evaluations/toy-8-dpfah-s0.json: evaluation of run {champion['run_id']}, but "
        f"runs/toy-8-dpfah-s0.json names run {fresh['run_id']}" in text
    )
    assert registry_state(uri) == state

    (root / "metrics" / "toy-8-dpfah-s0.json").unlink()
    code, text = cli(stage, base, capsys)
    assert (
        code == 2
        and "error: metrics/toy-8-dpfah-s0.json: no evaluation metrics "
        "(run python -m pipeline.evaluate --dataset toy --bits 8 --method dpfah --seed 0 first)"
        in text
    )
    assert registry_state(uri) == state

    # A run never evaluated (no metric in MLflow), by run id.
    bare = fake_training_run(uri, SHA)
    code, text = cli(stage, [*base, "--run-id", bare["run_id"]], capsys)
    assert code == 2 and f"error: MLflow run {bare['run_id']} (from --run-id) has no evaluation (query_map)" in text
    assert registry_state(uri) == state

    # The file and MLflow disagree (a later evaluation was logged to the run).
    write_metrics(root, fresh, 0.95)
    code, text = cli(stage, base, capsys)
    assert (
        code == 2
        and f"error: metrics/toy-8-dpfah-s0.json: query_map 0.95 differs from MLflow run {fresh['run_id']}'s 0.9"
        in text
    )
    assert registry_state(uri) == state

    # Evaluated at another R than the parameters now ask for.
    write_metrics(root, fresh, 0.9)
    code, text = cli(stage, [*base, "--set", "evaluate.map_at.toy=10"], capsys)
    assert (
        code == 2
        and "error: evaluations/toy-8-dpfah-s0.json: evaluated at mAP@ALL but evaluate.map_at gives mAP@10 now: "
        "re-run evaluate"
        in text
    )
    assert registry_state(uri) == state

    # Numbers measured differently (the champion at another R) are not compared.
    other = evaluated_run(uri, root, 0.99, map_at=10)
    code, text = cli(stage, [*base, "--set", "evaluate.map_at.toy=10"], capsys)
    assert (
        code == 2
        and f"{NAME} version 1 (run {champion['run_id']}) was evaluated at mAP@ALL on shards abababababab" in text
    )
    assert "this run at mAP@10 on abababababab: not comparable" in text
    assert registry_state(uri) == state  # nothing registered either
    del other

    # The registry cannot be reached.
    write_record(root, fresh)
    write_metrics(root, fresh, 0.9)
    code, text = cli(stage, [*base, "--set", "mlflow.tracking_uri=http://127.0.0.1:9"], capsys)
    assert code == 2 and "error: MLflow tracking server http://127.0.0.1:9 cannot be reached" in text
    assert registry_state(uri) == state

    # Once evaluated, the new run takes the alias.
    code, text = cli(stage, base, capsys)
    assert code == 0 and "champion -> version" in text
    assert registry_state(uri)[0] == {"champion": max(v for v, r in registry_state(uri)[1] if r == fresh["run_id"])}


def _stage_args(uri: str) -> list[str]:
    base = ["--dataset", "toy", "--bits", "8", "--params", str(Path(__file__).resolve().parents[1] / "params.yaml")]
    for item in [
        "prepare.datasets=[toy]",
        "datasets.toy.kind=custom",
        "datasets.toy.images=/nonexistent",
        f"mlflow.tracking_uri={uri}",
    ]:
        base += ["--set", item]
    return base


def test_incomplete_evaluation_is_refused(store, monkeypatch, capsys):
    """Metrics and eval.* tags on the run but no completion marker for them (evaluate failed
    after logging them), or a marker of an earlier evaluation: nothing is registered."""
    from mlflow.tracking import MlflowClient

    from pipeline import promote as stage

    uri, root = store
    monkeypatch.chdir(root)
    run = evaluated_run(uri, root, 0.7, complete=False)
    code, text = cli(stage, _stage_args(uri), capsys)
    assert code == 2 and text.count("\n") == 1
    assert text == (
        f"error: MLflow run {run['run_id']} (from runs/toy-8-dpfah-s0.json): its last evaluation (no eval.id) has no "
        "completion "
        "marker (the evaluate that logged it failed part-way): re-run python -m pipeline.evaluate --dataset toy "
        "--bits 8 --method dpfah --seed 0, then promote\n"
    )
    client = MlflowClient(uri)
    client.set_tag(run["run_id"], "eval.complete", "eval-1")  # an earlier evaluation completed...
    client.set_tag(run["run_id"], "eval.id", "eval-2")  # ...a later one logged its metrics, then failed
    code, text = cli(stage, [*_stage_args(uri), "--run-id", run["run_id"]], capsys)
    assert code == 2 and text == (
        f"error: MLflow run {run['run_id']} (from --run-id): its last evaluation (eval-2) has no completion marker "
        "(the "
        "evaluate that logged it failed part-way; the last one that did was eval-1): re-run python -m "
        "pipeline.evaluate "
        f"--dataset toy --bits 8 --method dpfah --seed 0 --run-id {run['run_id']}, then promote\n"
    )
    assert not client.search_registered_models()

    client.set_tag(run["run_id"], "eval.complete", "eval-2")  # evaluate re-run to the end
    assert cli(stage, _stage_args(uri), capsys)[0] == 0
    assert registry_state(uri) == ({"champion": 1}, [(1, run["run_id"])])


def test_model_with_non_finite_weights_is_never_registered(store, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline import promote as stage

    uri, root = store
    monkeypatch.chdir(root)
    from dpfah.model import DPFAH

    model = DPFAH(8, 3).eval()
    with torch.no_grad():
        model.stem[1].bias[0] = float("nan")  # a parameter: the first bad tensor in state-dict order
        model.stem[1].running_var[1] = float("inf")  # a buffer after it
    run = evaluated_run(uri, root, 0.9, model=model)
    code, text = cli(stage, _stage_args(uri), capsys)
    assert code == 2 and text.count("\n") == 1
    assert text.startswith(f"error: MLflow run {run['run_id']}: model models:/m-")
    assert (
        "has non-finite weights: parameter stem.1.bias holds 1 NaN and 0 infinite of 64 values (the training diverged)"
        in text
    )
    assert not MlflowClient(uri).search_registered_models()


# ----------------------------------------------------------------------------- promote: metric, alias, model name


def _evaluated(uri, root, query_map, tie_aware, sha="cd" * 32):
    """A fake-trained run evaluated as pipeline.evaluate leaves it, with the two metrics
    given separately (they rank runs differently below)."""
    from mlflow.tracking import MlflowClient

    record = fake_training_run(uri, sha)
    client = MlflowClient(uri)
    run_id = record["run_id"]
    client.log_metric(run_id, "query_map", query_map)
    client.log_metric(run_id, "query_map_tie_aware", tie_aware)
    for key, value in {
        "eval.map_at": "ALL",
        "eval.manifest_sha256": sha,
        "eval.id": f"e-{run_id[:8]}",
        "eval.complete": f"e-{run_id[:8]}",
    }.items():
        client.set_tag(run_id, key, value)
    write_record(root, record)
    for folder, doc in (
        ("evaluations", {"dataset": "toy", "bits": 8, "run_id": run_id, "map_at": "ALL"}),
        ("metrics", {"query_map": query_map, "query_map_tie_aware": tie_aware}),
    ):
        path = root / folder / "toy-8-dpfah-s0.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
    return run_id


@pytest.mark.slow
def test_promote_by_tie_aware_map_to_a_custom_alias_and_model_name(tmp_path, monkeypatch):
    """promote.metric query_map_tie_aware, promote.alias best, promote.model_name
    team/{dataset}/{bits}: the alias follows the tie-aware mAP where plain mAP disagrees,
    under the custom name only (no dpfah-toy-8b, no champion)."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_params
    from pipeline.promotion import promote

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = load_params(
        PARAMS_FILE,
        [
            "prepare.datasets=[toy]",
            "datasets.toy.kind=custom",
            "datasets.toy.images=/nonexistent",
            f"mlflow.tracking_uri={uri}",
            "promote.metric=query_map_tie_aware",
            "promote.alias=best",
            "promote.model_name=team-{dataset}-{bits}bit",
        ],
    )
    client = MlflowClient(uri)
    name = "team-toy-8bit"

    first = _evaluated(uri, tmp_path, query_map=0.70, tie_aware=0.50)
    r = promote(params, RunKey("toy", 8), root=tmp_path)
    assert r.moved and (r.record["model_name"], r.record["alias"], r.record["metric"], r.record["value"]) == (
        name,
        "best",
        "query_map_tie_aware",
        0.50,
    )

    second = _evaluated(uri, tmp_path, query_map=0.60, tie_aware=0.55)  # worse by query_map, better tie-aware
    r = promote(params, RunKey("toy", 8), root=tmp_path)
    assert (
        r.moved
        and r.record["decision"] == "promoted"
        and r.record["previous"] == {"version": 1, "run_id": first, "value": 0.50}
    )
    assert client.get_model_version_by_alias(name, "best").run_id == second

    third = _evaluated(uri, tmp_path, query_map=0.90, tie_aware=0.54)  # better by query_map, worse tie-aware
    r = promote(params, RunKey("toy", 8), root=tmp_path)
    assert not r.moved and r.record["decision"] == "kept" and r.record["alias_version"] == 2
    assert client.get_model_version_by_alias(name, "best").run_id == second

    model = client.get_registered_model(name)
    assert {k: int(v) for k, v in model.aliases.items()} == {"best": 2}
    assert [m.name for m in client.search_registered_models()] == [name]  # nothing under dpfah-toy-8b
    tags = client.get_run(third).data.tags
    assert (tags["promote.decision"], tags["promote.alias"], tags["promote.model_name"]) == ("kept", "best", name)
    assert (tags["promote.query_map_tie_aware"], tags["promote.champion_query_map_tie_aware"]) == ("0.54", "0.55")
    assert "promote.query_map" not in tags
    saved = json.loads((tmp_path / "promotions" / "toy-8-dpfah-s0.json").read_text())
    assert (saved["metric"], saved["alias"], saved["model_name"], saved["run_id"]) == (
        "query_map_tie_aware",
        "best",
        name,
        third,
    )


@pytest.mark.slow
def test_promote_compares_with_the_champion_as_re_evaluated(tmp_path, monkeypatch):
    """A candidate evaluated at mAP@10 against a champion evaluated at mAP@ALL is refused as
    not comparable; once the champion's run is re-evaluated at mAP@10 (as evaluate leaves a
    run: the metric, eval.* tags, a new completion marker), promote compares with that new
    value: a candidate better than it, though worse than its old value, takes the alias."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_params
    from pipeline.promotion import promote
    from tests.helpers import NAME, evaluated_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [
        "prepare.datasets=[toy]",
        "datasets.toy.kind=custom",
        "datasets.toy.images=/nonexistent",
        f"mlflow.tracking_uri={uri}",
    ]
    at_all, at_10 = load_params(PARAMS_FILE, sets), load_params(PARAMS_FILE, [*sets, "evaluate.map_at.toy=10"])
    client = MlflowClient(uri)

    champion = evaluated_run(uri, tmp_path, 0.80)["run_id"]
    assert promote(at_all, RunKey("toy", 8), root=tmp_path).record["decision"] == "promoted"
    candidate = evaluated_run(uri, tmp_path, 0.70, map_at=10)["run_id"]
    with pytest.raises(Exception, match="not comparable; re-evaluate the champion's run with the same settings"):
        promote(at_10, RunKey("toy", 8), root=tmp_path)

    client.log_metric(champion, "query_map", 0.60)  # the champion at mAP@10
    for key, value in {"eval.map_at": "10", "eval.id": "again", "eval.complete": "again"}.items():
        client.set_tag(champion, key, value)
    r = promote(at_10, RunKey("toy", 8), root=tmp_path)
    assert (r.record["decision"], r.record["run_id"], r.record["previous"]) == (
        "promoted",
        candidate,
        {"version": 1, "run_id": champion, "value": 0.60},
    )
    assert client.get_model_version_by_alias(NAME, "champion").run_id == candidate


def test_a_tampered_model_is_refused_in_one_line_and_its_pickle_never_runs(store, monkeypatch, capsys):
    """Issue 28, case 2: the model's weights replaced by a pickle of code in the artifact
    store; promote loads the model (its weight check) before registering anything."""
    import pickle

    from mlflow.tracking import MlflowClient

    from pipeline import promote as stage
    from tests.helpers import MarkerPayload

    uri, root = store
    monkeypatch.chdir(root)
    run = evaluated_run(uri, root, 0.9)
    location = MlflowClient(uri).get_logged_model(run["model_uri"].split("/")[-1]).artifact_location
    marker = root / "pwned"
    Path(location.removeprefix("file://"), "artifacts", "weights.pt").write_bytes(pickle.dumps(MarkerPayload(marker)))
    code, text = cli(stage, _stage_args(uri), capsys)
    assert code == 2 and text.count("\n") == 1, text
    assert text.startswith(f"error: model {run['model_uri']}: artifacts/weights.pt: not a file of plain tensors"), text
    assert not marker.exists() and not MlflowClient(uri).search_registered_models()
