"""The comparison methods (dpfah.methods): every objective against a per-pair loop written
from its paper's formula, the stateful steps against plain re-implementations, data-parallel
ranks (simulated with threads) against one process, and short runs through fit."""

from __future__ import annotations

import copy
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dpfah import methods
from dpfah.loss import DPFAHLoss
from dpfah.methods.dfh import center_step
from dpfah.methods.dsdh import dcc
from dpfah.objective import Memory, Objective, Shard
from dpfah.train import Batch, TrainSettings, fit
from tests.helpers import TinyNet as _Tiny

REPO = Path(__file__).resolve().parents[1]

BITS, CLASSES, TRAIN = 6, 4, 16

# (method, hyper-parameters): every method at its defaults, and the variants that matter.
CONFIGS = [
    ("dpsh", {}),
    ("dpsh", {"pairs": "batch"}),
    ("dpsh", {"pairs": "bank"}),  # the same memory, only the rows written so far
    ("dsh", {}),
    ("dhn", {}),
    ("hashnet", {}),
    ("hashnet", {"pairs": "memory", "schedule": "epoch", "alpha": 0.1, "label_cosine": False}),  # the 2022 zoo form
    ("dsdh", {}),
    ("dfh", {}),
    ("idhn", {}),
    ("dbdh", {}),
    ("lcdsh", {}),
    ("dpfah", {}),
    ("dpfah", {"pairs": "bank"}),
    ("dpfah", {"pairs": "memory"}),
]
# Non-default weights, so a term given the wrong coefficient cannot pass by coincidence.
ODD = [
    ("dpsh", {"eta": 3.0}),
    ("dsh", {"alpha": 0.2, "margin": 5.0}),
    ("dhn", {"lam": 0.7}),
    ("hashnet", {"alpha": 0.4, "label_cosine": False}),
    ("dsdh", {"eta": 3.0}),
    ("dfh", {"mu": 0.4, "margin": 1.5, "eta": 0.8}),
    ("idhn", {"beta": 4.0, "gamma": 0.3, "lam": 0.7}),
    ("dbdh", {"alpha": 0.3, "p": 1}),
    ("lcdsh", {"lam": 1.5}),
]


def _ids(configs):
    return [name + ("-" + "-".join(f"{k}={v}" for k, v in p.items()) if p else "") for name, p in configs]


IDS = _ids(CONFIGS)


def _batch(n=8, seed=0, multi=False, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, BITS, generator=g, dtype=torch.float64) * scale
    logits = torch.randn(n, CLASSES, generator=g, dtype=torch.float64)
    if multi:
        labels = (torch.rand(n, CLASSES, generator=g) < 0.4).double()
        labels[labels.sum(1) == 0, 0] = 1
    else:
        labels = nn.functional.one_hot(torch.randint(0, CLASSES, (n,), generator=g), CLASSES).double()
    index = torch.randperm(TRAIN, generator=g)[:n]
    return u, logits, labels, index


def _make(name, params, seed=1):
    """The objective with its state already away from the initial one: half the memory
    filled, HashNet's schedule advanced, DSDH's classifier set."""
    obj = methods.build(name, params, bits=BITS, num_classes=CLASSES, train_size=TRAIN).double()
    g = torch.Generator().manual_seed(seed)
    if hasattr(obj, "memory"):
        rows = torch.arange(0, TRAIN, 2)
        obj.memory.codes[rows] = torch.randn(len(rows), BITS, generator=g, dtype=torch.float64)
        obj.memory.labels[rows] = (torch.rand(len(rows), CLASSES, generator=g) < 0.5).double()
        obj.memory.seen[rows] = True
    if name == "hashnet":
        obj.iteration.fill_(450)  # schedule "iteration": beta = (1 + 0.005 * 400) ** 0.5 = sqrt(3)
        obj.epoch.fill_(45)  # schedule "epoch": beta = sqrt(45 // 20 + 1) = sqrt(3)
    return obj


# ------------------------------------------------------------------ references, per pair


def _dot(a, b):
    return sum(a[k] * b[k] for k in range(len(a)))


def _share(ya, yb):
    return any(float(ya[c]) > 0 and float(yb[c]) > 0 for c in range(len(ya)))


def _sgn(x):
    return 1.0 if float(torch.as_tensor(x).detach()) >= 0 else -1.0


def _log1pexp(x):
    return torch.log1p(torch.exp(x))


def _memory_after(obj, h, labels, index):
    """(codes, labels) of the memory's columns after this batch was written (constants):
    every row for ``memory``, the rows written so far for ``bank``."""
    codes, col_labels, seen = obj.memory.codes.clone(), obj.memory.labels.clone(), obj.memory.seen.clone()
    codes[index], col_labels[index], seen[index] = h.detach(), labels, True
    keep = seen if obj.hparams["pairs"] == "bank" else torch.ones_like(seen)
    return codes[keep], col_labels[keep]


def _pair_set(obj, h, labels, index):
    """(rows, columns, pairs) of the objective's pair set: columns are the differentiable batch
    codes (in-batch pairs, i != j) or the memory after this batch was written (constants)."""
    n = h.shape[0]
    if obj.hparams["pairs"] == "batch":
        return list(h), list(labels), [(i, j) for i in range(n) for j in range(n) if i != j]
    codes, col_labels = _memory_after(obj, h, labels, index)
    return list(codes), list(col_labels), [(i, j) for i in range(n) for j in range(len(codes))]


def _dpsh_likelihood_sum(u, labels, cols, ycols, pairs):
    """sum over pairs of log(1 + e^theta) - s theta, theta = <u_i, col_j> / 2."""
    total = 0
    for i, j in pairs:
        theta = 0.5 * _dot(u[i], cols[j])
        total = total + _log1pexp(theta) - (1.0 if _share(labels[i], ycols[j]) else 0.0) * theta
    return total


def ref_dpsh(obj, u, logits, labels, index):
    cols, ycols, pairs = _pair_set(obj, u, labels, index)
    total = _dpsh_likelihood_sum(u, labels, cols, ycols, pairs)
    quant = sum((_sgn(u[i, k]) - u[i, k]) ** 2 for i in range(len(u)) for k in range(BITS))
    return (total + obj.hparams["eta"] * quant) / len(pairs)


def ref_dsh(obj, u, logits, labels, index):
    cols, ycols, pairs = _pair_set(obj, u, labels, index)
    m = 2 * BITS if obj.hparams["margin"] is None else obj.hparams["margin"]
    alpha = obj.hparams["alpha"]
    total = 0
    for i, j in pairs:
        d = sum((u[i, k] - cols[j][k]) ** 2 for k in range(BITS))
        y = 0.0 if _share(labels[i], ycols[j]) else 1.0
        total = total + 0.5 * (1 - y) * d + 0.5 * y * torch.clamp(m - d, min=0)
        total = total + alpha * sum(abs(abs(u[i, k]) - 1) + abs(abs(cols[j][k]) - 1) for k in range(BITS))
    return total / len(pairs)


def ref_dhn(obj, u, logits, labels, index):
    z = torch.tanh(u)
    cols, ycols, pairs = _pair_set(obj, z, labels, index)
    total = 0
    for i, j in pairs:
        ip = _dot(z[i], cols[j])
        total = total + _log1pexp(ip) - (1.0 if _share(labels[i], ycols[j]) else 0.0) * ip
    quant = sum(torch.log(torch.cosh(abs(z[i, k]) - 1)) for i in range(len(u)) for k in range(BITS))
    return (total + obj.hparams["lam"] * quant) / len(pairs)


def ref_hashnet(obj, u, logits, labels, index):
    p = obj.hparams
    beta = math.sqrt(3.0)  # see _make: both schedules give sqrt(3) at the state set there
    h = torch.tanh(beta * u)
    alpha = 10 / BITS if p["alpha"] is None else p["alpha"]
    cols, ycols, pairs = _pair_set(obj, h, labels, index)
    sim_sum, dis_sum, n_sim, n_dis = 0, 0, 0, 0
    for i, j in pairs:
        ip = alpha * _dot(h[i], cols[j])
        if _share(labels[i], ycols[j]):
            c = float(_dot(labels[i], ycols[j]) / (labels[i].norm() * ycols[j].norm())) if p["label_cosine"] else 1.0
            sim_sum, n_sim = sim_sum + c * (_log1pexp(ip) - ip), n_sim + 1
        else:
            dis_sum, n_dis = dis_sum + _log1pexp(ip), n_dis + 1
    return sim_sum / max(n_sim, 1) + dis_sum / max(n_dis, 1)


def ref_dsdh(obj, u, logits, labels, index):
    cols, ycols, pairs = _pair_set(obj, u, labels, index)
    total = _dpsh_likelihood_sum(u, labels, cols, ycols, pairs)
    b = obj.codes_b
    coupling = sum((b[index[i], k] - u[i, k]) ** 2 for i in range(len(u)) for k in range(BITS))
    return (total + obj.hparams["eta"] * coupling) / len(pairs)


def ref_dfh(obj, u, logits, labels, index):
    p = obj.hparams
    centers = [[_sgn(obj.centers_v[k, c]) for c in range(CLASSES)] for k in range(BITS)]  # C = sign V, before the step
    b = [
        [
            _sgn(p["mu"] * sum(centers[k][c] * float(labels[i, c]) for c in range(CLASSES)) + float(u[i, k].detach()))
            for k in range(BITS)
        ]
        for i in range(len(u))
    ]
    cols, ycols, pairs = _pair_set(obj, u, labels, index)
    total = 0
    for i, j in pairs:
        theta = 0.5 * _dot(u[i], cols[j])
        if _share(labels[i], ycols[j]):
            total = total + _log1pexp(p["margin"] - theta)
        else:
            total = total + _log1pexp(p["margin"] + theta)
    quant = sum((b[i][k] - u[i, k]) ** 2 for i in range(len(u)) for k in range(BITS))
    return total / len(pairs) + p["eta"] * quant / (len(u) * BITS)


def ref_idhn(obj, u, logits, labels, index):
    p = obj.hparams
    h = u / (1 + u.abs())
    cols, ycols, pairs = _pair_set(obj, h, labels, index)
    ce, mse = 0, 0
    for i, j in pairs:
        ip = _dot(h[i], cols[j])
        s = float(_dot(labels[i], ycols[j]) / (labels[i].norm() * ycols[j].norm()))
        if s > 0.99 or s < 0.01:
            q = p["beta"] / BITS * ip
            ce = ce + _log1pexp(q) - s * q
        else:
            mse = mse + BITS * ((ip + BITS) / (2 * BITS) - s) ** 2
    quant = sum(abs(abs(h[i, k]) - 1) for i in range(len(u)) for k in range(BITS)) / (len(u) * BITS)
    return ce / len(pairs) + p["gamma"] * mse / len(pairs) + p["lam"] * quant


def ref_dbdh(obj, u, logits, labels, index):
    p = obj.hparams
    b = u + (torch.where(u >= 0, 1.0, -1.0).double() - u).detach()  # sign forward, identity backward
    cols, ycols, pairs = _pair_set(obj, b, labels, index)
    total = _dpsh_likelihood_sum(b, labels, cols, ycols, pairs)
    balance = sum(abs(sum(b[i, k] for k in range(BITS)) / BITS) ** p["p"] for i in range(len(u)))
    return total / len(pairs) + p["alpha"] * balance / len(u)


def ref_lcdsh(obj, u, logits, labels, index):
    cols, ycols, pairs = _pair_set(obj, u, labels, index)
    nll, loc = 0, 0
    for i, j in pairs:
        s = 1.0 if _share(labels[i], ycols[j]) else -1.0
        theta = 0.5 * _dot(u[i], cols[j])
        phi = 0.5 * sum(_sgn(u[i, k]) * _sgn(cols[j][k]) for k in range(BITS))
        nll = nll + _log1pexp(-s * theta)
        loc = loc + (torch.sigmoid(theta) - 1 / (1 + math.exp(-phi))) ** 2
    return nll / len(pairs) + obj.hparams["lam"] * loc / len(pairs)


def ref_dpfah(obj, u, logits, labels, index):
    """DPFAHLoss itself (the registry entry must not change its numerics); its formula is
    checked against loops in test_model.py."""
    loss = DPFAHLoss(obj.eta, obj.zeta, obj.delta)
    if obj.pairs != "batch":
        return loss(u, logits, labels, *_memory_after(obj, u, labels, index)).total
    return loss(u, logits, labels).total


REFERENCES = {name[4:]: fn for name, fn in globals().items() if name.startswith("ref_")}


# ------------------------------------------------------------------ value and gradient


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("name,params", CONFIGS + ODD, ids=_ids(CONFIGS + ODD))
def test_objective_matches_the_per_pair_formula(name, params, multi):
    u, logits, labels, index = _batch(seed=2, multi=multi)
    before = _make(name, params)
    reference = REFERENCES[name]
    u_ref = u.clone().requires_grad_(True)
    expected = reference(copy.deepcopy(before), u_ref, logits, labels, index)
    expected.backward()

    obj = copy.deepcopy(before)
    u_got = u.clone().requires_grad_(True)
    step = obj.step(u_got, logits, labels, index, Shard(1, 0, 8))
    step.surrogate.backward()
    values = {t: total / weight for t, (total, weight) in step.stats.items()}
    assert set(values) == set(obj.terms)
    assert obj.total(**values) == pytest.approx(expected.item(), rel=1e-9)
    if isinstance(obj, methods.Method):  # (DPFAHLoss's surrogate carries only the gradient)
        assert step.surrogate.item() == pytest.approx(expected.item(), rel=1e-9)
    torch.testing.assert_close(u_got.grad, u_ref.grad, rtol=1e-8, atol=1e-11)
    assert u_got.grad.abs().sum() > 0


def test_idhn_soft_pairs_are_exercised():
    """Multi-label batches have soft pairs (0.01 <= s <= 0.99), so the squared error counts."""
    u, logits, labels, index = _batch(seed=2, multi=True)
    step = _make("idhn", {}).step(u, logits, labels, index, Shard(1, 0, 8))
    assert step.stats["soft"][0] > 0


# ------------------------------------------------------------------ stateful steps


def _dcc_plain(b, u, y, mu, nu, eta, iterations):
    """The paper's W-step and bit-by-bit B-step in numpy, written out."""
    b, k = b.copy(), b.shape[0]
    w = None
    for _ in range(iterations):
        w = np.linalg.inv(b @ b.T + nu / mu * np.eye(k)) @ b @ y.T
        p = w @ y + eta / mu * u
        for bit in range(k):
            b_rest, w_rest = np.delete(b, bit, axis=0), np.delete(w, bit, axis=0)
            z = p[bit] - b_rest.T @ w_rest @ w[bit]
            b[bit] = np.where(z >= 0, 1.0, -1.0)
    return b, w


def _dsdh_energy(b, w, u, y, mu, nu, eta):
    return mu * ((y - w.T @ b) ** 2).sum() + nu * (w**2).sum() + eta * ((b - u) ** 2).sum()


def test_dsdh_dcc_matches_the_paper_update():
    rng = np.random.default_rng(0)
    k, c, n = 6, 3, 20
    b0 = np.where(rng.random((k, n)) < 0.5, 1.0, -1.0)
    u = rng.normal(size=(k, n))
    y = np.eye(c)[rng.integers(0, c, n)].T
    # mu, nu, eta chosen so that the label fit and the coupling compete (every ratio matters)
    mu, nu, eta = 2.0, 0.3, 0.6
    got_b, got_w = dcc(torch.from_numpy(b0.copy()), torch.from_numpy(u), torch.from_numpy(y), mu, nu, eta, 3)
    want_b, want_w = _dcc_plain(b0, u, y, mu, nu, eta, 3)
    assert (want_b != np.where(u >= 0, 1.0, -1.0)).any()  # not just sign(U)
    np.testing.assert_array_equal(got_b.numpy(), want_b)
    np.testing.assert_allclose(got_w.numpy(), want_w, rtol=1e-10)
    # the B-step never raises the energy over B (each bit is an exact minimiser)
    _, w = dcc(torch.from_numpy(b0.copy()), torch.from_numpy(u), torch.from_numpy(y), mu, nu, eta, 1)
    b1 = np.where(w.numpy() @ y >= 0, 1.0, -1.0)
    stepped = _dcc_plain(b1, u, y, mu, nu, eta, 1)[0]
    w1 = np.linalg.inv(b1 @ b1.T + nu / mu * np.eye(k)) @ b1 @ y.T
    assert _dsdh_energy(stepped, w1, u, y, mu, nu, eta) <= _dsdh_energy(b1, w1, u, y, mu, nu, eta) + 1e-9


def test_dsdh_epoch_start_solves_b_and_w_over_the_seen_items():
    obj = _make("dsdh", {})
    untouched = obj.codes_b[~obj.memory.seen].clone()
    obj.start_epoch(0)  # nothing before the first epoch
    assert obj.classifier_w.abs().sum() == 0
    seen = obj.memory.seen
    p = obj.hparams
    want_b, want_w = _dcc_plain(
        obj.codes_b[seen].numpy().T,
        obj.memory.codes[seen].numpy().T,
        obj.memory.labels[seen].numpy().T,
        p["mu"],
        p["nu"],
        p["eta"],
        p["dcc_iter"],
    )
    obj.start_epoch(1)
    np.testing.assert_array_equal(obj.codes_b[seen].numpy().T, want_b)
    np.testing.assert_allclose(obj.classifier_w.numpy(), want_w, rtol=1e-9)
    torch.testing.assert_close(obj.codes_b[~seen], untouched, rtol=0, atol=0)


def _center_step_plain(v, y, b, vul, nta, steps, lr, milestones):
    """Gradient descent on J(V) with the gradient derived by hand:
    dJ/dV = 2/(nK) (V Y^T - B^T) Y + 4 vul/C^2 V (V^T V - G) + 2 nta/(KC) (V - sign V)."""
    v = v.copy()
    k, c = v.shape
    n = y.shape[0]
    g = k * (2 * np.eye(c) - 1)
    rate = lr
    for t in range(steps):
        if t in milestones:
            rate *= 0.1
        grad = np.zeros_like(v)
        for a in range(k):
            for cls in range(c):
                fit = sum(2 * (sum(v[a, q] * y[i, q] for q in range(c)) - b[i, a]) * y[i, cls] for i in range(n)) / (
                    n * k
                )
                e = v.T @ v - g
                push = 4 * vul * sum(v[a, q] * e[q, cls] for q in range(c)) / c**2
                binary = 2 * nta * (v[a, cls] - (1.0 if v[a, cls] >= 0 else -1.0)) / (k * c)
                grad[a, cls] = fit + push + binary
        v = v - rate * grad
    return v


def test_dfh_center_step_matches_hand_derived_descent():
    rng = np.random.default_rng(1)
    k, c, n = 4, 3, 5
    v0 = rng.normal(scale=0.3, size=(k, c))
    y = (rng.random((n, c)) < 0.5).astype(float)
    b = np.where(rng.random((n, k)) < 0.5, 1.0, -1.0)
    got = center_step(
        torch.from_numpy(v0),
        torch.from_numpy(y),
        torch.from_numpy(b),
        vul=0.7,
        nta=1.3,
        steps=12,
        lr=0.03,
        milestones=(5, 9),
    )
    want = _center_step_plain(v0, y, b, 0.7, 1.3, 12, 0.03, (5, 9))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_dfh_step_updates_the_centres_from_the_batch_codes():
    u, logits, labels, index = _batch(seed=4, multi=True)
    obj = _make("dfh", {"center_steps": 7})
    p = obj.hparams
    v0 = obj.centers_v.numpy().copy()
    c = np.where(v0 >= 0, 1.0, -1.0)
    b = np.where(p["mu"] * labels.numpy() @ c.T + u.numpy() >= 0, 1.0, -1.0)
    obj.step(u, logits, labels, index, Shard(1, 0, 8))
    want = _center_step_plain(v0, labels.numpy(), b, p["vul"], p["nta"], 7, p["center_lr"], p["center_milestones"])
    np.testing.assert_allclose(obj.centers_v.numpy(), want, rtol=1e-10, atol=1e-12)


def test_hashnet_continuation_schedules():
    u, logits, labels, index = _batch(seed=5)
    obj = methods.build("hashnet", {"step_size": 3, "gamma": 0.5, "power": 0.5}, bits=BITS, num_classes=CLASSES)
    for t in range(8):
        assert obj.beta == pytest.approx((1 + 0.5 * (t - t % 3)) ** 0.5)
        assert int(obj.iteration) == t
        obj.step(u, logits, labels, index, Shard(1, 0, 8))
    zoo = methods.build("hashnet", {"schedule": "epoch"}, bits=BITS, num_classes=CLASSES)
    for epoch in (0, 19, 20, 59, 60, 149):
        zoo.start_epoch(epoch)
        zoo.step(u, logits, labels, index, Shard(1, 0, 8))
        assert zoo.beta == pytest.approx(math.sqrt(epoch // 20 + 1))


# ------------------------------------------------------------------ data parallelism


class _Group:
    """all_gather between threads standing in for ranks."""

    def __init__(self, world_size):
        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size

    def gather(self, rank, t):
        self.barrier.wait()  # everyone has read the previous gather
        self.slots[rank] = t.detach().clone()
        self.barrier.wait()
        return torch.cat(self.slots)


class _ThreadShard(Shard):
    def __init__(self, world_size, rank, local_batch, group):
        super().__init__(world_size, rank, local_batch)
        object.__setattr__(self, "group", group)

    def gather(self, t):
        return t if self.world_size == 1 else self.group.gather(self.rank, t)


def _run_ranks(objective, world_size, batches):
    """Each rank (a thread) runs ``start_epoch(e)`` and one step per batch on its rows; returns
    per batch the DDP-averaged gradients of u and logits and the summed term values, and every
    rank's final state."""
    n = batches[0][0].shape[0]
    local = n // world_size
    group = _Group(world_size)
    objectives = [copy.deepcopy(objective) for _ in range(world_size)]
    grads = [[torch.zeros_like(b[0]), torch.zeros_like(b[1]), {}] for b in batches]
    errors = []

    def rank_main(r):
        try:
            for e, (u, logits, labels, index) in enumerate(batches):
                objectives[r].start_epoch(e)
                rows = slice(r * local, (r + 1) * local)
                u_r, o_r = u[rows].clone().requires_grad_(True), logits[rows].clone().requires_grad_(True)
                step = objectives[r].step(
                    u_r, o_r, labels[rows], index[rows], _ThreadShard(world_size, r, local, group)
                )
                step.surrogate.backward()
                grads[e][0][rows] = u_r.grad / world_size
                grads[e][1][rows] = o_r.grad / world_size
                for term, (value, weight) in step.stats.items():
                    grads[e][2].setdefault(term, [0.0, 0.0])
                    grads[e][2][term][0] += value
                    grads[e][2][term][1] += weight
                group.barrier.wait()  # stats written before the next step's gather reuses slots
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return grads, [o.state_dict() for o in objectives]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_ranks_compute_what_one_process_computes(name, params, world_size):
    """Two steps (epochs 0 and 1, so DSDH's B/W step runs on the state the first left): the
    averaged gradients, every term and the state of every rank equal one process's."""
    batches = [_batch(seed=6, multi=True), _batch(seed=7, multi=True)]
    objective = _make(name, params)
    assert isinstance(objective, Objective)
    want, (want_state,) = _run_ranks(objective, 1, batches)
    got, states = _run_ranks(objective, world_size, batches)
    for (gu, go, gs), (wu, wo, ws) in zip(got, want):
        torch.testing.assert_close(gu, wu, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(go, wo, rtol=1e-10, atol=1e-13)
        assert {t: v / w for t, (v, w) in gs.items()} == pytest.approx(
            {t: v / w for t, (v, w) in ws.items()}, rel=1e-10
        )
    for state in states:
        assert state.keys() == want_state.keys()
        for key in state:
            torch.testing.assert_close(state[key], want_state[key], rtol=1e-10, atol=1e-13, msg=key)


# ------------------------------------------------------------------ registry


@pytest.mark.parametrize("name", ["dpsh", "dpfah"])
def test_memory_and_bank_are_one_memory_read_two_ways(name):
    """One mechanism (dpfah.objective.Memory), two documented behaviours: ``memory`` (the code
    zoo's U, the comparison methods' default) pairs the batch with every row, and a row not
    written yet is a zero code with no label: a dissimilar pair with theta = 0, log 2 each;
    ``bank`` (DPFAH's choice) pairs it with the rows written so far only. Same state, same
    writes: the pair sums differ by exactly the unseen rows' log 2s."""
    u, logits, labels, index = _batch(seed=3)
    steps = {}
    for pairs in ("memory", "bank"):
        obj = _make(name, {"pairs": pairs})
        assert isinstance(obj.memory, Memory) and obj.state_dict().keys() >= {
            "memory.codes",
            "memory.labels",
            "memory.seen",
        }
        steps[pairs] = obj.step(u.clone(), logits, labels, index, Shard(1, 0, 8))
        unseen = int((~obj.memory.seen).sum())
    term = "likelihood" if name == "dpsh" else "l1"
    (mem_sum, mem_pairs), (bank_sum, bank_pairs) = steps["memory"].stats[term], steps["bank"].stats[term]
    assert unseen > 0 and (mem_pairs, bank_pairs) == (8 * TRAIN, 8 * (TRAIN - unseen))
    assert mem_sum == pytest.approx(bank_sum + 8 * unseen * math.log(2), rel=1e-12)


def test_registry_declares_every_method():
    assert set(methods.names()) == {"dpfah", "dpsh", "dsh", "dhn", "hashnet", "dsdh", "dfh", "idhn", "dbdh", "lcdsh"}
    for name in methods.names():
        cls = methods.get(name)
        assert cls.name == name and set(cls.tunable) <= set(cls.defaults) and "pairs" in cls.defaults
        assert set(cls.choices) <= set(cls.defaults)
        obj = methods.build(name, bits=8, num_classes=3, train_size=10)
        assert obj.hparams == cls.defaults and isinstance(obj, Objective) and obj.terms
    with pytest.raises(ValueError, match=r"unknown method 'dpshh'; known methods: dpfah, dpsh, dsh"):
        methods.get("dpshh")
    with pytest.raises(ValueError, match=r"dsh: unknown hyper-parameter\(s\) \['eta'\]"):
        methods.build("dsh", {"eta": 1}, bits=8, num_classes=3)
    with pytest.raises(ValueError, match="needs train_size"):
        methods.build("dpsh", bits=8, num_classes=3)
    with pytest.raises(ValueError, match="schedule='linear'"):
        methods.build("hashnet", {"schedule": "linear"}, bits=8, num_classes=3)
    assert methods.get("dpsh").needs_train_size({"pairs": "memory"}) and not methods.get("dsh").needs_train_size(
        methods.get("dsh").defaults
    )


def test_dpfah_entry_keeps_dpfah_loss_numerics():
    u, logits, labels, index = _batch(seed=8, multi=True)
    entry = methods.build("dpfah", {"eta": 2.0, "zeta": 0.3}, bits=BITS, num_classes=CLASSES).double()
    plain = DPFAHLoss(2.0, 0.3).double()
    assert entry.state_dict().keys() == plain.state_dict().keys()
    a = entry.step(u, logits, labels, index, Shard(1, 0, 8))
    b = plain.step(u, logits, labels, index, Shard(1, 0, 8))
    assert a.stats == b.stats and a.surrogate.item() == b.surrogate.item()
    # Its knobs are declared once, DPFAHLoss's, with the paper's values as defaults.
    assert (
        methods.get("dpfah").defaults
        is DPFAHLoss.defaults
        == {"eta": 10.0, "zeta": 0.1, "delta": 1.1, "pairs": "batch"}
    )
    assert (DPFAHLoss().eta, DPFAHLoss().zeta, DPFAHLoss().delta, DPFAHLoss().pairs) == (10.0, 0.1, 1.1, "batch")
    with pytest.raises(ValueError, match=r"^dpfah: delta must be >= 0, got -1$"):
        methods.build("dpfah", {"delta": -1}, bits=BITS, num_classes=CLASSES)


# ------------------------------------------------------------------ through fit


def _data(n=24, classes=3, size=16):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.eye(classes)[torch.arange(n) % classes]
    return images, labels


def _stream(images, labels, epoch):
    order = np.random.default_rng(epoch).permutation(len(images))
    for start in range(0, len(order), 8):
        idx = order[start : start + 8]
        yield Batch(images[idx], labels[idx], torch.from_numpy(idx))


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_fit_trains_every_method_and_resumes_exactly(name, params):
    images, labels = _data()
    settings = TrainSettings(
        epochs=3, batch_size=8, image_size=16, optimizer="adamw", lr=1e-2, schedule="constant", precision="fp32"
    )

    def run(state=None):
        torch.manual_seed(0)
        model = _Tiny(8, 3)
        objective = methods.build(name, params, bits=8, num_classes=3, train_size=len(images))
        reports = []
        fit(
            settings,
            model,
            objective,
            train_batches=lambda e: _stream(images, labels, e),
            steps_per_epoch=3,
            report=lambda m, s: reports.append((m, s)),
            state=state,
        )
        return reports

    full = run()
    assert [m["epoch"] for m, _ in full] == [0, 1, 2]
    for metrics, _ in full:
        assert np.isfinite(metrics["loss"]) and all(np.isfinite(metrics[f"loss_{t}"]) for t in methods.get(name).terms)
    resumed = run(state=full[1][1])
    assert [m["epoch"] for m, _ in resumed] == [2]
    assert resumed[0][0]["loss"] == full[2][0]["loss"]
    for part in ("objective", "model"):
        want, got = full[2][1][part], resumed[0][1][part]
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=f"{part}.{key}")


def _ddp_worker(rank, world_size, port, out):
    """One rank of a real gloo group: every method through fit, on its half of each batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        images, labels = _data()
        settings = TrainSettings(
            epochs=2, batch_size=8, image_size=16, optimizer="adamw", lr=1e-2, schedule="constant", precision="fp32"
        )
        local = 8 // world_size
        results = {}
        for name, params in CONFIGS:
            torch.manual_seed(0)
            model = _Tiny(8, 3)
            objective = methods.build(name, params, bits=8, num_classes=3, train_size=len(images))

            def batches(epoch):
                for b in _stream(images, labels, epoch):
                    rows = slice(rank * local, (rank + 1) * local)
                    yield Batch(b.images[rows], b.labels[rows], b.index[rows])

            reports = []
            fit(
                settings,
                model,
                objective,
                train_batches=batches,
                steps_per_epoch=3,
                report=lambda m, s: reports.append(m),  # noqa: B023
            )
            results[name + repr(params)] = (
                reports[-1]["loss"],
                {k: v.clone() for k, v in objective.state_dict().items()},
                {k: v.clone() for k, v in model.state_dict().items()},
            )
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _diverging_worker(rank, world_size, port, out):
    """One rank of a real gloo group running fit where rank 1 has twice the learning rate."""
    import torch.distributed as dist

    from dpfah.train import RanksDiverged

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        images, labels = _data()
        lr = 1e-3 * (2 if rank == 1 else 1)
        settings = TrainSettings(
            epochs=2, batch_size=8, image_size=16, optimizer="sgd", lr=lr, schedule="constant", precision="fp32"
        )
        local = 8 // world_size
        torch.manual_seed(0)
        model = _Tiny(8, 3)
        objective = methods.build("dpfah", {}, bits=8, num_classes=3, train_size=len(images))

        def batches(epoch):
            for b in _stream(images, labels, epoch):
                rows = slice(rank * local, (rank + 1) * local)
                yield Batch(b.images[rows], b.labels[rows], b.index[rows])

        reports = []
        try:
            fit(
                settings,
                model,
                objective,
                train_batches=batches,
                steps_per_epoch=3,
                report=lambda m, s: reports.append(m),
            )
            outcome = "finished"
        except RanksDiverged as e:
            outcome = str(e)
        torch.save({"outcome": outcome, "epochs": len(reports)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_a_rank_that_steps_differently_stops_the_fit(tmp_path):
    """Rank 1 with twice the learning rate: its weights drift from rank 0's by a few 1e-4,
    too little to show in rank 0's weights or loss (the gradients are averaged), but fit
    compares the ranks' weights after every epoch and stops both before any report."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "diverging")
    mp.spawn(_diverging_worker, args=(2, port, out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert got["epochs"] == 0, got
        assert got["outcome"].startswith("after epoch 0, rank 1's weights differ from rank 0's"), got


def test_fit_under_real_ddp_equals_one_process(tmp_path):
    """Two gloo processes with DDP (so the comparison methods' unused classification head, the
    all-gathers and the broadcasts run for real) end where one process ends: same loss, same
    objective state on both ranks, the same weights up to float32 summation order."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    images, labels = _data()
    settings = TrainSettings(
        epochs=2, batch_size=8, image_size=16, optimizer="adamw", lr=1e-2, schedule="constant", precision="fp32"
    )
    for name, params in CONFIGS:
        torch.manual_seed(0)
        model = _Tiny(8, 3)
        objective = methods.build(name, params, bits=8, num_classes=3, train_size=len(images))
        reports = []
        fit(
            settings,
            model,
            objective,
            train_batches=lambda e: _stream(images, labels, e),
            steps_per_epoch=3,
            report=lambda m, s: reports.append(m),  # noqa: B023
        )
        key = name + repr(params)
        for loss, state, weights in (r[key] for r in ranks):
            assert loss == pytest.approx(reports[-1]["loss"], rel=1e-4), key
            for k, v in objective.state_dict().items():
                torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=f"{key} {k}")
            for k, v in model.state_dict().items():
                torch.testing.assert_close(weights[k], v, rtol=1e-3, atol=1e-4, msg=f"{key} {k}")
        for k in ranks[0][key][1]:  # the ranks agree exactly on the objective's state
            torch.testing.assert_close(ranks[0][key][1][k], ranks[1][key][1][k], rtol=0, atol=0)


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
