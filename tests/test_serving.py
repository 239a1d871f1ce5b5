"""Serving the logged model: what ``dpfah.encoder.ImageEncoder`` refuses and how, in process
and behind the real ``mlflow models serve`` (one server for the module, 127.0.0.1 only).

The model is logged by ``pipeline.model_logging.log_model_artifact`` (the train stage's logging)
from an untrained DPFAH network, without Ray, with small limits so that a request over them
is a few kilobytes. Each refusal must be a 400 whose message is one sentence naming what
was expected, not an echo of the input; afterwards the server still answers a good request
with the network's codes.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

BITS, SIZE = 8, 16
#: the logged model's limits: 32 x 32 pixels an image, three such images a request
LIMITS = {"max_image_pixels": 32 * 32, "max_request_pixels": 3 * 32 * 32}
REPO = Path(__file__).resolve().parents[1]


def _network():
    from dpfah.model import DPFAH

    torch.manual_seed(0)
    return DPFAH(BITS, 3).eval()


def _evaluation_codes(net, images: np.ndarray) -> np.ndarray:
    """The codes evaluation computes for uint8 (N, H, W, 3) images: one-shot resize, normalise."""
    from dpfah.augment import DeviceAugment, resize_uint8

    x = DeviceAugment()(resize_uint8(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), SIZE), train=False)
    return net.codes(x).numpy().astype(np.int8)


def _one_sentence(message: str) -> bool:
    return message.count(". ") == 0 and message.endswith(".") and "\n" not in message and len(message) < 250


# ----------------------------------------------------------------------------- in process


@pytest.mark.parametrize(
    "shape",
    [(2, 40, 40, 3), (1, 16, 16, 3), (1, 16, 40, 3), (3, 40, 16, 3), (1, 5, 7, 3), (1, 301, 203, 3), (1, 1, 1, 3)],
)
def test_the_resize_in_strips_is_bit_for_bit_the_evaluation_resize(shape, monkeypatch):
    """The CPU resize (a strip of rows at a time; here strips of 1 and 7 rows and one strip)
    gives exactly evaluation's codes: torch resizes rows first, so strips change nothing."""
    import dpfah.encoder as encoder_module

    net = _network()
    encoder = encoder_module.ImageEncoder(net, SIZE)
    images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    expected = _evaluation_codes(net, images)
    for values in (3 * shape[2], 7 * 3 * shape[2], 1 << 21):
        monkeypatch.setattr(encoder_module, "_STRIP_VALUES", values)
        np.testing.assert_array_equal(encoder(torch.from_numpy(images)).numpy(), expected)
    np.testing.assert_array_equal(encoder(images.astype(np.int64)).numpy(), expected)  # what JSON integers parse to


def test_an_encoder_pickled_before_the_limits_existed_loads_with_the_defaults():
    from dpfah.encoder import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, MAX_REQUEST_PIXELS, ImageEncoder

    encoder = ImageEncoder(_network(), SIZE)
    for name in ("max_image_pixels", "max_image_side", "max_request_pixels", "refusal_base", "refusal_kwargs"):
        del encoder.__dict__[name]  # the state an encoder of the earlier class pickled
    loaded = pickle.loads(pickle.dumps(encoder))
    assert loaded.limits == {
        "max_image_pixels": MAX_IMAGE_PIXELS,
        "max_image_side": MAX_IMAGE_SIDE,
        "max_request_pixels": MAX_REQUEST_PIXELS,
    }
    assert MAX_IMAGE_PIXELS == MAX_REQUEST_PIXELS == 2048 * 2048 and MAX_IMAGE_SIDE == 8192
    assert loaded(np.zeros((1, 20, 20, 3), np.uint8)).shape == (1, BITS)
    with pytest.raises(ValueError, match="no images"):
        loaded(np.zeros((0, 4, 4, 3), np.uint8))


def test_a_refusal_is_also_the_given_base_and_keeps_its_sentence():
    """What train logs: MLflow's exception with INVALID_PARAMETER_VALUE (a 400), whose message
    the scoring server cannot rewrite into "Failed to predict data '<the input>'"."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from dpfah.encoder import ImageEncoder

    encoder = ImageEncoder(
        _network(), SIZE, refusal_base=MlflowException, refusal_kwargs={"error_code": INVALID_PARAMETER_VALUE}
    )
    with pytest.raises(MlflowException) as refused:
        pickle.loads(pickle.dumps(encoder))(np.zeros((2, 3), np.uint8))
    assert isinstance(refused.value, ValueError) and refused.value.get_http_status_code() == 400
    sentence = refused.value.message
    refused.value.message = f"Failed to predict data '{np.zeros((2, 3))}'. \nError: {sentence}"  # what the server does
    assert json.loads(refused.value.serialize_as_json())["message"] == sentence


@pytest.mark.parametrize(
    "images, words",
    [
        (np.zeros((0,)), "no images"),
        (np.zeros((0, 4, 4, 3), np.uint8), "no images"),
        ([], "no images"),
        ([np.zeros((8, 8, 3), int).tolist(), np.zeros((4, 6, 3), int).tolist()], "must share H and W"),
        ([[[[0, 0, "a"]]]], "Got text values"),
        ([[[[0, 0, None]]]], "Got non-numeric (null, object or over 64-bit) values"),
        (np.zeros((4, 5), np.int64), "shape (4, 5)"),
        (np.zeros((4, 5, 3), np.uint8), "shape (4, 5, 3)"),
        (np.full((1, 4, 4, 3), 0.5, np.float32), "float32"),
        (np.full((1, 4, 4, 3), 256, np.int64), "from 256 to 256"),
        (np.zeros((1, 8193, 2, 3), np.uint8), "8192 a side"),
        (np.zeros((1, 33, 32, 3), np.uint8), "limit of 1024 pixels"),
        (np.zeros((4, 32, 32, 3), np.uint8), "3072 pixels per request"),
    ],
)
def test_refusals_in_process_are_one_sentence_value_errors(images, words):
    from dpfah.encoder import ImageEncoder

    encoder = ImageEncoder(_network(), SIZE, **LIMITS)
    with pytest.raises(ValueError) as refused:
        encoder(images)
    message = str(refused.value)
    assert words in message and _one_sentence(message), message
    assert "(N, H, W, 3)" in message or "limit" in message or "one per request" in message, message


# ----------------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The model logged as train logs it, in a local store, served by `mlflow models serve
    --env-manager local` from its downloaded directory; yields (url, server process, codes of
    the good images computed here from the network)."""
    import mlflow

    from pipeline.model_logging import log_model_artifact
    from pipeline.tracking import open_experiment, using_tracking_uri
    from tests.helpers import free_port, wait_answering

    work = tmp_path_factory.mktemp("serving")
    net = _network()
    store = f"sqlite:///{work / 'mlflow.db'}"
    with using_tracking_uri(store):
        open_experiment("serving", store)  # artifacts beside the store, not in ./mlruns
        with mlflow.start_run():
            uri = log_model_artifact(net, SIZE, "dpfah-serving-test", **LIMITS)
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(work / "model"))
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # the venv's mlflow, and its python for the server
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", local, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        assert wait_answering(f"http://127.0.0.1:{port}/ping", proc, 180), (work / "serve.log").read_text()[-3000:]
        yield {"url": f"http://127.0.0.1:{port}/invocations", "proc": proc, "net": net, "log": work / "serve.log"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def _post(served, body) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(served["url"], data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _refused(served, images) -> str:
    status, answer = _post(served, {"inputs": images})
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", (status, answer)
    assert set(answer) <= {"error_code", "message", "sqlstate", "error_class"}, answer  # no stack trace, no input
    assert _one_sentence(answer["message"]), answer["message"]
    return answer["message"]


def test_served_floats_in_0_1_are_a_400_that_asks_for_integers(served):
    """Was: 200 with the code of an all-black image (MLflow cast them to the signature's uint8)."""
    images = np.random.default_rng(3).random((1, 8, 8, 3)).tolist()
    message = _refused(served, images)
    assert "float64 values" in message and "integers 0..255" in message and "multiplied by 255" in message


def test_served_images_over_the_limits_are_a_400_that_names_the_limit(served):
    too_big = np.zeros((1, 40, 40, 3), np.uint8).tolist()
    assert "limit of 1024 pixels and 8192 a side per image" in _refused(served, too_big)
    too_many = np.zeros((4, 32, 32, 3), np.uint8).tolist()
    assert "limit of 3072 pixels per request" in _refused(served, too_many)


def test_served_arrays_not_of_images_are_a_400_without_the_array(served):
    """Was: MLflow's shape error after "Failed to predict data '<the whole array>'"."""
    flat = np.random.default_rng(4).integers(100, 256, (20, 24)).tolist()
    message = _refused(served, flat)
    assert "shape (20, 24)" in message and "(N, H, W, 3)" in message
    assert f"{flat[0][0]} {flat[0][1]}" not in message and f"{flat[0][0]}, {flat[0][1]}" not in message
    assert "values from 0 to 300" in _refused(served, [[[[0, 0, 300]]]])


def test_served_empty_request_is_a_400_in_one_sentence(served):
    """Was MLflow's "tensor-based model signature with no input names" (its parse of an empty
    list); the model gets the empty list and says so."""
    message = _refused(served, [])
    assert message == (
        "The request holds no images: expected RGB images as an array (N, H, W, 3) of integers 0..255 (uint8), "
        "with N >= 1."
    ), message


def test_served_images_of_different_sizes_are_a_400_that_says_to_send_them_one_per_request(served):
    """Was numpy's "inhomogeneous shape" from MLflow's JSON parse, before the model ran: the
    signature now has MLflow hand the request's lists to the model as they are."""
    ragged = [np.zeros((8, 8, 3), np.uint8).tolist(), np.zeros((4, 6, 3), np.uint8).tolist()]
    message = _refused(served, ragged)
    assert message == (
        "Got images of different sizes (nested lists of unequal lengths): images in one request must share "
        "H and W, or be sent one per request."
    ), message
    assert "Got text values" in _refused(served, [[[[0, 0, "red"]]]])


def test_served_two_dimensional_array_names_its_shape_and_what_was_expected(served):
    flat = np.random.default_rng(5).integers(0, 256, (4, 6)).tolist()
    message = _refused(served, flat)
    assert message == (
        "Got an array of shape (4, 6): expected RGB images as an array (N, H, W, 3) of integers 0..255 (uint8) "
        "(send a single image as a list of one image)."
    ), message


def test_the_server_still_answers_good_requests_with_the_networks_codes(served):
    """Last in the module: after every refusal above, the same server answers."""
    images = np.random.default_rng(2).integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    status, answer = _post(served, {"inputs": images.tolist()})
    assert status == 200 and list(answer) == ["predictions"], answer
    served_codes = np.asarray(answer["predictions"])
    np.testing.assert_array_equal(served_codes, _evaluation_codes(served["net"], images))
    assert served["proc"].poll() is None
