"""Training throughput: our loop against the hashing code zoos' loop, same images and model.

    python -m bench.train_throughput [--size 224] [--batch 128] [--steps 20] [--workers 16]

* ours: ``dpfah.train.fit`` itself (the loop every runner uses), fed the images' original
  encoded bytes; it decodes them on the device (nvJPEG on a GPU), augments whole batches
  there, and runs bf16 autocast + channels_last on a GPU (fp32 on the CPU). The number is the
  ``images_per_s`` that ``fit`` reports for its second epoch (the first warms up).
* reference: the loop of the popular hashing repositories: PIL decodes, resizes and crops
  every image in DataLoader worker processes, fp32, NCHW, the same DPFAH model (PFA on),
  the same loss and optimiser, timed over the same number of steps after a warm-up epoch.

Both see the same JPEG images (synthetic, ``--source-size`` px, seeded) and the same batch
size. Prints a table and writes JSON (bench/results/train_throughput.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dpfah.data import Batch
from dpfah.loss import DPFAHLoss
from dpfah.model import DPFAH
from dpfah.settings import ModelSettings
from dpfah.train import TrainSettings, fit


def make_jpegs(n: int, size: int, classes: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    """Smooth random images (so JPEG sizes are realistic), one class colour cast each."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    images = []
    for _i in range(n):
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    return images, np.eye(classes, dtype=np.uint8)[labels]


class _BytesStream(IterableDataset):
    """Our input: batches of encoded bytes, as dpfah.data.TrainStream yields them."""

    def __init__(self, images, labels, batch):
        self.images, self.labels, self.batch = images, labels, batch

    def __iter__(self):
        n = len(self.images) - len(self.images) % self.batch
        for s in range(0, n, self.batch):
            idx = np.arange(s, s + self.batch)
            yield Batch([self.images[i] for i in idx], torch.from_numpy(self.labels[idx]), torch.from_numpy(idx))


class _PilDataset(Dataset):
    """The code zoos' input: PIL decode, resize, random crop and flip, to float, normalise."""

    def __init__(self, images, labels, size):
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose(
            [
                transforms.Resize(size),
                transforms.RandomResizedCrop(size, scale=(0.5, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        with Image.open(io.BytesIO(self.images[i])) as im:
            x = self.transform(im.convert("RGB"))
        return x, torch.from_numpy(self.labels[i]).float()


def run_ours(images, labels, args, device) -> dict:
    settings = TrainSettings(
        epochs=2,
        batch_size=args.batch,
        image_size=args.size,
        optimizer="rmsprop",
        lr=5e-5,
        weight_decay=1e-5,
        schedule="constant",
    )
    model = DPFAH.build(64, labels.shape[1], ModelSettings(pfa=True), seed=0)
    loader = DataLoader(
        _BytesStream(images, labels, args.batch), batch_size=None, num_workers=1
    )  # a reader process, as the shard stream has
    reports = []
    fit(
        settings,
        model,
        DPFAHLoss(),
        train_batches=lambda epoch: loader,
        steps_per_epoch=args.steps,
        report=lambda m, s: reports.append(m),
        device=device,
    )
    second = reports[-1]
    return {"images_per_s": second["images_per_s"], "epoch_s": second["epoch_s"], "images": args.steps * args.batch}


def run_reference(images, labels, args, device) -> dict:
    torch.manual_seed(0)
    model = DPFAH(64, labels.shape[1], pfa=True).to(device)
    loss_fn = DPFAHLoss()
    opt = torch.optim.RMSprop(model.parameters(), lr=5e-5, weight_decay=1e-5)
    loader = DataLoader(
        _PilDataset(images, labels, args.size),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )

    def epoch() -> tuple[float, int]:
        seen, it = 0, iter(loader)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            x, y = next(it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            u, logits = model(x)
            parts = loss_fn(u, logits, y)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()
            seen += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, seen

    model.train()
    epoch()  # warm-up: worker start, allocator, cuDNN autotuning
    seconds, seen = epoch()
    return {"images_per_s": seen / seconds, "epoch_s": seconds, "images": seen}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        type=int,
        default=224 if cuda else 112,
        help="training image size (default 224 on a GPU, 112 on a CPU)",
    )
    parser.add_argument("--source-size", type=int, default=256, help="stored JPEG size in px (default 256)")
    parser.add_argument(
        "--batch", type=int, default=128 if cuda else 16, help="batch size (default 128 on a GPU, 16 on a CPU)"
    )
    parser.add_argument("--steps", type=int, default=20 if cuda else 4, help="timed steps per epoch")
    parser.add_argument(
        "--workers", type=int, default=min(16, os.cpu_count() or 1), help="reference DataLoader workers"
    )
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    n = args.batch * args.steps * 2
    images, labels = make_jpegs(n, args.source_size, 10, seed=0)
    rows = []
    for name, fn in (("reference (PIL in workers, fp32, NCHW)", run_reference), ("ours (dpfah.train.fit)", run_ours)):
        r = fn(images, labels, args, device)
        rows.append({"loop": name, **r})
    ratio = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    card = (
        torch.cuda.get_device_name(0)
        if cuda
        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    print(
        f"training throughput, DPFAH-64 with PFA, {args.size} px, batch {args.batch}, {args.steps} timed steps, on "
        f"{card}"
    )
    print(f"{'loop':42s} {'img/s':>10s} {'s':>8s}")
    for r in rows:
        print(f"{r['loop']:42s} {r['images_per_s']:10.1f} {r['epoch_s']:8.2f}")
    print(f"ratio ours / reference: {ratio:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": card, "settings": vars(args), "rows": rows, "ratio": ratio, "torch": torch.__version__}, indent=2
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
