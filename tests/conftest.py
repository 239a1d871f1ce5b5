"""Shared fixtures: one local Ray instance per test session, tiny prepared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance on this machine's CPUs, shared by every test that needs it."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # no token file in ~/.ray for a test cluster
    os.environ.pop("RAY_ADDRESS", None)  # never an outside cluster
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_class_folder(root: Path, classes=("red", "green", "blue"), per_class=30, size=32, seed=0) -> Path:
    """PNG images, one folder per class, each class a noisy version of its own colour."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(len(classes), 3))
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(colours[c] + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png")
    return root


def toy_params(work: Path, images: Path, *extra: str):
    """Params for a custom dataset `toy` under ``work`` (data root, MLflow, Ray storage)."""
    from pipeline.config import load_params

    overrides = [
        f"data.root={work / 'data'}",
        "prepare.datasets=[toy]",
        "datasets.toy.kind=custom",
        f"datasets.toy.images={images}",
        "datasets.toy.query_per_class=4",
        "datasets.toy.train_per_class=16",
        "datasets.toy.validation=6",
        "datasets.toy.shard_size=10",
        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"train.storage_path={work / 'ray_results'}",
        "train.epochs=2",
        "train.batch_size=8",
        "train.image_size=32",
        "train.loader_workers=0",
        "train.eval_batch_size=32",
        "train.collective_timeout_s=60",
        *extra,
    ]
    return load_params(Path(__file__).resolve().parents[1] / "params.yaml", overrides)


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    """A prepared 3-class dataset (train 42, validation 6, query 12, database 78) in uneven shards."""
    from pipeline.prepare import prepare

    work = tmp_path_factory.mktemp("toy")
    images = make_class_folder(work / "images")
    params = toy_params(work, images)
    prepare(params, "toy", progress=False)
    return work, images


@pytest.fixture(scope="session")
def cifar10_source() -> str:
    """The real CIFAR-10 (official archive or image-folder .tar.gz) from DPFAH_CIFAR10_SOURCE."""
    source = os.environ.get("DPFAH_CIFAR10_SOURCE")
    if not source:
        pytest.skip("DPFAH_CIFAR10_SOURCE is not set (path to CIFAR-10: the official archive or an image-folder .tar.gz)")
    if not Path(source).exists():
        pytest.skip(f"DPFAH_CIFAR10_SOURCE={source} does not exist")
    return source
