"""MLflow, in one place: which store, runs opened and closed, the commit, a run looked up.

Every stage reaches MLflow through here. Failures become :class:`PipelineError` subclasses
with one-line messages that name the run or URI, so a stage exits 2 with a clear error
instead of a traceback (or, for an unreachable server, minutes of HTTP retries).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from .errors import PipelineError

__all__ = [
    "RegistryError",
    "RegistryUnreachable",
    "RunNotFound",
    "resolve_uri",
    "tracking_uri",
    "connect",
    "using_tracking_uri",
    "mlflow_errors",
    "tracked_run",
    "get_run",
    "git_commit",
    "model_requirements",
]


class RegistryError(PipelineError):
    """An MLflow tracking or registry call failed."""


class RegistryUnreachable(RegistryError):
    """The MLflow tracking server (or its SQLite file) cannot be reached."""


class RunNotFound(PipelineError):
    """The run id is not in the MLflow tracking store."""


def resolve_uri(uri: str) -> str:
    """Local paths and ``sqlite:///`` paths made absolute: Ray workers run in another directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    if "://" not in uri:
        return os.path.abspath(uri)
    return uri


def tracking_uri(params) -> str:
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
    """Make ``uri`` MLflow's process-wide tracking URI inside the block (``load_model``,
    ``register_model`` and the fluent run API take no client), then put back the old one
    *and* the environment: ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI,
    which would otherwise outrank ``mlflow.tracking_uri`` for every later stage call in
    the same process."""
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


@contextlib.contextmanager
def tracked_run(uri: str, experiment: str, run_name: str, *, parent_run_id: str | None = None) -> Iterator[Any]:
    """Open an MLflow run (the fluent API's active run) in ``experiment`` and close it:
    FINISHED when the block completes, KILLED on Ctrl-C, FAILED otherwise.

    The store is created here, in the driver, before any worker or trial touches it
    (several processes creating a fresh SQLite store at once race). Yields the run; its
    experiment is ``run.info.experiment_id``."""
    import mlflow

    with using_tracking_uri(uri):
        exp = mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id, experiment_id=exp.experiment_id)
        try:
            yield run
        except BaseException:
            interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
            mlflow.end_run(_failed_status(run.info.run_id, "KILLED" if interrupted else "FAILED"))
            raise
        mlflow.end_run("FINISHED")


def _failed_status(run_id: str, status: str) -> str:
    """The status to end a failed run with: ``status``, unless something else has already
    ended it (a Tune search marks the runs of the trials it stopped KILLED, and a stopped
    trial's own exception may arrive after that): then the status it was given stands."""
    import mlflow

    try:
        current = mlflow.get_run(run_id).info.status
    except Exception:  # the store is what failed: say what we know
        return status
    return status if current == "RUNNING" else current


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


def git_commit() -> str:
    """The commit being run; ``ray job submit`` ships no .git, so DPFAH_GIT_COMMIT wins."""
    env = os.environ.get("DPFAH_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_requirements() -> list[str]:
    """What loading a logged model needs, pinned to what trained it.

    Given explicitly: MLflow's inference loads the model in a subprocess, 9-12 s a training.
    The pickle also needs ``dpfah`` itself importable (this repository, or the cluster image).
    """
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "torchvision", "numpy")]
