"""The GPU path against the CPU path: decode, augmentation, bf16 training, encoding, search.

Marked ``gpu`` and skipped without a CUDA device: CI has none. ``bench/gpu_check.sh`` runs
them on a GPU machine (``pytest -m gpu tests/test_gpu.py``); they need only torch,
torchvision, numpy and PIL (no Ray, MLflow or DVC), as on a bare GPU machine.

Tolerances, and why:
* PNG decodes identically (the CUDA path decodes PNG on the CPU, then moves it); resizing on
  the GPU may round a pixel the other way, so resized images may differ by 1 level.
* JPEG: nvJPEG and libjpeg-turbo both meet the JPEG standard's IDCT accuracy but are not
  the same integer IDCT, so pixels may differ by a few levels. With 4:4:4 chroma (no
  upsampling) we allow at most 4 levels anywhere and 0.5 on average; with 4:2:0 the chroma
  upsampling filters differ too, so only the average is bounded (1.5 levels).
* Augmentation is one float32 affine warp: GPU and CPU agree to within 1e-3 of a level.
* bf16 autocast keeps 8 bits of mantissa (about 0.4 % per operation): after a few steps the
  epoch loss stays within 5 % of fp32's.
* Codes: a bit can flip only where |u| is within bf16's rounding of 0; at least 99.9 % of
  the bits of a trained model agree with the CPU's fp32 codes (100 % expected in fp32).
* Search and mAP are exact integer work: equal, ties broken by database index everywhere.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dpfah.augment import DeviceAugment, decode_batch, sample_uniforms
from dpfah.codes import pack_codes, topk_hamming
from dpfah.data import Batch
from dpfah.loss import DPFAHLoss
from dpfah.metrics import mean_average_precision
from dpfah.model import DPFAH
from dpfah.settings import TrainSettings
from dpfah.train import encode, fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device: run on a GPU machine with bench/gpu_check.sh"
    ),
]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _smooth_image(rng, h: int, w: int) -> Image.Image:
    small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def _encoded(images, fmt: str, **options) -> list[bytes]:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **options)
        out.append(buf.getvalue())
    return out


def test_png_decodes_identically_on_the_gpu():
    rng = np.random.default_rng(0)
    raw = _encoded([_smooth_image(rng, 64, 64) for _ in range(8)], "PNG")
    same_size = (decode_batch(raw, 64, CUDA).cpu(), decode_batch(raw, 64, CPU))
    assert torch.equal(*same_size)
    other = _encoded([_smooth_image(rng, 48, 40) for _ in range(4)], "PNG")
    resized = [decode_batch(other, 32, d).cpu().int() for d in (CUDA, CPU)]
    assert (resized[0] - resized[1]).abs().max().item() <= 1


@pytest.mark.parametrize("subsampling, max_limit, mean_limit", [(0, 4, 0.5), (2, None, 1.5)])
def test_jpeg_decodes_on_the_gpu_like_the_cpu_decoder(subsampling, max_limit, mean_limit):
    rng = np.random.default_rng(1)
    raw = _encoded([_smooth_image(rng, 64, 64) for _ in range(16)], "JPEG", quality=90, subsampling=subsampling)
    gpu, cpu = decode_batch(raw, 64, CUDA).cpu().int(), decode_batch(raw, 64, CPU).int()
    diff = (gpu - cpu).abs().float()
    print(
        f"JPEG subsampling {subsampling}: max |gpu - cpu| {diff.max().item():.0f}, mean {diff.mean().item():.3f} levels"
    )
    assert diff.mean().item() <= mean_limit
    if max_limit is not None:
        assert diff.max().item() <= max_limit


def test_augmentation_on_the_gpu_matches_the_cpu_for_the_same_draws():
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.integers(0, 256, size=(16, 3, 48, 48), dtype=np.uint8))
    rand = sample_uniforms(np.arange(16), seed=3, epoch=1)
    augment = DeviceAugment(scale=(0.3, 1.0))
    gpu = augment(images.to(CUDA), train=True, rand=rand).cpu()
    cpu = augment(images, train=True, rand=rand)
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-3 / (0.225 * 255) * 255)


def _toy(n=64, classes=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    base = rng.integers(0, 256, size=(classes, 3, 1, 1))
    x = np.clip(base[y] + rng.normal(0, 30, size=(n, 3, size, size)), 0, 255).astype(np.uint8)
    return torch.from_numpy(x), torch.from_numpy(np.eye(classes, dtype=np.uint8)[y])


def _batches(images, labels, batch=16):
    for s in range(0, len(images) - batch + 1, batch):
        idx = torch.arange(s, s + batch)
        yield Batch(images[idx], labels[idx], idx)


def _fit(precision: str, steps: int = 4):
    images, labels = _toy()
    settings = TrainSettings(
        epochs=1, batch_size=16, image_size=32, optimizer="adamw", lr=1e-3, schedule="constant", precision=precision
    )
    model = DPFAH.build(16, 4, seed=0)
    reports = []
    fit(settings, model, DPFAHLoss(eta=1.0), train_batches=lambda e: _batches(images, labels), steps_per_epoch=steps,
        report=lambda m, s: reports.append(m), device=CUDA, seed=0)  # fmt: skip
    return model, reports[-1]


def test_bf16_fit_is_finite_and_close_to_fp32():
    _, bf16 = _fit("bf16")
    _, fp32 = _fit("fp32")
    for metrics in (bf16, fp32):
        assert np.isfinite([metrics[k] for k in ("loss", "loss_l1", "loss_l2", "loss_l3")]).all(), metrics
    print(f"epoch loss bf16 {bf16['loss']:.5f}, fp32 {fp32['loss']:.5f}")
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)


def test_gpu_encoding_gives_the_cpu_codes():
    model, _ = _fit("fp32", steps=4)  # trained a little: u is not all near 0
    images, labels = _toy(n=96, seed=5)
    batches = list(_batches(images, labels, batch=32))
    cpu_codes, _, cpu_index = encode(model.to(CPU), batches, CPU, 32, precision="fp32")
    for precision, floor in (("fp32", 0.9999), ("auto", 0.999)):  # auto = bf16 on a GPU, as evaluate runs
        codes, _, index = encode(model.to(CUDA), batches, CUDA, 32, precision=precision)
        assert np.array_equal(index, cpu_index)
        agree = float((codes == cpu_codes).mean())
        print(f"codes {precision} on the GPU vs fp32 on the CPU: {agree:.6f} of bits agree")
        assert agree >= floor


def test_search_and_map_of_gpu_tensors_equal_the_cpu_values():
    rng = np.random.default_rng(4)
    q = np.where(rng.random((50, 32)) < 0.5, 1, -1).astype(np.int8)
    d = np.where(rng.random((3000, 32)) < 0.5, 1, -1).astype(np.int8)
    ql = np.eye(5, dtype=np.uint8)[rng.integers(0, 5, 50)]
    dl = np.eye(5, dtype=np.uint8)[rng.integers(0, 5, 3000)]
    idx_cpu, dist_cpu = topk_hamming(pack_codes(q), pack_codes(d), k=100)
    qg, dg = (
        torch.from_numpy(pack_codes(q).view(np.int64)).to(CUDA),
        torch.from_numpy(pack_codes(d).view(np.int64)).to(CUDA),
    )
    idx_gpu, dist_gpu = topk_hamming(qg, dg, k=100, backend="torch")
    np.testing.assert_array_equal(torch.as_tensor(idx_gpu).cpu().numpy(), idx_cpu)  # ties by index on both
    np.testing.assert_array_equal(torch.as_tensor(dist_gpu).cpu().numpy(), dist_cpu)
    # mAP has no GPU kernel: CUDA tensors are brought to the CPU, with the same result
    on_gpu = mean_average_precision(
        torch.from_numpy(q).to(CUDA),
        torch.from_numpy(d).to(CUDA),
        torch.from_numpy(ql).to(CUDA),
        torch.from_numpy(dl).to(CUDA),
        topk=1000,
    )
    assert on_gpu == mean_average_precision(q, d, ql, dl, topk=1000)
