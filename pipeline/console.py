"""What a stage prints: its own lines, and the libraries' only with ``--verbose``.

By default Ray's start-up banner, Ray Train's controller and worker logs (resource requests,
"Reporting training result ..." per epoch, checkpoint paths) and MLflow's INFO lines (table
creation, new experiments, "Registered model ... already exists"), its "View run ... at"
links at the end of a run on a tracking server, its artifact download progress bars and
its pickle warning are not shown: the stage prints one line
per epoch and a summary instead. ``--verbose`` (or DPFAH_VERBOSE=1) shows them all, as
they were. Warnings and errors of the libraries are always shown, except the pickle
warning, which is about a choice the project made (see ``pipeline/train_driver.py: _log_model``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

ENV = "DPFAH_VERBOSE"

__all__ = ["ENV", "verbose", "set_verbose", "quiet_libraries", "stderr_muted", "EpochPrinter", "duration"]


def verbose() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    if on:
        os.environ[ENV] = "1"


class _DropPickleWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


def quiet_libraries() -> None:
    """MLflow's INFO lines off (call after importing mlflow: it configures its loggers on
    import); its warnings stay, but the pickle one."""
    if verbose():
        return
    # the "Downloading artifacts: 100%|..." bar of every model load from a local store
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # "🏃 View run ... at: http://..." and "🧪 View experiment at: ..." at the end of every run
    # on a tracking server, printed straight to stdout: the stages name the run themselves
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    pytorch_logger = logging.getLogger("mlflow.pytorch")
    if not any(isinstance(f, _DropPickleWarning) for f in pytorch_logger.filters):
        pytorch_logger.addFilter(_DropPickleWarning())


def stderr_muted():
    """A block whose writes to stderr are dropped (unless --verbose): MLflow's
    ``register_model`` prints "Registered model ... already exists. Creating a new version"
    and "Created version ..." straight to stderr, past its loggers."""
    import contextlib
    import io

    return contextlib.nullcontext() if verbose() else contextlib.redirect_stderr(io.StringIO())


def duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def epoch_line(epoch: int, epochs: int, metrics: dict[str, float], elapsed: float, eta: float | None) -> str:
    """``epoch 2 (3/8)  loss 0.8412  val mAP 0.5120 (best 0.5300 @ epoch 1)  412 img/s  0:41 elapsed  ETA 1:02``:
    epochs numbered from 0, as MLflow's steps, the run record and the tune summary number them;
    in brackets how many of the epochs have run."""
    parts = [f"epoch {epoch} ({epoch + 1}/{epochs})", f"loss {metrics['loss']:.4f}"]
    if "val_map" in metrics:
        best = (
            f" (best {metrics['best_val_map']:.4f} @ epoch {int(metrics['best_epoch'])})"
            if "best_val_map" in metrics
            else ""
        )
        parts.append(f"val mAP {metrics['val_map']:.4f}{best}")
    if "images_per_s" in metrics:
        parts.append(f"{metrics['images_per_s']:.0f} img/s")
    parts.append(f"{duration(elapsed)} elapsed")
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return "  ".join(parts)


class EpochPrinter:
    """Prints one line per finished epoch while a training runs, from what the run has
    logged (``fetch() -> {epoch: metrics}``, polled every ``interval`` s on a thread).
    Epochs are numbered from 0, as MLflow's steps (:func:`epoch_line`)."""

    def __init__(
        self, fetch: Callable[[], dict[int, dict[str, float]]], epochs: int, *, interval: float = 1.0, out=None
    ):
        self.fetch, self.epochs, self.interval = fetch, epochs, interval
        self.out = out or sys.stdout
        self.printed: set[int] = set()
        self.start = time.time()
        self.first_epoch_start: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epoch-printer", daemon=True)

    def __enter__(self) -> EpochPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if exc[0] is None:
            self.poll()  # the last epochs, logged just before the training returned

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # a store hiccup must not end the training; the next poll retries
                pass

    def poll(self) -> None:
        seen = self.fetch()
        for epoch in sorted(e for e in seen if e not in self.printed):
            metrics = seen[epoch]
            now = time.time()
            if self.first_epoch_start is None:  # the first epoch ends now; it began epoch_s ago
                self.first_epoch_start = now - float(metrics.get("epoch_s", 0.0))
                self.first_epoch = epoch
            done = epoch - self.first_epoch + 1
            remaining = self.epochs - epoch - 1
            eta = (now - self.first_epoch_start) / done * remaining if done > 0 else None
            print(epoch_line(epoch, self.epochs, metrics, now - self.start, eta), file=self.out, flush=True)
            self.printed.add(epoch)
