"""The one loader of a logged model: its two files fetched from the artifact store and the
encoder rebuilt by ``dpfah`` (:meth:`dpfah.encoder.ImageEncoder.load`: weights read as
tensors, never unpickled). Evaluate, promote, index, search and the report load through it;
the model's own code (``code/``, ``served_model.py``) is never run here. See docs/serving.md."""

from __future__ import annotations

import os
import tempfile

from .errors import PipelineError
from .tracking import mlflow_errors, using_tracking_uri

__all__ = ["ModelRefused", "load_encoder"]


class ModelRefused(PipelineError):
    """A logged model whose files are missing or not this pipeline's format (a pickle, say)."""


def load_encoder(model_uri: str, uri: str, map_location="cpu"):
    """The :class:`dpfah.encoder.ImageEncoder` logged at ``model_uri`` (``models:/...`` or
    ``runs:/...``) in the store ``uri``, or :class:`ModelRefused` in one line naming the
    model and the file."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    from dpfah.encoder import SETTINGS_FILE, WEIGHTS_FILE, ImageEncoder, ModelFileError

    from .console import quiet_libraries

    quiet_libraries()  # no progress bar per file
    with mlflow_errors(f"loading model {model_uri}", uri), using_tracking_uri(uri):
        location = (
            ModelsArtifactRepository.get_underlying_uri(model_uri) if model_uri.startswith("models:/") else model_uri
        )
        with tempfile.TemporaryDirectory(prefix="dpfah-model-") as tmp:
            files = {}
            for name in (SETTINGS_FILE, WEIGHTS_FILE):
                try:
                    files[name] = mlflow.artifacts.download_artifacts(
                        artifact_uri=f"{location.rstrip('/')}/artifacts/{name}", dst_path=tmp
                    )
                except (MlflowException, OSError):
                    raise ModelRefused(
                        f"model {model_uri}: no artifacts/{name}, so not a model this pipeline logs as plain tensors "
                        "(a pickled model, as train logged them before, is not loaded: retrain it)"
                    ) from None
            try:
                return ImageEncoder.load(files[WEIGHTS_FILE], files[SETTINGS_FILE], map_location=map_location)
            except ModelFileError as e:
                raise ModelRefused(f"model {model_uri}: {str(e).replace(tmp + os.sep, 'artifacts/')}") from None
