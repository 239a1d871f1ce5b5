"""Helpers shared by the test modules: a tiny class-folder dataset, its parameters, an MLflow
run shaped like the train stage's, and a stage's command line run in-process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
BITS = 8


def make_class_folder(root: Path, classes=("red", "green", "blue"), per_class=30, size=32, seed=0, noise=25.0) -> Path:
    """PNG images, one folder per class, each class a noisy version of its own colour
    (pixel noise of standard deviation ``noise``: large values make the classes overlap)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(len(classes), 3))
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(colours[c] + rng.normal(0, noise, size=(size, size, 3)), 0, 255).astype(np.uint8)
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
    """An MLflow run shaped like pipeline.train's (params, tags, its DPFAH model ``model``
    logged as train logs it) without Ray; writes the run record under ``root`` when given.
    Returns the record."""
    import mlflow

    from dpfah.model import DPFAH
    from pipeline.model_logging import log_model_artifact
    from pipeline.tracking import open_experiment, using_tracking_uri

    if model is None:
        torch.manual_seed(seed)
        model = DPFAH(bits, num_classes).eval()
    with using_tracking_uri(tracking_uri):
        experiment = open_experiment(f"dpfah-{dataset}", tracking_uri)
        with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
            mlflow.log_params({"dataset": dataset, "bits": bits, "train.image_size": image_size})
            mlflow.set_tags(
                {"dataset": dataset, "protocol": "custom", "manifest_sha256": manifest_sha256, "git_commit": "test"}
            )
            model_uri = log_model_artifact(model, image_size, "model")
            run_id = run.info.run_id
    if status != "FINISHED":
        mlflow.tracking.MlflowClient(tracking_uri).set_terminated(run_id, status)
    record = {
        "run_id": run_id,
        "model_uri": model_uri,
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


class MarkerPayload:
    """Unpickling this writes the file ``marker``: what an attacker's pickle would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


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


def evaluated_run(
    uri: str,
    root: Path,
    value: float,
    *,
    map_at="ALL",
    sha: str = SHA,
    write_files: bool = True,
    complete: bool = True,
    model=None,
) -> dict:
    """A fake-trained run with an evaluation as pipeline.evaluate leaves it: the metric and
    ``eval.*`` tags on the run, the run record and metrics/toy-8-dpfah-s0.json under ``root``."""
    from mlflow.tracking import MlflowClient

    record = fake_training_run(uri, sha, model=model)
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


# ----------------------------------------------------------------------------- mlflow server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answering(url: str, proc, timeout_s: float) -> bool:
    """Whether ``url`` answers 200 within ``timeout_s`` while ``proc`` (the server) lives."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def start_mlflow_server(work: Path, env: dict[str, str] | None = None):
    """A real ``mlflow server`` on a free port (SQLite backend under ``work``, proxied
    artifacts), in its own process group; returns (its URI, the process) once it answers
    /health. Stop it with :func:`stop_mlflow_server`."""
    import os
    import subprocess
    import sys

    port = free_port()
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    with open(work / "server.log", "w") as log:
        proc = subprocess.Popen(
            [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
             "--artifacts-destination", str(work / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    if not wait_healthy(uri, proc, 180):
        stop_mlflow_server(proc)
        raise RuntimeError(f"mlflow server did not start: {(work / 'server.log').read_text()[-2000:]}")
    return uri, proc


def wait_healthy(uri: str, proc=None, timeout_s: float = 60) -> bool:
    """Whether the MLflow server at ``uri`` answers /health and then a tracking API call
    within ``timeout_s``. On a loaded 2-core machine a fresh server's first API call took
    more than the 5 s the stages' store check allows, after /health had answered."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5):
                pass
            search = urllib.request.Request(
                f"{uri}/api/2.0/mlflow/experiments/search",
                data=b'{"max_results": 1}',
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(search, timeout=max(5.0, deadline - time.monotonic())):
                return True
        except OSError:
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def stop_mlflow_server(proc) -> None:
    """Kill the server and its workers: the process group :func:`start_mlflow_server` started."""
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ----------------------------------------------------------------------------- deterministic global batches


class GlobalBatches:
    """``batch_source(epoch, rank, world_size)`` for pipeline.train_driver.run_training: every epoch
    ``steps`` global batches of ``global_batch`` training images of the prepared shards at
    ``shards`` (decoded, in a permutation seeded by the epoch), each rank taking its slice,
    so that any worker count sees exactly the same global batch at every step. The indices
    are the samples' own (a memory bank is indexed by them)."""

    def __init__(self, shards: Path, steps: int, global_batch: int):
        self.shards, self.steps, self.global_batch = str(shards), steps, global_batch

    def __call__(self, epoch: int, rank: int, world_size: int):
        from dpfah.data import Batch, EvalStream

        (everything,) = list(EvalStream(self.shards, "train", batch_size=10**6, decode=True, rank=0, world_size=1))
        order = np.random.default_rng([7, epoch]).permutation(len(everything.index))
        local = self.global_batch // world_size
        for step in range(self.steps):
            rows = order[step * self.global_batch : (step + 1) * self.global_batch][rank * local : (rank + 1) * local]
            yield Batch(everything.images[rows], everything.labels[rows], everything.index[rows])


# ----------------------------------------------------------------------------- codes near zero
# A code bit is sign(u): where |u| is within rounding of 0, two reduction orders (1 vs 2 DDP
# workers, another CPU's vector width, another batch composition) may give it either sign, and
# a retrieval metric of those codes jumps. These helpers let a test compare such metrics
# exactly, for every sign the bits within ``eps`` of 0 may take, instead of at a tolerance.


def encode_with_u(net, shards: Path, split: str, image_size: int):
    """(u, codes, labels) of every item of ``split`` in index order, encoded on this process
    by dpfah's own ``encode`` (so the codes are the ones validation computes); ``u`` is the
    hashing output the codes are the signs of."""
    from dpfah.data import EvalStream
    from dpfah.train import encode

    seen_u, seen_index = [], []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.bits, self.num_classes = net, net.bits, net.num_classes

        def forward(self, x):
            u, logits = self.net(x)
            seen_u.append(u.detach().float().numpy())
            return u, logits

    def batches():
        for batch in EvalStream(str(shards), split, batch_size=64, rank=0, world_size=1):
            seen_index.append(np.asarray(batch.index))
            yield batch

    codes, labels, _ = encode(Probe(), batches(), torch.device("cpu"), image_size)
    u = np.concatenate(seen_u)[np.argsort(np.concatenate(seen_index), kind="stable")]
    assert np.array_equal(np.where(u >= 0, 1, -1), codes), "encode's codes are not the signs of u"
    return u, codes, labels


def maps_for_every_sign_near_zero(u_query, u_db, query_labels, db_labels, eps: float, most: int = 12) -> set[float]:
    """mAP@ALL (index ties, as validation computes it) of sign(u) for every assignment of
    signs to the entries with |u| < ``eps``: the values a run whose u differs from this one
    by less than ``eps`` can report. Fails when more than ``most`` entries are that close."""
    import itertools

    from dpfah.metrics import mean_average_precision

    u = np.concatenate([u_query, u_db])
    near = np.argwhere(np.abs(u) < eps)
    assert len(near) <= most, f"{len(near)} code entries within {eps} of 0: too many to enumerate"
    values = set()
    for signs in itertools.product((-1, 1), repeat=len(near)):
        codes = np.where(u >= 0, 1, -1).astype(np.int8)
        for (row, col), sign in zip(near, signs):
            codes[row, col] = sign
        q, d = codes[: len(u_query)], codes[len(u_query) :]
        values.add(float(mean_average_precision(q, d, query_labels, db_labels, topk=None, ties="index")))
    return values


def distinct_clear_images(net, image_size: int, n: int, margin: float = 1e-3, seed: int = 0) -> np.ndarray:
    """``n`` uint8 (N, H, W, 3) images (24 x 20, resized to ``image_size`` by the model) that
    ``net`` maps to pairwise different codes with every |u| >= ``margin``: a comparison of
    codes computed elsewhere with these is exact (no bit within rounding of 0) and not
    trivial (one code for all would differ). Drawn from noise around varied mean colours."""
    from dpfah.augment import DeviceAugment, resize_uint8

    rng = np.random.default_rng(seed)
    means = rng.integers(0, 256, (64, 1, 1, 3))
    pool = np.clip(means + rng.normal(0, 40, (64, 24, 20, 3)), 0, 255).astype(np.uint8)
    x = DeviceAugment()(resize_uint8(torch.from_numpy(pool).permute(0, 3, 1, 2).contiguous(), image_size), train=False)
    net.eval()
    with torch.no_grad():
        u, _ = net(x)
    chosen, codes = [], set()
    for i, row in enumerate(u.numpy()):
        code = tuple(np.where(row >= 0, 1, -1))
        if np.abs(row).min() >= margin and code not in codes:
            chosen.append(i)
            codes.add(code)
        if len(chosen) == n:
            return pool[chosen]
    raise AssertionError(f"only {len(chosen)} of 64 images have distinct codes clear of 0 by {margin}")


# ----------------------------------------------------------------------------- independent re-implementations
# What the evaluate stage computes, written again without dpfah's code paths: the shards read
# with tarfile and PIL, the resize and normalisation in numpy, the metrics with per-query loops.


def shards_sha(shards: Path) -> str:
    from dpfah.data import read_manifest

    return read_manifest(shards).sha256


def read_split_plain(shards: Path, split: str):
    """(images uint8 N,H,W,3, labels uint8 N,C) of a split in stored order, read with tarfile
    and PIL only (independent of dpfah.data)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / shard["file"]) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    rows = sorted(samples.values(), key=lambda s: int(s["index"]))
    assert [int(s["index"]) for s in rows] == list(range(manifest["splits"][split]["count"]))
    images = np.stack(
        [
            np.asarray(
                Image.open(io.BytesIO(next(v for k, v in s.items() if k not in ("index", "labels.npy")))).convert("RGB")
            )
            for s in rows
        ]
    )
    labels = np.stack([np.load(io.BytesIO(s["labels.npy"])) for s in rows])
    return images, labels


def plain_codes(model, images: np.ndarray, logged: np.ndarray | None = None, eps: float = 1e-4) -> np.ndarray:
    """The network's codes of uint8 (N, H, W, 3) images, normalised in numpy.

    With ``logged`` (the pipeline's codes of the same images, encoded in torch in other
    batches): they must agree wherever |u| >= ``eps``; entries closer to 0 may round either
    way (another order of the same float operations), so there the logged bit is taken. The
    result is what a reference metric must be computed from to be compared at 1e-12."""
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    x = torch.from_numpy(((images.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        u = model.eval()(x)[0].float().numpy()
    codes = np.where(u >= 0, 1, -1).astype(np.int8)
    if logged is None:
        return codes
    sure = np.abs(u) >= eps
    assert sure.mean() > 0.95, f"only {sure.mean():.1%} of the code entries are clear of 0 by {eps}"
    np.testing.assert_array_equal(logged[sure], codes[sure])
    return np.where(sure, codes, logged).astype(np.int8)


def plain_metrics(qc, dc, ql, dl, topk, radius, n):
    """mAP@topk by (distance, index), P@H<=radius (empty = 0), P@n, per-query loops."""
    bits = qc.shape[1]
    dist = (bits - qc.astype(np.int64) @ dc.astype(np.int64).T) // 2
    rel = (ql.astype(np.int64) @ dl.astype(np.int64).T) > 0
    aps, ball, empty, pn, best, worst = [], [], [], [], [], []
    for i in range(len(qc)):
        order = np.lexsort((np.arange(dc.shape[0]), dist[i]))[:topk]
        r = rel[i, order]
        hits = np.cumsum(r)
        aps.append(float((hits / np.arange(1, len(r) + 1))[r].mean()) if r.any() else 0.0)
        inside = dist[i] <= radius
        ball.append(rel[i, inside].mean() if inside.any() else 0.0)
        empty.append(not inside.any())
        pn.append(rel[i, np.lexsort((np.arange(dc.shape[0]), dist[i]))[:n]].mean())
        for sink, first in ((best, True), (worst, False)):  # relevant first / last inside ties
            o = np.lexsort((~rel[i] if first else rel[i], dist[i]))[:topk]
            rr = rel[i, o]
            h = np.cumsum(rr)
            sink.append(float((h / np.arange(1, len(rr) + 1))[rr].mean()) if rr.any() else 0.0)
    return {
        "map": np.mean(aps),
        "ball": np.mean(ball),
        "empty": np.mean(empty),
        "p_at_n": np.mean(pn),
        "best": np.mean(best),
        "worst": np.mean(worst),
        "dist": dist,
        "rel": rel,
    }


def plain_resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, size, size, 3): the antialiased bilinear (triangle) filter as
    PIL defines it, the filter widened by the scale when shrinking, pixel centres at +0.5,
    weights cut at the border and renormalised; float64, rounded half to even."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        support = max(scale, 1.0)
        w = np.zeros((n_out, n_in))
        for i in range(n_out):
            centre = scale * (i + 0.5)
            lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
            taps = np.array([max(0.0, 1 - abs((j - centre + 0.5) / support)) for j in range(lo, hi)])
            w[i, lo:hi] = taps / taps.sum()
        return w

    wy, wx = weights(images.shape[1], size), weights(images.shape[2], size)
    out = np.einsum("yh,nhwc,xw->nyxc", wy, images.astype(np.float64), wx)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def plain_tie_aware_map(dist: np.ndarray, rel: np.ndarray) -> float:
    """Tie-aware mAP@ALL: per query, the expected AP over random orders inside each group of
    equal distance. A relevant item of a group of n (k relevant) after c items (c_rel
    relevant) has y of the group before it with y uniform on 0..n-1, and of those
    y (k-1)/(n-1) relevant in expectation, so E[precision] = mean over y of
    (c_rel + 1 + y (k-1)/(n-1)) / (c + 1 + y)."""
    aps = []
    for d, r in zip(dist, rel):
        if not r.any():
            aps.append(0.0)
            continue
        total, c, c_rel = 0.0, 0, 0
        for value in np.unique(d):
            group = d == value
            n, k = int(group.sum()), int(r[group].sum())
            if k:
                y = np.arange(n)
                total += k * np.mean((c_rel + 1 + y * (k - 1) / max(n - 1, 1)) / (c + 1 + y))
            c, c_rel = c + n, c_rel + k
        aps.append(total / r.sum())
    return float(np.mean(aps))


def class_images(n, classes=3, size=16, seed=0):
    """``n`` uint8 images (N, 3, size, size) of ``classes`` colours with noise, and their one-hot labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    base = rng.integers(0, 256, size=(classes, 3, 1, 1))
    x = np.clip(base[y] + rng.normal(0, 30, size=(n, 3, size, size)), 0, 255).astype(np.uint8)
    return torch.from_numpy(x), torch.eye(classes)[torch.from_numpy(y)]


@contextlib.contextmanager
def failing_at_epoch(epoch: int):
    """The test hook of :mod:`pipeline.train_driver` (``DPFAH_FAIL_AT_EPOCH``), set while in
    the block: the last worker dies once as epoch ``epoch + 1`` starts (the last epoch: no
    fault, each worker only notes the epochs it starts)."""
    from pipeline.train_driver import FAIL_AT_EPOCH_ENV

    before = os.environ.get(FAIL_AT_EPOCH_ENV)
    os.environ[FAIL_AT_EPOCH_ENV] = str(epoch)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FAIL_AT_EPOCH_ENV, None)
        else:
            os.environ[FAIL_AT_EPOCH_ENV] = before
