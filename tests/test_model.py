"""PFA, the DPFAH network and its loss, checked against plain re-computations."""

import math

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from dpfah.attention import ParameterFreeAttention
from dpfah.loss import DPFAHLoss
from dpfah.model import DPFAH


def pfa_reference(x: np.ndarray, lam: float) -> np.ndarray:
    """The closed form written out per sample and channel, in float64 numpy."""
    out = np.empty_like(x, dtype=np.float64)
    n, c, h, w = x.shape
    m = h * w
    for i in range(n):
        for k in range(c):
            t = x[i, k].astype(np.float64)
            mu = t.sum() / m
            d = (t - mu) ** 2
            sigma2 = d.sum() / (m - 1) if m > 1 else 0.0
            inv_e = d / (4.0 * (sigma2 + lam)) + 0.5
            out[i, k] = t * (1.0 / (1.0 + np.exp(-inv_e)))
    return out


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 8, 8), (3, 2, 1, 6), (2, 2, 1, 1)])
@pytest.mark.parametrize("lam", [1e-4, 0.1])
def test_pfa_matches_per_channel_loop(shape, lam):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    got = ParameterFreeAttention(lam)(x).numpy()
    np.testing.assert_allclose(got, pfa_reference(x.numpy(), lam), rtol=1e-12, atol=1e-12)


def test_pfa_properties():
    module = ParameterFreeAttention()
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    x = torch.randn(4, 8, 6, 6) + 0.5
    y_train = module.train()(x)
    y_eval = module.eval()(x)
    assert y_train.shape == x.shape
    torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)
    weight = (y_train / x)[x.abs() > 1e-3]
    assert weight.min() >= 1 / (1 + math.exp(-0.5)) - 1e-6
    assert weight.max() < 1.0


def test_pfa_single_position_is_finite():
    x = torch.randn(3, 5, 1, 1)
    y = ParameterFreeAttention()(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x * torch.sigmoid(torch.tensor(0.5)))


def test_pfa_gradcheck():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ParameterFreeAttention(1e-2), (x,))


def test_pfa_rejects_bad_input():
    with pytest.raises(ValueError, match="N, C, H, W"):
        ParameterFreeAttention()(torch.randn(3, 4))
    with pytest.raises(ValueError, match="lam"):
        ParameterFreeAttention(0.0)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def test_dpfah_parameter_count_is_trunk_plus_heads():
    trunk = resnet18(weights=None)
    trunk_params = _count(p for name, p in trunk.named_parameters() if not name.startswith("fc."))
    heads = (512 * 64 + 64) + (512 * 10 + 10)
    assert _count(DPFAH(64, 10).parameters()) == trunk_params + heads
    assert _count(DPFAH(64, 10, pfa=False).parameters()) == trunk_params + heads
    assert _count(DPFAH(64, 10).buffers()) == _count(trunk.buffers())


@pytest.mark.parametrize("size", [224, 32])
@pytest.mark.parametrize("use_pfa", [True, False])
def test_dpfah_forward_backward(size, use_pfa):
    torch.manual_seed(0)
    model = DPFAH(48, 7, pfa=use_pfa)
    x = torch.randn(2, 3, size, size)
    u, logits = model(x)
    assert u.shape == (2, 48) and logits.shape == (2, 7)
    (u.sum() + logits.sum()).backward()
    assert model.stem[0].weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0
    assert model.hash_head.weight.grad.abs().sum() > 0
    codes = model.eval().codes(x)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}


def test_pfa_changes_the_output():
    torch.manual_seed(0)
    with_pfa = DPFAH(16, 3, pfa=True).eval()
    without = DPFAH(16, 3, pfa=False).eval()
    without.load_state_dict(with_pfa.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(with_pfa(x)[0], without(x)[0])


def test_backbone_weights_from_local_file(tmp_path):
    torch.manual_seed(3)
    source = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = DPFAH(32, 10, backbone_weights=path)
    torch.testing.assert_close(model.stem[0].weight, source.conv1.weight)
    torch.testing.assert_close(model.layers[3][1].conv2.weight, source.layer4[1].conv2.weight)
    torch.testing.assert_close(model.stem[1].running_var, source.bn1.running_var)

    with pytest.raises(FileNotFoundError, match="not found"):
        DPFAH(32, 10, backbone_weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises((ValueError, RuntimeError)):
        DPFAH(32, 10, backbone_weights=bad)


# ----------------------------------------------------------------------------- loss


def _random_batch(n=6, bits=12, classes=5, multi=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, bits, generator=g, dtype=torch.float64) * 1.5
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64)
    if multi:
        labels = (torch.rand(n, classes, generator=g) < 0.35).double()
        labels[labels.sum(1) == 0, 0] = 1
    else:
        labels = torch.nn.functional.one_hot(torch.randint(0, classes, (n,), generator=g), classes).double()
    return u, logits, labels


def _l1_reference(u, labels, other_u, other_labels, skip_diagonal):
    total, count = 0.0, 0
    for i in range(u.shape[0]):
        for j in range(other_u.shape[0]):
            if skip_diagonal and i == j:
                continue
            theta = 0.5 * sum(float(u[i, k]) * float(other_u[j, k]) for k in range(u.shape[1]))
            s = 1.0 if any(labels[i, c] > 0 and other_labels[j, c] > 0 for c in range(labels.shape[1])) else 0.0
            total += math.log1p(math.exp(theta)) - s * theta
            count += 1
    return total / count


def _l2_reference(u, delta):
    return sum(max(0.0, -delta - float(v)) + max(0.0, float(v) - delta) for row in u for v in row) / u.shape[0]


def _l3_reference(logits, labels):
    total = 0.0
    for o_row, y_row in zip(logits.tolist(), labels.tolist()):
        for o, y in zip(o_row, y_row):
            p = 1.0 / (1.0 + math.exp(-o))
            total -= y * math.log(p) + (1 - y) * math.log(1 - p)
    return total / logits.shape[0]


@pytest.mark.parametrize("multi", [False, True])
def test_loss_parts_match_explicit_sums(multi):
    u, logits, labels = _random_batch(multi=multi)
    loss = DPFAHLoss(eta=10, zeta=0.1, delta=1.1)
    parts = loss(u, logits, labels)
    l1 = _l1_reference(u, labels, u, labels, skip_diagonal=True)
    l2 = _l2_reference(u, 1.1)
    l3 = _l3_reference(logits, labels)
    assert parts.l1.item() == pytest.approx(l1, rel=1e-10)
    assert parts.l2.item() == pytest.approx(l2, rel=1e-10)
    assert l2 > 0  # the random u leaves the band, so the term is exercised
    assert parts.l3.item() == pytest.approx(l3, rel=1e-10)
    assert parts.total.item() == pytest.approx(l1 + 10 * l2 + 0.1 * l3, rel=1e-10)


def test_loss_with_memory_bank_matches_explicit_sum():
    u, logits, labels = _random_batch(n=4, multi=True, seed=1)
    bank_u, _, bank_labels = _random_batch(n=9, multi=True, seed=2)
    parts = DPFAHLoss()(u, logits, labels, bank_u=bank_u, bank_labels=bank_labels)
    assert parts.l1.item() == pytest.approx(
        _l1_reference(u, labels, bank_u, bank_labels, skip_diagonal=False), rel=1e-10
    )


def test_multilabel_similarity_means_any_shared_label():
    # Equal codes give every pair the same theta, so L1 counts exactly the similar pairs.
    u = torch.zeros(3, 4, dtype=torch.float64)
    u[:, 0] = 2.0
    labels = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    l1 = DPFAHLoss().pairwise(u, labels).item()
    theta = 2.0  # 0.5 * 2 * 2
    similar_pairs = 2  # (0,1) and (1,0) share label 1; everything else shares none
    expected = (6 * math.log1p(math.exp(theta)) - similar_pairs * theta) / 6
    assert l1 == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("part", ["l1", "l2", "l3", "total"])
def test_loss_gradcheck(part):
    u, logits, labels = _random_batch(n=5, bits=6, classes=4, multi=True, seed=4)
    u.requires_grad_(True)
    logits.requires_grad_(True)
    loss = DPFAHLoss(eta=3.0, zeta=0.7)

    def f(u_, o_):
        return getattr(loss(u_, o_, labels), part)

    assert torch.autograd.gradcheck(f, (u, logits))


def test_loss_gradcheck_with_bank():
    u, logits, labels = _random_batch(n=4, bits=6, classes=4, seed=5)
    bank_u, _, bank_labels = _random_batch(n=7, bits=6, classes=4, seed=6)
    u.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u_: DPFAHLoss()(u_, logits, labels, bank_u, bank_labels).l1, (u,))


def test_loss_rejects_bad_input():
    u, logits, labels = _random_batch()
    with pytest.raises(ValueError, match="classes"):
        DPFAHLoss()(u, logits[:, :3], labels)
    with pytest.raises(ValueError, match="batch sizes"):
        DPFAHLoss()(u[:4], logits, labels)
    with pytest.raises(ValueError, match="together"):
        DPFAHLoss()(u, logits, labels, bank_u=u)
    with pytest.raises(ValueError, match="eta"):
        DPFAHLoss(eta=-1)


# ----------------------------------------------------------------------------- backbones


def test_alexnet_backbone_with_and_without_pfa(tmp_path):
    from torchvision.models import alexnet

    from dpfah.settings import ModelSettings

    torch.manual_seed(4)
    source = alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(source.state_dict(), path)
    model = DPFAH.build(16, 5, ModelSettings(backbone="alexnet", backbone_weights=str(path)), seed=0)
    assert model.backbone == "alexnet" and model.uses_pfa
    torch.testing.assert_close(model.stem[0].weight, source.features[0].weight)
    torch.testing.assert_close(model.layers[-3].weight, source.features[10].weight)
    torch.testing.assert_close(model.pool[-2].weight, source.classifier[4].weight)  # fc7; the ImageNet fc8 is dropped
    assert model.hash_head.in_features == 4096
    trunk = sum(p.numel() for n, p in source.named_parameters() if not n.startswith("classifier.6."))
    assert _count(model.parameters()) == trunk + (4096 * 16 + 16) + (4096 * 5 + 5)

    x = torch.randn(2, 3, 64, 64)
    model.eval()
    u, logits = model(x)
    assert u.shape == (2, 16) and logits.shape == (2, 5)
    plain = DPFAH(16, 5, pfa=False, backbone="alexnet").eval()
    plain.load_state_dict(model.state_dict())
    assert not plain.uses_pfa and not torch.allclose(plain(x)[0], u)  # PFA changes the output
    model.train()
    (model(x)[0].sum()).backward()
    assert model.stem[0].weight.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="not a alexnet state dict"):
        DPFAH(16, 5, backbone="alexnet", backbone_weights=_resnet_file(tmp_path))
    with pytest.raises(ValueError, match="backbone='vgg'"):
        DPFAH(16, 5, backbone="vgg")


def _resnet_file(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    return path


def test_model_settings_default_is_the_resnet18_network():
    from dpfah.settings import ModelSettings

    assert ModelSettings().backbone == "resnet18"
    model = DPFAH.build(8, 3, ModelSettings(), seed=0)
    assert model.backbone == "resnet18" and isinstance(model.stem[1], torch.nn.BatchNorm2d)
    torch.manual_seed(0)
    torch.testing.assert_close(model.state_dict(), DPFAH(8, 3).state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="backbone"):
        ModelSettings(backbone="vgg")
