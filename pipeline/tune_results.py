"""A finished Tune search read back: one :class:`TrialRow` per trial (its MLflow runs
tagged and closed), the best trial, ``best.json``'s record and the summary tables."""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .leftovers import wait_for_drivers
from .registry import model_name
from .tune_space import trial_run_name

__all__ = [
    "METRIC",
    "STATUS_COMPLETED",
    "STATUS_STOPPED",
    "STATUS_ERROR",
    "TrialRow",
    "children",
    "close_children",
    "collect",
    "order",
    "one_line",
    "failures",
    "select_best",
    "best_record",
    "fmt",
    "summary_markdown",
    "summary_csv",
]

METRIC = "val_map"  # validation mAP@ALL, reported by rank 0 after every epoch
STATUS_COMPLETED, STATUS_STOPPED, STATUS_ERROR = "completed", "stopped", "error"


@dataclass(frozen=True)
class TrialRow:
    """One trial of a search, as the summary and best.json see it."""

    trial_id: str
    hparams: dict[str, Any]  # the searched knobs' values
    bits: int
    val_map: float  # the best validation mAP over the epochs it ran (nan: none)
    best_epoch: int
    epochs: int  # epochs it ran
    status: str  # completed | stopped (by the scheduler) | error
    run_id: str  # its MLflow run ("" when none was found)
    run_name: str
    error: str = ""


def children(client, experiment_id: str, parent_id: str) -> list:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10000
    )


def close_children(client, experiment_id: str, parent_id: str) -> None:
    """Runs the scheduler stopped (or an interruption left behind) end KILLED, not RUNNING."""
    for run in children(client, experiment_id, parent_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")


def collect(
    results, client, experiment_id: str, parent_id: str, search_name: str, epochs: int, knobs: Sequence[str]
) -> list[TrialRow]:
    # A trial the scheduler stopped ends after fit() returns: its process, as it exits, may still
    # mark its run FAILED. Its final status is written here only once that process is gone.
    lingering = wait_for_drivers(children(client, experiment_id, parent_id))
    if lingering:
        print(
            f"warning: the processes of {len(lingering)} trial run(s) still run after 60 s: {', '.join(lingering)}; "
            "their runs may end with the status those processes give them",
            file=sys.stderr,
        )
    by_name: dict[str, list] = {}
    for run in children(client, experiment_id, parent_id):
        by_name.setdefault(run.data.tags.get("ray_run_name", ""), []).append(run)
    rows = []
    for result in results:
        config = result.config or {}
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        frame = result.metrics_dataframe
        val_map, best_epoch, ran = math.nan, -1, 0
        if frame is not None and METRIC in frame and frame[METRIC].notna().any():
            i = frame[METRIC].astype(float).idxmax()
            val_map, best_epoch = float(frame[METRIC][i]), int(frame["epoch"][i])
            ran = int(frame["epoch"].max()) + 1
        if result.error is not None:
            status = STATUS_ERROR
        elif ran < epochs:
            status = STATUS_STOPPED
        else:
            status = STATUS_COMPLETED
        run_name = trial_run_name(search_name, trial_id, config) if config else ""
        runs = sorted(by_name.get(run_name, []), key=lambda r: r.info.start_time)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        run = (finished or runs or [None])[-1]
        for attempt in runs:
            client.set_tag(attempt.info.run_id, "tune.trial_id", trial_id)
            client.set_tag(attempt.info.run_id, "tune.status", status)
            if status == STATUS_STOPPED and attempt is run:
                # Stopped by the scheduler: the run is left RUNNING (its process killed) or
                # FAILED (its trainer interrupted); either way it was KILLED.
                if attempt.info.status != "KILLED":
                    client.set_terminated(attempt.info.run_id, "KILLED")
            elif attempt.info.status == "RUNNING":  # an attempt that died (then retried, or the trial failed)
                client.set_terminated(attempt.info.run_id, "FAILED")
        rows.append(
            TrialRow(
                trial_id=trial_id,
                hparams={k: config.get(k, math.nan) for k in knobs},
                bits=int(config.get("bits", 0)),
                val_map=val_map,
                best_epoch=best_epoch,
                epochs=ran,
                status=status,
                run_id=run.info.run_id if run is not None else "",
                run_name=run_name,
                error=one_line(result.error) if result.error is not None else "",
            )
        )
    rows.sort(key=lambda r: (r.bits, *(order(r.hparams[k]) for k in knobs), r.trial_id))
    return rows


def order(value: Any) -> tuple:
    """Sort key for knob values of any kind (numbers before strings)."""
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def one_line(error: BaseException) -> str:
    """A trial's error in a line: the error the trial raised (not Ray's wrapper around it) and
    its first line, continued by the first detail line when it ends with a colon
    ("... failed due to worker errors: A worker health check failed.")."""
    cause = getattr(error, "cause", None)  # a RayTaskError wraps what the trial raised
    error = cause if isinstance(cause, BaseException) else error
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":"):
        text = " ".join([text, *[line for line in lines[1:] if not line.startswith("[")][:1]])
    return f"{type(error).__name__}: {text}"[:300]


def failures(rows: Sequence[TrialRow], max_failures: int) -> str:
    """``"; N of M trials failed ..."`` naming the first error, or "" when none failed."""
    failed = [r for r in rows if r.status == STATUS_ERROR]
    if not failed:
        return ""
    tries = f"{max_failures + 1} attempts each (tune.max_failures={max_failures})"
    first = failed[0]
    example = f"{first.run_name or first.trial_id}: {first.error}"
    return f"; {len(failed)} of {len(rows)} trial(s) failed after {tries}, e.g. {example}"


def select_best(rows: Sequence[TrialRow], among: str | None = None) -> TrialRow | None:
    """Highest validation mAP among the trials that ran to the end (their model is logged);
    a trial the scheduler stopped counts only when none completed, a failed trial never
    (its last retry failed too: it may have diverged)."""
    scored = [r for r in rows if not math.isnan(r.val_map) and r.status != STATUS_ERROR]
    completed = [r for r in scored if r.status == STATUS_COMPLETED]
    pool = completed or scored
    if not pool:
        return None
    return max(pool, key=lambda r: (r.val_map, -r.bits, r.trial_id))


def best_record(
    rows, best, search_name, parent_id, tracking_uri, configured_uri, experiment, manifest_sha, dataset, params, method
) -> dict[str, Any]:
    def entry(r: TrialRow) -> dict[str, Any]:
        return {
            **r.hparams,
            "bits": r.bits,
            "val_map": r.val_map,
            "best_epoch": r.best_epoch,
            "run_id": r.run_id,
            # the trial's logged model, named as pipeline.train names it (a trial trains `method`)
            "model_uri": f"runs:/{r.run_id}/{model_name(params, dataset, r.bits, method)}"
            if r.run_id and r.status == STATUS_COMPLETED
            else None,
            "status": r.status,
        }

    by_bits = {}
    for bits in sorted({r.bits for r in rows}):
        top = select_best([r for r in rows if r.bits == bits])
        if top is not None:
            by_bits[str(bits)] = entry(top)
    return {
        **entry(best),
        "method": method,
        "knobs": list(best.hparams),
        "metric": "validation mAP@ALL (validation split against the training images)",
        "dataset": dataset,
        "manifest_sha256": manifest_sha,
        "search_name": search_name,
        "search_run_id": parent_id,
        "experiment": experiment,
        # a local sqlite path stays as configured (relative): the file is kept by DVC
        "tracking_uri": configured_uri if tracking_uri.startswith("sqlite:") else tracking_uri,
        "by_bits": by_bits,
    }


def fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _cell(rows: Sequence[TrialRow]) -> str:
    scored = [r for r in rows if not math.isnan(r.val_map)]
    if not scored:
        return "failed" if rows else ""
    top = max(scored, key=lambda r: r.val_map)
    return f"{top.val_map:.4f}" + ("*" if top.status == STATUS_STOPPED else "")


def _pivot(rows: Sequence[TrialRow], key, label: str, bit_lengths: Sequence[int]) -> list[str]:
    values = sorted({key(r) for r in rows}, key=lambda v: tuple(map(order, v)) if isinstance(v, tuple) else order(v))
    lines = [
        f"| {label} | " + " | ".join(f"{b} bits" for b in bit_lengths) + " |",
        "|---" * (len(bit_lengths) + 1) + "|",
    ]
    for v in values:
        cells = [_cell([r for r in rows if key(r) == v and r.bits == b]) for b in bit_lengths]
        shown = ", ".join(fmt(x) for x in v) if isinstance(v, tuple) else fmt(v)
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(
    rows: Sequence[TrialRow], meta: dict[str, Any], best: TrialRow | None, *, pivots: bool = True
) -> str:
    """The search as Markdown: validation mAP by each searched knob against the code length
    (for DPFAH's eta and zeta the shape of the paper's Tables 3 and 4), the full grid, and
    every trial. ``meta["knobs"]``: the searched knobs (default: those of the rows)."""
    bit_lengths = sorted({r.bits for r in rows})
    knobs = list(meta.get("knobs") or row_knobs(rows))
    lines = [
        f"# Tune search `{meta['name']}`",
        "",
        f"Dataset `{meta['dataset']}` ({meta['protocol']}); {meta['search']} search, {len(rows)} trials, "
        f"scheduler {meta['scheduler']}; each trial {meta['epochs']} epochs at {meta['image_size']} px on "
        f"{meta['num_workers']} worker(s).",
        "",
        "Values: validation mAP@ALL (validation split against the training images) at each trial's best "
        "epoch; the query set is not used. `*`: the trial was stopped early by the scheduler (its mAP after "
        "fewer epochs).",
        "",
    ]
    if best is not None:
        shown = ", ".join(f"{k} {fmt(best.hparams.get(k))}" for k in knobs)
        lines += [f"Best: {shown}, {best.bits} bits: {best.val_map:.4f} (MLflow run `{best.run_id}`).", ""]
    if pivots and rows:
        for knob in knobs:
            others = " and ".join(k for k in knobs if k != knob)
            lines += [f"## Validation mAP by {knob} and code length" + (f" (best over {others})" if others else ""), ""]
            lines += _pivot(rows, lambda r, k=knob: r.hparams.get(k), knob, bit_lengths) + [""]
        if len(knobs) > 1:
            lines += [f"## Every ({', '.join(knobs)})", ""]
            lines += _pivot(rows, lambda r: tuple(r.hparams.get(k) for k in knobs), ", ".join(knobs), bit_lengths) + [
                ""
            ]
    head = " | ".join(knobs)
    lines += [
        "## Trials, best first",
        "",
        f"| {head} | bits | val mAP | best epoch | epochs | status | MLflow run |",
        "|---" * (len(knobs) + 6) + "|",
    ]
    ranked = sorted(rows, key=lambda r: (math.isnan(r.val_map), -(r.val_map if not math.isnan(r.val_map) else 0)))
    for r in ranked:
        shown = "" if math.isnan(r.val_map) else f"{r.val_map:.4f}"
        status = r.status + (f" ({r.error})" if r.error else "")
        lines.append(
            f"| {' | '.join(fmt(r.hparams.get(k)) for k in knobs)} | {r.bits} | {shown} | {r.best_epoch} | {r.epochs} "
            f"| {status} | `{r.run_id}` |"
        )
    return "\n".join(lines) + "\n"


def row_knobs(rows: Sequence[TrialRow]) -> list[str]:
    """The searched knobs of ``rows``, in the order the trials give them."""
    return list(dict.fromkeys(k for r in rows for k in r.hparams))


def summary_csv(rows: Sequence[TrialRow], knobs: Sequence[str] | None = None) -> str:
    knobs = list(knobs or row_knobs(rows))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial_id", *knobs, "bits", "val_map", "best_epoch", "epochs", "status", "run_id"])
    for r in rows:
        writer.writerow(
            [
                r.trial_id,
                *(r.hparams.get(k, "") for k in knobs),
                r.bits,
                "" if math.isnan(r.val_map) else f"{r.val_map:.6f}",
                r.best_epoch,
                r.epochs,
                r.status,
                r.run_id,
            ]
        )
    return buf.getvalue()
