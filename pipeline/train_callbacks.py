"""The Ray Train callback of the train stage, in its own module so that importing
``pipeline.train`` (``--help``, the store check, Tune's driver) does not import Ray Train."""

from __future__ import annotations

import time

from ray.train import UserCallback

from .timing import span
from .tracking import training_metric

__all__ = ["EpochMetricsToMlflow"]


class EpochMetricsToMlflow(UserCallback):
    """Runs in Ray Train's controller: logs each epoch's metrics (rank 0's report) to the
    MLflow run at step = epoch, under their grouped names (``train/loss``, ``validation/map``:
    :func:`pipeline.tracking.training_metric`), after Ray Train has registered the report and its checkpoint.
    A report that a dying worker made but the controller never registered is not logged, and
    that epoch runs again after the restart: so every metric has one point per epoch."""

    def __init__(self, tracking_uri: str, run_id: str, *, skip: str):
        self.tracking_uri, self.run_id, self.skip, self._client = tracking_uri, run_id, skip, None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        values = metrics[0] if metrics else {}
        if not values or self.skip in values:  # a report that is not an epoch's
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        with span("controller: epoch metrics to mlflow"):
            if self._client is None:
                self._client = MlflowClient(self.tracking_uri)
            now, step = int(time.time() * 1000), int(values["epoch"])
            self._client.log_batch(
                self.run_id,
                metrics=[Metric(training_metric(k), float(v), now, step) for k, v in values.items() if k != "epoch"],
            )
