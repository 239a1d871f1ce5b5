"""Where every stage writes, and how: one path function per file, one atomic write.

The files DVC tracks (all small, all relative to the repository root unless a stage is
given another ``root``)::

    runs/<d>-<b>-<m>-s<s>.json          train: the run record (run id, model URI, data identity)
    objectives/<d>-<b>-<m>.json         objective: what a training optimises (method, hyper-parameters, network changes)
    metrics/<d>-<b>-<m>-s<s>.json       evaluate: the query metrics, nothing else (DVC metrics)
    evaluations/<d>-<b>-<m>-s<s>.json   evaluate: what they measure (run, data, R, radius, sizes, eval id)
    plots/<d>-<b>-<m>-s<s>/*.csv        evaluate: PR and P@N curve data (DVC plots)
    codes/<d>-<b>-<m>-s<s>/query.parquet  evaluate: the packed query codes and labels (the report's t-SNE)
    promotions/<d>-<b>-<m>-s<s>.json    promote: the decision and both numbers

(d: dataset, b: code length, m: method or variant, s: training seed)
    tune/<dataset>/best.json            tune: the best configuration, overall and per code length
    tune/<dataset>/summary.{md,csv}     tune: every trial
    reports/<dataset>/                  report: report.md, figures (PNG), tables (CSV)

A file is written to a temporary name beside its final one and renamed into place, so a
reader (or DVC) never sees half a file, and a failed stage leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "RUNS_DIR",
    "OBJECTIVES_DIR",
    "METRICS_DIR",
    "EVALUATIONS_DIR",
    "PLOTS_DIR",
    "PROMOTIONS_DIR",
    "TUNE_DIR",
    "CODES_DIR",
    "REPORTS_DIR",
    "METRIC_PREFIX",
    "DEFAULT_METHOD",
    "stem",
    "run_file",
    "objective_file",
    "metrics_file",
    "evaluation_file",
    "plots_dir",
    "query_codes_file",
    "report_dir",
    "promotion_file",
    "tune_dir",
    "best_file",
    "metric_values",
    "prepared_manifest",
    "write_atomic",
    "write_json_atomic",
]

RUNS_DIR = "runs"
OBJECTIVES_DIR = "objectives"
METRICS_DIR = "metrics"
EVALUATIONS_DIR = "evaluations"
PLOTS_DIR = "plots"
PROMOTIONS_DIR = "promotions"
TUNE_DIR = "tune"
CODES_DIR = "codes"
REPORTS_DIR = "reports"
#: The metrics of a metrics file (and of the MLflow run) start with this prefix.
METRIC_PREFIX = "query_"

Root = str | os.PathLike


#: The method a training runs when none is named (and the registry's DPFAH names).
DEFAULT_METHOD = "dpfah"


def stem(dataset: str, bits: int, method: str = DEFAULT_METHOD, seed: int = 0) -> str:
    """The name of one training's files: ``<dataset>-<bits>-<method>-s<seed>`` (method: a
    method or variant name; seed: the training seed), as dvc.yaml's matrix spells it."""
    return f"{dataset}-{bits}-{method}-s{seed}"


def run_file(dataset: str, bits: int, root: Root = ".", *, method: str = DEFAULT_METHOD, seed: int = 0) -> Path:
    return Path(root) / RUNS_DIR / f"{stem(dataset, bits, method, seed)}.json"


def objective_file(dataset: str, bits: int, root: Root = ".", *, method: str = DEFAULT_METHOD) -> Path:
    """The objective does not depend on the training seed: one file per method."""
    return Path(root) / OBJECTIVES_DIR / f"{dataset}-{bits}-{method}.json"


def metrics_file(dataset: str, bits: int, root: Root = ".", *, method: str = DEFAULT_METHOD, seed: int = 0) -> Path:
    return Path(root) / METRICS_DIR / f"{stem(dataset, bits, method, seed)}.json"


def evaluation_file(dataset: str, bits: int, root: Root = ".", *, method: str = DEFAULT_METHOD, seed: int = 0) -> Path:
    """The evaluation record: which run, data and settings the metrics file's numbers measure."""
    return Path(root) / EVALUATIONS_DIR / f"{stem(dataset, bits, method, seed)}.json"


def plots_dir(dataset: str, bits: int, root: Root = ".", *, method: str = DEFAULT_METHOD, seed: int = 0) -> Path:
    return Path(root) / PLOTS_DIR / stem(dataset, bits, method, seed)


def query_codes_file(dataset: str, bits: int, root: Root = ".", *, method: str = DEFAULT_METHOD, seed: int = 0) -> Path:
    return Path(root) / CODES_DIR / stem(dataset, bits, method, seed) / "query.parquet"


def report_dir(dataset: str, root: Root = ".") -> Path:
    return Path(root) / REPORTS_DIR / dataset


def promotion_file(dataset: str, bits: int, root: Root = ".", *, method: str = DEFAULT_METHOD, seed: int = 0) -> Path:
    return Path(root) / PROMOTIONS_DIR / f"{stem(dataset, bits, method, seed)}.json"


def tune_dir(dataset: str, root: Root = ".") -> Path:
    return Path(root) / TUNE_DIR / dataset


def best_file(dataset: str, root: Root = ".") -> Path:
    return tune_dir(dataset, root) / "best.json"


def metric_values(doc: dict[str, Any]) -> dict[str, float]:
    """The metrics (``query_*``) of a metrics file, as logged to MLflow under the same names."""
    return {k: v for k, v in doc.items() if k.startswith(METRIC_PREFIX)}


def write_atomic(path: Root, data: str | bytes) -> Path:
    """Write ``data`` to a temporary name beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: Root, doc: Any) -> Path:
    """``doc`` as indented, key-sorted JSON, written atomically."""
    return write_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def prepared_manifest(params, name: str):
    """The manifest of dataset ``name`` as prepare wrote it under ``data.root``, for the
    stages that read the shards; a one-line :class:`DataError` when there is none (naming
    the directory and the command that prepares it) or it is malformed."""
    from dpfah.data import MANIFEST_FILE, NotPrepared, ShardError, read_manifest

    from .config import DataConfig
    from .errors import DataError

    directory = params.shards_dir(name)
    try:
        return read_manifest(directory)
    except NotPrepared:
        command = f"python -m pipeline.prepare --dataset {name}"
        if params.data.root != DataConfig().root:
            command += f" --set data.root={params.data.root}"
        raise DataError(f"{directory}: no prepared dataset (no {MANIFEST_FILE}); prepare it first: {command}") from None
    except ShardError as e:
        raise DataError(str(e)) from None


def not_replaceable(
    folder: str | os.PathLike, allowed: Callable[[Path], bool], *, what: str, marker: str | None = None
) -> str | None:
    """Why a stage must not replace ``folder`` whole (None: it may): it may be absent, empty,
    or ``what`` (every entry one that ``allowed`` accepts, and ``marker`` among them when
    given). The current folder and a file system's root never may. A user's folder named by
    mistake (``--out .``, ``--out photos`` beside ``--images photos``) is refused, never
    deleted."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return None
    resolved = folder.resolve()
    if resolved == Path.cwd().resolve() or resolved == Path(resolved.anchor):
        return f"{folder} is the current or the root folder"
    if folder.is_symlink() or not folder.is_dir():
        return f"{folder} exists and is not a folder"
    others, names = [], set()
    for entry in folder.iterdir():
        names.add(entry.name)
        if not allowed(entry):
            others.append(entry.name)
            if len(others) == 3:
                break
    if others:
        listed = ", ".join(sorted(others)) + (", ..." if len(others) == 3 else "")
        return f"{folder} holds files that are not {what} ({listed})"
    if names and marker is not None and marker not in names:
        return f"{folder} is not {what} (no {marker})"
    return None
