"""The logged model's Python code (MLflow "models from code"): MLflow runs this file to load
the model, so nothing of the model is unpickled. It rebuilds the encoder from the model's
``weights.pt`` and ``settings.json`` (:meth:`dpfah.encoder.ImageEncoder.load`: tensors
only). Imports MLflow, numpy and ``dpfah`` only: it is copied into the model, where
``pipeline`` is not. See docs/serving.md.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from dpfah.encoder import SETTINGS_FILE, WEIGHTS_FILE, ImageEncoder


class ServedEncoder(mlflow.pyfunc.PythonModel):
    """``predict(images (N, H, W, 3) of integers 0..255) -> int8 codes (N, bits)``; a refusal
    is MLflow's INVALID_PARAMETER_VALUE (a 400 from its scoring server)."""

    encoder: ImageEncoder | None = None

    def load_context(self, context) -> None:
        self.encoder = ImageEncoder.load(
            context.artifacts[WEIGHTS_FILE],
            context.artifacts[SETTINGS_FILE],
            refusal_base=MlflowException,
            refusal_kwargs={"error_code": INVALID_PARAMETER_VALUE},
        )

    def predict(self, context, model_input, params=None) -> np.ndarray:
        """``model_input``: an array, or the request's ``inputs`` as JSON gave them (nested
        lists: the encoder reads them and names what is wrong, images of different sizes too)."""
        return self.encoder(model_input).numpy()


mlflow.models.set_model(ServedEncoder())
