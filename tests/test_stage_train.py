"""The train stage for real: Ray Train workers (CPU, gloo), DDP, checkpoints, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import toy_params

pytestmark = pytest.mark.slow


def _global_batch_source(steps: int, global_batch: int, classes: int):
    """Deterministic global batches, each rank taking its slice: any worker count sees
    exactly the same global batch at every step."""

    def source(epoch: int, rank: int, world_size: int):
        from dpfah.data import Batch

        local = global_batch // world_size
        for step in range(steps):
            rng = np.random.default_rng([epoch, step])
            y = rng.integers(0, classes, size=global_batch)
            images = rng.integers(0, 256, size=(global_batch, 3, 32, 32), dtype=np.uint8)
            labels = np.eye(classes, dtype=np.uint8)[y]
            rows = slice(rank * local, (rank + 1) * local)
            index = np.arange(step * global_batch, (step + 1) * global_batch)[rows]
            yield Batch(torch.from_numpy(images[rows]), torch.from_numpy(labels[rows]), torch.from_numpy(index))

    return source


def _final_model_state(outcome) -> dict:
    return torch.load(f"{outcome.checkpoint}/state.pt", map_location="cpu", weights_only=True)["model"]


def test_two_workers_match_one_worker_on_the_same_global_batch(ray_local, toy_dataset, tmp_path):
    """DDP with the pairwise loss over the gathered global batch = one process, same batch.

    BatchNorm statistics are frozen (eval-mode BN): per-rank BN would differ by design on
    CPUs, where SyncBatchNorm is unavailable (see the stack notes)."""
    from pipeline.train import run_training

    work, images = toy_dataset
    states = {}
    for workers in (1, 2):
        params = toy_params(
            work,
            images,
            f"train.num_workers={workers}",
            "train.epochs=1",
            "train.freeze_bn=true",
            "train.optimizer=sgd",
            "train.lr=0.001",
            "train.schedule=constant",
            f"train.storage_path={tmp_path / 'ray'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        )
        outcome = run_training(
            params,
            "toy",
            16,
            write_run_file=False,
            batch_source=_global_batch_source(steps=3, global_batch=8, classes=3),
            steps_per_epoch=3,
            validate=False,
            log_model=False,
        )
        states[workers] = _final_model_state(outcome)
    moved = 0
    for key, one in states[1].items():
        two = states[2][key]
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
        moved += 1
    assert moved > 100
    for key, value in states[1].items():
        assert torch.isfinite(value.float()).all(), key
    # Training did change the weights (so the agreement is not trivial).
    from dpfah.model import DPFAH

    start = DPFAH.build(16, 3, seed=0).state_dict()
    assert not torch.allclose(start["hash_head.weight"], states[1]["hash_head.weight"])


@pytest.fixture(scope="module")
def resumed_run(ray_local, toy_dataset, tmp_path_factory):
    """A 2-worker run on the toy shards whose last worker is killed as epoch 2 starts, and
    the same run undisturbed (``uninterrupted``: its final state)."""
    import os

    from pipeline.train import run_training

    work, images = toy_dataset
    out = tmp_path_factory.mktemp("resume")

    def run(name: str, *extra: str):
        params = toy_params(
            work,
            images,
            "train.num_workers=2",
            "train.epochs=3",
            "train.max_failures=1",
            f"train.storage_path={out / 'ray'}",
            f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            *extra,
        )
        cwd = os.getcwd()
        os.chdir(out)  # the run record goes to ./runs/
        try:
            return params, run_training(params, "toy", 16, run_name=name, write_run_file=name == "resume-test")
        finally:
            os.chdir(cwd)

    _, undisturbed = run("undisturbed", "train.fail_at_epoch=2")  # the last epoch: the epoch log, no fault
    params, outcome = run("resume-test", "train.fail_at_epoch=1")
    uninterrupted = torch.load(f"{undisturbed.checkpoint}/state.pt", map_location="cpu", weights_only=True)
    return params, outcome, out, uninterrupted


def test_killed_worker_resumes_from_checkpoint(resumed_run):
    """Resume restores everything: the final weights, optimiser and memory bank equal an
    undisturbed run's on the same data; the epoch before the fault is not run again; MLflow
    has one point per epoch per metric; no checkpoint is left beyond num_to_keep."""
    import mlflow
    from mlflow.tracking import MlflowClient

    params, outcome, out, uninterrupted = resumed_run
    run_dir = out / "ray" / "resume-test"
    assert (run_dir / ".fault-injected").exists(), "the fault was not injected"
    started = [tuple(map(int, line.split())) for line in (run_dir / ".epochs-started").read_text().split("\n") if line]
    assert [e for e, rank in started if rank == 0] == [0, 1, 2, 2], started  # epoch 2 again, epoch 1 not
    assert [e for e, rank in (tuple(map(int, x.split())) for x in (out / "ray" / "undisturbed" / ".epochs-started").read_text().split("\n") if x) if rank == 0] == [0, 1, 2]
    assert outcome.epochs == 3
    state = torch.load(f"{outcome.checkpoint}/state.pt", map_location="cpu", weights_only=True)  # plain data only
    assert [h["epoch"] for h in state["history"]] == [0, 1, 2]  # each epoch once, none lost
    for part in ("model", "objective", "best_model"):
        for key, value in uninterrupted[part].items():
            torch.testing.assert_close(state[part][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{part}.{key}: {m}")
    moved = [k for k, v in state["optimizer"]["state"].items() if "square_avg" in v or "momentum_buffer" in v or "exp_avg" in v]
    assert moved, "the optimiser state was checkpointed"
    for key, value in uninterrupted["optimizer"]["state"].items():
        for name, tensor in value.items():
            torch.testing.assert_close(state["optimizer"]["state"][key][name], tensor, rtol=1e-5, atol=1e-6)
    checkpoints = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert len(checkpoints) <= 2, checkpoints  # CheckpointConfig.num_to_keep

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["protocol"] == "custom" and len(run.data.tags["manifest_sha256"]) == 64
    # which kernels the run used is on record (the compiled ones where they built)
    assert run.data.tags["kernel.hamming"] and run.data.tags["kernel.ranking"]
    assert run.data.params["loss.eta"] == str(params.loss.eta) and run.data.tags["weights_from"] == "params"
    assert run.data.tags["model.selected_by"] == "best validation mAP"
    for name in ("validation/map", "train/loss", "train/loss_l1", "train/loss_l2", "train/loss_l3", "train/images_per_s", "validation/best_map", "validation/best_epoch"):
        steps = [m.step for m in client.get_metric_history(outcome.run_id, name)]
        assert sorted(steps) == [0, 1, 2], (name, steps)  # one point per epoch, at its epoch
    record = json.loads((out / "runs" / "toy-16-dpfah-s0.json").read_text())
    assert record["run_id"] == outcome.run_id and record["model_uri"] == outcome.model_uri
    assert record["selected_by"] == "best validation mAP"
    del mlflow


def test_logged_model_reloads_as_dpfah_with_the_same_codes(resumed_run):
    import mlflow.artifacts
    import mlflow.pytorch

    from dpfah.encoder import ImageEncoder
    from dpfah.model import DPFAH

    params, outcome, out, _ = resumed_run
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    loaded = mlflow.pytorch.load_model(outcome.model_uri)
    assert isinstance(loaded, ImageEncoder) and isinstance(loaded.net, DPFAH) and loaded.bits == 16
    assert loaded.image_size == params.train.image_size

    state = torch.load(f"{outcome.checkpoint}/state.pt", map_location="cpu", weights_only=True)
    in_memory = DPFAH(16, 3)
    in_memory.load_state_dict(state["best_model"])
    x = torch.rand(5, 3, 32, 32)
    loaded.eval(), in_memory.eval()
    codes = loaded.net.codes(x)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(codes, in_memory.codes(x), rtol=0, atol=0)

    # named after its registry name, linked to its run; a signature and an input example
    client = mlflow.tracking.MlflowClient()
    logged = client.get_logged_model(outcome.model_uri[len("models:/") :])
    assert logged.name == "dpfah-toy-16b" and logged.source_run_id == outcome.run_id
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=outcome.model_uri))
    from mlflow.models import Model

    meta = Model.load(str(model_dir / "MLmodel"))
    assert [(s.type.name, s.shape) for s in meta.signature.inputs.inputs] == [("uint8", (-1, -1, -1, 3))]
    assert [(s.type.name, s.shape) for s in meta.signature.outputs.inputs] == [("int8", (-1, 16))]
    assert (model_dir / "input_example.json").exists() and (model_dir / "code" / "dpfah" / "encoder.py").exists()

    # requirements given, not inferred: pinned to the versions that trained it
    from importlib.metadata import version

    reqs = (model_dir / "requirements.txt").read_text().split()
    assert f"torch=={version('torch')}" in reqs and f"numpy=={version('numpy')}" in reqs

    # The dataset column: the prepared split, named by dataset and protocol, the manifest's digest.
    run = client.get_run(outcome.run_id)
    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.name == "toy (custom)" and inp.dataset.digest == run.data.tags["manifest_sha256"][:12]
    assert json.loads(inp.dataset.profile)["manifest_sha256"] == run.data.tags["manifest_sha256"]


#: Loads a logged model where the project cannot be imported (no PYTHONPATH, -I, the
#: editable install's finder removed) and prints its codes for the images given.
_CLEAN_LOAD = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not str(getattr(h, "__module__", "")).startswith("__editable__")]
sys.path_importer_cache.clear()
for name in ("dpfah", "pipeline"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable before the model is loaded: not a clean environment")
import json
import numpy as np
import mlflow.pyfunc

model = mlflow.pyfunc.load_model(sys.argv[1])
codes = model.predict(np.load(sys.argv[2]))
import dpfah
np.save(sys.argv[3], codes)
print(json.dumps({"dpfah": dpfah.__file__, "pipeline": "pipeline" in sys.modules, "inputs": str(model.metadata.get_input_schema())}))
"""


def test_logged_model_loads_and_encodes_without_the_project(resumed_run, tmp_path):
    """The logged model in a Python process that cannot import the project: mlflow.pyfunc
    loads it with its packaged dpfah (code/dpfah), and uint8 (N, H, W, 3) images in give
    the network's codes out (what a `mlflow models serve` request returns)."""
    import os
    import subprocess
    import sys

    import mlflow
    import mlflow.pytorch

    params, outcome, out, _ = resumed_run
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    local = mlflow.artifacts.download_artifacts(artifact_uri=outcome.model_uri, dst_path=str(tmp_path / "model"))
    images = np.random.default_rng(1).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)  # resized to 32 by the model
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    done = subprocess.run(
        [sys.executable, "-I", "-c", _CLEAN_LOAD, local, str(tmp_path / "images.npy"), str(tmp_path / "codes.npy")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["dpfah"].startswith(str(Path(local) / "code" / "dpfah")) and not report["pipeline"], report
    served = np.load(tmp_path / "codes.npy")
    assert served.dtype == np.int8 and served.shape == (4, 16)

    from dpfah.augment import DeviceAugment, resize_uint8

    encoder = mlflow.pytorch.load_model(outcome.model_uri)
    x = DeviceAugment()(resize_uint8(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), 32), train=False)
    np.testing.assert_array_equal(served, encoder.net.codes(x).numpy())


def test_validation_map_rises_above_chance_on_cifar10(ray_local, cifar10_prepared, tmp_path):
    """From scratch, 32 px, three short epochs on real CIFAR-10: well above chance (~0.1)."""
    from pipeline.config import load_params
    from pipeline.train import run_training

    params = load_params(
        Path(__file__).resolve().parents[1] / "params.yaml",
        [
            f"data.root={cifar10_prepared[0]}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"train.storage_path={tmp_path / 'ray'}",
            "train.epochs=3",
            "train.steps_per_epoch=25",
            "train.batch_size=64",
            "train.loader_workers=0",
        ],
    )
    outcome = run_training(params, "cifar10", 32, write_run_file=False, log_model=False)
    state = torch.load(f"{outcome.checkpoint}/state.pt", map_location="cpu", weights_only=True)
    maps = [h["val_map"] for h in state["history"]]
    print("validation mAP by epoch:", maps)
    assert len(maps) == 3
    assert outcome.best_val_map == max(maps)
    # chance is about 0.10 (10 balanced classes); 75 steps from scratch reach about 0.15 here
    assert outcome.best_val_map > 0.13, maps
