"""The evaluate stage on the toy dataset: metrics against a plain re-implementation, DVC and
MLflow holding the same numbers, the artifacts, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpfah.model import DPFAH
from dpfah.settings import ModelSettings
from dpfah.train import Batch
from pipeline.runkey import RunKey
from tests.helpers import (
    BITS,
    class_images,
    cli,
    fake_training_run,
    plain_codes,
    plain_metrics,
    plain_resize,
    plain_tie_aware_map,
    read_split_plain,
    shards_sha,
    toy_overrides,
    toy_params,
    write_record,
)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _params_tracking_uri(monkeypatch):
    """MLFLOW_TRACKING_URI outranks params; in-process mlflow.set_tracking_uri calls elsewhere
    in the session may have left it set."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def trained(toy_dataset, tmp_path_factory):
    """A fake-trained toy model (MLflow run + run record) and its first evaluation."""

    from pipeline.evaluation import evaluate

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # see _params_tracking_uri
    work, images = toy_dataset
    out = tmp_path_factory.mktemp("evaluate")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    shards = work / "data" / "shards" / "toy"
    record = fake_training_run(uri, shards_sha(shards), root=out, seed=1)
    params = toy_params(
        work, images, f"mlflow.tracking_uri={uri}", "evaluate.loader_workers=0", "evaluate.grid_queries=3"
    )
    result = evaluate(params, RunKey("toy", BITS), progress=False, root=out)
    return {
        "work": work,
        "images": images,
        "out": out,
        "uri": uri,
        "shards": shards,
        "record": record,
        "params": params,
        "result": result,
    }


# ----------------------------------------------------------------------------- the stage


def test_metrics_match_a_plain_reimplementation(trained):
    import mlflow

    from dpfah.codes import unpack_codes
    from pipeline.codefiles import load_codes
    from pipeline.model_files import load_encoder

    out, shards, result = trained["out"], trained["shards"], trained["result"]
    from pipeline.artifacts import metric_values

    numbers = json.loads((out / "metrics" / f"toy-{BITS}-dpfah-s0.json").read_text())
    facts = json.loads((out / "evaluations" / f"toy-{BITS}-dpfah-s0.json").read_text())
    # the DVC metrics file holds the numbers only; the evaluation record what they measure
    assert numbers == metric_values(json.loads(json.dumps(result.doc))) and set(numbers) | set(facts) == set(result.doc)
    doc = {**facts, **numbers}
    assert (doc["dataset"], doc["bits"], doc["run_id"], doc["map_at"]) == (
        "toy",
        BITS,
        trained["record"]["run_id"],
        "ALL",
    )
    assert (doc["n_queries"], doc["n_db"], doc["topk"]) == (12, 78, 78)

    # Encode independently: tarfile + PIL + the model from MLflow, ImageNet normalisation.
    from pipeline.tracking import using_tracking_uri

    with using_tracking_uri(trained["uri"]):
        model = load_encoder(trained["record"]["model_uri"], mlflow.get_tracking_uri()).net
    q_img, q_lab = read_split_plain(shards, "query")
    d_img, d_lab = read_split_plain(shards, "database")

    # The packed codes logged to MLflow are those codes (wherever |u| is clear of rounding),
    # labels and indices.
    client = mlflow.tracking.MlflowClient(trained["uri"])
    local = Path(client.download_artifacts(doc["run_id"], "evaluation/codes", str(out / "dl")))
    packed, labels, index, meta = load_codes(local / "database.parquet")
    assert packed.dtype == np.uint64 and packed.shape == (78, 1)
    dc = plain_codes(model, d_img, logged=unpack_codes(packed, BITS))
    np.testing.assert_array_equal(labels, d_lab)
    np.testing.assert_array_equal(index, np.arange(78))
    assert meta["bits"] == str(BITS) and meta["run_id"] == doc["run_id"] and meta["split"] == "database"
    qp, ql, _, _ = load_codes(local / "query.parquet")
    qc = plain_codes(model, q_img, logged=unpack_codes(qp, BITS))
    np.testing.assert_array_equal(ql, q_lab)
    # ... and the query codes DVC keeps (for the report) are the same
    dp, dl, di, dmeta = load_codes(out / "codes" / f"toy-{BITS}-dpfah-s0" / "query.parquet")
    (
        np.testing.assert_array_equal(dp, qp),
        np.testing.assert_array_equal(dl, ql),
        np.testing.assert_array_equal(di, np.arange(12)),
    )
    assert (dmeta["split"], dmeta["method"], dmeta["seed"]) == ("query", "dpfah", "0")

    ref = plain_metrics(qc, dc, q_lab, d_lab, topk=78, radius=2, n=10)
    m = doc
    assert m["query_map"] == pytest.approx(ref["map"], abs=1e-12)
    assert ref["worst"] - 1e-12 <= m["query_map_tie_aware"] <= ref["best"] + 1e-12
    assert m["query_precision_within_radius"] == pytest.approx(ref["ball"], abs=1e-12)
    assert m["query_empty_ball_share"] == pytest.approx(ref["empty"], abs=1e-12)
    assert m["query_p_at_0010"] == pytest.approx(ref["p_at_n"], abs=1e-12)
    assert "query_p_at_0100" not in m  # the database has 78 items

    # The DVC plot data: PR by radius for r = 0..bits, P@N for N = 1..78.
    key = RunKey("toy", BITS)
    pr = np.genfromtxt(key.plot_file("pr_radius", out), delimiter=",", names=True)
    assert list(pr["radius"]) == list(range(BITS + 1))
    dist, rel = ref["dist"], ref["rel"]
    for r in (0, 2, BITS):
        inside = dist <= r
        prec = np.where(inside.any(1), (rel & inside).sum(1) / np.maximum(inside.sum(1), 1), 0).mean()
        rec = ((rel & inside).sum(1) / rel.sum(1)).mean()
        assert pr["precision"][r] == pytest.approx(prec, abs=1e-12) and pr["recall"][r] == pytest.approx(rec, abs=1e-12)
    pn = np.genfromtxt(key.plot_file("p_at_n", out), delimiter=",", names=True)
    assert list(pn["n"]) == list(range(1, 79)) and pn["precision"][9] == pytest.approx(ref["p_at_n"], abs=1e-12)
    rank = np.genfromtxt(key.plot_file("pr_rank", out), delimiter=",", names=True)
    assert rank["rank"][0] == 1 and rank["rank"][-1] == 78 and rank["recall"][-1] == pytest.approx(1.0)


def test_dvc_and_mlflow_hold_the_same_numbers(trained):
    from mlflow.tracking import MlflowClient

    doc = json.loads((trained["out"] / "metrics" / f"toy-{BITS}-dpfah-s0.json").read_text())
    run_id = json.loads((trained["out"] / "evaluations" / f"toy-{BITS}-dpfah-s0.json").read_text())["run_id"]
    run = MlflowClient(trained["uri"]).get_run(run_id)
    from pipeline.artifacts import metric_values

    assert len(metric_values(doc)) >= 6 and set(metric_values(doc)) <= set(run.data.metrics)
    for name, value in metric_values(doc).items():
        assert run.data.metrics[name] == value, name  # exactly, not approximately
    assert (
        run.data.tags["eval.map_at"] == "ALL"
        and run.data.tags["eval.manifest_sha256"] == trained["record"]["manifest_sha256"]
    )
    assert run.info.status == "FINISHED"


def test_figures_and_artifacts_are_logged(trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained["uri"])
    run_id = trained["record"]["run_id"]
    names = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    expected = {
        "pr_curves.png",
        "p_at_n.png",
        "retrieval_grid.png",
        "metrics.json",
        "pr_radius.csv",
        "pr_rank.csv",
        "p_at_n.csv",
        "codes",
    }
    assert {n.split("/", 1)[1] for n in names} == expected
    local = Path(client.download_artifacts(run_id, "evaluation", str(trained["out"] / "figs")))
    for png in ("pr_curves.png", "p_at_n.png", "retrieval_grid.png"):
        with Image.open(local / png) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    details = json.loads((local / "metrics.json").read_text())
    assert {k: details[k] for k in trained["result"].doc} == trained["result"].doc
    assert (
        details["manifest_sha256"] == trained["record"]["manifest_sha256"]
        and details["model_uri"] == trained["record"]["model_uri"]
    )


def test_the_pr_figure_has_the_reports_convention(trained, tmp_path):
    """The evaluation's PR panel: precision from 0 to 1 (as the report's and DVC's template),
    the radii r = 0..4 marked on the curve and named with their precision and recall, the
    empty-ball rule under the figure."""
    from pipeline.precision_plots import EMPTY_BALL_RULE, RADIUS_MARKERS, plot_pr

    report = trained["result"].report
    fig = plot_pr(tmp_path / "pr.png", report, "t", radius=2)
    left, right = fig.axes[:2]
    assert left.get_ylim() == (0.0, 1.0) and right.get_ylim() == (0.0, 1.0)
    pr = report["pr_by_radius"]
    labels = left.get_legend_handles_labels()[1]
    assert labels[0] == "r = 0 .. bits" and len(labels) == 1 + len(RADIUS_MARKERS)
    for r, label in enumerate(labels[1:]):
        assert label.startswith(f"r={r}: P {pr['precision'][r]:.3f}, R {pr['recall'][r]:.3f}")
    assert labels[3].endswith("(P@H<=2)") and fig.get_supxlabel() == EMPTY_BALL_RULE


def test_rates_that_are_counts_are_stored_as_the_exact_fraction():
    """P@N is relevant items over N x queries: stored as that fraction, it prints as its exact
    decimal (the mean of per-query shares can be an ulp off), and it is the same number."""
    from dpfah.metrics import retrieval_report
    from pipeline.evaluate_outputs import count_rate, flat_metrics, p_at_name

    rng = np.random.default_rng(3)
    nq, ndb, bits = 300, 1100, 16
    q = np.where(rng.random((nq, bits)) < 0.5, -1.0, 1.0).astype(np.float32)
    d = np.where(rng.random((ndb, bits)) < 0.5, -1.0, 1.0).astype(np.float32)
    ql = np.eye(7, dtype=np.uint8)[rng.integers(0, 7, nq)]
    dl = np.eye(7, dtype=np.uint8)[rng.integers(0, 7, ndb)]
    report = retrieval_report(q, d, ql, dl, None, radius=2, max_n=1000, pr_ranks=np.array([1, 10, 100, 1100]))
    m = flat_metrics(report)
    order = np.argsort((bits - q @ d.T) / 2, axis=1, kind="stable")  # ties by index, as the metrics
    relevant = (ql.astype(np.int32) @ dl.T.astype(np.int32)) > 0
    for n in (10, 100, 500, 1000):
        hits = int(np.take_along_axis(relevant, order[:, :n], axis=1).sum())
        assert m[p_at_name(n)] == hits / (n * nq)  # exactly: the count over the total
        assert m[p_at_name(n)] == pytest.approx(float(report["p_at_n"]["precision"][n - 1]), rel=1e-12, abs=0)
    assert float(count_rate(0.4413000000000001, 10_000)) == 0.4413
    assert float(count_rate(0.43390999999999996, 100_000)) == 0.43391
    assert float(count_rate(0.123456789, 7)) == 0.123456789  # no count behind it: kept


def test_retrieval_grid_marks_wrong_results(trained):
    from dpfah.data import read_manifest
    from pipeline.evaluation import _grid_rows

    manifest = read_manifest(trained["shards"])
    q_img, q_lab = read_split_plain(trained["shards"], "query")
    d_img, d_lab = read_split_plain(trained["shards"], "database")
    rng = np.random.default_rng(0)
    qc = rng.choice([-1, 1], size=(12, BITS)).astype(np.int8)
    dc = rng.choice([-1, 1], size=(78, BITS)).astype(np.int8)
    rows = _grid_rows(manifest, qc, dc, q_lab, d_lab, 3, 10)
    assert len(rows) == 3 and all(len(r["results"]) == 10 for r in rows)
    dist = (BITS - qc.astype(int) @ dc.astype(int).T) // 2
    for row, q in zip(rows, [0, 6, 11]):  # queries evenly spaced over the split
        top = np.lexsort((np.arange(78), dist[q]))[:10]
        assert [d for _, _, d, _ in row["results"]] == list(dist[q, top])
        assert [ok for _, ok, _, _ in row["results"]] == [bool((q_lab[q] & d_lab[j]).any()) for j in top]
        # each retrieved image is named by its class
        assert [name for _, _, _, name in row["results"]] == [
            manifest.classes[int(np.flatnonzero(d_lab[j])[0])] for j in top
        ]
        np.testing.assert_array_equal(row["query"], q_img[q])  # 32 px: the thumbnail is the image
        np.testing.assert_array_equal(row["results"][0][0], d_img[top[0]])


def test_reevaluation_with_another_r_and_a_url_data_root(trained, tmp_path):
    """mAP@R from evaluate.map_at, shards read through fsspec (file:// URL), and the latest
    evaluation is what both DVC and MLflow hold, its figures included (the retrieval grid
    of 2 queries replaces the first evaluation's of 3)."""
    from mlflow.tracking import MlflowClient

    from pipeline.evaluation import evaluate

    out = tmp_path
    shutil.copytree(trained["out"] / "runs", out / "runs")
    client = MlflowClient(trained["uri"])
    run_id = trained["record"]["run_id"]

    def grid_height(where: str) -> int:
        with Image.open(client.download_artifacts(run_id, "evaluation/retrieval_grid.png", str(out / where))) as im:
            return im.height

    before = grid_height("before")
    params = toy_params(
        trained["work"],
        trained["images"],
        f"data.root=file://{trained['work'] / 'data'}",
        f"mlflow.tracking_uri={trained['uri']}",
        "evaluate.map_at.toy=10",
        "evaluate.radius=1",
        "evaluate.grid_queries=2",
        "evaluate.loader_workers=1",
    )
    result = evaluate(params, RunKey("toy", BITS), progress=False, root=out)
    doc = result.doc
    assert (doc["map_at"], doc["topk"], doc["radius"]) == (10, 10, 1)
    d = read_split_plain(trained["shards"], "database")
    q = read_split_plain(trained["shards"], "query")
    from dpfah.codes import unpack_codes
    from pipeline.codefiles import load_codes

    local = Path(client.download_artifacts(doc["run_id"], "evaluation/codes", str(out / "dl")))
    dc = unpack_codes(load_codes(local / "database.parquet")[0], BITS)
    qc = unpack_codes(load_codes(local / "query.parquet")[0], BITS)
    ref = plain_metrics(qc, dc, q[1], d[1], topk=10, radius=1, n=10)
    assert doc["query_map"] == pytest.approx(ref["map"], abs=1e-12)
    assert doc["query_precision_within_radius"] == pytest.approx(ref["ball"], abs=1e-12)
    assert doc["query_map"] != trained["result"].doc["query_map"]
    run = client.get_run(doc["run_id"])
    for name, value in result.metrics.items():
        assert run.data.metrics[name] == value, name
    assert run.data.tags["eval.map_at"] == "10"
    assert 0 < grid_height("after") < before  # 2 rows of results now, not 3
    details = json.loads(
        Path(client.download_artifacts(run_id, "evaluation/metrics.json", str(out / "after"))).read_text()
    )
    assert (details["map_at"], details["query_map"]) == (10, doc["query_map"])


# ----------------------------------------------------------------------------- bad input


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_run_record(trained, tmp_path, monkeypatch, capsys):
    from pipeline import evaluate

    monkeypatch.chdir(tmp_path)
    code, text = cli(
        evaluate, ["--dataset", "toy", "--bits", "8", "--params", str(_params_file()), *_sets(trained)], capsys
    )
    assert code == 2
    assert text.strip().splitlines()[-1] == (
        "error: runs/toy-8-dpfah-s0.json: no run record (train first: python -m pipeline.train --dataset toy "
        "--bits 8 --method dpfah --seed 0; or give --run-id)"
    )


def test_unknown_run_id(trained, tmp_path, monkeypatch, capsys):
    from pipeline import evaluate

    monkeypatch.chdir(tmp_path)
    write_record(tmp_path, {**trained["record"], "run_id": "f" * 32})
    code, text = cli(
        evaluate, ["--dataset", "toy", "--bits", "8", "--params", str(_params_file()), *_sets(trained)], capsys
    )
    assert code == 2 and text.count("\n") == 1
    assert f"error: MLflow run {'f' * 32} (from runs/toy-8-dpfah-s0.json) not found in {trained['uri']}" in text
    write_record(tmp_path, {k: v for k, v in trained["record"].items() if k != "run_id"})
    code, text = cli(
        evaluate, ["--dataset", "toy", "--bits", "8", "--params", str(_params_file()), *_sets(trained)], capsys
    )
    assert code == 2 and "error: runs/toy-8-dpfah-s0.json: no run_id" in text


def test_record_or_run_of_another_bit_length(trained, tmp_path, monkeypatch, capsys):
    from pipeline import evaluate

    monkeypatch.chdir(tmp_path)
    write_record(tmp_path, trained["record"], name="toy-16-dpfah-s0.json")  # a copied record
    args = ["--params", str(_params_file()), *_sets(trained)]
    code, text = cli(evaluate, ["--dataset", "toy", "--bits", "16", *args], capsys)
    assert (
        code == 2 and "error: runs/toy-16-dpfah-s0.json: records dataset 'toy' at 8 bits, not 'toy' at 16 bits" in text
    )
    run_id = trained["record"]["run_id"]
    code, text = cli(evaluate, ["--dataset", "toy", "--bits", "16", "--run-id", run_id, *args], capsys)
    assert (
        code == 2
        and f"error: MLflow run {run_id} (from --run-id) trained 'toy' at 8 bits, not 'toy' at 16 bits" in text
    )
    assert not (tmp_path / "metrics").exists()


def test_shards_the_model_was_not_trained_on(trained, tmp_path, monkeypatch, capsys):
    """The same dataset name, re-prepared with another seed: other splits, another manifest."""
    from pipeline import evaluate
    from pipeline.prepare import prepare

    other = tmp_path / "other"
    prepare(toy_params(other, trained["images"], "seed=5"), "toy", progress=False)
    monkeypatch.chdir(tmp_path)
    write_record(tmp_path, trained["record"])
    argv = [
        "--dataset",
        "toy",
        "--bits",
        "8",
        "--params",
        str(_params_file()),
        *_sets(trained),
        "--set",
        f"data.root={other / 'data'}",
    ]
    code, text = cli(evaluate, argv, capsys)
    sha = shards_sha(other / "data" / "shards" / "toy")
    assert code == 2 and text.count("\n") == 1
    assert f"error: the shards at {other / 'data' / 'shards' / 'toy'} (manifest sha256 {sha[:12]}, toy/custom)" in text
    assert (
        f"MLflow run {trained['record']['run_id']} was trained on (sha256 {trained['record']['manifest_sha256'][:12]})"
        in text
    )
    assert not (tmp_path / "metrics").exists()


def test_unfinished_run_and_unprepared_shards(trained, tmp_path, monkeypatch, capsys):
    from pipeline import evaluate

    failed = fake_training_run(trained["uri"], trained["record"]["manifest_sha256"], status="FAILED")
    monkeypatch.chdir(tmp_path)
    args = ["--dataset", "toy", "--bits", "8", "--params", str(_params_file()), *_sets(trained)]
    code, text = cli(evaluate, [*args, "--run-id", failed["run_id"]], capsys)
    assert code == 2 and f"error: MLflow run {failed['run_id']} (from --run-id) is FAILED, not FINISHED" in text
    code, text = cli(
        evaluate, [*args, "--run-id", trained["record"]["run_id"], "--set", f"data.root={tmp_path / 'nothing'}"], capsys
    )
    assert code == 2 and f"error: {tmp_path / 'nothing' / 'shards' / 'toy' / 'manifest.json'}: not found" in text


def test_unreachable_tracking_store(trained, tmp_path, monkeypatch, capsys):
    import time

    from pipeline import evaluate

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_record(tmp_path, trained["record"])
    port = _closed_port()
    base = ["--dataset", "toy", "--bits", "8", "--params", str(_params_file()), *_sets(trained)]
    t = time.monotonic()
    code, text = cli(evaluate, [*base, "--set", f"mlflow.tracking_uri=http://127.0.0.1:{port}"], capsys)
    assert code == 2 and time.monotonic() - t < 30
    assert (
        f"error: MLflow tracking server http://127.0.0.1:{port} cannot be reached ([Errno 111] Connection refused)"
        in text
    )

    # Something answers, but it is not an MLflow server (a wrong URL, a proxy page).
    import http.server
    import threading

    class NotMlflow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wrong = f"http://127.0.0.1:{server.server_address[1]}"
        code, text = cli(evaluate, [*base, "--set", f"mlflow.tracking_uri={wrong}"], capsys)
    finally:
        server.shutdown()
    assert code == 2 and text.count("\n") == 1
    assert (
        f"error: MLflow tracking server {wrong}: no MLflow tracking API there (HTTP 404 for {wrong}/api/2.0/mlflow/"
        in text
    )

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")  # the environment wins over params
    code, text = cli(evaluate, base, capsys)
    assert code == 2 and f"error: MLflow store sqlite:///{tmp_path / 'none.db'}: no such file" in text
    assert not (tmp_path / "none.db").exists()


def _params_file() -> Path:
    return Path(__file__).resolve().parents[1] / "params.yaml"


def _sets(trained) -> list[str]:
    out = []
    for item in toy_overrides(trained["work"], trained["images"], f"mlflow.tracking_uri={trained['uri']}"):
        out += ["--set", item]
    return out


# ----------------------------------------------------------------------------- a real trained model, on a real server


def test_a_trained_model_evaluated_and_promoted_on_a_tracking_server(ray_trained, monkeypatch, capsys):
    """The success path as a team runs it: the model Ray Train trained (2 workers, resumed
    after a fault; conftest's ``ray_trained``) and logged to a real ``mlflow server``, then
    ``python -m pipeline.evaluate`` and ``python -m pipeline.promote`` against that server.

    Evaluate encodes at the run's 16 px from the stored 32 px images: the codes it logs are
    those of an independent computation (tarfile, PIL, a numpy antialiased resize, the MLflow
    model in float64) wherever that computation's u is not within 1e-4 of 0; its
    mAP, tie-aware mAP, P@H<=2 and P@10 are exactly those of a plain per-query
    implementation on those codes. Then the model is promoted and the champion alias serves
    the same codes."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from dpfah.codes import unpack_codes
    from pipeline import evaluate, promote
    from pipeline.codefiles import load_codes
    from pipeline.model_files import load_encoder
    from pipeline.tracking import using_tracking_uri

    out, server = ray_trained["out"], ray_trained["server"]
    outcome = ray_trained["resumed"]["outcome"]
    monkeypatch.chdir(out)  # the run record train wrote: runs/toy-16-dpfah-s0.json
    args = ["--dataset", "toy", "--bits", "16", "--params", str(_params_file())]
    for item in toy_overrides(out, ray_trained["images"], f"mlflow.tracking_uri={server}", "evaluate.grid_queries=2"):
        args += ["--set", item]
    code, text = cli(evaluate, [*args, "--quiet"], capsys)
    assert code == 0, text
    doc = json.loads((out / "metrics" / "toy-16-dpfah-s0.json").read_text())
    facts = json.loads((out / "evaluations" / "toy-16-dpfah-s0.json").read_text())
    assert facts["run_id"] == outcome.run_id and (facts["n_queries"], facts["n_db"], facts["map_at"]) == (12, 78, "ALL")

    client = MlflowClient(server)
    local = Path(client.download_artifacts(outcome.run_id, "evaluation/codes", str(out / "dl")))
    qc, dc = (unpack_codes(load_codes(local / f"{split}.parquet")[0], 16) for split in ("query", "database"))

    shards = out / "data" / "shards" / "toy"
    with using_tracking_uri(server):
        model = load_encoder(outcome.model_uri, mlflow.get_tracking_uri()).net.double().eval()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    splits = {}
    for split, logged in (("query", qc), ("database", dc)):
        images, labels = read_split_plain(shards, split)
        assert images.shape[1:] == (32, 32, 3)
        x = torch.from_numpy(((plain_resize(images, 16) / 255 - mean) / std).transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            u = model(x)[0].numpy()
        ref = np.where(u >= 0, 1, -1)
        # float32 against float64, and a few border pixels one level apart (the .5 roundings
        # of the 1/7 border weights) move u by far less than 1e-4
        sure = np.abs(u) > 1e-4
        assert sure.mean() > 0.98
        np.testing.assert_array_equal(logged[sure], ref[sure])
        splits[split] = labels
    assert len({c.tobytes() for c in dc}) >= 10, "a trained model's codes differ from item to item"

    ref = plain_metrics(qc, dc, splits["query"], splits["database"], topk=78, radius=2, n=10)
    assert 0.45 < ref["map"] < 0.99  # learned (chance: 1/3), not perfect: the ranking matters
    assert doc["query_map"] == pytest.approx(ref["map"], abs=1e-12)
    assert doc["query_map_tie_aware"] == pytest.approx(plain_tie_aware_map(ref["dist"], ref["rel"]), abs=1e-12)
    assert doc["query_map_tie_aware"] != doc["query_map"]  # the codes tie: the two differ
    assert doc["query_precision_within_radius"] == pytest.approx(ref["ball"], abs=1e-12)
    assert doc["query_p_at_0010"] == pytest.approx(ref["p_at_n"], abs=1e-12)
    run = client.get_run(outcome.run_id)
    for name in ("query_map", "query_map_tie_aware"):
        assert run.data.metrics[name] == doc[name]

    code, text = cli(promote, args, capsys)
    assert code == 0, text
    promotion = json.loads((out / "promotions" / "toy-16-dpfah-s0.json").read_text())
    assert (promotion["decision"], promotion["version"], promotion["run_id"]) == ("promoted", 1, outcome.run_id)
    champion = client.get_model_version_by_alias("dpfah-toy-16b", "champion")
    assert champion.run_id == outcome.run_id and champion.version == "1"
    with using_tracking_uri(server):
        served = load_encoder("models:/dpfah-toy-16b@champion", mlflow.get_tracking_uri()).net.eval()
    x = torch.from_numpy(
        plain_resize(read_split_plain(shards, "query")[0], 16).transpose(0, 3, 1, 2).astype(np.float32) / 255
    )
    torch.testing.assert_close(served.codes(x), model.float().codes(x), rtol=0, atol=0)


def test_evaluate_precision_bf16_encodes_in_bfloat16_on_the_cpu():
    """evaluate.precision (encode): bf16 autocasts on the CPU; the codes agree with fp32's
    except where u is within bfloat16's rounding of 0; auto on a CPU is exactly fp32."""
    from dpfah.train import encode

    images, labels = class_images(24, size=32)
    model = DPFAH.build(64, 3, ModelSettings(), seed=0)
    batches = [Batch(images[i : i + 8], labels[i : i + 8], torch.arange(i, i + 8)) for i in range(0, 24, 8)]
    dtypes = []
    hook = model.hash_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    codes = {p: encode(model, batches, torch.device("cpu"), 32, precision=p)[0] for p in ("fp32", "bf16", "auto")}
    hook.remove()
    assert dtypes == [torch.float32] * 3 + [torch.bfloat16] * 3 + [torch.float32] * 3
    assert np.array_equal(codes["auto"], codes["fp32"])
    agree = (codes["bf16"] == codes["fp32"]).mean()
    assert agree > 0.9


# ----------------------------------------------------------------------------- evaluate.device


def test_evaluate_device_choice(monkeypatch):
    from pipeline.errors import ConfigError
    from pipeline.evaluation import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device("cpu") == torch.device("cpu") and _device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="^evaluate.device: cuda, but torch sees no GPU"):
        _device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device("cpu") == torch.device("cpu")
    assert _device("auto") == torch.device("cuda") and _device("cuda") == torch.device("cuda")


@pytest.mark.slow
def test_evaluate_with_device_cpu_stays_on_the_cpu_when_a_gpu_is_there(toy_dataset, tmp_path, monkeypatch):
    """evaluate.device=cpu through the stage, with torch reporting a GPU: both splits are
    encoded on the CPU by a model whose weights are on the CPU. (Where the GPU is only
    claimed, as on a CPU machine, the default auto then fails: it would take the GPU.)"""
    import dpfah.train
    from dpfah.data import read_manifest
    from pipeline.evaluation import evaluate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work, images = toy_dataset
    shards = work / "data" / "shards" / "toy"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fake_training_run(uri, read_manifest(shards).sha256, root=tmp_path, seed=3)
    params = toy_params(work, images, f"mlflow.tracking_uri={uri}", "evaluate.device=cpu", "evaluate.grid_queries=0")
    real_gpu = torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls, original = [], dpfah.train.encode

    def encode(model, batches, device, image_size, precision="auto"):
        calls.append((torch.device(device), {p.device for p in model.parameters()}))
        return original(model, batches, device, image_size, precision)

    monkeypatch.setattr(dpfah.train, "encode", encode)
    result = evaluate(params, RunKey("toy", 8), progress=False, root=tmp_path)
    assert calls == [(torch.device("cpu"), {torch.device("cpu")})] * 2  # query, then database
    assert result.doc["n_queries"] == 12 and 0 <= result.doc["query_map"] <= 1
    if not real_gpu:
        with pytest.raises(RuntimeError, match="NVIDIA driver"):
            evaluate(
                toy_params(work, images, f"mlflow.tracking_uri={uri}", "evaluate.grid_queries=0"),
                RunKey("toy", 8),
                progress=False,
                root=tmp_path,
            )
