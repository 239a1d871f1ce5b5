"""The run's model, logged: a trained network as an MLflow pyfunc model whose weights are
plain tensors and whose code is a file (:mod:`pipeline.served_model`), so that loading it
never unpickles anything. The loader is :mod:`pipeline.model_files`; see docs/serving.md."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PipelineError

__all__ = [
    "StoreFull",
    "EXAMPLE_SIZE",
    "MODEL_PACKAGES",
    "log_model_artifact",
    "log_trained_model",
    "model_requirements",
    "requirements_known",
]

#: Side of the images in the logged model's input example (any size is accepted: the model resizes).
EXAMPLE_SIZE = 32


def log_trained_model(job, state: dict[str, Any], name: str, image_size: int, step: int) -> str:
    """The best-validation weights of a training's ``state`` (the last epoch's without
    validation) as the run's model ``name``."""
    from dpfah.model import DPFAH

    net = DPFAH.build(job.bits, job.num_classes, dataclasses.replace(job.model, backbone_weights=None))
    net.load_state_dict(state.get("best_model") or state["model"])
    return log_model_artifact(net, image_size, name, step=step)


def log_model_artifact(net, image_size: int, name: str, *, step: int = 0, **limits: int) -> str:
    """Log the trained network ``net`` to the active MLflow run as the model ``name`` (the
    registry name): :class:`dpfah.encoder.ImageEncoder`'s two files (``weights.pt``, a state
    dict of tensors; ``settings.json``) as artifacts, :mod:`pipeline.served_model` as its code
    and the ``dpfah`` package beside it (``code/dpfah``: it loads where the project is not
    installed), an output signature and an input example. ``limits``: the encoder's
    (``max_image_pixels``, ``max_image_side``, ``max_request_pixels``), also logged as tags.
    No input schema, on purpose (docs/serving.md). Returns its URI (``models:/m-...``)."""
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    import dpfah
    from dpfah.encoder import SETTINGS_FILE, WEIGHTS_FILE, ImageEncoder

    from . import served_model

    model = ImageEncoder(net, image_size, **limits).eval()
    signature = ModelSignature(outputs=Schema([TensorSpec(np.dtype(np.int8), (-1, model.bits))]))
    # MLflow's scoring server then hands the request's "inputs" to the model as JSON gave them,
    # as for a model typed by its predict's hints: its own parse (np.array of the lists) would
    # refuse images of different sizes in numpy's words before the model could name the problem
    # (docs/serving.md). The flag is MLflow 3's (mlflow.models.signature), read by its server.
    signature._is_signature_from_type_hint = True
    example = np.random.default_rng(0).integers(0, 256, (2, EXAMPLE_SIZE, EXAMPLE_SIZE, 3), dtype=np.uint8)
    tags = {
        "bits": str(model.bits),
        "image_size": str(image_size),
        "input": "RGB images (N, H, W, 3) of integers 0..255 (uint8), any H, W within the max_* limits",
        "output": f"int8 codes (N, {model.bits}) in {{-1, +1}}",
        "weights": f"{WEIGHTS_FILE}: a state dict of tensors (torch.load weights_only=True), no pickled code",
        **{key: str(value) for key, value in model.limits.items()},
    }
    with tempfile.TemporaryDirectory(prefix="dpfah-model-") as tmp:
        weights, settings = model.save(os.path.join(tmp, "files"))
        # the package's Python sources only (no caches, no C sources of the optional kernels)
        package = shutil.copytree(
            os.path.dirname(dpfah.__file__),
            os.path.join(tmp, "dpfah"),
            ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.h", "*.so"),
        )
        needed = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        try:
            with requirements_known(), _store_errors_unlogged():
                info = mlflow.pyfunc.log_model(
                    name=name,
                    python_model=served_model.__file__,
                    artifacts={WEIGHTS_FILE: weights, SETTINGS_FILE: settings},
                    pip_requirements=model_requirements(),
                    code_paths=[package],
                    signature=signature,
                    input_example=example,
                    step=step,
                    tags=tags,
                )
        except Exception as e:
            full = _no_space(e)
            where = _discard_partial_model(name)
            if full is None:
                raise
            while full.startswith("/") and not os.path.exists(full):  # the partial model's files are gone
                full = os.path.dirname(full)
            raise StoreFull(
                f"{full}: no space left on device while logging the model {name} to MLflow (it needs about "
                f"{needed / 1e6:.1f} MB{' at ' + where if where and where not in full else ''}); the partial model "
                "was removed; free space there and train again"
            ) from None
    return info.model_uri


@contextlib.contextmanager
def _store_errors_unlogged() -> Iterator[None]:
    """MLflow's SQL store logs every database error with its traceback (ERROR) before it
    raises it; a failed log_model is reported here in one line instead (unless --verbose)."""
    from .console import verbose

    logger = logging.getLogger("mlflow.store.db.utils")
    before = logger.level
    if not verbose():
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)


class StoreFull(PipelineError):
    """The MLflow store (its artifacts or its database) ran out of space while logging."""


def _no_space(error: BaseException) -> str | None:
    """The path a disk-full error in ``error``'s chain names (the file MLflow was writing),
    "the MLflow database" when only the database says it is full; else None."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return str(getattr(e, "filename2", None) or e.filename or "the MLflow store")
    return "the MLflow database" if any("database or disk is full" in str(e) for e in chain) else None


def _discard_partial_model(name: str) -> str | None:
    """After a failed log_model: delete the files of the active run's logged model ``name``
    that MLflow left PENDING, then the logged model itself, so that no partial model stays
    listed (deleting the files first frees the space the store needs to record it). Returns
    where its files were; best effort, one store call each."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    run = mlflow.active_run()
    if run is None:
        return None
    client = mlflow.tracking.MlflowClient()
    location = None
    with contextlib.suppress(Exception):
        models = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'"
        )
        for model in models:
            location = model.artifact_location
            if location.startswith("file://"):  # .../models/<model_id>/artifacts: the model's own folder
                folder = Path(location.removeprefix("file://"))
                shutil.rmtree(folder.parent if folder.parent.name == model.model_id else folder, ignore_errors=True)
            else:
                with contextlib.suppress(Exception):
                    get_artifact_repository(location).delete_artifacts()
            client.delete_logged_model(model.model_id)
    return location.removeprefix("file://") if location else None


def model_requirements() -> list[str]:
    """What loading a logged model needs, pinned to what trained it.

    Given explicitly: MLflow's inference loads the model in a subprocess, 9-12 s a training.
    The pickle also needs ``dpfah`` itself importable (this repository, or the cluster image).
    """
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in MODEL_PACKAGES]


#: The packages a logged model needs besides ``dpfah`` (each imports under its own name).
MODEL_PACKAGES = ("torch", "torchvision", "numpy")


@contextlib.contextmanager
def requirements_known() -> Iterator[None]:
    """Inside the block, MLflow checks a model's pip requirements against what is installed
    without first mapping every module of every installed distribution to its package
    (``importlib.metadata.packages_distributions()``: reading the file lists of all ~200
    distributions, 3 s of ``log_model`` on 2 cores). That map only serves to find the module
    of a package whose metadata is missing; our requirements are :data:`MODEL_PACKAGES`,
    whose modules have their names, so MLflow gets exactly that much of it; its check of the
    versions (``importlib.metadata.version``) is unchanged. MLflow's map is private: where it
    is already built, or no longer there, nothing is changed. Put back as it was after."""
    try:
        from mlflow.utils import requirements_utils as reqs
    except ImportError:
        yield
        return
    if getattr(reqs, "_MODULES_TO_PACKAGES", False) is not None:
        yield
        return
    seeded = {name: [name] for name in MODEL_PACKAGES}
    reqs._MODULES_TO_PACKAGES = seeded
    try:
        yield
    finally:
        if reqs._MODULES_TO_PACKAGES is seeded:
            reqs._MODULES_TO_PACKAGES = None
            reqs._PACKAGES_TO_MODULES = None
