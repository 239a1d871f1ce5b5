"""Real CIFAR-10 on whatever device there is: encode throughput, and a time-boxed training.

    python -m bench.gpu_cifar --source cifar10-jpg.tar.gz --work /tmp/gpu_cifar --minutes 3 --out cifar10.json
    python -m bench.gpu_cifar --summary DIR      # the table of a finished bench/gpu_check.sh run

Part of ``bench/gpu_check.sh`` (the GPU check), and runnable on a CPU with small settings
(its test does that). Needs torch, torchvision, numpy, PIL, pyarrow, pyyaml and tqdm only:
no Ray, MLflow or DVC. It

1. prepares CIFAR-10 (protocol cifar10-59k, the pipeline's own ``prepare``) from the archive;
2. measures encoding as ``evaluate`` does it (shard stream, decode on the device, bf16 on a
   GPU): images per second over the database split, decode included;
3. trains DPFAH from scratch with ``dpfah.train.fit`` at the paper's settings (224 px,
   RMSProp 5e-5, weight decay 1e-5, batch 128, eta 10, zeta 0.1, 64 bits) except the number
   of epochs: as many as fit in ``--minutes`` (the loop stops after the epoch that would
   overrun), validating every epoch; then scores the best-validation model on the queries
   (mAP@ALL over the 59,000-image database).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # `python bench/gpu_cifar.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpfah.data import EvalStream, TrainStream, read_manifest  # noqa: E402
from dpfah.loss import DPFAHLoss  # noqa: E402
from dpfah.metrics import mean_average_precision  # noqa: E402
from dpfah.model import DPFAH  # noqa: E402
from dpfah.settings import ModelSettings, TrainSettings  # noqa: E402
from dpfah.train import encode, fit, validation_map  # noqa: E402

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


class _TimeUp(Exception):
    pass


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def prepare_cifar(source: str, work: Path, dataset: str = "cifar10") -> str:
    """The shards of ``source`` under ``work`` (prepared once; reused when the manifest exists)."""
    from pipeline.config import load_params
    from pipeline.prepare import prepare

    params = load_params(
        PARAMS, [f"data.root={work}", f"datasets.{dataset}.source={source}", f"prepare.datasets=[{dataset}]"]
    )
    shards = params.shards_dir(dataset)
    if not (Path(shards) / "manifest.json").is_file():
        prepare(params, dataset, progress=False)
    return shards


def _eval_loader(shards: str, split: str, batch: int, workers: int):
    return DataLoader(
        EvalStream(shards, split, batch_size=batch),
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )


def encode_throughput(shards: str, device: torch.device, size: int, batch: int, workers: int, limit_s: float) -> dict:
    """Images per second decoded and encoded over the database split, as evaluate runs it."""
    model = DPFAH.build(64, read_manifest(shards).num_classes, seed=0).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        encode(model, [next(iter(_eval_loader(shards, "query", batch, 0)))], device, size)  # warm-up: cuDNN, nvJPEG
    seen, deadline = 0, time.perf_counter() + limit_s

    def batches():
        nonlocal seen
        for b in _eval_loader(shards, "database", batch, workers):
            seen += len(b.index)
            yield b
            if time.perf_counter() > deadline:
                return

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    encode(model, batches(), device, size)  # precision auto: bf16 on a GPU
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "images": seen,
        "seconds": seconds,
        "images_per_s": seen / seconds,
        "image_size": size,
        "batch": batch,
        "precision": "auto",
    }


def train_time_boxed(shards: str, device: torch.device, args) -> dict:
    """DPFAH from scratch, the paper's settings but the epochs: as many as fit in the budget."""
    manifest = read_manifest(shards)
    settings = TrainSettings(
        epochs=10_000, batch_size=args.batch, image_size=args.size, optimizer="rmsprop", lr=5e-5, weight_decay=1e-5,
        schedule="constant", crop_scale=(0.5, 1.0),
    )  # fmt: skip
    model = DPFAH.build(64, manifest.num_classes, ModelSettings(), seed=0)
    objective = DPFAHLoss()  # its defaults: the paper's eta 10, zeta 0.1
    stream = TrainStream(shards, args.batch, seed=0)
    loader = DataLoader(
        stream, batch_size=None, num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=False
    )
    steps = len(stream) if not args.max_steps else min(len(stream), args.max_steps)

    def train_batches(epoch: int):
        stream.set_epoch(epoch)
        return loader

    def validate(net) -> float:
        return validation_map(
            net,
            _eval_loader(shards, "validation", 256, args.workers),
            _eval_loader(shards, "train", 256, args.workers),
            device,
            args.size,
        )

    budget = args.minutes * 60
    t0 = time.perf_counter()
    history: list[dict] = []
    best: dict = {}

    def report(metrics, state):
        history.append({k: float(v) for k, v in metrics.items()})
        if state is not None and state["best_epoch"] == metrics["epoch"]:
            best["model"] = state["best_model"]

    def on_epoch_end(epoch: int) -> None:
        elapsed = time.perf_counter() - t0
        per_epoch = elapsed / (epoch + 1)
        if elapsed + per_epoch > budget:
            raise _TimeUp

    try:
        fit(settings, model, objective, train_batches=train_batches, steps_per_epoch=steps, report=report,
            device=device,
            seed=0, validate=validate, on_epoch_end=on_epoch_end)  # fmt: skip
    except _TimeUp:
        pass
    train_s = time.perf_counter() - t0
    model.load_state_dict(best["model"])
    t1 = time.perf_counter()
    q_codes, q_labels, _ = encode(model, _eval_loader(shards, "query", 256, args.workers), device, args.size)
    d_codes, d_labels, _ = encode(model, _eval_loader(shards, "database", 256, args.workers), device, args.size)
    query_map = float(mean_average_precision(q_codes, d_codes, q_labels, d_labels, topk=None, ties="index"))
    top = max(history, key=lambda h: h.get("val_map", -1))
    return {
        "epochs": len(history),
        "steps_per_epoch": steps,
        "train_s": train_s,
        "images_per_s": [h["images_per_s"] for h in history],
        "val_map": [h.get("val_map") for h in history],
        "best_epoch": int(top["epoch"]),
        "best_val_map": top.get("val_map"),
        "query_map_at_all": query_map,
        "n_queries": int(len(q_codes)),
        "n_db": int(len(d_codes)),
        "score_s": time.perf_counter() - t1,
        "settings": {
            "image_size": args.size,
            "batch": args.batch,
            "optimizer": "rmsprop",
            "lr": 5e-5,
            "eta": 10.0,
            "zeta": 0.1,
            "bits": 64,
            "pfa": True,
        },
    }


def summary(directory: Path) -> dict:
    """One JSON and one table from the files a bench/gpu_check.sh run left in ``directory``."""

    def load(name):
        path = directory / name
        return json.loads(path.read_text()) if path.is_file() else None

    tests_log = directory / "gpu_tests.log"
    tests = tests_log.read_text().strip().splitlines()[-1] if tests_log.is_file() else "not run"
    throughput, cifar = load("train_throughput.json"), load("cifar10.json")
    out = {"gpu_tests": tests, "train_throughput": throughput, "cifar10": cifar}
    rows = [("CUDA tests", tests)]
    if throughput:
        for r in throughput["rows"]:
            rows.append((f"train img/s, {r['loop']}", f"{r['images_per_s']:,.0f}"))
        rows.append(("train ratio ours / reference (target >= 3x, >= 12,000 img/s)", f"{throughput['ratio']:.2f}x"))
    if cifar:
        enc = cifar["encode"]
        rows.append(
            (
                f"encode img/s incl. decode, {enc['image_size']} px, bf16 on a GPU (target >= 30,000)",
                f"{enc['images_per_s']:,.0f} ({enc['images']:,} images)",
            )
        )
        t = cifar["train"]
        rows.append(
            (
                f"CIFAR-10 {t['settings']['image_size']} px from scratch, {t['epochs']} epochs in {t['train_s']:.0f} s",
                f"val mAP {t['best_val_map']:.4f} (epoch {t['best_epoch']}), query mAP@ALL {t['query_map_at_all']:.4f}",
            )
        )
        rows.append(("train img/s per epoch (CIFAR-10 shards)", ", ".join(f"{x:,.0f}" for x in t["images_per_s"])))
        out["device"] = cifar.get("device")
    width = max(len(r[0]) for r in rows)
    print(f"GPU check on {out.get('device') or (throughput or {}).get('device', '?')}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    (directory / "gpu_check.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_cifar", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help="CIFAR-10: the official archive or an image-folder .tar.gz")
    parser.add_argument("--shards", help="an already prepared dataset directory instead of --source")
    parser.add_argument("--work", default="/tmp/gpu_cifar", help="where --source is prepared")
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget (epochs that fit)")
    parser.add_argument("--size", type=int, default=224 if cuda else 32, help="image size (default 224 on a GPU)")
    parser.add_argument("--batch", type=int, default=128 if cuda else 16)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--max-steps", type=int, default=0, help="cap on steps per epoch (0: the whole split)")
    parser.add_argument("--encode-seconds", type=float, default=30.0, help="cap on the encode measurement")
    parser.add_argument("--out", default="bench/results/gpu/cifar10.json")
    parser.add_argument("--summary", metavar="DIR", help="only print the table of a finished gpu_check run in DIR")
    args = parser.parse_args(argv)
    if args.summary:
        summary(Path(args.summary))
        return 0
    if not (args.source or args.shards):
        parser.error("give --source (CIFAR-10 archive) or --shards (a prepared dataset)")
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    shards = args.shards or prepare_cifar(args.source, Path(args.work))
    prepare_s = time.perf_counter() - t0
    result = {"device": device_name(device), "torch": torch.__version__, "shards": shards, "prepare_s": prepare_s}
    result["encode"] = encode_throughput(
        shards, device, args.size, 512 if cuda else 64, args.workers, args.encode_seconds
    )
    print(
        f"encode: {result['encode']['images_per_s']:,.0f} img/s ({result['encode']['images']:,} images, decode "
        "included)",
        flush=True,
    )
    result["train"] = train_time_boxed(shards, device, args)
    t = result["train"]
    print(f"train: {t['epochs']} epochs in {t['train_s']:.0f} s; best validation mAP {t['best_val_map']:.4f} "
          f"at epoch {t['best_epoch']}; "
          f"query mAP@ALL {t['query_map_at_all']:.4f} ({t['n_queries']} x {t['n_db']})")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
