"""Training runs as the later stages find them: the run record, its MLflow run, its model.

Evaluate and promote (and anything that uses a trained model) start from the record that
train writes (``runs/<dataset>-<bits>.json``) or from a run id, and check that the run is a
finished training of that dataset and code length before using its model
(:func:`load_subject`: the run checked against the shards, its model loaded). Index and
search name a model by a ``models:/`` URI instead (:func:`resolve_model`: pinned to its version).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import DEFAULT_METHOD
from .config import MlflowConfig, Params
from .errors import ConfigError, DataError, PipelineError
from .runkey import RecordError, RunKey, read_record
from .tracking import connect, get_run, mlflow_errors, resolve_uri, tracking_uri

__all__ = [
    "EVAL_ID_TAG",
    "EVAL_COMPLETE_TAG",
    "MODEL_NAME_TAG",
    "model_name",
    "RunRecordError",
    "MismatchError",
    "NonFiniteWeights",
    "read_run_record",
    "record_tracking_uri",
    "check_training_run",
    "run_model_uri",
    "load_checked_model",
    "check_finite_weights",
    "Subject",
    "load_subject",
    "ModelNotFound",
    "ResolvedModel",
    "default_model_uri",
    "resolve_model",
    "load_model",
]


#: Tags of an evaluation in the run: ``eval.id`` comes with its metrics, ``eval.complete``
#: (the same id) is written last, when everything else is logged.
EVAL_ID_TAG = "eval.id"
EVAL_COMPLETE_TAG = "eval.complete"


#: Run tag naming the run's logged model (the registry name it is promoted under).
MODEL_NAME_TAG = "model.name"


def model_name(params, dataset: str, bits: int, method: str = DEFAULT_METHOD) -> str:
    """The name of a training's model: its logged model in the run and its registered model
    (``promote.model_name``, default ``<method>-<dataset>-<bits>b``)."""
    name = params.promote.model_name.format(dataset=dataset, bits=bits, method=method)
    if "'" in name or '"' in name:
        raise ConfigError(f"promote.model_name: {name!r} must not contain quotes")
    return name


class RunRecordError(PipelineError):
    """runs/<dataset>-<bits>.json is missing, malformed, or describes another dataset or length."""


class MismatchError(PipelineError):
    """A model, its run and the data or metrics it is used with do not belong together."""


class NonFiniteWeights(PipelineError):
    """A model has NaN or infinite values in a parameter or buffer (its training diverged)."""


def read_run_record(key: RunKey, root: str | os.PathLike = ".") -> tuple[dict[str, Any], Path]:
    """The training run record of ``key``, checked to describe that training."""
    path = key.run_file(root)

    def valid(doc: dict[str, Any]) -> str | None:
        run_id = doc.get("run_id")
        return None if isinstance(run_id, str) and run_id else "no run_id"

    record = read_record(
        path, "run record", missing=f"train first: {key.command('train')}; or give --run-id", error=RunRecordError,
        valid=valid,
    )  # fmt: skip
    try:
        key.check(record, path)
    except RecordError as e:
        raise RunRecordError(str(e)) from None
    return record, path


def record_tracking_uri(record: dict[str, Any] | None, params) -> str:
    """The tracking store of a run record's run. A store given explicitly wins:
    MLFLOW_TRACKING_URI, or ``mlflow.tracking_uri`` set to other than its default (in the
    parameters or by --set). Otherwise the record's own ``tracking_uri``, where train
    logged the run (e.g. a server named by MLFLOW_TRACKING_URI at training time).
    SQLite paths made absolute."""
    recorded = record.get("tracking_uri") if record else None
    explicit = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri != MlflowConfig().tracking_uri
    if explicit or not isinstance(recorded, str) or not recorded:
        return tracking_uri(params)
    return resolve_uri(recorded)


def check_training_run(run, dataset: str, bits: int, source: str) -> None:
    """The run finished and trained this dataset at this code length (its logged params)."""
    run_id = run.info.run_id
    params = run.data.params
    if run.info.status != "FINISHED":
        raise MismatchError(
            f"MLflow run {run_id} (from {source}) is {run.info.status}, not FINISHED: its training did not complete"
        )
    trained = (params.get("dataset"), params.get("bits"))
    if trained[0] is None or trained[1] is None:
        raise MismatchError(f"MLflow run {run_id} (from {source}) has no dataset/bits params: not a pipeline.train run")
    if trained != (dataset, str(bits)):
        raise MismatchError(
            f"MLflow run {run_id} (from {source}) trained {trained[0]!r} at {trained[1]} bits, not {dataset!r} at "
            f"{bits} bits"
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
                    raise MismatchError(
                        f"model {record_uri} was logged by run {model.source_run_id}, not by run {run_id}"
                    )
            return record_uri
        outputs = getattr(run, "outputs", None)
        candidates = [client.get_logged_model(o.model_id) for o in (outputs.model_outputs if outputs else [])]
        # the model named by the run's tag (older runs: "model"); a run logs one
        wanted = run.data.tags.get(MODEL_NAME_TAG, "model")
        for model in sorted(candidates, key=lambda m: m.name != wanted):
            if model.source_run_id == run_id:
                return f"models:/{model.model_id}"
    raise MismatchError(f"MLflow run {run_id} has no logged model (did its training finish?)")


def check_finite_weights(model, run_id: str, model_uri: str) -> None:
    """Every floating-point parameter and buffer of ``model`` is finite, or
    :class:`NonFiniteWeights` naming the run and the first bad tensor (in the order of the
    state dict, then buffers kept out of it)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise MismatchError(f"model {model_uri} of MLflow run {run_id} is a {type(model).__name__}, not a torch module")
    tensors = dict(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers():
        tensors.setdefault(name, buffer)
    for name, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor.detach())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            nan = int(torch.isnan(tensor.detach()).sum())
            kind = "parameter" if isinstance(tensor, torch.nn.Parameter) else "buffer"
            raise NonFiniteWeights(
                f"MLflow run {run_id}: model {model_uri} has non-finite weights: {kind} {name} holds {nan} NaN and "
                f"{bad - nan} infinite of {tensor.numel()} values (the training diverged); retrain it, it is not used"
            )


def load_checked_model(model_uri: str, run_id: str, uri: str, map_location="cpu"):
    """The DPFAH network of the logged model at ``model_uri``, loaded by the one loader
    (:func:`pipeline.model_files.load_encoder`: nothing unpickled), checked to have finite
    weights."""
    from .model_files import load_encoder

    net = load_encoder(model_uri, uri, map_location=map_location).net
    check_finite_weights(net, run_id, model_uri)
    return net


# ---------------------------------------------- a run with its model, for evaluate and the report


def _read_manifest(shards: str):
    from dpfah.data import ShardError, read_manifest

    try:
        return read_manifest(shards)
    except ShardError as e:
        raise DataError(str(e)) from None


@dataclass(frozen=True)
class Subject:
    """A trained run checked against the data, with its model loaded (what evaluate
    encodes with; the report's Grad-CAM figure loads its models the same way)."""

    run_id: str
    record: dict[str, Any] | None
    uri: str
    client: Any
    manifest: Any
    shards: str
    model_uri: str
    model: Any
    image_size: int
    device: Any  # torch.device the splits are encoded on


def load_subject(params: Params, key: RunKey, run_id: str | None, root, device) -> Subject:
    """The run of the record (or ``run_id``), checked to be a finished training of this
    dataset and length on these very shards, with its model loaded on ``device``."""
    dataset, bits = key.dataset, key.bits
    record: dict[str, Any] | None = None
    if run_id is None:
        record, record_path = read_run_record(key, root)
        run_id, source = record["run_id"], str(record_path)
    else:
        source = "--run-id"
    uri = record_tracking_uri(record, params)
    client = connect(uri)
    run = get_run(client, run_id, uri, source)
    check_training_run(run, dataset, bits, source)

    shards = params.shards_dir(dataset)
    manifest = _read_manifest(shards)
    sha = manifest.sha256
    trained_on = run.data.tags.get("manifest_sha256")
    if trained_on != sha:
        raise MismatchError(
            f"the shards at {shards} (manifest sha256 {sha[:12]}, {manifest.dataset}/{manifest.protocol}) are not the "
            "ones "
            f"MLflow run {run_id} was trained on (sha256 {str(trained_on)[:12]}): re-run train, or point data.root at "
            "its data"
        )
    if record is not None and record.get("manifest_sha256") not in (None, sha):
        raise MismatchError(
            f"{source}: manifest_sha256 {str(record['manifest_sha256'])[:12]} does not match the shards at {shards} "
            f"({sha[:12]})"
        )

    model_uri = run_model_uri(client, run, uri, record.get("model_uri") if record else None)
    model = load_checked_model(model_uri, run_id, uri, map_location=device)  # finite weights, or a refusal
    if getattr(model, "bits", None) != bits or getattr(model, "num_classes", None) != manifest.num_classes:
        raise MismatchError(
            f"model {model_uri} has {getattr(model, 'bits', '?')} bits and {getattr(model, 'num_classes', '?')} "
            "classes; "
            f"the {dataset} shards need {bits} bits and {manifest.num_classes} classes"
        )
    model.to(device)
    image_size = int(run.data.params.get("train.image_size", params.train.image_size))
    return Subject(run_id, record, uri, client, manifest, shards, model_uri, model, image_size, device)


# ---------------------------------------------- a models:/ URI resolved to its version, for index and search


class ModelNotFound(PipelineError):
    """The registered model, its alias or its version does not exist."""


@dataclass(frozen=True)
class ResolvedModel:
    given: str  # as asked for (e.g. models:/dpfah-cifar10-64b@champion)
    uri: str  # pinned: models:/<name>/<version>, or the logged model's models:/m-...
    name: str | None
    version: int | None
    run_id: str
    tracking_uri: str
    bits: int
    image_size: int
    dataset: str | None

    def describe(self) -> dict[str, Any]:
        return {
            "given": self.given,
            "uri": self.uri,
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "bits": self.bits,
            "image_size": self.image_size,
            "trained_on": self.dataset,
        }


_ALIAS_URI = re.compile(r"^models:/([^/@]+)@([^/@]+)$")


_VERSION_URI = re.compile(r"^models:/([^/@]+)/(\d+)$")


_LOGGED_URI = re.compile(r"^models:/(m-[0-9a-fA-F]+)$")


def default_model_uri(params: Params, dataset: str, bits: int, method: str = DEFAULT_METHOD) -> str:
    """``models:/<promote.model_name>@<promote.alias>`` for this dataset, length and method."""
    return f"models:/{model_name(params, dataset, bits, method)}@{params.promote.alias}"


def resolve_model(params: Params, given: str, uri: str | None = None) -> ResolvedModel:
    """The model version ``given`` names, with its training run's code length and image size.
    ``uri``: the tracking store (default: MLFLOW_TRACKING_URI or ``mlflow.tracking_uri``)."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri(params)
    client = connect(uri)
    name = version = None
    with mlflow_errors(f"resolving model {given}", uri):
        try:
            if m := _ALIAS_URI.match(given):
                name, alias = m.groups()
                mv = client.get_model_version_by_alias(name, alias)
                version, run_id = int(mv.version), mv.run_id
            elif m := _VERSION_URI.match(given):
                name, version = m.group(1), int(m.group(2))
                run_id = client.get_model_version(name, str(version)).run_id
            elif m := _LOGGED_URI.match(given):
                run_id = client.get_logged_model(m.group(1)).source_run_id
            else:
                raise ConfigError(
                    f"--model {given}: expected models:/<name>@<alias>, models:/<name>/<version> or models:/m-<id>"
                )
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise
            hint = "promote a model first (python -m pipeline.promote --dataset D --bits L) or name one with --model"
            raise ModelNotFound(f"{given}: no such model in {uri} ({str(e.message).splitlines()[0]}); {hint}") from None
    if not run_id:
        raise MismatchError(f"{given}: the model has no training run (registered from outside pipeline.train?)")
    run = get_run(client, run_id, uri, given)
    p = run.data.params
    if "bits" not in p:
        raise MismatchError(f"{given}: MLflow run {run_id} has no bits param: not a pipeline.train run")
    pinned = f"models:/{name}/{version}" if name is not None else given
    image_size = int(p.get("train.image_size", params.train.image_size))
    return ResolvedModel(given, pinned, name, version, run_id, uri, int(p["bits"]), image_size, p.get("dataset"))


def load_model(resolved: ResolvedModel, device="cpu"):
    """The model of ``resolved``, checked (finite weights, its code length)."""
    model = load_checked_model(resolved.uri, resolved.run_id, resolved.tracking_uri, map_location=device)
    if getattr(model, "bits", None) != resolved.bits:
        raise MismatchError(
            f"model {resolved.uri} gives {getattr(model, 'bits', '?')}-bit codes; its run trained {resolved.bits} bits"
        )
    return model.eval()
