"""MLflow, in one place: which store, runs opened and closed, the commit, a run looked up.

Every stage reaches MLflow through here. Failures become :class:`PipelineError` subclasses
with one-line messages that name the run or URI, so a stage exits 2 with a clear error
instead of a traceback (or, for an unreachable server, minutes of HTTP retries).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PipelineError

__all__ = [
    "RegistryError",
    "RegistryUnreachable",
    "RunNotFound",
    "resolve_uri",
    "tracking_uri",
    "check_store",
    "sqlite_path",
    "connect",
    "using_tracking_uri",
    "mlflow_errors",
    "tracked_run",
    "get_run",
    "git_commit",
    "dataset_name",
    "training_metric",
    "dataset_digest",
    "log_dataset",
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


#: Seconds the reachability probe of a tracking server waits (connect, then the answer).
PROBE_TIMEOUT_S = 5.0


def check_store(uri: str, *, create: bool = False, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, with one line naming ``uri`` and the cause, when the tracking store cannot
    be used: a server that does not answer (one request with a short timeout, never MLflow's
    client, which retries a refused connection with backoff for about four minutes), a SQLite
    file that is missing (unless ``create``: train and tune create the store), not a
    database, read-only, or cannot be created. Imports no MLflow: a stage calls it first."""
    if uri.startswith("sqlite:"):
        _check_sqlite(uri, create)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri, timeout_s)
    registry = os.environ.get("MLFLOW_REGISTRY_URI")
    if registry and resolve_uri(registry) != uri:
        check_store(resolve_uri(registry), create=create, timeout_s=timeout_s)


def sqlite_path(uri: str) -> str | None:
    """The file of a ``sqlite:///path`` URI (query string dropped); None for in-memory."""
    path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    path = path.split("?", 1)[0]
    return path if path and path != ":memory:" else None


def _check_sqlite(uri: str, create: bool) -> None:
    import sqlite3
    import tempfile

    path = sqlite_path(uri)
    if path is None:
        return
    if not os.path.exists(path):
        if not create:
            raise RegistryUnreachable(
                f"MLflow store {uri}: no such file (train first, or point mlflow.tracking_uri / MLFLOW_TRACKING_URI "
                "at the store that holds the runs)"
            )
        # MLflow creates the missing directories and the file: the deepest existing ancestor
        # must be a directory we can create files in (probed with a file, not os.access:
        # root passes os.access, a read-only mount does not).
        ancestor = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        try:
            if not os.path.isdir(ancestor):
                raise NotADirectoryError(f"{ancestor} is a file, not a directory")
            with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".dpfah-store-probe-"):
                pass
        except OSError as e:
            raise RegistryUnreachable(f"MLflow store {uri} cannot be created: {_os_cause(e)}") from None
        return
    if os.path.isdir(path):
        raise RegistryUnreachable(f"MLflow store {uri}: {path} is a directory, not a SQLite file")
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=10)
    except sqlite3.Error as e:
        raise RegistryUnreachable(f"MLflow store {uri} cannot be opened for writing: {e}") from None
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the header and schema
        try:  # a write lock, released at once: a read-only file or directory fails here
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):  # another writer: in use, so usable
                raise
    except sqlite3.DatabaseError as e:
        cause = str(e)
        if "not a database" in cause or "malformed" in cause:
            cause += " (corrupt, or not an MLflow SQLite store)"
        raise RegistryUnreachable(f"MLflow store {uri} cannot be used: {cause}") from None
    finally:
        con.close()


def _os_cause(e: OSError) -> str:
    """``Permission denied: /path`` rather than ``[Errno 13] Permission denied: '/path'``."""
    return f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)


def _check_server(uri: str, timeout_s: float) -> None:
    """One GET of a cheap tracking API call (it reaches the server's backend store, which
    /health does not), no retries. An answer of 401/403 counts as up (MLflow's client has the
    credentials and says so itself); 404 means no MLflow API at this URL; 5xx, a refused or
    timed-out connection mean the server cannot be used now."""
    import base64
    import ssl
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    token, user = os.environ.get("MLFLOW_TRACKING_TOKEN"), os.environ.get("MLFLOW_TRACKING_USERNAME")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    elif user:
        basic = base64.b64encode(f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    context = None
    if uri.startswith("https://"):
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl._create_unverified_context()
        else:
            context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    hint = "start it, or set mlflow.tracking_uri / MLFLOW_TRACKING_URI"
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return
        if e.code == 404:
            raise RegistryUnreachable(
                f"MLflow tracking server {uri}: no MLflow tracking API there (HTTP 404 for {url}); check the URL"
            ) from None
        raise RegistryUnreachable(
            f"MLflow tracking server {uri} cannot be used (HTTP {e.code} {e.reason}); {hint}"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            reason = f"no answer within {timeout_s:g} s"
        raise RegistryUnreachable(f"MLflow tracking server {uri} cannot be reached ({reason}); {hint}") from None


def connect(uri: str, *, create: bool = False, timeout_s: float = PROBE_TIMEOUT_S):
    """An ``MlflowClient`` for ``uri`` after :func:`check_store`."""
    check_store(uri, create=create, timeout_s=timeout_s)
    from mlflow.tracking import MlflowClient

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
            raise RegistryUnreachable(
                f"{what} at {uri}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        raise


#: The experiment tag the MLflow 3 UI reads to choose its view: "custom_model_development"
#: opens the experiment on its training runs table; without it a fresh browser may open the
#: GenAI view (traces, sessions).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of the store at ``uri`` keeps its artifacts: for a SQLite store,
    ``mlruns/`` beside the database file (MLflow's own default is ``./mlruns`` of whatever
    directory the process runs in, so one store would scatter its artifacts over every
    working directory it was used from); None (the server's choice) for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    return (database.expanduser().resolve().parent / "mlruns").as_uri()


def open_experiment(name: str, uri: str):
    """The experiment ``name`` of the active store (``uri``), created where
    :func:`artifact_root` says when it does not exist yet, and made the active one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(name)
    root = artifact_root(uri)
    if experiment is None and root is not None:
        folder = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        try:
            mlflow.create_experiment(name, artifact_location=f"{root}/{folder}")
        except MlflowException as e:  # another process created it meanwhile
            if mlflow.get_experiment_by_name(name) is None:
                raise e
    return mlflow.set_experiment(name)


@contextlib.contextmanager
def tracked_run(
    uri: str, experiment: str, run_name: str, *, parent_run_id: str | None = None, reopen: bool = False
) -> Iterator[Any]:
    """Open an MLflow run (the fluent API's active run) in ``experiment`` and close it:
    FINISHED when the block completes, KILLED on Ctrl-C, FAILED otherwise.

    ``reopen`` (with ``parent_run_id``): a run of the same name under that parent is this
    run again (a Tune trial retried after a failure): it is reopened, not duplicated, so
    the trial's epochs before and after the failure are one run.

    The store is checked first (:func:`check_store`: seconds, one line, before any work
    such as starting Ray) and created here, in the driver, before any worker or trial
    touches it (several processes creating a fresh SQLite store at once race). Yields the
    run; its experiment is ``run.info.experiment_id``."""
    check_store(uri, create=True)
    import mlflow

    from .console import quiet_libraries

    quiet_libraries()  # every stage that opens a run (report, tune too): MLflow's INFO lines and links off
    with using_tracking_uri(uri):
        with mlflow_errors(f"opening a run in experiment {experiment}", uri):
            exp = open_experiment(experiment, uri)
            if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                mlflow.set_experiment_tag(
                    EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                )  # opens as training runs, not GenAI traces
            earlier = _same_child(exp.experiment_id, parent_run_id, run_name) if reopen and parent_run_id else None
            if earlier is not None:
                run = mlflow.start_run(run_id=earlier, experiment_id=exp.experiment_id)
            else:
                run = mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id, experiment_id=exp.experiment_id)
        try:
            yield run
        except BaseException:
            interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
            status = _failed_status(run.info.run_id, "KILLED" if interrupted else "FAILED")
            try:
                mlflow.end_run(status)
            except Exception as e:  # the store itself failed (full, gone): say so, keep the first error
                cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
                print(f"warning: MLflow run {run.info.run_id} could not be marked {status}: {cause}", file=sys.stderr)
            raise
        mlflow.end_run("FINISHED")


def _same_child(experiment_id: str, parent_run_id: str, run_name: str) -> str | None:
    """The id of the earliest run named ``run_name`` nested under ``parent_run_id``, if any."""
    import mlflow

    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


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
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


#: The names of the training's metrics in MLflow, grouped by prefix (the runs table and the
#: charts sort and group them: ``train/...``, ``validation/...``; evaluation's are ``query_*``).
#: The keys are what ``dpfah.train.fit`` reports (and Ray Tune sees).
TRAINING_METRICS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "images_per_s": "train/images_per_s",
    "epoch_s": "train/epoch_s",
    "epochs_run": "train/epochs_run",
    "val_map": "validation/map",
    "best_val_map": "validation/best_map",
    "best_epoch": "validation/best_epoch",
}


def training_metric(key: str) -> str:
    """The MLflow name of a metric ``fit`` reports: ``loss_l1`` -> ``train/loss_l1``, ``val_map``
    -> ``validation/map`` (:data:`TRAINING_METRICS`); others under ``train/``."""
    return TRAINING_METRICS.get(key, key if "/" in key else f"train/{key}")


def dataset_name(dataset: str, protocol: str) -> str:
    """The name of a prepared split in MLflow (the runs table's Dataset column)."""
    return f"{dataset} ({protocol})"


def dataset_digest(manifest_sha256: str) -> str:
    """MLflow's digest of a prepared split: the manifest's sha256, cut to the 12 characters the
    pipeline's messages show (MLflow stores at most 36; the run's ``manifest_sha256`` tag
    and the dataset's profile hold all 64)."""
    return manifest_sha256[:12]


def log_dataset(client, run_id: str, dataset: str, manifest, shards: str, context: str = "training") -> None:
    """Register the prepared split ``manifest`` (under ``shards``) as an input of the run:
    name = dataset and protocol, digest = the manifest's sha256, the split sizes as profile."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    sizes = {name: manifest.split(name).count for name in manifest.splits if manifest.splits.get(name) is not None}
    profile = {
        "splits": sizes,
        "num_classes": manifest.num_classes,
        "manifest_sha256": manifest.sha256,
        "split_seed": manifest.seed,
    }
    entity = Dataset(
        name=dataset_name(dataset, manifest.protocol),
        digest=dataset_digest(manifest.sha256),
        source_type="local",
        source=json.dumps({"uri": os.path.abspath(shards)}),
        profile=json.dumps(profile),
    )
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])
