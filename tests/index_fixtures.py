"""The toy index the index and search tests share: a registered (untrained) DPFAH model as
the champion of dpfah-toy-8b and the toy database split indexed with it. Imported by the test
modules that use them (module-scoped: each module builds its own)."""

from __future__ import annotations

import pytest

from pipeline import index as index_stage
from tests.helpers import BITS, fake_training_run, toy_params

__all__ = ["NAME", "CHAMPION", "champion", "database_index"]

NAME = f"dpfah-toy-{BITS}b"
CHAMPION = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def champion(toy_dataset, tmp_path_factory):
    """The toy dataset's params (block size 16: 78 database items in 5 blocks) and a DPFAH
    model registered as dpfah-toy-8b with the champion alias, in a store of its own."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from dpfah.data import read_manifest
    from pipeline.tracking import using_tracking_uri

    work, images = toy_dataset
    store = tmp_path_factory.mktemp("index-store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    params = toy_params(work, images, f"mlflow.tracking_uri={uri}", "index.block_size=16", "index.batch_size=8")
    record = fake_training_run(uri, read_manifest(params.shards_dir("toy")).sha256)
    with using_tracking_uri(uri):
        version = mlflow.register_model(record["model_uri"], NAME).version
    MlflowClient(uri).set_registered_model_alias(NAME, "champion", version)
    return params, record, images


@pytest.fixture(scope="module")
def database_index(ray_local, champion, tmp_path_factory):
    """The toy database split indexed in one uninterrupted run, by two Ray Data actors."""
    import dataclasses

    params, record, _ = champion
    two = dataclasses.replace(params, index=dataclasses.replace(params.index, workers=2))
    out = tmp_path_factory.mktemp("indexes") / "toy-8"
    result = index_stage.build_index(two, out, model=CHAMPION, dataset="toy", split="database", progress=False)
    return result
