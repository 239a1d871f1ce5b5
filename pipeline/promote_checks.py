"""What promote checks before it registers a run: its evaluation, as the DVC files and the
MLflow run record it, complete (its ``eval.complete`` marker) and measured the way the
parameters ask (the same mAP@R, the shards the run was trained on)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifacts import metric_values
from .errors import PipelineError
from .registry import EVAL_COMPLETE_TAG, EVAL_ID_TAG, MismatchError, read_run_record
from .runkey import RunKey, read_record

__all__ = ["EvaluationMissing", "EvaluationIncomplete", "evaluate_command", "from_dvc_files", "evaluated_value"]


def evaluate_command(key: RunKey, run_id: str | None = None) -> str:
    """The evaluate command that writes what promote reads for this training: its method and
    seed name the files (issue 28: the seed was left out)."""
    return key.command("evaluate") + (f" --run-id {run_id}" if run_id else "")


class EvaluationMissing(PipelineError):
    """The run has not been evaluated (or its metrics file is missing or unreadable)."""


class EvaluationIncomplete(EvaluationMissing):
    """The run's last evaluation did not finish: no completion marker for it."""


def _read_metrics(key: RunKey, root) -> tuple[dict[str, Any], Path]:
    path = key.metrics_file(root)
    doc = read_record(
        path, "evaluation metrics", missing=f"run {evaluate_command(key)} first", error=EvaluationMissing,
        valid=lambda d: None if metric_values(d) else "not an evaluation metrics file (no query_* metrics)",
    )  # fmt: skip
    return doc, path


def _read_evaluation(key: RunKey, root) -> tuple[dict[str, Any], Path]:
    """The evaluation record beside the metrics file: the run, data and settings measured."""
    path = key.evaluation_file(root)
    doc = read_record(
        path, "evaluation record", missing=f"run {evaluate_command(key)} first", error=EvaluationMissing,
        valid=lambda d: None if "run_id" in d else "not an evaluation record (no run_id)",
    )  # fmt: skip
    return doc, path


def from_dvc_files(key: RunKey, root, map_at, metric: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(run record, where it is, metrics file): the DVC way, where the two must agree."""
    dataset, bits = key.dataset, key.bits
    record, record_path = read_run_record(key, root)
    run_id = record["run_id"]
    values, _ = _read_metrics(key, root)
    facts, doc_path = _read_evaluation(key, root)
    doc = {**facts, **values}
    if doc.get("run_id") != run_id:
        raise MismatchError(
            f"{doc_path}: evaluation of run {doc.get('run_id')}, but {record_path} names run {run_id} "
            f"(evaluate that run first: {evaluate_command(key)})"
        )
    if (doc.get("dataset"), doc.get("bits")) != (dataset, bits):
        raise MismatchError(
            f"{doc_path}: evaluation of {doc.get('dataset')!r} at {doc.get('bits')} bits, not {dataset!r} at {bits}"
        )
    if doc.get("map_at") != map_at:
        raise MismatchError(
            f"{doc_path}: evaluated at mAP@{doc.get('map_at')} but evaluate.map_at gives mAP@{map_at} now: re-run "
            "evaluate"
        )
    if metric not in doc:
        raise EvaluationMissing(f"{doc_path}: no {metric}")
    return record, str(record_path), doc


def evaluated_value(run, doc, key: RunKey, root, metric: str, map_at, source: str, by_id: bool) -> tuple[float, str]:
    """(the run's ``metric``, the shards' sha256 it was measured on), checked to be the
    evaluation of this run on the data it was trained on, as the metrics file says, and
    complete: its ``eval.complete`` marker, written last by evaluate, names its ``eval.id``."""
    run_id, tags = run.info.run_id, run.data.tags
    value = run.data.metrics.get(metric)
    if value is None or "eval.map_at" not in tags:
        raise EvaluationMissing(
            f"MLflow run {run_id} (from {source}) has no evaluation ({metric}): "
            f"run {evaluate_command(key, run_id if by_id else None)} first"
        )
    marker, eval_id = tags.get(EVAL_COMPLETE_TAG), tags.get(EVAL_ID_TAG)
    if not marker or marker != eval_id:
        earlier = f"; the last one that did was {marker}" if marker else ""
        raise EvaluationIncomplete(
            f"MLflow run {run_id} (from {source}): its last evaluation ({eval_id or 'no eval.id'}) has no completion "
            f"marker (the evaluate that logged it failed part-way{earlier}): "
            f"re-run {evaluate_command(key, run_id if by_id else None)}, then promote"
        )
    if doc is not None and doc.get("eval_id") not in (None, marker):
        raise MismatchError(
            f"{key.metrics_file(root)}: evaluation {doc['eval_id']}, but MLflow run {run_id}'s "
            "last completed "
            f"evaluation is {marker}: re-run evaluate"
        )
    if doc is not None and doc[metric] != value:
        raise MismatchError(
            f"{key.metrics_file(root)}: {metric} {doc[metric]!r} differs from MLflow run "
            f"{run_id}'s "
            f"{value!r} (another evaluation was logged since): re-run evaluate"
        )
    if tags.get("eval.map_at") != str(map_at):
        raise MismatchError(
            f"MLflow run {run_id} was evaluated at mAP@{tags.get('eval.map_at')}, but evaluate.map_at gives "
            f"mAP@{map_at}: re-run evaluate"
        )
    sha = tags.get("eval.manifest_sha256", "")
    if sha != tags.get("manifest_sha256"):
        raise MismatchError(
            f"MLflow run {run_id} was evaluated on other shards ({sha[:12]}) than it was trained on: re-run evaluate"
        )
    return value, sha
