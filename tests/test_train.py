"""The training loop without Ray: the sharded objective, and short real runs."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dpfah.loss import DPFAHLoss
from dpfah.train import Batch, TrainSettings, encode, fit, validation_map


def _batch(n=8, bits=10, classes=4, seed=0, multi=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, bits, generator=g, dtype=torch.float64)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64)
    if multi:
        labels = (torch.rand(n, classes, generator=g) < 0.4).double()
    else:
        labels = torch.nn.functional.one_hot(torch.randint(0, classes, (n,), generator=g), classes).double()
    return u, logits, labels


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("multi", [False, True])
def test_sharded_objective_gives_single_process_gradient(world_size, multi):
    """Ranks see their rows, the gathered batch as constant columns; DDP averages."""
    u, logits, labels = _batch(multi=multi)
    loss = DPFAHLoss(eta=2.0, zeta=0.5)
    u_ref, o_ref = u.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ref = loss(u_ref, o_ref, labels)
    ref.total.backward()

    n, local = u.shape[0], u.shape[0] // world_size
    grad_u, grad_o, pair_sum = torch.zeros_like(u), torch.zeros_like(logits), 0.0
    for r in range(world_size):
        rows = slice(r * local, (r + 1) * local)
        u_r, o_r = u[rows].clone().requires_grad_(True), logits[rows].clone().requires_grad_(True)
        surrogate, ps, _, _ = loss.sharded(
            u_r, o_r, labels[rows], u, labels, world_size=world_size, offset=r * local, num_pairs=n * (n - 1)
        )
        surrogate.backward()
        grad_u[rows] = u_r.grad / world_size  # what DDP's gradient averaging does
        grad_o[rows] = o_r.grad / world_size
        pair_sum += ps.item()
    torch.testing.assert_close(grad_u, u_ref.grad)
    torch.testing.assert_close(grad_o, o_ref.grad)
    assert pair_sum / (n * (n - 1)) == pytest.approx(ref.l1.item(), rel=1e-12)


@pytest.mark.parametrize("world_size", [1, 2])
def test_sharded_objective_with_bank(world_size):
    u, logits, labels = _batch(seed=3)
    bank_u, _, bank_labels = _batch(n=13, seed=4)
    loss = DPFAHLoss()
    u_ref = u.clone().requires_grad_(True)
    loss(u_ref, logits, labels, bank_u=bank_u, bank_labels=bank_labels).total.backward()
    local = u.shape[0] // world_size
    grad_u = torch.zeros_like(u)
    for r in range(world_size):
        rows = slice(r * local, (r + 1) * local)
        u_r = u[rows].clone().requires_grad_(True)
        surrogate, *_ = loss.sharded(
            u_r, logits[rows], labels[rows], bank_u, bank_labels, world_size=world_size, offset=None, num_pairs=u.shape[0] * 13
        )
        surrogate.backward()
        grad_u[rows] = u_r.grad / world_size
    torch.testing.assert_close(grad_u, u_ref.grad)


def _toy_images(n, classes, size=32, seed=0):
    """Class-coloured noise images: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    base = rng.integers(0, 256, size=(classes, 3, 1, 1))
    x = np.clip(base[y] + rng.normal(0, 30, size=(n, 3, size, size)), 0, 255).astype(np.uint8)
    labels = np.eye(classes, dtype=np.float32)[y]
    return torch.from_numpy(x), torch.from_numpy(labels)


def _batches(images, labels, batch, shuffle_seed=None):
    order = np.arange(len(images)) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(len(images))
    for start in range(0, len(order) - batch + 1, batch):
        idx = order[start : start + batch]
        yield Batch(images[idx], labels[idx], torch.from_numpy(idx))


@pytest.mark.parametrize("pairs", ["batch", "bank"])
def test_fit_runs_reports_and_resumes(pairs):
    images, labels = _toy_images(48, 3)
    settings = TrainSettings(bits=16, num_classes=3, epochs=3, batch_size=8, image_size=32, optimizer="adamw", lr=1e-3, pairs=pairs)
    reports = []

    def report(metrics, state):
        reports.append((metrics, state))

    def validate(model):
        return validation_map(model, _batches(images[:16], labels[:16], 8), _batches(images[16:], labels[16:], 8), torch.device("cpu"), 32)

    result = fit(
        settings,
        train_batches=lambda epoch: _batches(images, labels, 8, shuffle_seed=epoch),
        steps_per_epoch=4,
        report=report,
        validate=validate,
        bank_size=48,
    )
    assert result.epochs_run == 3 and len(reports) == 3
    assert [m["epoch"] for m, _ in reports] == [0, 1, 2]
    for metrics, state in reports:
        assert np.isfinite([metrics[k] for k in ("loss", "loss_l1", "loss_l2", "loss_l3", "images_per_s")]).all()
        assert metrics["loss"] == pytest.approx(metrics["loss_l1"] + 10 * metrics["loss_l2"] + 0.1 * metrics["loss_l3"])
        assert 0 <= metrics["val_map"] <= 1
        assert state is not None and state["epoch"] == metrics["epoch"]
    assert result.best_val_map == max(m["val_map"] for m, _ in reports)

    # Resume from the state after epoch 1: only epoch 2 runs, from the saved weights.
    resumed = []
    fit(
        settings,
        train_batches=lambda epoch: _batches(images, labels, 8, shuffle_seed=epoch),
        steps_per_epoch=4,
        report=lambda m, s: resumed.append(m),
        validate=validate,
        state=reports[1][1],
        bank_size=48,
    )
    assert [m["epoch"] for m in resumed] == [2]
    assert resumed[0]["loss"] == pytest.approx(reports[2][0]["loss"], rel=1e-4)


def test_encode_accepts_encoded_bytes_and_sorts_by_index():
    images, labels = _toy_images(6, 2)
    encoded = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    torch.manual_seed(0)
    from dpfah.model import DPFAH

    model = DPFAH(16, 2)
    order = [4, 1, 5, 0, 3, 2]
    batches = [Batch([encoded[i] for i in order[:3]], labels[order[:3]], torch.tensor(order[:3])),
               Batch([encoded[i] for i in order[3:]], labels[order[3:]], torch.tensor(order[3:]))]
    codes, lab, index = encode(model, batches, torch.device("cpu"), 32)
    assert index.tolist() == list(range(6))
    np.testing.assert_array_equal(lab, labels.numpy().astype(np.uint8))
    # PNG is lossless, so the bytes path must give exactly the tensor path's codes.
    direct, _, _ = encode(model, [Batch(images, labels, torch.arange(6))], torch.device("cpu"), 32)
    np.testing.assert_array_equal(codes, direct)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="optimizer"):
        TrainSettings(optimizer="adam2")
    with pytest.raises(ValueError, match="batch_size"):
        TrainSettings(batch_size=1)


def test_augmentation_randomness_depends_on_the_sample_not_the_batch():
    from dpfah.augment import sample_uniforms

    whole = sample_uniforms(np.arange(10), seed=3, epoch=2)
    parts = torch.cat([sample_uniforms(np.arange(0, 4), 3, 2), sample_uniforms(np.arange(4, 10), 3, 2)])
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)
    assert whole.shape == (10, 4) and (whole >= 0).all() and (whole < 1).all()
    assert not torch.equal(whole, sample_uniforms(np.arange(10), seed=3, epoch=3))
    assert not torch.equal(whole, sample_uniforms(np.arange(10), seed=4, epoch=2))
    many = sample_uniforms(np.arange(20000), seed=0, epoch=0)
    assert abs(many.mean().item() - 0.5) < 0.01  # roughly uniform
