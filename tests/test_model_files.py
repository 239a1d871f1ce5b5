"""The logged model is never unpickled (issue 28, case 2): its weights are plain tensors read
with ``torch.load(weights_only=True)`` and its network is rebuilt by ``dpfah`` from recorded
settings. A model whose weights file an attacker replaced with a pickle of code is refused in
one line by every loader (the pipeline's one loader, promote's command line, MLflow's pyfunc
as ``mlflow models serve`` loads it), and the code never runs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import MarkerPayload

BITS, SIZE = 8, 16


@pytest.fixture
def logged(tmp_path):
    """A DPFAH encoder logged as train logs it into a fresh local store: (store, model URI,
    the local folder of its files, the network)."""
    import mlflow

    from dpfah.model import DPFAH
    from pipeline.model_logging import log_model_artifact
    from pipeline.tracking import open_experiment, using_tracking_uri

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torch.manual_seed(0)
    net = DPFAH(BITS, 3).eval()
    with using_tracking_uri(store):
        open_experiment("files", store)
        with mlflow.start_run():
            uri = log_model_artifact(net, SIZE, "dpfah-files-test")
        location = mlflow.tracking.MlflowClient().get_logged_model(uri.split("/")[-1]).artifact_location
    files = Path(location.removeprefix("file://"))  # the model folder (MLflow names it artifacts/)
    return store, uri, files, net


def test_the_model_artifact_holds_tensors_and_settings_and_no_pickle(logged):
    from dpfah.encoder import FORMAT

    store, uri, files, net = logged
    names = {p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()}
    assert {"artifacts/weights.pt", "artifacts/settings.json", "served_model.py", "MLmodel"} <= names
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".pth"))], names
    assert "python_model.pkl" not in names and "data/model.pth" not in names  # what pyfunc / pytorch pickle
    settings = json.loads((files / "artifacts" / "settings.json").read_text())
    assert settings["format"] == FORMAT and (settings["bits"], settings["num_classes"], settings["image_size"]) == (
        BITS,
        3,
        SIZE,
    )
    state = torch.load(files / "artifacts" / "weights.pt", weights_only=True)
    assert set(state) == set(net.state_dict()) and all(isinstance(v, torch.Tensor) for v in state.values())


def test_the_one_loader_gives_the_same_codes(logged):
    from pipeline.model_files import load_encoder

    store, uri, _, net = logged
    encoder = load_encoder(uri, store)
    images = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    from dpfah.encoder import ImageEncoder

    np.testing.assert_array_equal(encoder(images).numpy(), ImageEncoder(net, SIZE)(images).numpy())


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_weights_file_replaced_by_a_pickle_of_code_is_refused_and_never_run(logged, tmp_path, how):
    import mlflow.pyfunc

    from pipeline.errors import PipelineError
    from pipeline.model_files import load_encoder
    from pipeline.registry import load_checked_model
    from pipeline.tracking import using_tracking_uri

    store, uri, files, _ = logged
    marker = tmp_path / "pwned"
    weights = files / "artifacts" / "weights.pt"
    if how == "pickle":
        weights.write_bytes(pickle.dumps(MarkerPayload(marker)))
    else:
        torch.save({"hash_head.weight": MarkerPayload(marker)}, weights)
    for load in (lambda: load_encoder(uri, store), lambda: load_checked_model(uri, "r", store)):
        with pytest.raises(PipelineError) as refused:
            load()
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"model {uri}: artifacts/weights.pt: not a file of plain"), (
            message
        )
        assert "refused without running it" in message
    with using_tracking_uri(store), pytest.raises(ValueError, match="not a file of plain tensors"):
        mlflow.pyfunc.load_model(uri)  # what `mlflow models serve` does
    assert not marker.exists()


def test_tampered_settings_and_old_pickled_models_are_refused_in_one_line(logged, tmp_path):
    import mlflow
    import mlflow.pytorch

    from pipeline.model_files import ModelRefused, load_encoder
    from pipeline.tracking import using_tracking_uri

    store, uri, files, _ = logged
    settings = files / "artifacts" / "settings.json"
    good = json.loads(settings.read_text())
    for bad, words in [
        ({**good, "bits": 9}, "not the weights of the network artifacts/settings.json describes (size mismatch"),
        ({**good, "bits": "8"}, "bits must be a positive int, got '8'"),
        ({**good, "backbone": "vgg"}, "backbone='vgg': choose one of"),
        ({**good, "extra": 1}, "expected the keys"),
        ({**good, "format": "x"}, "not a dpfah-image-encoder/1 settings file"),
    ]:
        settings.write_text(json.dumps(bad))
        with pytest.raises(ModelRefused) as refused:
            load_encoder(uri, store)
        message = str(refused.value)
        assert "\n" not in message and "artifacts/settings.json" in message and words in message, message
    settings.write_text("{not json")
    with pytest.raises(ModelRefused, match="unreadable model settings"):
        load_encoder(uri, store)

    with using_tracking_uri(store), mlflow.start_run():  # a model as train logged them before: a pickle
        old = mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="old", serialization_format="pickle").model_uri
    with pytest.raises(ModelRefused) as refused:
        load_encoder(old, store)
    assert str(refused.value) == (
        f"model {old}: no artifacts/settings.json, so not a model this pipeline logs as plain tensors "
        "(a pickled model, as train logged them before, is not loaded: retrain it)"
    )
