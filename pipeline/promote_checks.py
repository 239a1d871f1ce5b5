"""What promote checks before it registers a run: its evaluation, as the DVC files and the
MLflow run record it, complete (its ``eval.complete`` marker) and measured the way the
parameters ask (the same mAP@R, the shards the run was trained on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .artifacts import DEFAULT_METHOD, evaluation_file, metric_values, metrics_file
from .errors import PipelineError
from .registry import EVAL_COMPLETE_TAG, EVAL_ID_TAG, MismatchError, read_run_record

__all__ = ["EvaluationMissing", "EvaluationIncomplete", "evaluate_command", "from_dvc_files", "evaluated_value"]


def evaluate_command(dataset: str, bits: int, which: dict[str, Any], run_id: str | None = None) -> str:
    """The evaluate command that writes what promote reads for this training: its method
    (when not the default) and seed name the files (issue 28: the seed was left out)."""
    method = which.get("method", DEFAULT_METHOD)
    return (
        f"python -m pipeline.evaluate --dataset {dataset} --bits {bits}"
        f"{'' if method == DEFAULT_METHOD else ' --method ' + method} --seed {which['seed']}"
        f"{' --run-id ' + run_id if run_id else ''}"
    )


class EvaluationMissing(PipelineError):
    """The run has not been evaluated (or its metrics file is missing or unreadable)."""


class EvaluationIncomplete(EvaluationMissing):
    """The run's last evaluation did not finish: no completion marker for it."""


def _read_json(path: Path, what: str, hint: str) -> Any:
    """The JSON document at ``path`` (``what`` it is), or EvaluationMissing in one line."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EvaluationMissing(f"{path}: no {what} (run {hint} first)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationMissing(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None


def _read_metrics(dataset: str, bits: int, root, which: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    path = metrics_file(dataset, bits, root, **which)
    doc = _read_json(path, "evaluation metrics", evaluate_command(dataset, bits, which))
    if not isinstance(doc, dict) or not metric_values(doc):
        raise EvaluationMissing(f"{path}: not an evaluation metrics file (no query_* metrics)")
    return doc, path


def _read_evaluation(dataset: str, bits: int, root, which: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The evaluation record beside the metrics file: the run, data and settings measured."""
    path = evaluation_file(dataset, bits, root, **which)
    doc = _read_json(path, "evaluation record", evaluate_command(dataset, bits, which))
    if not isinstance(doc, dict) or "run_id" not in doc:
        raise EvaluationMissing(f"{path}: not an evaluation record (no run_id)")
    return doc, path


def from_dvc_files(
    dataset: str, bits: int, root, map_at, metric: str, which: dict[str, Any]
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(run record, where it is, metrics file): the DVC way, where the two must agree."""
    record, record_path = read_run_record(dataset, bits, root, **which)
    run_id = record["run_id"]
    values, _ = _read_metrics(dataset, bits, root, which)
    facts, doc_path = _read_evaluation(dataset, bits, root, which)
    doc = {**facts, **values}
    if doc.get("run_id") != run_id:
        raise MismatchError(
            f"{doc_path}: evaluation of run {doc.get('run_id')}, but {record_path} names run {run_id} "
            f"(evaluate that run first: {evaluate_command(dataset, bits, which)})"
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


def evaluated_value(
    run, doc, dataset: str, bits: int, root, metric: str, map_at, source: str, by_id: bool, which: dict[str, Any]
) -> tuple[float, str]:
    """(the run's ``metric``, the shards' sha256 it was measured on), checked to be the
    evaluation of this run on the data it was trained on, as the metrics file says, and
    complete: its ``eval.complete`` marker, written last by evaluate, names its ``eval.id``."""
    run_id, tags = run.info.run_id, run.data.tags
    value = run.data.metrics.get(metric)
    if value is None or "eval.map_at" not in tags:
        raise EvaluationMissing(
            f"MLflow run {run_id} (from {source}) has no evaluation ({metric}): "
            f"run {evaluate_command(dataset, bits, which, run_id if by_id else None)} first"
        )
    marker, eval_id = tags.get(EVAL_COMPLETE_TAG), tags.get(EVAL_ID_TAG)
    if not marker or marker != eval_id:
        earlier = f"; the last one that did was {marker}" if marker else ""
        raise EvaluationIncomplete(
            f"MLflow run {run_id} (from {source}): its last evaluation ({eval_id or 'no eval.id'}) has no completion "
            f"marker (the evaluate that logged it failed part-way{earlier}): "
            f"re-run {evaluate_command(dataset, bits, which, run_id if by_id else None)}, then promote"
        )
    if doc is not None and doc.get("eval_id") not in (None, marker):
        raise MismatchError(
            f"{metrics_file(dataset, bits, root, **which)}: evaluation {doc['eval_id']}, but MLflow run {run_id}'s "
            "last completed "
            f"evaluation is {marker}: re-run evaluate"
        )
    if doc is not None and doc[metric] != value:
        raise MismatchError(
            f"{metrics_file(dataset, bits, root, **which)}: {metric} {doc[metric]!r} differs from MLflow run "
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
