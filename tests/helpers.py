"""Helpers shared by the test modules: a tiny class-folder dataset, its parameters, an MLflow
run shaped like the train stage's, and a stage's command line run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
BITS = 8


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


class TinyNet(nn.Module):
    """A small network with DPFAH's interface ((u, logits), bits, num_classes): fit in
    milliseconds a step."""

    def __init__(self, bits: int, num_classes: int):
        super().__init__()
        self.bits, self.num_classes = bits, num_classes
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hash_head, self.cls_head = nn.Linear(8, bits), nn.Linear(8, num_classes)

    def forward(self, x):
        f = self.body(x)
        return self.hash_head(f), self.cls_head(f)


def toy_overrides(work: Path, images: Path, *extra: str) -> list[str]:
    """``--set`` items for a custom dataset `toy` under ``work`` (data root, MLflow, Ray storage)."""
    return [
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
        "evaluate.loader_workers=0",
        "evaluate.batch_size=32",
        *extra,
    ]


def toy_params(work: Path, images: Path, *extra: str):
    """The parameters of ``toy_overrides``, loaded over the repository's params.yaml."""
    from pipeline.config import load_params

    return load_params(PARAMS_FILE, toy_overrides(work, images, *extra))


def fake_training_run(
    tracking_uri: str,
    manifest_sha256: str,
    *,
    dataset: str = "toy",
    bits: int = BITS,
    num_classes: int = 3,
    seed: int = 0,
    root: Path | None = None,
    image_size: int = 32,
    status: str = "FINISHED",
    model=None,
) -> dict:
    """An MLflow run shaped like pipeline.train's (params, tags, a pickled DPFAH model) without
    Ray; writes the run record under ``root`` when given. Returns the record."""
    import mlflow
    import mlflow.pytorch

    from dpfah.model import DPFAH
    from pipeline.tracking import using_tracking_uri

    if model is None:
        torch.manual_seed(seed)
        model = DPFAH(bits, num_classes).eval()
    with using_tracking_uri(tracking_uri):
        experiment = mlflow.set_experiment(f"dpfah-{dataset}")
        with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
            mlflow.log_params({"dataset": dataset, "bits": bits, "train.image_size": image_size})
            mlflow.set_tags({"dataset": dataset, "protocol": "custom", "manifest_sha256": manifest_sha256, "git_commit": "test"})
            info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", pip_requirements=["torch"])
            run_id = run.info.run_id
    if status != "FINISHED":
        mlflow.tracking.MlflowClient(tracking_uri).set_terminated(run_id, status)
    record = {
        "run_id": run_id,
        "model_uri": info.model_uri,
        "tracking_uri": tracking_uri,
        "experiment": experiment.name,
        "dataset": dataset,
        "bits": bits,
        "protocol": "custom",
        "manifest_sha256": manifest_sha256,
        "best_val_map": 0.0,
        "best_epoch": 0,
        "epochs": 1,
    }
    if root is not None:
        write_record(root, record)
    return record


def write_record(root: Path, record: dict, name: str | None = None) -> Path:
    path = Path(root) / "runs" / (name or f"{record['dataset']}-{record['bits']}-dpfah-s0.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def cli(module, argv: list[str], capsys) -> tuple[int, str]:
    from pipeline.errors import run_main

    capsys.readouterr()  # only this command's output
    code = run_main(module.main, argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ----------------------------------------------------------------------------- promote

SHA = "ab" * 32
NAME = "dpfah-toy-8b"


def evaluated_run(uri: str, root: Path, value: float, *, map_at="ALL", sha: str = SHA, write_files: bool = True, complete: bool = True, model=None) -> dict:
    """A fake-trained run with an evaluation as pipeline.evaluate leaves it: the metric and
    ``eval.*`` tags on the run, the run record and metrics/toy-8-dpfah-s0.json under ``root``."""
    from mlflow.tracking import MlflowClient

    record = fake_training_run(uri, sha, model=model if model is not None else torch.nn.Linear(2, 2))
    client = MlflowClient(uri)
    client.log_metric(record["run_id"], "query_map", value)
    client.log_metric(record["run_id"], "query_map_tie_aware", value - 0.01)
    client.set_tag(record["run_id"], "eval.map_at", str(map_at))
    client.set_tag(record["run_id"], "eval.manifest_sha256", sha)
    if complete:  # evaluate writes the marker last, naming the evaluation it completes
        client.set_tag(record["run_id"], "eval.id", f"eval-{record['run_id'][:8]}")
        client.set_tag(record["run_id"], "eval.complete", f"eval-{record['run_id'][:8]}")
    if write_files:
        write_record(root, record)
        write_metrics(root, record, value, map_at=map_at, sha=sha)
    return record


def write_metrics(root: Path, record: dict, value: float, *, map_at="ALL", sha: str = SHA) -> Path:
    """metrics/toy-8-dpfah-s0.json (the numbers) and evaluations/toy-8-dpfah-s0.json (what they measure)."""
    facts = root / "evaluations" / "toy-8-dpfah-s0.json"
    facts.parent.mkdir(parents=True, exist_ok=True)
    facts.write_text(json.dumps({"dataset": "toy", "bits": 8, "run_id": record["run_id"], "map_at": map_at}))
    path = root / "metrics" / "toy-8-dpfah-s0.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"query_map": value, "query_map_tie_aware": value - 0.01}))
    return path


def registry_state(uri: str) -> tuple[dict, list[tuple[int, str]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    aliases = {k: int(v) for k, v in (client.get_registered_model(NAME).aliases or {}).items()}
    versions = sorted((int(v.version), v.run_id) for v in client.search_model_versions(f"name = '{NAME}'"))
    return aliases, versions
