"""The train stage for real: Ray Train workers (CPU, gloo), DDP, checkpoints, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def _epochs_started(run_dir: Path, rank: int = 0) -> list[int]:
    return [
        int(e)
        for e, r in (line.split() for line in (run_dir / ".epochs-started").read_text().splitlines() if line)
        if int(r) == rank
    ]


def _state(outcome) -> dict:
    return torch.load(f"{outcome.checkpoint}/state.pt", map_location="cpu", weights_only=True)  # plain data only


def test_two_workers_resumed_after_a_fault_end_where_one_worker_ends(ray_trained):
    """One run proves three things (conftest's ``ray_trained``): DDP over 2 workers, with the
    pairwise loss over the gathered global batch and ``pairs: bank`` (the indices and codes
    all-gathered into the bank), equals one worker on the same global batches; and the
    2-worker run, its last worker killed as epoch 2 starts, resumed from epoch 1's
    checkpoint without running epoch 1 again and restored everything: its final weights,
    best model, optimiser state and memory bank equal the uninterrupted run's.

    "Equal" is what DDP promises: the same computation in another reduction order (the
    gradient summed over 2 ranks, gathered batches), so equal to rounding, on any CPU:
    losses to 1e-5, weights and bank to 1e-4 relative, the optimiser's momentum to 1e-3 of
    its norm. The training is
    stable (lr 1e-3: the loss falls every epoch), so rounding stays rounding; at lr 1e-2 the
    loss rose and a 1e-7 difference grew to 9 % of the weights in 9 steps (issue 31). The
    validation mAP is a discontinuous function of the weights (a code bit flips where u
    crosses 0), so it is compared exactly for every sign the entries within rounding of 0
    may take (tests.helpers.maps_for_every_sign_near_zero), not at 1e-9.

    BatchNorm statistics are frozen (eval-mode BN): per-rank BN would differ by design on
    CPUs, where SyncBatchNorm is unavailable (see the stack notes)."""
    from dpfah.model import DPFAH
    from tests.helpers import encode_with_u, maps_for_every_sign_near_zero

    one, two = ray_trained["uninterrupted"]["outcome"], ray_trained["resumed"]["outcome"]
    runs = ray_trained["out"] / "ray"
    assert (runs / "resumed" / ".fault-injected").exists(), "the fault was not injected"
    assert not (runs / "uninterrupted" / ".fault-injected").exists()
    assert _epochs_started(runs / "resumed") == [0, 1, 2, 2]  # epoch 2 again, epoch 1 not
    assert _epochs_started(runs / "resumed", rank=1) == [0, 1, 2, 2]
    assert _epochs_started(runs / "uninterrupted") == [0, 1, 2]
    assert one.epochs == two.epochs == 3
    a, b = _state(one), _state(two)
    assert [h["epoch"] for h in b["history"]] == [0, 1, 2]  # each epoch once, none lost
    losses = [h["loss"] for h in a["history"]]
    assert losses[0] > losses[1] > losses[2], f"the toy training is not stable: {losses}"
    for term in ("loss", "loss_l1", "loss_l2", "loss_l3"):
        assert [h[term] for h in b["history"]] == pytest.approx([h[term] for h in a["history"]], rel=1e-5), term
    compared = 0
    for part in ("model", "objective", "best_model"):
        for key, value in a[part].items():
            assert torch.isfinite(b[part][key].float()).all(), f"{part}.{key}"
            torch.testing.assert_close(b[part][key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{part}.{key}: {m}")  # noqa: B023
            compared += 1
    assert compared > 200
    assert b["objective"]["memory.seen"].sum() > 24  # the bank holds rows of earlier epochs too
    assert torch.equal(b["objective"]["memory.seen"], a["objective"]["memory.seen"])
    moved = [k for k, v in b["optimizer"]["state"].items() if "momentum_buffer" in v]
    assert len(moved) > 50, "the optimiser state was checkpointed"
    # The momentum buffers accumulate gradients, sums that cancel: elementwise a small entry
    # can be off by 20 % of itself, so they agree in norm (measured: 9e-5 at most; weights 8e-6).
    for key, value in a["optimizer"]["state"].items():
        for name, tensor in value.items():
            off = float((b["optimizer"]["state"][key][name] - tensor).norm() / tensor.norm().clamp_min(1e-12))
            assert off < 1e-3, f"optimizer.state.{key}.{name} is {off:.2e} of its norm away"
    # Training did change the weights (so the agreement is not trivial).
    start = DPFAH.build(16, 3, seed=0).state_dict()
    assert not torch.allclose(start["hash_head.weight"], a["model"]["hash_head.weight"])

    # The validation mAP of the best epoch and of the last (whose models are kept): what each
    # run reported (1 worker; 2 ranks, each encoding half) is the mAP of the 1-worker model's
    # codes, for some sign of the entries within 1e-4 of 0 (the weights agree to 1e-4). The
    # codes of the two runs' models agree wherever |u| is clear of that.
    shards = ray_trained["out"] / "data" / "shards" / "toy"
    assert a["best_epoch"] == b["best_epoch"], (a["best_epoch"], b["best_epoch"])  # see the margin below
    for part, epoch in (("best_model", a["best_epoch"]), ("model", 2)):
        encoded = {}
        for name, state in (("one", a), ("two", b)):
            net = DPFAH.build(16, 3, seed=0)
            net.load_state_dict(state[part])
            encoded[name] = [encode_with_u(net, shards, split, 16) for split in ("validation", "train")]
        (uq, cq, lq), (ud, cd, ld) = encoded["one"]
        clear = np.abs(np.concatenate([uq, ud])) >= 1e-4
        assert clear.mean() > 0.95, f"{part}: only {clear.mean():.1%} of the code entries are clear of 0"
        for x, y in zip(encoded["one"], encoded["two"]):
            assert np.array_equal(x[2], y[2])  # labels, same order
        codes_one = np.concatenate([cq, cd])
        codes_two = np.concatenate([encoded["two"][0][1], encoded["two"][1][1]])
        assert np.array_equal(codes_one[clear], codes_two[clear]), f"{part}: the two runs' models give other codes"
        reachable = maps_for_every_sign_near_zero(uq, ud, lq, ld, eps=1e-4)
        for name, state in (("one", a), ("two", b)):
            reported = state["history"][epoch]["val_map"]
            assert any(abs(reported - v) < 1e-9 for v in reachable), (part, name, reported, sorted(reachable))
    # The other epoch's model is not kept: its mAP agrees to 0.015, and both runs pick the
    # same best epoch because the 1-worker run's best is ahead of the next by over twice that.
    assert [h["val_map"] for h in b["history"]] == pytest.approx([h["val_map"] for h in a["history"]], abs=0.015)
    maps = sorted(h["val_map"] for h in a["history"])
    assert maps[-1] - maps[-2] > 0.03, f"no margin between the best epoch and the next: {maps}"
    checkpoints = sorted(
        p.name for p in (runs / "resumed").iterdir() if p.is_dir() and p.name.startswith("checkpoint_")
    )
    assert len(checkpoints) <= 2, checkpoints  # CheckpointConfig.num_to_keep


def test_resumed_run_is_recorded_once_in_mlflow(ray_trained):
    """On the real tracking server: the run FINISHED, its tags and params (the tuned eta and
    zeta, which the workers' objective used), one point per epoch per metric at its epoch
    (the re-run epoch 2 logged once), and the run record."""
    from mlflow.tracking import MlflowClient

    resumed = ray_trained["resumed"]
    params, outcome = resumed["params"], resumed["outcome"]
    client = MlflowClient(ray_trained["server"])
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["protocol"] == "custom" and len(run.data.tags["manifest_sha256"]) == 64
    # which kernels the run used is on record (the compiled ones where they built)
    assert run.data.tags["kernel.hamming"] and run.data.tags["kernel.ranking"]
    # use_tuned: the search's eta and zeta at 16 bits, the rest from params (MLflow keeps
    # every knob of the method as loss.<knob>)
    assert (run.data.params["loss.eta"], run.data.params["loss.zeta"], run.data.params["loss.delta"]) == (
        "3.0",
        "0.5",
        "0.05",
    )
    assert (
        run.data.tags["weights_from"],
        run.data.tags["tuned_trial_run_id"],
        run.data.tags["tuned_search_run_id"],
    ) == ("tune", "trial-16", "search")
    assert params.objectives["dpfah"].get("eta") != 3.0 and params.objectives["dpfah"].get("zeta") != 0.5
    assert run.data.params["loss.pairs"] == "bank" and run.data.params["num_workers"] == "2"
    assert run.data.tags["model.selected_by"] == "best validation mAP"
    for name in (
        "validation/map",
        "train/loss",
        "train/loss_l1",
        "train/loss_l2",
        "train/loss_l3",
        "train/images_per_s",
        "validation/best_map",
        "validation/best_epoch",
    ):
        steps = [m.step for m in client.get_metric_history(outcome.run_id, name)]
        assert sorted(steps) == [0, 1, 2], (name, steps)  # one point per epoch, at its epoch
    history = _state(outcome)["history"]
    assert [m.value for m in sorted(client.get_metric_history(outcome.run_id, "train/loss"), key=lambda m: m.step)] == [
        h["loss"] for h in history
    ]
    # ... and the workers' objective used them: each epoch's loss is l1 + 3.0 l2 + 0.5 l3
    # (the quantisation term is large in epoch 0 and falls as |u| settles inside delta)
    assert history[0]["loss_l2"] > 0.1 and all(h["loss_l3"] > 0.01 for h in history)
    for h in history:
        assert h["loss"] == pytest.approx(h["loss_l1"] + 3.0 * h["loss_l2"] + 0.5 * h["loss_l3"], rel=1e-6)
    record = json.loads((ray_trained["out"] / "runs" / "toy-16-dpfah-s0.json").read_text())
    assert record["run_id"] == outcome.run_id and record["model_uri"] == outcome.model_uri
    assert record["selected_by"] == "best validation mAP" and record["tracking_uri"] == ray_trained["server"]


def test_logged_model_reloads_as_dpfah_with_the_same_codes(ray_trained):
    import mlflow
    import mlflow.artifacts

    from dpfah.encoder import ImageEncoder
    from dpfah.model import DPFAH
    from pipeline.model_files import load_encoder
    from pipeline.tracking import using_tracking_uri

    resumed = ray_trained["resumed"]
    params, outcome = resumed["params"], resumed["outcome"]
    with using_tracking_uri(ray_trained["server"]):
        loaded = load_encoder(outcome.model_uri, mlflow.get_tracking_uri())
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=outcome.model_uri))
    assert isinstance(loaded, ImageEncoder) and isinstance(loaded.net, DPFAH) and loaded.bits == 16
    assert loaded.image_size == params.train.image_size == 16

    state = torch.load(f"{outcome.checkpoint}/state.pt", map_location="cpu", weights_only=True)
    in_memory = DPFAH(16, 3)
    in_memory.load_state_dict(state["best_model"])
    x = torch.rand(5, 3, 16, 16)
    loaded.eval(), in_memory.eval()
    codes = loaded.net.codes(x)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(codes, in_memory.codes(x), rtol=0, atol=0)

    # named after its registry name, linked to its run; a signature and an input example
    client = mlflow.tracking.MlflowClient(ray_trained["server"])  # the run's store, not the process's default
    logged = client.get_logged_model(outcome.model_uri[len("models:/") :])
    assert logged.name == "dpfah-toy-16b" and logged.source_run_id == outcome.run_id
    from mlflow.models import Model

    meta = Model.load(str(model_dir / "MLmodel"))
    # outputs only: an input schema would make MLflow cast a request's numbers before the model checks them
    assert meta.signature.inputs is None
    assert [(s.type.name, s.shape) for s in meta.signature.outputs.inputs] == [("int8", (-1, 16))]
    assert (model_dir / "input_example.json").exists() and (model_dir / "code" / "dpfah" / "encoder.py").exists()

    # requirements given, not inferred: pinned to the versions that trained it
    from importlib.metadata import version

    reqs = (model_dir / "requirements.txt").read_text().split()
    assert f"torch=={version('torch')}" in reqs and f"numpy=={version('numpy')}" in reqs

    # The dataset column: the prepared split, named by dataset and protocol, the manifest's digest.
    from mlflow.tracking import MlflowClient

    run = MlflowClient(ray_trained["server"]).get_run(outcome.run_id)
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
inputs = str(model.metadata.get_input_schema())
print(json.dumps({"dpfah": dpfah.__file__, "pipeline": "pipeline" in sys.modules, "inputs": inputs}))
"""


def test_logged_model_loads_and_encodes_without_the_project(ray_trained, tmp_path):
    """The logged model in a Python process that cannot import the project: mlflow.pyfunc
    loads it with its packaged dpfah (code/dpfah), and uint8 (N, H, W, 3) images in give
    the network's codes out (what a `mlflow models serve` request returns)."""
    import os
    import subprocess
    import sys

    import mlflow

    from pipeline.model_files import load_encoder
    from pipeline.tracking import using_tracking_uri

    outcome = ray_trained["resumed"]["outcome"]
    with using_tracking_uri(ray_trained["server"]):
        local = mlflow.artifacts.download_artifacts(artifact_uri=outcome.model_uri, dst_path=str(tmp_path / "model"))
        encoder = load_encoder(outcome.model_uri, mlflow.get_tracking_uri())
    images = np.random.default_rng(1).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)  # resized to 16 by the model
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    done = subprocess.run(
        [sys.executable, "-I", "-c", _CLEAN_LOAD, local, str(tmp_path / "images.npy"), str(tmp_path / "codes.npy")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["dpfah"].startswith(str(Path(local) / "code" / "dpfah")) and not report["pipeline"], report
    served = np.load(tmp_path / "codes.npy")
    assert served.dtype == np.int8 and served.shape == (4, 16)

    from dpfah.augment import DeviceAugment, resize_uint8

    x = DeviceAugment()(resize_uint8(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), 16), train=False)
    np.testing.assert_array_equal(served, encoder.net.codes(x).numpy())


def test_the_logged_model_served_over_http_answers_with_its_codes(ray_trained, tmp_path):
    """`mlflow models serve` (the real command, --env-manager local) on the logged model of
    conftest's Ray training, fetched from the tracking server: a POST of uint8 images as
    nested lists ({"inputs": ...}, the signature's (N, H, W, 3)) answers {"predictions":
    ...}, the network's -1/+1 codes of those images, computed here from the network."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    import mlflow

    from dpfah.augment import DeviceAugment, resize_uint8
    from pipeline.model_files import load_encoder
    from pipeline.tracking import using_tracking_uri
    from tests.helpers import distinct_clear_images, free_port, wait_answering

    outcome = ray_trained["resumed"]["outcome"]
    with using_tracking_uri(ray_trained["server"]):
        encoder = load_encoder(outcome.model_uri, mlflow.get_tracking_uri())
    # three images this model gives different codes, none within 1e-3 of a sign change: the
    # served codes must equal the network's exactly, and one code for all would not
    images = distinct_clear_images(encoder.net, 16, n=3)
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # the venv's mlflow (and its python for the server)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": ray_trained["server"],
    }
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", outcome.model_uri, "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        assert wait_answering(f"http://127.0.0.1:{port}/ping", proc, 180), (tmp_path / "serve.log").read_text()[-3000:]
        body = json.dumps({"inputs": images.tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert list(answer) == ["predictions"], answer
    served = np.asarray(answer["predictions"])
    assert served.shape == (3, 16) and set(np.unique(served)) <= {-1, 1}, answer

    x = DeviceAugment()(resize_uint8(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), 16), train=False)
    expected = encoder.net.codes(x).numpy()
    np.testing.assert_array_equal(served, expected)
    assert len({tuple(row) for row in served}) == 3  # three different codes, not one for all
