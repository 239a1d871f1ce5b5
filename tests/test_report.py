"""The report stage: a toy DVC repository whose evaluate outputs (2 methods x 2 code lengths x
2 seeds) are written by evaluate's own writer from random codes, then `dvc repro` of
report@toy; its tables against hand computations, its figures, when it reruns, and the error
for a missing (method, bits, seed)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch

from tests.test_dag import BIN, copy_project, edit_params, run, stage_env

pytestmark = pytest.mark.slow

METHODS, BITS, SEEDS = ("dpfah", "dsh"), (8, 16), (0, 1)
N_CLASSES, N_QUERY, N_DB = 3, 30, 90


def _codes(rng, labels: np.ndarray, bits: int, flip: float) -> np.ndarray:
    """Class prototypes (fixed per code length) with a share ``flip`` of bits flipped."""
    protos = np.where(np.random.default_rng(bits).random((N_CLASSES, bits)) < 0.5, -1.0, 1.0)
    codes = protos[labels.argmax(axis=1)]
    return np.where(rng.random(codes.shape) < flip, -codes, codes).astype(np.float32)


FLIPS = {"dpfah": 0.15, "dsh": 0.35, "resnet18": 0.3, "resnet18-pfa": 0.22}


def write_evaluation(root: Path, method: str, bits: int, seed: int, dataset: str = "toy") -> dict:
    """One training's evaluate outputs, through evaluate's writer, from random codes: DPFAH
    flips fewer bits than the others, so it ranks better. Returns the metrics document."""
    from dpfah.metrics import retrieval_report
    from pipeline.artifacts import write_json_atomic
    from pipeline.codefiles import codes_table
    from pipeline.evaluate_outputs import flat_metrics, write_dvc_outputs
    from pipeline.runkey import RunKey

    rng = np.random.default_rng([list(FLIPS).index(method), bits, seed])
    ql = np.eye(N_CLASSES, dtype=np.uint8)[np.arange(N_QUERY) % N_CLASSES]
    dl = np.eye(N_CLASSES, dtype=np.uint8)[np.arange(N_DB) % N_CLASSES]
    flip = FLIPS[method]
    q, d = _codes(rng, ql, bits, flip), _codes(rng, dl, bits, flip)
    ranks = np.unique(np.linspace(1, N_DB, 20).round().astype(np.int64))
    report = retrieval_report(q, d, ql, dl, None, radius=2, max_n=50, pr_ranks=ranks)
    doc = {**flat_metrics(report), "bits": bits, "map_at": "ALL", "n_queries": N_QUERY, "n_db": N_DB}
    key = RunKey(dataset, bits, method, seed)
    write_dvc_outputs(root, key, doc, report, codes_table(q, ql, np.arange(N_QUERY), {"bits": bits, "split": "query"}))
    write_json_atomic(
        key.run_file(root),
        {"best_val_map": 0.5 + 0.1 * (method == "dpfah"), "method": method, "seed": seed},
    )
    return doc


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The project with params for the toy matrix, the evaluations written, `dvc repro report@toy` run."""
    from pipeline.tune import TrialRow, summary_csv, summary_markdown

    work = tmp_path_factory.mktemp("report")
    root = copy_project(work / "repo")
    edit_params(
        root / "params.yaml",
        {
            "prepare.datasets": ["toy"],
            "datasets.toy": {
                "kind": "custom",
                "images": str(work / "no-images"),
                "query_per_class": 10,
                "train_per_class": 10,
                "validation": 0,
            },
            "bits": list(BITS),
            "train.methods": list(METHODS),
            "train.seeds": list(SEEDS),
            "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        },
    )
    docs = {(m, b, s): write_evaluation(root, m, b, s) for m in METHODS for b in BITS for s in SEEDS}
    (root / "data" / "shards" / "toy").mkdir(
        parents=True
    )  # a dependency of the stage (Grad-CAM's images); not read here
    (root / "data" / "shards" / "toy" / "README").write_text("no shards: the toy evaluations are written directly\n")
    rows = [
        TrialRow(f"t{i}", {"eta": e, "zeta": 0.1}, 8, 0.4 + 0.1 * i, 0, 2, "completed", f"r{i}", "n")
        for i, e in enumerate((1.0, 10.0))
    ]
    meta = {
        "name": "s",
        "dataset": "toy",
        "protocol": "p",
        "search": "grid",
        "scheduler": "asha",
        "epochs": 2,
        "image_size": 32,
        "num_workers": 1,
        "knobs": ["eta", "zeta"],
    }
    (root / "tune" / "toy").mkdir(parents=True)
    (root / "tune" / "toy" / "summary.md").write_text(summary_markdown(rows, meta, rows[1]))
    (root / "tune" / "toy" / "summary.csv").write_text(summary_csv(rows))
    env = stage_env()
    run([str(BIN / "dvc"), "init", "--no-scm", "-q"], root, env)
    out = run([str(BIN / "dvc"), "repro", "--single-item", "report@toy"], root, env)
    return root, docs, env, out


def _table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_t_quantile_against_closed_forms():
    from pipeline.report import interval, t_quantile

    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)  # Cauchy
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-9)
    assert t_quantile(0.975, 9) == pytest.approx(2.262157, abs=1e-6) and t_quantile(0.975, 1000) == pytest.approx(
        1.962339, abs=1e-6
    )
    single = interval([0.7])
    assert (single.mean, single.half, single.text()) == (0.7, None, "0.7000 (n = 1)")


def test_table6_cell_is_the_mean_of_the_metrics_files_with_a_hand_computed_interval(repo):
    root, docs, _, _ = repo
    report = root / "reports" / "toy"
    rows = {(r["method"], int(r["bits"])): r for r in _table(report / "table6.csv")}
    assert set(rows) == {(m, b) for m in METHODS for b in BITS}
    for (method, bits), row in rows.items():
        a, b = (
            json.loads((root / "metrics" / f"toy-{bits}-{method}-s{s}.json").read_text())["query_map"] for s in SEEDS
        )
        assert (a, b) == (docs[(method, bits, 0)]["query_map"], docs[(method, bits, 1)]["query_map"])
        # two seeds: s = |a - b| / sqrt(2), half = t(0.975, 1) s / sqrt(2) = tan(0.475 pi) |a - b| / 2
        half = math.tan(math.pi * 0.475) * abs(a - b) / 2
        assert float(row["mean"]) == pytest.approx((a + b) / 2, abs=1e-6) and float(
            row["half_width_95"]
        ) == pytest.approx(half, abs=1e-6)
        assert row["n"] == "2" and row["paper"] == ""  # the paper has no toy dataset
    md = (report / "report.md").read_text()
    r = rows[("dpfah", 16)]
    assert f"{float(r['mean']):.4f} ± {float(r['half_width_95']):.4f}" in md
    assert "### Validation mAP by eta and code length" in md  # the tune grid (Tables 3-4)
    assert (report / "tune_summary.csv").is_file()
    assert "Table 5: ablation" in md and "Not run: train.methods lacks resnet18, resnet18-pfa" in md
    # dsh and dpfah both run with PFA (model.pfa): Fig 3 says so instead of failing
    assert (
        "Grad-CAM heat maps with and without PFA (Fig 3): not drawn: train.methods (dpfah, dsh) lacks a method "
        "without PFA (e.g. resnet18)." in md
    )
    assert not list(report.glob("gradcam_*.png"))


def test_each_figure_is_a_png_with_one_curve_per_method(repo):
    from PIL import Image

    root, _, _, _ = repo
    report = root / "reports" / "toy"
    curves = {f"pr_{b}.png": 2 for b in BITS} | {f"p_at_n_{b}.png": 1 for b in BITS} | {"p_at_h.png": 1}
    for name, panels in curves.items():
        with Image.open(report / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
            listed = im.text["Curves"].split(" | ")
        assert len(listed) == panels, listed
        for panel in listed:
            assert panel.split(": ", 1)[1].split(", ") == list(METHODS), (name, panel)
    with Image.open(report / "tsne_16.png") as im:
        assert im.format == "PNG"
    md = (report / "report.md").read_text()
    assert (
        "t-SNE of the query codes (Fig 7), 16 bits, seed 0: DPFAH and dsh (chosen as the best validation mAP among "
        "the baselines" in md
    )
    agreement = float(md.split("label agreement in Hamming space")[1].split("dpfah ")[1].split(";")[0])
    assert 0 <= agreement <= 1


def test_report_is_an_mlflow_run_of_the_datasets_experiment(repo):
    from mlflow.tracking import MlflowClient

    root, docs, _, out = repo
    uri = f"sqlite:///{root.parent / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dpfah-toy")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'report'")
    assert run.data.metrics["map.dpfah.8b"] == pytest.approx(
        np.mean([docs[("dpfah", 8, s)]["query_map"] for s in SEEDS])
    )
    names = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/table6.csv", "report/pr_8.png"} <= names


def test_stage_reruns_only_when_a_metrics_file_changes(repo):
    root, _, env, _ = repo
    dvc = str(BIN / "dvc")
    dag = run([dvc, "dag", "--dot", "report@toy"], root, env)
    assert '"train" -> "report@toy"' in dag, dag  # after the matrix (every evaluation)
    assert "up to date" in run([dvc, "status", "report@toy"], root, env)
    (root / "promotions").mkdir(exist_ok=True)
    (root / "promotions" / "toy-8-dpfah-s0.json").write_text("{}")  # not read by the report
    assert "up to date" in run([dvc, "status", "report@toy"], root, env)
    path = root / "metrics" / "toy-8-dsh-s1.json"
    before = path.read_text()
    try:
        doc = json.loads(before)
        doc["query_map"] = 0.123
        path.write_text(json.dumps(doc))
        status = run([dvc, "status", "report@toy"], root, env)
        assert "report@toy" in status and "modified:" in status and "metrics" in status, status
    finally:
        path.write_text(before)


def test_a_missing_training_is_named_and_the_previous_report_stays(repo):
    from pipeline.config import load_params
    from pipeline.report import ReportError, write_report

    root, _, _, _ = repo
    params = load_params(root / "params.yaml", ["train.seeds=[0,1,2]"])
    out = root / "reports" / "toy"
    before = (out / "report.md").read_text()
    with pytest.raises(ReportError, match=r"4 of 12 evaluated trainings of toy are missing") as e:
        write_report(params, "toy", root=root)
    assert "(method dpfah, 8 bits, seed 2): " in str(e.value) and "(method dsh, 16 bits, seed 2): " in str(e.value)
    codes = root / "codes" / "toy-16-dsh-s1" / "query.parquet"
    moved = codes.with_suffix(".moved")
    shutil.move(codes, moved)
    try:
        with pytest.raises(
            ReportError, match=r"1 of 8 .*\n  \(method dsh, 16 bits, seed 1\): .*codes/toy-16-dsh-s1/query.parquet$"
        ):
            write_report(load_params(root / "params.yaml"), "toy", root=root)
    finally:
        shutil.move(moved, codes)
    assert (out / "report.md").read_text() == before and not list(out.parent.glob(".toy.*"))


def test_table5_steps_are_paired_differences_over_the_seeds(tmp_path):
    """The ablation's rows and steps at 48 bits on 'cifar10' (the paper's values beside):
    each step's cell is the per-seed difference, its interval a hand computation."""
    from pipeline.config import load_params
    from pipeline.report_tables import collect, table5, table5_md

    params = load_params(
        Path(__file__).resolve().parents[1] / "params.yaml",
        ["train.methods=[resnet18,resnet18-pfa,dpfah]", "bits=[48]", "train.seeds=[0,1,2]"],
    )
    maps = {
        (m, s): write_evaluation(tmp_path, m, 48, s, dataset="cifar10")["query_map"]
        for m in ("resnet18", "resnet18-pfa", "dpfah")
        for s in (0, 1, 2)
    }
    bits, rows = table5(params, "cifar10", collect(params, "cifar10", tmp_path))
    assert bits == 48 and [r["row"] for r in rows] == [
        "resnet18",
        "resnet18-pfa",
        "dpfah",
        "+ PFA (resnet18 -> resnet18-pfa)",
        "+ L2/L3 (resnet18-pfa -> dpfah)",
    ]
    assert [r["paper"] for r in rows[:3]] == [0.8129, 0.8424, 0.8522]
    step = rows[3]
    diffs = [maps[("resnet18-pfa", s)] - maps[("resnet18", s)] for s in (0, 1, 2)]
    assert step["cell"].values == pytest.approx(diffs) and step["paper"] == pytest.approx(0.8424 - 0.8129)
    t2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t(0.975, 2), closed form
    assert step["cell"].half == pytest.approx(t2 * np.std(diffs, ddof=1) / math.sqrt(3), rel=1e-9)
    md = "\n".join(table5_md(rows))
    assert (
        f"| + PFA (resnet18 -> resnet18-pfa) | paired difference | {step['cell'].text(signed=True)} | +0.0295 |" in md
    )


# ----------------------------------------------------------------------------- Grad-CAM (Fig 3)


def _hand_gradcam(net, x: torch.Tensor, layer) -> np.ndarray:
    """Grad-CAM written out: A = the layer's activations, f = sum_i sign(u_i) u_i (sign
    fixed), w_k = spatial mean of df/dA_k, cam = relu(sum_k w_k A_k), scaled to [0, 1],
    resized to the image (bilinear, as the package does) and scaled again."""
    import cv2
    import torch

    from dpfah.codes import binarize

    store = {}
    hook = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        u, _ = net.eval()(x)
    finally:
        hook.remove()
    a = store["a"]
    (grad,) = torch.autograd.grad((binarize(u).detach() * u).sum(), a)
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)).detach().numpy()
    out = []
    for c in cam:
        c = (c - c.min()) / (1e-7 + (c - c.min()).max())
        c = cv2.resize(np.float32(c), x.shape[-2:][::-1])
        out.append((c - c.min()) / (1e-7 + (c - c.min()).max()))
    return np.stack(out)


def test_gradcam_target_is_the_images_own_code_and_the_package_computes_grad_cam():
    import torch

    from dpfah.codes import binarize
    from dpfah.model import DPFAH
    from pipeline.gradcam import OwnCode, _one_thread, cam_layer, heat_maps

    u = torch.tensor([0.3, -2.0, 0.0, 1e-3], requires_grad=True)
    f = OwnCode()(u)
    f.backward()
    assert f.item() == pytest.approx(0.3 + 2.0 + 0.0 + 1e-3) and torch.equal(
        u.grad, binarize(u.detach())
    )  # d f / d u = sign(u)
    torch.manual_seed(0)
    net = DPFAH(8, 3)
    name, layer, side = cam_layer(net, 32)
    assert (name, side) == ("layer2", 4) and cam_layer(net, 224)[0::2] == ("layer4", 7)  # at 32 px layer4 is 1x1
    x = torch.randn(3, 3, 32, 32)
    with _one_thread():  # as heat_maps runs (torch's threads spin on a busy machine)
        by_hand = _hand_gradcam(net, x, layer)
    np.testing.assert_allclose(heat_maps(net, x, layer), by_hand, atol=1e-5)


def test_gradcam_figure_from_two_logged_models_with_and_without_pfa(repo, toy_dataset, tmp_path, monkeypatch):
    """Two models logged to MLflow as train logs them (tiny DPFAH networks, one without PFA
    as resnet18, one with as dpfah), their run records, the prepared toy shards: the heat
    maps have the image's size, lie in [0, 1], vary over the image and differ between the
    models; the figure is a PNG with a row per image and three columns. A record without
    a run, or a model trained otherwise than params.yaml builds it, is named instead."""
    import torch
    from PIL import Image

    from dpfah.data import read_manifest
    from dpfah.model import DPFAH
    from pipeline.gradcam import Pair, compute
    from tests.helpers import fake_training_run, read_split_plain, shards_sha, toy_params, write_record

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work, images = toy_dataset
    shards = work / "data" / "shards" / "toy"
    uri = f"sqlite:///{repo[0].parent / 'mlflow.db'}"  # the toy DAG's store: its tables exist (creating them: seconds)
    records = {}
    for method, pfa, seed in (("resnet18", False, 1), ("dpfah", True, 2)):
        torch.manual_seed(seed)
        records[method] = fake_training_run(uri, shards_sha(shards), model=DPFAH(8, 3, pfa=pfa).eval())
        write_record(tmp_path, records[method], f"toy-8-{method}-s0.json")
    params = toy_params(work, images, f"mlflow.tracking_uri={uri}", "train.methods=[resnet18,dpfah,dsh]", "bits=[8]")
    _, labels = read_split_plain(shards, "query")
    pair = compute(params, "toy", 8, labels, np.arange(len(labels)), root=tmp_path)
    assert isinstance(pair, Pair), pair
    assert pair.methods == ("resnet18", "dpfah") and pair.layers == ("layer2 (4x4)", "layer2 (4x4)")
    n = len(pair.images)
    assert n == 6 and pair.images.shape == (6, 32, 32, 3) and pair.images.dtype == np.uint8
    # the first two queries of each of the 3 classes
    assert pair.indices.tolist() == sorted(int(i) for c in range(3) for i in np.flatnonzero(labels.argmax(1) == c)[:2])
    classes = read_manifest(shards).classes
    assert pair.names == [classes[int(labels[i].argmax())] for i in pair.indices]
    for maps in pair.maps:
        assert maps.shape == (6, 32, 32) and maps.min() >= 0 and maps.max() <= 1
        assert (maps.std(axis=(1, 2)) > 0.05).all()  # not constant
    assert np.abs(pair.maps[0] - pair.maps[1]).mean() > 0.05

    # through the report: the query split's labels from evaluate's codes file, the figure, its sentence
    import pyarrow.parquet as pq

    from pipeline.codefiles import codes_table
    from pipeline.report import Member, gradcam_section

    codes = tmp_path / "query.parquet"
    pq.write_table(
        codes_table(np.ones((len(labels), 8), np.int8), labels, np.arange(len(labels)), {"bits": 8, "split": "query"}),
        codes,
    )
    member = Member("resnet18", 8, 0, {}, {}, codes, 0.5)
    lines, result = gradcam_section(params, "toy", [member], tmp_path, tmp_path)
    assert result["figure"] == "gradcam_8.png" and result["runs"] == (
        records["resnet18"]["run_id"],
        records["dpfah"]["run_id"],
    )
    assert result["indices"] == pair.indices.tolist() and "![Grad-CAM](gradcam_8.png)" in lines
    assert lines[0].startswith(
        "Grad-CAM heat maps with and without PFA (Fig 3), 8 bits, seed 0: 6 query images (the first of each class"
    )
    path = tmp_path / "gradcam_8.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[1] > im.size[0] > 300
        assert im.text["Columns"] == "query image | resnet18 (without PFA) | dpfah (with PFA)"
        assert im.text["Rows"].split(" | ") == pair.names and set(pair.names) <= {"red", "green", "blue"}

    # the reasons, not a failure
    write_record(tmp_path, {"dataset": "toy", "bits": 8}, "toy-8-resnet18-s0.json")
    why = compute(params, "toy", 8, labels, np.arange(len(labels)), root=tmp_path)
    assert why.startswith("the model of resnet18 (8 bits, seed 0) could not be loaded: ") and "no run_id" in why
    as_dsh = toy_params(work, images, f"mlflow.tracking_uri={uri}", "train.methods=[dpfah,dsh]", "bits=[8]")
    assert (
        compute(as_dsh, "toy", 8, labels, np.arange(len(labels)), root=tmp_path)
        == "train.methods (dpfah, dsh) lacks a method without PFA (e.g. resnet18)"
    )
    write_record(tmp_path, records["dpfah"], "toy-8-resnet18-s0.json")  # resnet18's record naming a network with PFA
    why = compute(params, "toy", 8, labels, np.arange(len(labels)), root=tmp_path)
    assert (
        why == f"the model of resnet18 (run {records['dpfah']['run_id']}) was trained with PFA, "
        "not as params.yaml builds it now"
    )


# ----------------------------------------------------------------------------- issue 29: what MLflow and a browser show


def test_the_html_report_embeds_every_figure_of_the_markdown(repo):
    """report.html is self-contained: each figure report.md links is an <img> whose data URI
    holds that very PNG; no script, no external source (MLflow shows it in an iframe)."""
    import base64
    import re

    root, _, _, _ = repo
    report = root / "reports" / "toy"
    md, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"pr_8.png", "pr_16.png", "p_at_n_8.png", "p_at_h.png", "tsne_16.png"} <= set(linked)
    images = re.findall(r'<img alt="[^"]*" title="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert [name for name, _ in images] == linked
    for name, data in images:
        assert base64.b64decode(data) == (report / name).read_bytes(), name
    assert "<script" not in page and not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "<table>" in page and "<h2>Table 6: query mAP@ALL by method and code length</h2>" in page
    assert "<strong>" in page  # the marked best cell of Table 6


def test_the_pr_panel_has_the_evaluations_convention(repo, tmp_path):
    """PR by radius in the report: precision from 0 to 1 (as evaluate's figure and DVC's
    template), each method's radii r = 0..4 marked, and the empty-ball rule said under the
    figure and in report.md."""
    from matplotlib.collections import PathCollection

    from pipeline.config import load_params
    from pipeline.precision_plots import EMPTY_BALL_RULE, RADIUS_MARKERS
    from pipeline.report_figures import figure_pr
    from pipeline.report_tables import collect

    root, _, _, _ = repo
    params = load_params(root / "params.yaml")
    fig = figure_pr(params, collect(params, "toy", root), 16, tmp_path / "pr.png", "toy", 2)
    left, right = fig.axes[:2]
    assert left.get_ylim() == (0.0, 1.0) and right.get_ylim() == (0.0, 1.0)
    markers = [c for c in left.collections if isinstance(c, PathCollection)]
    assert len(markers) == len(RADIUS_MARKERS) * len(METHODS)
    x, y = left.lines[0].get_data()  # the first method's curve: its r = 0..4 points are marked
    marked = [tuple(c.get_offsets()[0]) for c in markers[: len(RADIUS_MARKERS)]]
    assert marked == [pytest.approx((x[r], y[r])) for r in range(len(RADIUS_MARKERS))]
    assert fig.get_supxlabel() == EMPTY_BALL_RULE
    assert EMPTY_BALL_RULE in (root / "reports" / "toy" / "report.md").read_text()


def test_p_at_h_against_the_code_length_needs_two_lengths(repo, tmp_path):
    """With one code length Fig 11 would be one dot per method: not drawn, and the report
    says why and gives the values (the CSV is written either way)."""
    from pipeline.config import load_params
    from pipeline.report import write_report

    root, _, _, _ = repo
    out, result = write_report(load_params(root / "params.yaml", ["bits=[8]"]), "toy", tmp_path / "one", root)
    assert not (out / "p_at_h.png").exists() and "p_at_h.png" not in result["figures"]
    md = (out / "report.md").read_text()
    rows = _table(out / "p_at_h.csv")
    assert [(r["method"], r["bits"]) for r in rows] == [("dpfah", "8"), ("dsh", "8")]
    dpfah = rows[0]
    assert (
        "P@H<=2 against the code length (Fig 11): not drawn: one code length (8 bits) makes one point per method, "
        "not a trend" in md
    )
    assert f"P@H<=2 at 8 bits: dpfah {float(dpfah['mean']):.3f} ± {float(dpfah['half_width_95']):.3f}" in md
    assert (root / "reports" / "toy" / "p_at_h.png").is_file()  # two lengths: drawn


def test_the_retrieval_grid_comes_from_the_evaluations_run(repo, tmp_path):
    """The report shows the grid evaluate logged (evaluation/retrieval_grid.png of the run the
    record names), byte for byte, embedded in the HTML; a run without one, or a record
    without a run, is named with the reason instead."""
    import base64

    from mlflow.tracking import MlflowClient
    from PIL import Image

    from pipeline.config import load_params
    from pipeline.report import Member, grid_section
    from pipeline.report_html import markdown_to_html

    root, _, _, _ = repo
    params = load_params(root / "params.yaml")
    client = MlflowClient(f"sqlite:///{root.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dpfah-toy").experiment_id
    grid = tmp_path / "evaluation" / "retrieval_grid.png"
    grid.parent.mkdir()
    Image.new("RGB", (40, 20), (10, 200, 30)).save(grid)
    with_grid, without = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    client.log_artifact(with_grid, str(grid), "evaluation")
    members = [Member("dpfah", 16, 0, {}, {}, tmp_path, 0.5, with_grid), Member("dsh", 16, 0, {}, {}, tmp_path, 0.4)]
    out = tmp_path / "out"
    out.mkdir()
    lines, names = grid_section(params, "toy", members, 16, out)
    assert names == ["grid_dpfah_16.png"] and (out / names[0]).read_bytes() == grid.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == names  # the download folder is gone
    assert f"dpfah (run {with_grid}):" in lines and "![grid dpfah](grid_dpfah_16.png)" in lines
    assert "dsh: no grid: its run record names no MLflow run." in lines
    page = markdown_to_html("\n".join(lines), out, "grid")
    assert base64.b64encode(grid.read_bytes()).decode() in page

    members[1] = Member("dsh", 16, 0, {}, {}, tmp_path, 0.4, without)
    lines, names = grid_section(params, "toy", members, 16, out)
    assert names == ["grid_dpfah_16.png"]
    (why,) = [x for x in lines if x.startswith("dsh: no grid")]
    assert why.startswith(f"dsh: no grid (run {without}): ") and "retrieval_grid.png" in why, why
    # the toy report's records name no runs: said, not failed
    md = (root / "reports" / "toy" / "report.md").read_text()
    assert (
        "Retrieval grids (Fig 15), 16 bits, seed 0:" in md
        and "dpfah: no grid: its run record names no MLflow run." in md
    )


def test_dvc_plots_titles_name_the_training(repo):
    """`dvc plots show`: each plot is titled by its file, plots/<curve>/<dataset>-<bits>-<method>-s<seed>.csv,
    which names the curve and the training (a folder of curves is drawn one way: dvc.yaml's top-level plots)."""
    root, _, env, _ = repo
    shown = json.loads(run([str(BIN / "dvc"), "plots", "show", "--json"], root, env))
    titles = set()
    for entries in shown["data"].values():
        for entry in entries:
            title = entry.get("content", {}).get("title", {})
            titles.add(title.get("text") if isinstance(title, dict) else title)
    for m in METHODS:
        for b in BITS:
            for s in SEEDS:
                for curve in ("pr_radius", "pr_rank", "p_at_n"):
                    assert f"plots/{curve}/toy-{b}-{m}-s{s}.csv" in titles, sorted(map(str, titles))[:6]
    # each curve's axes from dvc.yaml's top-level plots (the template draws x against precision)
    for plot_id, entries in shown["data"].items():
        x = entries[0]["content"]["encoding"]["x"]["field"]
        assert x == ("n" if "/p_at_n/" in plot_id else "recall"), (plot_id, x)
