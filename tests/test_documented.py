"""Values params.yaml documents, each run for real and checked against an independent
computation (issue #19): the optimisers and schedules through fit step by step, the
precisions, evaluate.device, multi-label data through fit and prepare, the profile, the
tuned objective, every stage's --help, and promote's metric, alias and model name.

What other files already cover is not repeated here (see the report on issue #19):
the lists kind (test_prepare: imagenet100, nuswide21 multi-label through fit and the
evaluate stage), multi-label mAP (test_metrics), ``pairs: bank`` through fit under real DDP
(test_methods) and through Ray Train on 2 workers, and use_tuned through a real Ray Train
fit (conftest's ``ray_trained``, checked in test_stage_train)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from dpfah.loss import DPFAHLoss
from dpfah.model import DPFAH
from dpfah.objective import Shard
from dpfah.settings import ModelSettings
from dpfah.train import Batch, TrainSettings, fit
from tests.helpers import PARAMS_FILE, TinyNet, fake_training_run, toy_params, write_record

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def _images(n, classes=3, size=16, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    base = rng.integers(0, 256, size=(classes, 3, 1, 1))
    x = np.clip(base[y] + rng.normal(0, 30, size=(n, 3, size, size)), 0, 255).astype(np.uint8)
    return torch.from_numpy(x), torch.eye(classes)[torch.from_numpy(y)]


def _stream(images, labels, batch=8):
    def batches(epoch):
        order = np.random.default_rng(epoch).permutation(len(images))
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start : start + batch]
            yield Batch(images[idx], labels[idx], torch.from_numpy(idx))

    return batches


class _StepRecorder:
    """Every optimiser step of a fit, seen through torch's global optimiser hooks: the lr
    the step uses, the parameters and gradients before it and the parameters after it."""

    def __init__(self, params_too=False):
        self.params_too = params_too
        self.lrs, self.before, self.grads, self.after, self.groups = [], [], [], [], []

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(opt, args, kwargs):
            group = opt.param_groups[0]
            self.lrs.append(group["lr"])
            self.groups.append({k: v for k, v in group.items() if k != "params"})
            if self.params_too:
                self.before.append([p.detach().double().clone() for p in group["params"]])
                self.grads.append([p.grad.detach().double().clone() for p in group["params"]])

        def post(opt, args, kwargs):
            if self.params_too:
                self.after.append([p.detach().double().clone() for p in opt.param_groups[0]["params"]])

        self.handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _fit(settings, model, objective, images, labels, steps, **kw):
    reports = []
    fit(settings, model, objective, train_batches=_stream(images, labels, settings.batch_size), steps_per_epoch=steps,
        report=lambda m, s: reports.append(m), **kw)  # fmt: skip
    return reports


# ----------------------------------------------------------------------------- optimisers and schedules


def _cosine(t, total, lr):
    return lr * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))


def _onecycle(t, total, lr, pct_start=0.3, div_factor=25.0, final_div_factor=1e4):
    """Smith's 1cycle with cosine annealing, torch.optim.lr_scheduler.OneCycleLR's defaults:
    from lr/25 up to lr over the first 30 % of the steps, then down to lr/25/1e4."""
    start = lr / div_factor
    end = start / final_div_factor
    peak = pct_start * total - 1

    def anneal(a, b, pct):
        return b + (a - b) / 2 * (1 + math.cos(math.pi * pct))

    if t <= peak:
        return anneal(start, lr, t / peak)
    return anneal(lr, end, (t - peak) / (total - 1 - peak))


SCHEDULE_FORMULAS = {"constant": lambda t, total, lr: lr, "cosine": _cosine, "onecycle": _onecycle}


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_each_schedule_sets_the_learning_rate_of_every_step_by_its_formula(schedule):
    """train.schedule through fit: the lr the optimiser holds at each of the 12 steps, and
    after the last step of each epoch (the epoch's reported lr), equals the formula."""
    images, labels = _images(32)
    epochs, steps, lr = 3, 4, 3e-3
    settings = TrainSettings(
        epochs=epochs, batch_size=8, image_size=16, optimizer="adamw", lr=lr, schedule=schedule, precision="fp32"
    )
    torch.manual_seed(0)
    with _StepRecorder() as rec:
        reports = _fit(settings, TinyNet(8, 3), DPFAHLoss(eta=1, zeta=0.1), images, labels, steps)
    total = epochs * steps
    want = [SCHEDULE_FORMULAS[schedule](t, total, lr) for t in range(total)]
    assert rec.lrs == pytest.approx(want, rel=1e-9, abs=1e-15)
    for e, metrics in enumerate(reports):
        assert metrics["lr"] == pytest.approx(
            SCHEDULE_FORMULAS[schedule]((e + 1) * steps, total, lr), rel=1e-9, abs=1e-15
        )
    if schedule != "constant":  # the formula is not trivially flat over these steps
        assert max(want) / min(want) > 2


def test_rmsprop_with_the_cosine_schedule_updates_every_weight_by_the_rmsprop_rule():
    """train.optimizer rmsprop (the paper's: lr 5e-5, weight decay 1e-5, no momentum) with
    train.schedule cosine: every parameter after each of 6 steps equals an independent
    RMSProp (alpha 0.99, eps 1e-8, L2 weight decay) at the cosine learning rate of the step."""
    images, labels = _images(32)
    epochs, steps, lr, wd = 2, 3, 5e-5, 1e-5
    settings = TrainSettings(
        epochs=epochs,
        batch_size=8,
        image_size=16,
        optimizer="rmsprop",
        lr=lr,
        weight_decay=wd,
        schedule="cosine",
        precision="fp32",
    )
    torch.manual_seed(0)
    model = TinyNet(8, 3)
    with _StepRecorder(params_too=True) as rec:
        _fit(settings, model, DPFAHLoss(eta=1, zeta=0.1), images, labels, steps)
    total = epochs * steps
    assert len(rec.after) == total
    alpha, eps = 0.99, 1e-8
    square = [torch.zeros_like(p) for p in rec.before[0]]
    for t in range(total):
        lr_t = _cosine(t, total, lr)
        assert rec.lrs[t] == pytest.approx(lr_t, rel=1e-12)
        for i, (p, g, got) in enumerate(zip(rec.before[t], rec.grads[t], rec.after[t])):
            g = g + wd * p
            square[i] = alpha * square[i] + (1 - alpha) * g * g
            want = p - lr_t * g / (square[i].sqrt() + eps)
            torch.testing.assert_close(got, want, rtol=0, atol=2e-7, msg=f"step {t}, parameter {i}")
    moved = [max((a - b).abs().max().item() for a, b in zip(rec.after[t], rec.before[t])) for t in range(total)]
    assert moved[0] > 2e-4 and min(moved) > 1e-5  # updates far larger than the tolerance: the check is not vacuous


def test_rmsprop_has_no_momentum_under_every_schedule():
    images, labels = _images(16)
    for schedule in ("constant", "cosine", "onecycle"):
        settings = TrainSettings(
            epochs=1, batch_size=8, image_size=16, optimizer="rmsprop", lr=5e-5, schedule=schedule, precision="fp32"
        )
        with _StepRecorder() as rec:
            _fit(settings, TinyNet(8, 3), DPFAHLoss(), images, labels, 2)
        assert [g["momentum"] for g in rec.groups] == [0, 0], schedule


def test_sgd_uses_train_momentum_under_every_schedule():
    images, labels = _images(16)
    for schedule in ("constant", "cosine", "onecycle"):
        settings = TrainSettings(
            epochs=1,
            batch_size=8,
            image_size=16,
            optimizer="sgd",
            lr=1e-3,
            momentum=0.5,
            schedule=schedule,
            precision="fp32",
        )
        with _StepRecorder() as rec:
            _fit(settings, TinyNet(8, 3), DPFAHLoss(), images, labels, 2)
        assert [g["momentum"] for g in rec.groups] == [0.5, 0.5], schedule


# ----------------------------------------------------------------------------- precision


def _fit_precision(precision):
    images, labels = _images(16, size=32)
    settings = TrainSettings(
        epochs=1, batch_size=8, image_size=32, optimizer="adamw", lr=1e-3, schedule="constant", precision=precision
    )
    model = DPFAH.build(16, 3, ModelSettings(), seed=0)
    dtypes = set()
    hooks = [
        m.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    reports = _fit(settings, model, DPFAHLoss(eta=1, zeta=0.1), images, labels, 2)
    for h in hooks:
        h.remove()
    return reports[0], dtypes, model.state_dict()


def test_precision_fp32_bf16_and_auto_through_fit_on_the_cpu():
    """train.precision: bf16 runs the convolutions in bfloat16 on the CPU too (autocast), with a
    finite loss close to fp32's but not equal to it; auto on a CPU is exactly fp32."""
    fp32, fp32_types, fp32_weights = _fit_precision("fp32")
    bf16, bf16_types, bf16_weights = _fit_precision("bf16")
    auto, auto_types, auto_weights = _fit_precision("auto")
    assert fp32_types == auto_types == {torch.float32} and bf16_types == {torch.bfloat16}
    for m in (fp32, bf16, auto):
        assert all(math.isfinite(m[k]) for k in ("loss", "loss_l1", "loss_l2", "loss_l3"))
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)
    assert auto["loss"] == fp32["loss"]
    assert any(
        not torch.equal(bf16_weights[k], fp32_weights[k]) for k in fp32_weights if fp32_weights[k].is_floating_point()
    )
    for k in fp32_weights:
        assert torch.equal(auto_weights[k], fp32_weights[k]), k


def test_evaluate_precision_bf16_encodes_in_bfloat16_on_the_cpu():
    """evaluate.precision (encode): bf16 autocasts on the CPU; the codes agree with fp32's
    except where u is within bfloat16's rounding of 0; auto on a CPU is exactly fp32."""
    from dpfah.train import encode

    images, labels = _images(24, size=32)
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
    from pipeline.evaluate import _device

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
    from pipeline.evaluate import evaluate

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
    result = evaluate(params, "toy", 8, progress=False, root=tmp_path)
    assert calls == [(torch.device("cpu"), {torch.device("cpu")})] * 2  # query, then database
    assert result.doc["n_queries"] == 12 and 0 <= result.doc["query_map"] <= 1
    if not real_gpu:
        with pytest.raises(RuntimeError, match="NVIDIA driver"):
            evaluate(
                toy_params(work, images, f"mlflow.tracking_uri={uri}", "evaluate.grid_queries=0"),
                "toy",
                8,
                progress=False,
                root=tmp_path,
            )


# ----------------------------------------------------------------------------- multi-label data


def _shares(a, b):
    return any(x > 0 and y > 0 for x, y in zip(a, b))


def test_multi_label_batches_through_fit_use_shared_label_similarity():
    """Multi-hot labels through fit: each epoch's reported L1, L2 and L3 equal the per-pair
    formula on the codes the network produced, with similar = any shared label (a pair
    sharing only a second label counts), and L3 against the whole label vector."""
    images, _ = _images(16)
    labels = torch.tensor(
        [[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]] * 2,
        dtype=torch.float32,
    )
    assert (
        _shares(labels[0], labels[1]) and labels[0].argmax() != labels[1].argmax()
    )  # similar only through a second label
    settings = TrainSettings(
        epochs=2, batch_size=8, image_size=16, optimizer="adamw", lr=1e-2, schedule="constant", precision="fp32"
    )
    torch.manual_seed(0)
    model = TinyNet(8, 3)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((o[0].detach().double(), o[1].detach().double())))
    batches, label_of = _stream(images, labels), {}

    def stream(epoch):
        for b in batches(epoch):
            label_of[len(label_of)] = b.labels.double()
            yield b

    reports = []
    fit(
        settings,
        model,
        DPFAHLoss(eta=2.0, zeta=0.5),
        train_batches=stream,
        steps_per_epoch=2,
        report=lambda m, s: reports.append(m),
    )
    assert len(seen) == 4
    for e in range(2):
        l1s, l2s, l3s = [], [], []
        for step in (2 * e, 2 * e + 1):
            u, logits = seen[step]
            y = label_of[step]
            pairs = [(i, j) for i in range(8) for j in range(8) if i != j]
            l1 = 0.0
            for i, j in pairs:
                theta = 0.5 * float(u[i] @ u[j])
                l1 += math.log1p(math.exp(theta)) - (1.0 if _shares(y[i], y[j]) else 0.0) * theta
            l1s.append(l1 / len(pairs))
            l2s.append(sum(max(0.0, -1.1 - float(v)) + max(0.0, float(v) - 1.1) for v in u.flatten()) / 8)
            l3s.append(sum(
                -(float(y[i, c]) * math.log(1 / (1 + math.exp(-float(logits[i, c])))) + (1 - float(y[i, c])) * math.log(1 - 1 / (1 + math.exp(-float(logits[i, c])))))
                for i in range(8) for c in range(3)) / 8)  # fmt: skip
        m = reports[e]
        assert m["loss_l1"] == pytest.approx(np.mean(l1s), rel=1e-5)
        assert m["loss_l2"] == pytest.approx(np.mean(l2s), rel=1e-5, abs=1e-7)
        assert m["loss_l3"] == pytest.approx(np.mean(l3s), rel=1e-5)
        assert m["loss"] == pytest.approx(np.mean(l1s) + 2.0 * np.mean(l2s) + 0.5 * np.mean(l3s), rel=1e-5)


def _png(seed, size=12):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_custom_dataset_with_a_multi_label_labels_list(tmp_path):
    """datasets.<name>.kind custom with labels_list (`<path> <0/1 vector>`, multi-label) and
    num_classes: the splits are drawn per class (query_per_class images carrying each class,
    train_per_class likewise, validation carved at random from training as for multi-label
    data, the database everything else with the training images), the label vectors survive,
    and the stored images decode, with the training decoder, to the files' pixels."""
    from dpfah.augment import decode_batch
    from dpfah.data import EvalStream
    from pipeline.config import load_params
    from pipeline.prepare import prepare

    root = tmp_path / "photos"
    rng = np.random.default_rng(1)
    lines, vectors = [], {}
    for i in range(60):
        v = (rng.random(4) < 0.35).astype(int)
        if not v.any():
            v[i % 4] = 1
        path = f"{'ab'[i % 2]}/img_{i:03d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(_png(i))
        lines.append(f"{path} {' '.join(map(str, v))}\n")
        vectors[path] = v.tolist()
    assert sum(sum(v) > 1 for v in vectors.values()) > 10
    listing = tmp_path / "labels.txt"
    listing.write_text("".join(lines))
    sets = [f"data.root={tmp_path / 'data'}", "prepare.datasets=[mine]", "datasets.mine.kind=custom", f"datasets.mine.images={root}",
            f"datasets.mine.labels_list={listing}", "datasets.mine.num_classes=4", "datasets.mine.class_names=[sky,sea,dog,car]",
            "datasets.mine.query_per_class=2", "datasets.mine.train_per_class=5", "datasets.mine.validation=4",
            "datasets.mine.shard_size=7"]  # fmt: skip
    result = prepare(load_params(PARAMS_FILE, sets), "mine", progress=False)
    m = result.manifest
    assert m["multi_label"] is True and m["classes"] == ["sky", "sea", "dog", "car"]
    assert m["lists"]["labels_list"]["lines"] == 60
    counts = {s: m["splits"][s]["count"] for s in m["splits"]}
    assert counts == {"query": 8, "train": 16, "validation": 4, "database": 52}

    import pyarrow.parquet as pq

    rows = pq.read_table(result.directory / "splits.parquet").to_pylist()
    by = {s: [r for r in rows if r["split"] == s] for s in counts}
    for r in rows:
        assert r["labels"] == vectors[r["path"]]
    for c in range(4):  # at least the drawn number per class (an image drawn for one class may carry others)
        assert sum(r["labels"][c] for r in by["query"]) >= 2
        assert sum(r["labels"][c] for r in by["train"] + by["validation"]) >= 5
    query = {r["path"] for r in by["query"]}
    assert not query & {r["path"] for r in by["database"] + by["train"] + by["validation"]}
    assert {r["path"] for r in by["train"] + by["validation"]} <= {
        r["path"] for r in by["database"]
    }  # database_includes_train
    assert {r["path"] for r in by["database"]} | query == set(vectors)

    paths = {(r["split"], r["index"]): r["path"] for r in rows}
    for split in ("query", "validation"):
        for batch in EvalStream(result.directory, split, batch_size=5):
            decoded = decode_batch(batch.images, 12)
            for k, index in enumerate(batch.index.tolist()):
                path = paths[(split, index)]
                assert batch.labels[k].tolist() == vectors[path]
                pixels = np.asarray(Image.open(root / path).convert("RGB")).transpose(2, 0, 1)
                assert np.array_equal(decoded[k].numpy(), pixels), path


# ----------------------------------------------------------------------------- pairs: bank under real DDP


def _bank_batches():
    """Three global batches of 8 out of 12 training indices (rows overwritten across steps)."""
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(3):
        u = torch.randn(8, 6, generator=g, dtype=torch.float64)
        logits = torch.randn(8, 4, generator=g, dtype=torch.float64)
        labels = (torch.rand(8, 4, generator=g) < 0.4).double()
        labels[labels.sum(1) == 0, 1] = 1
        index = torch.randperm(12, generator=g)[:8]
        out.append((u, logits, labels, index))
    return out


def _bank_objective():
    return DPFAHLoss(eta=1.5, zeta=0.3, pairs="bank", bank_size=12, bits=6, num_classes=4).double()


def _bank_worker(rank, world_size, port, out):
    """One rank of a real gloo group: the bank objective's step on its rows, with the real
    Shard (index and codes all-gathered by torch.distributed)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        objective = _bank_objective()
        local = 8 // world_size
        results = []
        for u, logits, labels, index in _bank_batches():
            rows = slice(rank * local, (rank + 1) * local)
            u_r, o_r = u[rows].clone().requires_grad_(True), logits[rows].clone().requires_grad_(True)
            step = objective.step(u_r, o_r, labels[rows], index[rows], Shard(world_size, rank, local))
            step.surrogate.backward()
            results.append((u_r.grad.clone(), o_r.grad.clone(), step.stats))
        torch.save(
            {"steps": results, "bank": {k: v.clone() for k, v in objective.state_dict().items()}}, f"{out}.{rank}"
        )
    finally:
        dist.destroy_process_group()


def test_bank_pairs_under_a_real_process_group_equal_one_process():
    """DPFAH's pairs bank with two gloo processes: the gathered indices and codes write the
    same bank on both ranks as one process writes from the global batch, and the gradients
    (averaged as DDP does) and the epoch terms are one process's on the global batch."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bank")
        mp.spawn(_bank_worker, args=(2, port, out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    single = _bank_objective()
    for t, (u, logits, labels, index) in enumerate(_bank_batches()):
        u1, o1 = u.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        step = single.step(u1, o1, labels, index, Shard(1, 0, 8))
        step.surrogate.backward()
        grad_u = torch.cat([r["steps"][t][0] for r in ranks]) / 2
        grad_o = torch.cat([r["steps"][t][1] for r in ranks]) / 2
        torch.testing.assert_close(grad_u, u1.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad_o, o1.grad, rtol=1e-12, atol=1e-14)
        for term, (value, weight) in step.stats.items():  # summed over the ranks as the loop does
            total = sum(r["steps"][t][2][term][0] for r in ranks)
            weights = sum(r["steps"][t][2][term][1] for r in ranks)
            assert total / weights == pytest.approx(value / weight, rel=1e-12), term
    for r in ranks:
        for key, value in single.state_dict().items():
            torch.testing.assert_close(r["bank"][key], value, rtol=0, atol=0, msg=key)
    # The bank holds the latest code and labels of every index seen, whichever rank held it.
    latest = {}
    for u, _, labels, index in _bank_batches():
        for row, i in enumerate(index.tolist()):
            latest[i] = (u[row], labels[row])
    assert single.memory.seen.nonzero().flatten().tolist() == sorted(latest)
    for i, (code, lab) in latest.items():
        assert torch.equal(single.memory.codes[i], code) and torch.equal(single.memory.labels[i], lab)


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


def test_objective_stage_with_use_tuned_writes_the_tuned_weights_of_the_code_length(tmp_path, monkeypatch, capsys):
    """use_tuned=true through `python -m pipeline.objective` (in process): eta and zeta
    from tune/<dataset>/best.json at the training's code length, the rest from params."""
    from pipeline import objective
    from tests.helpers import cli

    monkeypatch.chdir(tmp_path)
    best = tmp_path / "tune" / "cifar10" / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({
        "eta": 5.0, "zeta": 0.05, "bits": 64, "run_id": "t64", "search_run_id": "s",
        "by_bits": {"16": {"eta": 15.0, "zeta": 1.0, "bits": 16, "run_id": "t16"}, "64": {"eta": 5.0, "zeta": 0.05, "bits": 64, "run_id": "t64"}},
    }))  # fmt: skip
    args = ["--params", str(PARAMS_FILE), "--set", "use_tuned=true", "--set", "objectives.dpfah.delta=0.9"]
    for bits, want in ((16, (15.0, 1.0, "t16")), (64, (5.0, 0.05, "t64")), (32, (5.0, 0.05, "t64"))):
        code, text = cli(objective, ["--dataset", "cifar10", "--bits", str(bits), *args], capsys)
        assert code == 0 and "(from tune)" in text, text
        doc = json.loads((tmp_path / "objectives" / f"cifar10-{bits}-dpfah.json").read_text())
        assert (doc["hparams"]["eta"], doc["hparams"]["zeta"], doc["source"]["tuned_trial_run_id"]) == want
        assert doc["hparams"]["delta"] == 0.9 and doc["source"]["weights_from"] == "tune" and doc["method"] == "dpfah"


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
    from pipeline.promote import promote

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = load_params(PARAMS_FILE, [
        "prepare.datasets=[toy]", "datasets.toy.kind=custom", "datasets.toy.images=/nonexistent", f"mlflow.tracking_uri={uri}",
        "promote.metric=query_map_tie_aware", "promote.alias=best", "promote.model_name=team-{dataset}-{bits}bit",
    ])  # fmt: skip
    client = MlflowClient(uri)
    name = "team-toy-8bit"

    first = _evaluated(uri, tmp_path, query_map=0.70, tie_aware=0.50)
    r = promote(params, "toy", 8, root=tmp_path)
    assert r.moved and (r.record["model_name"], r.record["alias"], r.record["metric"], r.record["value"]) == (
        name,
        "best",
        "query_map_tie_aware",
        0.50,
    )

    second = _evaluated(uri, tmp_path, query_map=0.60, tie_aware=0.55)  # worse by query_map, better tie-aware
    r = promote(params, "toy", 8, root=tmp_path)
    assert (
        r.moved
        and r.record["decision"] == "promoted"
        and r.record["previous"] == {"version": 1, "run_id": first, "value": 0.50}
    )
    assert client.get_model_version_by_alias(name, "best").run_id == second

    third = _evaluated(uri, tmp_path, query_map=0.90, tie_aware=0.54)  # better by query_map, worse tie-aware
    r = promote(params, "toy", 8, root=tmp_path)
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


# ----------------------------------------------------------------------------- tune: random search, no scheduler


def test_tune_scheduler_none_runs_every_trial_to_the_end_and_asha_stops_before_the_last_epoch(toy_dataset):
    """tune.scheduler: none is a FIFO scheduler (stops nothing), so a grace period as long as
    the training is allowed; asha's rungs end before the last epoch."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipeline.errors import ConfigError
    from pipeline.tune import _check_search, _scheduler

    work, images = toy_dataset
    none = toy_params(work, images, "train.epochs=2", "tune.scheduler=none", "tune.grace_period=5")
    assert type(_scheduler(none)) is FIFOScheduler
    _check_search(none, "toy")  # no complaint about the grace period: nothing is stopped
    asha = toy_params(work, images, "train.epochs=4", "tune.grace_period=2", "tune.reduction_factor=3")
    scheduler = _scheduler(asha)
    assert isinstance(scheduler, ASHAScheduler) and scheduler._max_t == 3 and scheduler._reduction_factor == 3
    with pytest.raises(ConfigError, match="^tune.grace_period"):
        _check_search(toy_params(work, images, "train.epochs=2", "tune.grace_period=2"), "toy")


@pytest.mark.slow
def test_random_search_without_scheduler_on_ray(ray_local, toy_dataset, tmp_path, monkeypatch):
    """tune.search random with tune.ranges.eta and scheduler none, for real on the local Ray: the
    one trial's eta is drawn log-uniformly inside the range (not a grid value), zeta
    and bits come from their lists, the trial runs all its epochs, and best.json names it.
    tune.ranges adds another of the method's knobs (DPFAH's delta), drawn and trained with."""
    from mlflow.tracking import MlflowClient

    from pipeline.tune import run_search

    work, images = toy_dataset
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = toy_params(
        work, images, "train.epochs=2", f"train.storage_path={tmp_path / 'ray'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tune.search=random", "tune.ranges.eta=[0.3,3]", "tune.space.zeta=[0.2]", "tune.bits=[8]", "tune.num_samples=1",
        "tune.scheduler=none", "tune.max_failures=0", "tune.ranges.delta=[1.05,1.5]",
    )  # fmt: skip
    try:
        outcome = run_search(params, "toy", out_dir=tmp_path / "out", verbose=0)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    (row,) = outcome.rows
    assert row.status == "completed" and row.epochs == 2 and 0 <= row.val_map <= 1
    eta = row.hparams["eta"]
    assert 0.3 <= eta <= 3 and eta not in (1.0, 10.0) and (row.hparams["zeta"], row.bits) == (0.2, 8)
    best = json.loads(Path(outcome.best_file).read_text())
    assert (best["eta"], best["zeta"], best["bits"], best["run_id"]) == (eta, 0.2, 8, row.run_id)
    delta = row.hparams["delta"]
    assert 1.05 <= delta <= 1.5 and best["delta"] == delta and best["knobs"] == ["eta", "zeta", "delta"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(row.run_id)
    assert float(run.data.params["loss.eta"]) == pytest.approx(eta) and run.info.status == "FINISHED"
    assert float(run.data.params["loss.delta"]) == pytest.approx(delta)
    parent = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(outcome.parent_run_id)
    assert (parent.data.params["tune.search"], parent.data.params["tune.scheduler"]) == ("random", "none")


@pytest.mark.slow
def test_promote_compares_with_the_champion_as_re_evaluated(tmp_path, monkeypatch):
    """A candidate evaluated at mAP@10 against a champion evaluated at mAP@ALL is refused as
    not comparable; once the champion's run is re-evaluated at mAP@10 (as evaluate leaves a
    run: the metric, eval.* tags, a new completion marker), promote compares with that new
    value: a candidate better than it, though worse than its old value, takes the alias."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_params
    from pipeline.promote import promote
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
    assert promote(at_all, "toy", 8, root=tmp_path).record["decision"] == "promoted"
    candidate = evaluated_run(uri, tmp_path, 0.70, map_at=10)["run_id"]
    with pytest.raises(Exception, match="not comparable; re-evaluate the champion's run with the same settings"):
        promote(at_10, "toy", 8, root=tmp_path)

    client.log_metric(champion, "query_map", 0.60)  # the champion at mAP@10
    for key, value in {"eval.map_at": "10", "eval.id": "again", "eval.complete": "again"}.items():
        client.set_tag(champion, key, value)
    r = promote(at_10, "toy", 8, root=tmp_path)
    assert (r.record["decision"], r.record["run_id"], r.record["previous"]) == (
        "promoted",
        candidate,
        {"version": 1, "run_id": champion, "value": 0.60},
    )
    assert client.get_model_version_by_alias(NAME, "champion").run_id == candidate
