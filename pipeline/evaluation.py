"""Retrieval metrics of a trained model, for DVC and for its MLflow run (the evaluate stage's
work, and the matrix's after each training).

Encodes the query and database splits with the run's model and computes mAP@R, P@H<=radius,
P@N and the PR curves; writes the DVC files (pipeline.evaluate_outputs), then logs metrics,
figures and codes to the run, its completion marker last. What and why: docs/report.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import (
    metric_values,
    write_json_atomic,
)
from .codefiles import ARTIFACT_DIR, codes_table
from .config import Params
from .errors import ConfigError, DataError
from .evaluate_outputs import flat_metrics, write_dvc_outputs
from .figures import class_name, plot_grid, thumbnail
from .precision_plots import plot_p_at_n, plot_pr
from .registry import EVAL_COMPLETE_TAG, EVAL_ID_TAG, Subject, load_subject
from .runkey import RunKey
from .timing import record, span
from .tracking import dataset_digest, dataset_name, git_commit, mlflow_errors

__all__ = ["Evaluation", "evaluate"]


@dataclass(frozen=True)
class Evaluation:
    doc: dict[str, Any]  # the metrics file's numbers and the evaluation record's facts, together
    report: dict[str, Any]  # dpfah.metrics.retrieval_report (numpy arrays inside)
    metrics_file: Path
    plot_files: dict[str, Path]  # curve name (RunKey.CURVES) -> its CSV
    seconds: dict[str, float]

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics logged to MLflow (the ``query_*`` numbers of the metrics file)."""
        return metric_values(self.doc)


# ----------------------------------------------------------------------------- checks


def _device(choice: str):
    import torch

    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluate.device: cuda, but torch sees no GPU here (use auto or cpu)")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- encoding


def _encode_split(model, shards: str, split: str, params: Params, device, image_size: int, progress: bool | None):
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from dpfah.data import EvalStream, ShardError
    from dpfah.train import encode

    e = params.evaluate
    try:
        stream = EvalStream(shards, split, batch_size=e.batch_size, rank=0, world_size=1)
        loader = DataLoader(stream, batch_size=None, num_workers=e.loader_workers, pin_memory=device.type == "cuda")
        total = stream.num_samples
        with tqdm(
            total=total,
            desc=f"encode {split}",
            unit="img",
            disable=False if progress else None if progress is None else True,
        ) as bar:

            def batches() -> Iterator[Any]:
                for batch in loader:
                    bar.update(len(batch.index))
                    yield batch

            codes, labels, index = encode(model, batches(), device, image_size, e.precision)
    except ShardError as err:
        raise DataError(str(err)) from None
    if len(index) != total or not np.array_equal(index, np.arange(total)):
        raise DataError(f"{shards}: split {split!r} yielded {len(index)} samples with indices not 0..{total - 1}")
    return codes, labels, index


def _read_samples(manifest, split: str, indices) -> dict[int, bytes]:
    from dpfah.data import ShardError, read_samples

    try:
        return read_samples(manifest, split, indices)
    except ShardError as e:
        raise DataError(str(e)) from None


# ----------------------------------------------------------------------------- metrics


# ----------------------------------------------------------------------------- figures


def _grid_rows(manifest, q_codes, d_codes, q_labels, d_labels, n_queries: int, topk: int) -> list[dict[str, Any]]:
    from dpfah.codes import pack_codes, topk_hamming

    nq, ndb = len(q_codes), len(d_codes)
    if n_queries == 0 or nq == 0 or ndb == 0:
        return []
    chosen = np.unique(np.linspace(0, nq - 1, min(n_queries, nq)).round().astype(np.int64))
    idx, dist = topk_hamming(pack_codes(q_codes[chosen]), pack_codes(d_codes), k=min(topk, ndb))
    q_bytes = _read_samples(manifest, "query", chosen)
    d_bytes = _read_samples(manifest, "database", np.unique(idx))
    rows = []
    for row, q in enumerate(chosen):
        results = []
        for j, d in zip(idx[row], dist[row]):
            relevant = bool(np.any(q_labels[q].astype(bool) & d_labels[j].astype(bool)))
            results.append((thumbnail(d_bytes[int(j)]), relevant, int(d), class_name(d_labels[j], manifest.classes)))
        rows.append(
            {"query": thumbnail(q_bytes[int(q)]), "name": class_name(q_labels[q], manifest.classes), "results": results}
        )
    return rows


# ----------------------------------------------------------------------------- the stage


def _build_artifacts(art: Path, subject: Subject, params: Params, dataset: str, bits: int, doc, report, codes) -> None:
    """What goes under ``evaluation/`` in the run, built in ``art`` before anything is logged:
    the details of the metrics, figures (PR curves, P@N, the retrieval grid), packed codes."""
    import pyarrow.parquet as pq

    e, manifest, run_id = params.evaluate, subject.manifest, subject.run_id
    (q_codes, q_labels, q_index), (d_codes, d_labels, d_index) = codes
    sha = manifest.sha256
    details = {
        **doc,
        "model_uri": subject.model_uri,
        "protocol": manifest.protocol,
        "manifest_sha256": sha,
        "ties": "index",
    }
    label = f"{dataset}, {bits} bits, run {run_id[:8]}"
    write_json_atomic(art / "metrics.json", details)
    scores = f"mAP@{doc['map_at']} {report['map']:.4f}, P@H<={e.radius} {report['precision_within_radius']:.4f}"
    plot_pr(art / "pr_curves.png", report, f"PR curves: {label}: {scores}", e.radius)
    plot_p_at_n(art / "p_at_n.png", report, f"P@N: {label}")
    rows = _grid_rows(manifest, q_codes, d_codes, q_labels, d_labels, e.grid_queries, e.grid_topk)
    if rows:
        plot_grid(art / "retrieval_grid.png", rows, f"top-{e.grid_topk} by Hamming distance (ties by index): {label}")
    meta = {"bits": bits, "dataset": dataset, "run_id": run_id, "manifest_sha256": sha}
    (art / "codes").mkdir()
    pq.write_table(
        codes_table(d_codes, d_labels, d_index, {**meta, "split": "database"}), art / "codes" / "database.parquet"
    )
    pq.write_table(codes_table(q_codes, q_labels, q_index, {**meta, "split": "query"}), art / "codes" / "query.parquet")


#: Set to ``before-marker`` to make evaluate fail after logging the evaluation and before its
#: completion marker (tests of promote's refusal; what a crash or a lost server there does).
FAULT_ENV = "DPFAH_EVALUATE_FAULT"


def _log_to_run(subject: Subject, params: Params, doc, metrics, art: Path) -> None:
    """The evaluation into the training's MLflow run: metrics and ``eval.*`` tags (with this
    evaluation's ``eval.id``), the artifacts, then, last, the completion marker
    ``eval.complete`` (= ``eval.id``) with ``eval.completed_at``. Promote accepts a run only
    with the marker of its latest evaluation, so a failure anywhere here (an earlier
    evaluation's marker no longer matches the new ``eval.id``) leaves nothing promotable."""
    from mlflow.entities import Metric, RunTag

    from dpfah.train import precision_used

    run_id, eval_id = subject.run_id, doc["eval_id"]
    now = int(time.time() * 1000)
    tags = {
        EVAL_ID_TAG: eval_id,
        "eval.map_at": str(doc["map_at"]),
        "eval.radius": str(params.evaluate.radius),
        "eval.manifest_sha256": subject.manifest.sha256,
        # how the logged codes were computed: an index of these splits reuses them only when
        # its encoding would be the same (pipeline.index)
        "eval.precision": precision_used(params.evaluate.precision, subject.device.type),
        "eval.device": subject.device.type,
        "eval.n_queries": str(doc["n_queries"]),
        "eval.n_db": str(doc["n_db"]),
        "eval.git_commit": git_commit(),
    }
    with mlflow_errors(f"logging the evaluation to run {run_id}", subject.uri):
        # linked to the logged model (its page lists them) and to the prepared split
        link = {
            "model_id": _model_id(subject.model_uri),
            "dataset_name": dataset_name(doc["dataset"], subject.manifest.protocol),
            "dataset_digest": dataset_digest(subject.manifest.sha256),
        }
        subject.client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0, **link) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        subject.client.log_artifacts(run_id, str(art), ARTIFACT_DIR)
        if os.environ.get(FAULT_ENV) == "before-marker":
            raise RuntimeError(
                f"{FAULT_ENV}=before-marker: injected fault after logging evaluation {eval_id} to run {run_id}"
            )
        done = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        subject.client.log_batch(run_id, tags=[RunTag(EVAL_COMPLETE_TAG, eval_id), RunTag("eval.completed_at", done)])


def _model_id(model_uri: str) -> str | None:
    """The logged model's id in a ``models:/m-...`` URI (what train records), else None."""
    rest = model_uri[len("models:/") :] if model_uri.startswith("models:/") else ""
    return rest if rest.startswith("m-") and "/" not in rest else None


def evaluate(
    params: Params,
    key: RunKey,
    *,
    run_id: str | None = None,
    progress: bool | None = None,
    root: str | os.PathLike = ".",
    subject: Subject | None = None,
    record_extra: dict[str, Any] | None = None,
) -> Evaluation:
    """Evaluate the model of ``key``'s run record (or of ``run_id``) on the dataset's query and
    database splits; write the DVC files under ``root`` and log everything to the model's
    MLflow run. ``subject``: the model just trained in this process (:mod:`pipeline.entry`)
    instead of the record's, loaded from MLflow; ``record_extra`` joins the evaluation record."""
    dataset, bits = key.dataset, key.bits
    which = {"method": key.method, "seed": key.seed}
    with span("imports: torch, mlflow"):
        import mlflow.pytorch  # noqa: F401
        import torch  # noqa: F401

        from dpfah.metrics import retrieval_report

        from .console import quiet_libraries

    quiet_libraries()  # MLflow's download bars and INFO lines: the stage prints its own
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    params.dataset(dataset)  # a clear error for an unknown name
    if bits < 1:
        raise ConfigError(f"--bits {bits}: must be >= 1")
    device = _device(params.evaluate.device)
    with span("mlflow: find the run, load the model"):
        if subject is None:
            subject = load_subject(params, key, run_id, root, device)
        else:
            device = subject.device
    seconds["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    codes = tuple(
        _encode_split(subject.model, subject.shards, split, params, device, subject.image_size, progress)
        for split in ("query", "database")
    )
    (q_codes, q_labels, _), (d_codes, d_labels, _) = codes
    seconds["encode"] = time.perf_counter() - t
    record("encode the query and database splits", time.time() - seconds["encode"])

    t = time.perf_counter()
    e = params.evaluate
    r = e.r_for(dataset)
    ranks = np.unique(np.linspace(1, max(len(d_codes), 1), e.pr_rank_points).round().astype(np.int64))
    report = retrieval_report(
        q_codes, d_codes, q_labels, d_labels, topk=r, radius=e.radius, max_n=e.max_n, pr_ranks=ranks
    )
    metrics = flat_metrics(report)
    seconds["metrics"] = time.perf_counter() - t
    record("retrieval metrics", time.time() - seconds["metrics"])

    # The DVC metrics file holds the numbers only (what `dvc metrics show` and `dvc exp show`
    # list); the evaluation record beside it says what they measure and for which run.
    doc = {
        **metrics,
        "eval_id": f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}",
        "dataset": dataset,
        "bits": bits,
        "run_id": subject.run_id,
        "map_at": e.map_at_label(dataset),
        "topk": int(report["topk"]),
        "radius": e.radius,
        "n_queries": int(report["n_queries"]),
        "n_db": int(report["n_db"]),
        **(record_extra or {}),
    }
    # Everything computed first, then the DVC files (each written atomically), then MLflow,
    # whose completion marker comes last: a failure anywhere leaves a run promote refuses.
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpfah-eval-") as tmp:
        art = Path(tmp)
        with span("figures and codes"):
            _build_artifacts(art, subject, params, dataset, bits, doc, report, codes)
        q_codes, q_labels, q_index = codes[0]
        meta = {"bits": bits, "dataset": dataset, "split": "query", "method": which["method"], "seed": which["seed"]}
        path, plots = write_dvc_outputs(root, key, doc, report, codes_table(q_codes, q_labels, q_index, meta))
        for curve, f in plots.items():
            shutil.copy(f, art / f"{curve}.csv")  # the curve data as DVC has it
        with span("mlflow logging"):
            _log_to_run(subject, params, doc, metrics, art)
    seconds["outputs"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return Evaluation(doc, report, path, plots, seconds)
