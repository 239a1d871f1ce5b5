"""MLflow access shared by the evaluate and promote stages: the store, run records, the registry.

Everything here turns MLflow's failures into :class:`PipelineError` subclasses with one-line
messages that name the run, file or URI, so a stage exits 2 with a clear error instead of a
traceback (or, for an unreachable server, minutes of HTTP retries).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import Params
from .errors import PipelineError
from .train import RUNS_DIR, resolve_uri

__all__ = [
    "RunRecordError",
    "RunNotFound",
    "RegistryError",
    "RegistryUnreachable",
    "MismatchError",
    "tracking_uri",
    "connect",
    "using_tracking_uri",
    "mlflow_errors",
    "read_run_record",
    "get_run",
    "check_training_run",
    "run_model_uri",
    "write_json_atomic",
]


class RunRecordError(PipelineError):
    """runs/<dataset>-<bits>.json is missing, malformed, or describes another dataset or length."""


class RunNotFound(PipelineError):
    """The run id is not in the MLflow tracking store."""


class RegistryError(PipelineError):
    """An MLflow tracking or registry call failed."""


class RegistryUnreachable(RegistryError):
    """The MLflow tracking server (or its SQLite file) cannot be reached."""


class MismatchError(PipelineError):
    """A model, its run and the data or metrics it is used with do not belong together."""


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI when set, else ``mlflow.tracking_uri``; SQLite paths made absolute."""
    return resolve_uri(os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri)


def _check_reachable(uri: str, timeout_s: float) -> None:
    if uri.startswith("sqlite:"):
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else None
        if path and not os.path.isfile(path):
            raise RegistryUnreachable(
                f"MLflow store {uri}: no such file (train first, or point mlflow.tracking_uri / MLFLOW_TRACKING_URI at the store that holds the runs)"
            )
        return
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        # One quick probe: MLflow's own client would retry a refused connection with
        # backoff for minutes before failing.
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            pass  # an HTTP answer, even an error, means the server is up
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RegistryUnreachable(
                f"MLflow tracking server {uri} cannot be reached ({reason}); start it, or set mlflow.tracking_uri / MLFLOW_TRACKING_URI"
            ) from None


def connect(uri: str, *, timeout_s: float = 10.0):
    """An ``MlflowClient`` for ``uri`` after a quick reachability check."""
    from mlflow.tracking import MlflowClient

    _check_reachable(uri, timeout_s)
    registry = os.environ.get("MLFLOW_REGISTRY_URI")
    if registry and registry != uri:
        _check_reachable(resolve_uri(registry), timeout_s)
    return MlflowClient(uri)


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Make ``uri`` MLflow's process-wide tracking URI inside the block (``load_model`` and
    ``register_model`` take no client), then put back the old one *and* the environment:
    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI, which would otherwise
    outrank ``mlflow.tracking_uri`` for every later stage call in the same process."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


@contextlib.contextmanager
def mlflow_errors(what: str, uri: str) -> Iterator[None]:
    """Turn MLflow, HTTP and database failures inside the block into one-line RegistryErrors."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except PipelineError:
        raise
    except MlflowException as e:
        message = str(e.message if hasattr(e, "message") else e).splitlines()[0]
        raise RegistryError(f"{what} at {uri}: {message}") from None
    except Exception as e:  # requests / sqlalchemy errors surface as their own types
        module = type(e).__module__.split(".")[0]
        if module in ("requests", "urllib3", "sqlalchemy", "sqlite3"):
            raise RegistryUnreachable(f"{what} at {uri}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        raise


def read_run_record(dataset: str, bits: int, root: str | os.PathLike = ".") -> tuple[dict[str, Any], Path]:
    """The training run record ``runs/<dataset>-<bits>.json``, checked to describe that
    dataset and code length."""
    path = Path(root) / RUNS_DIR / f"{dataset}-{bits}.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunRecordError(
            f"{path}: no run record (train first: python -m pipeline.train --dataset {dataset} --bits {bits}; or give --run-id)"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise RunRecordError(f"{path}: unreadable run record ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict):
        raise RunRecordError(f"{path}: expected a JSON object")
    run_id = record.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise RunRecordError(f"{path}: no run_id")
    if record.get("dataset") != dataset or record.get("bits") != bits:
        raise RunRecordError(
            f"{path}: records dataset {record.get('dataset')!r} at {record.get('bits')!r} bits, not {dataset!r} at {bits} bits"
        )
    return record, path


def get_run(client, run_id: str, uri: str, source: str = ""):
    """The MLflow run, or :class:`RunNotFound` naming the id, where it came from and the store."""
    from mlflow.exceptions import MlflowException

    with mlflow_errors(f"reading run {run_id}", uri):
        try:
            return client.get_run(run_id)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                where = f" (from {source})" if source else ""
                raise RunNotFound(f"MLflow run {run_id}{where} not found in {uri}") from None
            raise


def check_training_run(run, dataset: str, bits: int, source: str) -> None:
    """The run finished and trained this dataset at this code length (its logged params)."""
    run_id = run.info.run_id
    params = run.data.params
    if run.info.status != "FINISHED":
        raise MismatchError(f"MLflow run {run_id} (from {source}) is {run.info.status}, not FINISHED: its training did not complete")
    trained = (params.get("dataset"), params.get("bits"))
    if trained[0] is None or trained[1] is None:
        raise MismatchError(f"MLflow run {run_id} (from {source}) has no dataset/bits params: not a pipeline.train run")
    if trained != (dataset, str(bits)):
        raise MismatchError(
            f"MLflow run {run_id} (from {source}) trained {trained[0]!r} at {trained[1]} bits, not {dataset!r} at {bits} bits"
        )


def run_model_uri(client, run, uri: str, record_uri: str | None = None) -> str:
    """The URI of the model logged by ``run``: the record's, checked to come from this run,
    else the run's logged model named ``model``."""
    run_id = run.info.run_id
    with mlflow_errors(f"reading the model of run {run_id}", uri):
        if record_uri:
            if record_uri.startswith("models:/m-"):
                model = client.get_logged_model(record_uri[len("models:/") :])
                if model.source_run_id != run_id:
                    raise MismatchError(f"model {record_uri} was logged by run {model.source_run_id}, not by run {run_id}")
            return record_uri
        outputs = getattr(run, "outputs", None)
        candidates = [o.model_id for o in (outputs.model_outputs if outputs else [])]
        for model_id in candidates:
            if client.get_logged_model(model_id).name == "model":
                return f"models:/{model_id}"
    raise MismatchError(f"MLflow run {run_id} has no logged model (did its training finish?)")


def write_json_atomic(path: str | os.PathLike, doc: Any) -> Path:
    """Write ``doc`` as JSON to a temporary name beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
