"""Shared fixtures: one local Ray instance per test session, tiny prepared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_class_folder, toy_params


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
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", [f"data.root={root}", f"datasets.cifar10.source={cifar10_source}"])
    return root, prepare(params, "cifar10", progress=False)
