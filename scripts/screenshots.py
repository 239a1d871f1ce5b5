"""Screenshots of what a user sees in the MLflow UI, taken in a real headless browser.

    python scripts/screenshots.py [--out DIR] [--store DIR] [--work DIR] [--images DIR]

Without ``--store``: builds a tiny store with the pipeline itself, as a user would (prepare,
train, evaluate and promote as ``python -m pipeline.<stage>`` in ``--work``, a fresh
temporary folder by default): a custom dataset of 10 classes taken from the CIFAR-10 archive
named by ``$DPFAH_CIFAR10_SOURCE`` (60 images a class), or of ``--images`` (one folder per
class), or, without either, of generated colour patches; 16 bits, 3 epochs on the CPU
(about 2 minutes here). ``--store DIR``: a folder holding ``mlflow.db`` (and the
artifacts where its runs recorded them) that the pipeline wrote.

Then starts a real ``mlflow server`` on that store (a free local port), and with headless
Chromium (``apt-get install -y chromium``) saves into ``--out`` (default
``screenshots/``):

* ``1-runs-table.png``: the experiment's training runs, sorted by ``query_map``;
* ``2-run.png``: the training run (metrics, dataset, tags);
* ``3-run-artifacts.png``: its ``evaluation/`` artifacts (the figures);
* ``4-logged-model.png``: the logged model (signature, linked metrics);
* ``5-model-version.png``: the registered model version (its description, the alias).

A script, not a test: starting MLflow's server and a browser costs a minute. Look at the
pictures: that is the point.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DATASET, BITS = "toy", 16


def _stage_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    # the stages run outside the repository: tell them its commit (the runs' git_commit tag)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        env.setdefault("DPFAH_GIT_COMMIT", commit.stdout.strip())
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    return env


def _images(work: Path, given: str | None) -> Path:
    """A class-folder dataset: ``--images``, a CIFAR-10 subset, or generated patches."""
    if given:
        return Path(given).resolve()
    out = work / "images"
    source = os.environ.get("DPFAH_CIFAR10_SOURCE")
    if source and os.path.isfile(source):
        counts: dict[str, int] = {}
        with tarfile.open(source) as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile() or not member.name.endswith((".jpg", ".png")) or len(parts) < 2:
                    continue
                cls = parts[-2]
                if counts.get(cls, 0) >= 60:
                    if len(counts) >= 10 and all(n >= 60 for n in counts.values()):
                        break
                    continue
                (out / cls).mkdir(parents=True, exist_ok=True)
                (out / cls / parts[-1]).write_bytes(tar.extractfile(member).read())
                counts[cls] = counts.get(cls, 0) + 1
        print(f"dataset: {sum(counts.values())} CIFAR-10 images of {len(counts)} classes from {source}")
        return out
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue", "yellow")):
        colour = rng.integers(0, 256, 3)
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(40):
            pixels = np.clip(colour + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(out / name / f"{i:03d}.png")
    print("dataset: generated colour patches (set DPFAH_CIFAR10_SOURCE for real images)")
    return out


def build_store(work: Path, images: str | None) -> Path:
    """prepare, train, evaluate, promote: the pipeline's own commands, in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    folder = _images(work, images)
    sets = [
        f"data.root={work / 'data'}",
        "prepare.datasets=[toy]",
        "datasets.toy.kind=custom",
        f"datasets.toy.images={folder}",
        "datasets.toy.query_per_class=6",
        "datasets.toy.train_per_class=40",
        "datasets.toy.validation=20",
        "datasets.toy.shard_size=100",
        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"train.storage_path={work / 'ray_results'}",
        "train.epochs=3",
        "train.batch_size=16",
        "train.image_size=32",
        "train.loader_workers=0",
        "evaluate.loader_workers=0",
        "evaluate.grid_topk=8",
        "evaluate.grid_queries=4",
    ]
    args = ["--params", str(REPO / "params.yaml"), *(a for s in sets for a in ("--set", s))]
    which = ["--dataset", DATASET]
    for stage, extra in (("prepare", []), ("train", ["--bits", str(BITS)]), ("evaluate", ["--bits", str(BITS), "--quiet"]), ("promote", ["--bits", str(BITS)])):
        print(f"$ python -m pipeline.{stage} {' '.join(which + extra)} ...", flush=True)
        subprocess.run([PYTHON, "-m", f"pipeline.{stage}", *which, *extra, *args], cwd=work, env=_stage_env(), check=True)
    return work


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store: Path, timeout_s: float = 180.0):
    """A real ``mlflow server`` on ``store/mlflow.db``; yields its URL; stopped at the end."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(store / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [str(Path(PYTHON).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=store, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"mlflow server did not start (see {store / 'mlflow-server.log'})")
                time.sleep(1)
        print(f"mlflow server at {url} (log: {store / 'mlflow-server.log'})")
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium found: apt-get install -y chromium")


def screenshot(url: str, path: Path, *, width: int = 1600, height: int = 1000, wait_ms: int = 15000) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run(
            [_browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
            check=True, capture_output=True, timeout=180,
        )
    print(f"wrote {path}  ({url})")


def take(url: str, out: Path) -> list[Path]:
    from urllib.parse import quote

    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(f"dpfah-{DATASET}")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    run = next((r for r in runs if "promote.version" in r.data.tags), runs[0])  # the promoted training
    model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    name = run.data.tags.get("promote.model_name", model.name)
    version = run.data.tags.get("promote.version", "1")
    exp = experiment.experiment_id
    pages = [
        ("1-runs-table.png", f"{url}/#/experiments/{exp}/runs?orderByKey={quote('metrics.`query_map`')}&orderByAsc=false"),
        ("2-run.png", f"{url}/#/experiments/{exp}/runs/{run.info.run_id}"),
        ("3-run-artifacts.png", f"{url}/#/experiments/{exp}/runs/{run.info.run_id}/artifacts/evaluation/pr_curves.png"),
        ("4-logged-model.png", f"{url}/#/experiments/{exp}/models/{model.model_id}"),
        ("5-model-version.png", f"{url}/#/models/{quote(name)}/versions/{version}"),
    ]
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    for file, page in pages:
        screenshot(page, out / file, height=1300 if file.startswith(("2", "4", "5")) else 1000)
        shots.append(out / file)
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/screenshots.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="screenshots", help="folder for the PNGs (default: screenshots/)")
    parser.add_argument("--store", help="a folder with the pipeline's mlflow.db (default: build one in --work)")
    parser.add_argument("--work", help="where to build the tiny store (default: a new temporary folder, kept)")
    parser.add_argument("--images", help="a class-folder dataset for the tiny store (default: a CIFAR-10 subset or colour patches)")
    args = parser.parse_args(argv)
    _browser()  # fail before any work
    store = Path(args.store).resolve() if args.store else build_store(Path(args.work or tempfile.mkdtemp(prefix="dpfah-ui-")).resolve(), args.images)
    with mlflow_server(store) as url:
        shots = take(url, Path(args.out).resolve())
    print(f"{len(shots)} screenshots in {Path(args.out).resolve()}; the store is {store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
