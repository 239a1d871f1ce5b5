"""Shared fixtures: one local Ray instance per test session, tiny prepared datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.runkey import RunKey
from tests.helpers import failing_at_epoch, make_class_folder, toy_params


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """``mlflow.set_tracking_uri`` also sets MLFLOW_TRACKING_URI, which outranks params.yaml
    for every later stage call in this process: no test leaves it changed for the next."""
    import sys

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None and hasattr(utils, "_tracking_uri"):
        utils._tracking_uri = before  # MLflow's process-wide URI (set_tracking_uri's other half)


_REPO = Path(__file__).resolve().parents[1]


def _top_level() -> set[str]:
    return {p.name for p in _REPO.iterdir()}


#: The repository root's entries when the session started; an entry that appears later is
#: reported once, by the first test after which it is there.
_ROOT_AT_START = _top_level()


@pytest.fixture(autouse=True)
def _writes_only_under_tmp(request):
    """Every test writes only under its temporary paths: a new entry in the repository root
    (MLflow's ./mlruns or ./mlflow.db of a store opened with the checkout as the working
    directory, a build/, a ray_results/, ...) fails the test after which it appeared, naming
    it, whether the test or a fixture it set up (module or session scoped) wrote it."""
    yield
    new = sorted(_top_level() - _ROOT_AT_START)
    if new:
        _ROOT_AT_START.update(new)
        pytest.fail(
            f"{request.node.nodeid} (or a fixture it set up) left {new} in the repository root {_REPO}; "
            "write under tmp_path",
            pytrace=False,
        )


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
    # CI (.ci/run) sets DPFAH_REQUIRE_CIFAR10=1: there a missing archive fails these tests
    # instead of skipping them silently.
    missing = pytest.fail if os.environ.get("DPFAH_REQUIRE_CIFAR10") == "1" else pytest.skip
    if not source:
        missing("DPFAH_CIFAR10_SOURCE is not set (path to CIFAR-10: the official archive or an image-folder .tar.gz)")
    if not Path(source).exists():
        missing(f"DPFAH_CIFAR10_SOURCE={source} does not exist")
    return source


@pytest.fixture(scope="session")
def cifar10_prepared(tmp_path_factory, cifar10_source):
    """Real CIFAR-10 prepared once per test run (protocol cifar10-59k, the repository's
    params): (its data.root, the PrepareResult). Tests only read it."""
    from pipeline.config import load_params
    from pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("cifar10") / "data"
    params = load_params(
        Path(__file__).resolve().parents[1] / "params.yaml",
        [f"data.root={root}", f"datasets.cifar10.source={cifar10_source}"],
    )
    return root, prepare(params, "cifar10", progress=False)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` process (SQLite backend, proxied artifacts) for the session:
    its URI. Tests that kill a server start their own."""
    from tests.helpers import start_mlflow_server, stop_mlflow_server

    uri, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop_mlflow_server(proc)


@pytest.fixture(scope="session")
def ray_trained(ray_local, mlflow_server, tmp_path_factory):
    """The session's two real Ray Train fits of DPFAH (16 bits, ``pairs: bank``, 16 px from
    32 px images, 3 epochs of the same 3 global batches of 8, ``use_tuned`` with a
    search result beside it) on a 3-class dataset whose classes overlap:

    * ``uninterrupted``: 1 worker, no fault (the epoch log only), SQLite store;
    * ``resumed``: 2 workers, the last one killed as epoch 2 starts, resumed from epoch 1's
      checkpoint; tracked on the real ``mlflow server``, its model logged, its run record
      written under ``out``.

    A dict: params and outcome of each, ``out``, ``work``, ``images``, ``uri`` (the server)."""
    import os

    from pipeline.prepare import prepare
    from pipeline.train_driver import run_training
    from tests.helpers import GlobalBatches, wait_healthy

    out = tmp_path_factory.mktemp("ray-trained")
    images = make_class_folder(out / "images", noise=130.0)
    prepare(toy_params(out, images), "toy", progress=False)
    source = GlobalBatches(out / "data" / "shards" / "toy", steps=3, global_batch=8)
    # use_tuned: eta and zeta from a search's best.json (the 16-bit entry), the rest
    # from params (delta 0.05: the quantisation term is not zero, so eta shows in the loss)
    best = {
        "eta": 9.0,
        "zeta": 0.9,
        "bits": 8,
        "run_id": "trial-8",
        "search_run_id": "search",
        "by_bits": {"16": {"eta": 3.0, "zeta": 0.5, "bits": 16, "run_id": "trial-16"}},
    }
    (out / "tune" / "toy").mkdir(parents=True)
    (out / "tune" / "toy" / "best.json").write_text(json.dumps(best))
    # lr 1e-3: a stable descent, so the 1- and 2-worker runs stay equal to rounding; at 1e-2
    # the loss rose and rounding (another CPU, another reduction order) grew to 9 % of the weights
    settings = ["train.epochs=3", "train.image_size=16", "train.freeze_bn=true", "train.optimizer=sgd",
                "train.lr=0.001", "objectives.dpfah.pairs=bank", "use_tuned=true", "objectives.dpfah.delta=0.05",
                f"train.storage_path={out / 'ray'}"]  # fmt: skip
    runs = {}
    cwd, before = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(out)  # the run record goes to ./runs/
    try:
        for name, extra, fault, uri in (
            # the last epoch: the epoch log, no fault
            ("uninterrupted", ["train.num_workers=1"], 2, f"sqlite:///{out / 'mlflow.db'}"),
            ("resumed", ["train.num_workers=2", "train.max_failures=1"], 1, mlflow_server),
        ):
            params = toy_params(out, images, *settings, *extra, f"mlflow.tracking_uri={uri}")
            assert uri != mlflow_server or wait_healthy(uri), f"the mlflow server at {uri} stopped answering"
            with failing_at_epoch(fault):
                outcome = run_training(
                    params,
                    RunKey("toy", 16),
                    run_name=name,
                    write_run_file=name == "resumed",
                    log_model=name == "resumed",
                    batch_source=source,
                    steps_per_epoch=3,
                )
            runs[name] = {"params": params, "outcome": outcome, "uri": uri}
    finally:
        os.chdir(cwd)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return {**runs, "out": out, "images": images, "server": mlflow_server}
