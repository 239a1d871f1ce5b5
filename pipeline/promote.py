"""Stage `promote`: register an evaluated model; the `champion` alias goes only to a better one.

    python -m pipeline.promote --dataset cifar10 --bits 64 [--method NAME] [--seed N] [--run-id ID] [--params FILE] [--set key=value ...]

Registers the model of the run named by ``runs/<dataset>-<bits>-<method>-s<seed>.json`` (or ``--run-id``) as
``promote.model_name`` (default ``<method>-<dataset>-<bits>b``; DPFAH's ``dpfah-<dataset>-<bits>b``) and moves ``promote.alias``
(default ``champion``) to the new version only when its query metric (``promote.metric``,
default ``query_map``) is strictly higher than the current holder's, or nothing holds it.
The decision and both numbers go to the run's tags, the version's tags and
``promotions/<dataset>-<bits>-<method>-s<seed>.json``.

Refuses (exit 2, nothing registered, no alias moved) when the run has no evaluation or only
an incomplete one (no ``eval.complete`` marker for its last ``eval.id``: that evaluate failed
part-way), when ``metrics/<dataset>-<bits>-<method>-s<seed>.json`` is missing or belongs to another run or
other settings, when the two numbers were not measured the same way (another R or other
shards), or when the model has NaN or infinite weights.

Concurrent promotions into one store act one at a time (:func:`promotion_lock`: a file lock
beside a SQLite store, a lock entry in a tracking server's registry) across
read-compare-register-alias, so a run gets one version and the alias never moves to a model
worse than the one it held; after moving it, promote reads it back and repairs it if a
writer outside the lock put a worse model there.

Idempotent: a run is registered once (its version is found again by run id) and a decision
already recorded on the version is reused as long as nothing it depended on has changed, so
running the stage twice changes neither the registry nor the promotion file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import DEFAULT_METHOD, evaluation_file, metric_values, metrics_file, promotion_file, write_json_atomic
from .config import Params, add_config_args, config_from_args
from .console import quiet_libraries, stderr_muted
from .errors import PipelineError, run_main
from .registry import (
    EVAL_COMPLETE_TAG,
    EVAL_ID_TAG,
    MismatchError,
    check_training_run,
    load_checked_model,
    model_name,
    read_run_record,
    run_model_uri,
)
from .timing import record, span
from .tracking import connect, get_run, mlflow_errors, sqlite_path, tracking_uri, using_tracking_uri

__all__ = ["EvaluationMissing", "EvaluationIncomplete", "LockTimeout", "Promotion", "promote", "model_name", "main"]

RECORD_TAG = "promote.record"
#: Seconds a promotion waits for the lock before it reports the holder (a file lock) or
#: takes the lock over as stale (a tracking server: its holder must have died).
LOCK_WAIT_S = 120.0
#: The registered model that serves as the lock of ``<name>`` on a tracking server.
LOCK_SUFFIX = ".promote-lock"
#: MLflow error codes of a write that may succeed when tried again.
TRANSIENT = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


class EvaluationMissing(PipelineError):
    """The run has not been evaluated (or its metrics file is missing or unreadable)."""


class EvaluationIncomplete(EvaluationMissing):
    """The run's last evaluation did not finish: no completion marker for it."""


class LockTimeout(PipelineError):
    """Another promotion of the same store held the promotion lock for too long."""


@dataclass(frozen=True)
class Promotion:
    record: dict[str, Any]
    path: Path
    registered: bool  # a new model version was created
    moved: bool  # the alias was moved


def _read_metrics(dataset: str, bits: int, root, which: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    path = metrics_file(dataset, bits, root, **which)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvaluationMissing(
            f"{path}: no evaluation metrics (run python -m pipeline.evaluate --dataset {dataset} --bits {bits} first)"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationMissing(f"{path}: unreadable metrics ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or not metric_values(doc):
        raise EvaluationMissing(f"{path}: not an evaluation metrics file (no query_* metrics)")
    return doc, path


def _read_evaluation(dataset: str, bits: int, root, which: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The evaluation record beside the metrics file: the run, data and settings measured."""
    path = evaluation_file(dataset, bits, root, **which)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvaluationMissing(
            f"{path}: no evaluation record (run python -m pipeline.evaluate --dataset {dataset} --bits {bits} first)"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationMissing(f"{path}: unreadable evaluation record ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or "run_id" not in doc:
        raise EvaluationMissing(f"{path}: not an evaluation record (no run_id)")
    return doc, path


def _alias_holder(client, name: str, alias: str) -> int | None:
    aliases = client.get_registered_model(name).aliases or {}
    held = aliases.get(alias)
    return None if held is None else int(held)


def _find_version(client, name: str, run_id: str):
    """The run's model version (lowest, if registered twice by hand), or None; creates the
    registered model when it does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(
                name,
                description="Hashing models (uint8 images in, binary codes out), one version per promoted training; the alias (champion) marks the best by query mAP",
            )
        except MlflowException as e2:
            if e2.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return None
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _decide(
    client,
    name: str,
    version: int | None,
    run_id: str,
    value: float,
    holder: int | None,
    metric: str,
    map_at,
    sha: str,
    uri: str,
):
    """(decision, previous holder or None) for the candidate against the alias's holder."""
    if holder is not None and holder == version:
        return "unchanged", {"version": version, "run_id": run_id, "value": value}
    if holder is None:
        return "promoted", None
    champion = client.get_model_version(name, str(holder))
    champ_run = get_run(client, champion.run_id, uri, f"{name} version {holder}")
    champ_value = champ_run.data.metrics.get(metric)
    previous = {"version": holder, "run_id": champion.run_id, "value": champ_value}
    if champ_value is None:
        raise EvaluationMissing(
            f"{name} version {holder} holds the alias but its run {champion.run_id} has no {metric}: evaluate it "
            f"(python -m pipeline.evaluate --run-id {champion.run_id} ...) or remove the alias by hand"
        )
    tags = champ_run.data.tags
    if tags.get("eval.map_at") != str(map_at) or tags.get("eval.manifest_sha256") != sha:
        raise MismatchError(
            f"{name} version {holder} (run {champion.run_id}) was evaluated at mAP@{tags.get('eval.map_at')} on shards "
            f"{str(tags.get('eval.manifest_sha256'))[:12]}, this run at mAP@{map_at} on {sha[:12]}: not comparable; "
            f"re-evaluate the champion's run with the same settings"
        )
    return ("promoted" if value > champ_value else "kept"), previous


def _from_dvc_files(
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
            f"(evaluate that run first: python -m pipeline.evaluate --dataset {dataset} --bits {bits})"
        )
    if (doc.get("dataset"), doc.get("bits")) != (dataset, bits):
        raise MismatchError(
            f"{doc_path}: evaluation of {doc.get('dataset')!r} at {doc.get('bits')} bits, not {dataset!r} at {bits}"
        )
    if doc.get("map_at") != map_at:
        raise MismatchError(
            f"{doc_path}: evaluated at mAP@{doc.get('map_at')} but evaluate.map_at gives mAP@{map_at} now: re-run evaluate"
        )
    if metric not in doc:
        raise EvaluationMissing(f"{doc_path}: no {metric}")
    return record, str(record_path), doc


def _evaluated_value(
    run, doc, dataset: str, bits: int, root, metric: str, map_at, source: str, by_id: bool, which: dict[str, Any]
) -> tuple[float, str]:
    """(the run's ``metric``, the shards' sha256 it was measured on), checked to be the
    evaluation of this run on the data it was trained on, as the metrics file says, and
    complete: its ``eval.complete`` marker, written last by evaluate, names its ``eval.id``."""
    run_id, tags = run.info.run_id, run.data.tags
    value = run.data.metrics.get(metric)
    if value is None or "eval.map_at" not in tags:
        raise EvaluationMissing(
            f"MLflow run {run_id} (from {source}) has no evaluation ({metric}): run python -m pipeline.evaluate "
            f"--dataset {dataset} --bits {bits}{' --run-id ' + run_id if by_id else ''} first"
        )
    marker, eval_id = tags.get(EVAL_COMPLETE_TAG), tags.get(EVAL_ID_TAG)
    if not marker or marker != eval_id:
        earlier = f"; the last one that did was {marker}" if marker else ""
        raise EvaluationIncomplete(
            f"MLflow run {run_id} (from {source}): its last evaluation ({eval_id or 'no eval.id'}) has no completion marker "
            f"(the evaluate that logged it failed part-way{earlier}): re-run python -m pipeline.evaluate --dataset {dataset} "
            f"--bits {bits}{' --run-id ' + run_id if by_id else ''}, then promote"
        )
    if doc is not None and doc.get("eval_id") not in (None, marker):
        raise MismatchError(
            f"{metrics_file(dataset, bits, root, **which)}: evaluation {doc['eval_id']}, but MLflow run {run_id}'s last completed "
            f"evaluation is {marker}: re-run evaluate"
        )
    if doc is not None and doc[metric] != value:
        raise MismatchError(
            f"{metrics_file(dataset, bits, root, **which)}: {metric} {doc[metric]!r} differs from MLflow run {run_id}'s "
            f"{value!r} (another evaluation was logged since): re-run evaluate"
        )
    if tags.get("eval.map_at") != str(map_at):
        raise MismatchError(
            f"MLflow run {run_id} was evaluated at mAP@{tags.get('eval.map_at')}, but evaluate.map_at gives mAP@{map_at}: re-run evaluate"
        )
    sha = tags.get("eval.manifest_sha256", "")
    if sha != tags.get("manifest_sha256"):
        raise MismatchError(
            f"MLflow run {run_id} was evaluated on other shards ({sha[:12]}) than it was trained on: re-run evaluate"
        )
    return value, sha


def promote(
    params: Params,
    dataset: str,
    bits: int,
    *,
    run_id: str | None = None,
    root: str | os.PathLike = ".",
    method: str = DEFAULT_METHOD,
    seed: int | None = None,
) -> Promotion:
    """Register the evaluated model of ``runs/<dataset>-<bits>-<method>-s<seed>.json`` (or
    ``run_id``) as ``promote.model_name`` (default ``<method>-<dataset>-<bits>b``: each method
    has its own champion) and move the alias to it when it beats the holder; write
    ``promotions/<dataset>-<bits>-<method>-s<seed>.json``."""
    which = {"method": method, "seed": params.seed if seed is None else seed}
    params.dataset(dataset)
    cfg = params.promote
    metric, alias = cfg.metric, cfg.alias
    map_at = params.evaluate.map_at_label(dataset)
    name = model_name(params, dataset, bits, method)

    record: dict[str, Any] | None = None
    doc: dict[str, Any] | None = None
    if run_id is None:
        record, source, doc = _from_dvc_files(dataset, bits, root, map_at, metric, which)
        run_id = record["run_id"]
    else:
        source = "--run-id"
    uri = tracking_uri(params)
    with span("imports and mlflow: find the run"):
        client = connect(uri)
        quiet_libraries()  # MLflow's "Registered model ... already exists" and the like: ours says what happened
        run = get_run(client, run_id, uri, source)
    check_training_run(run, dataset, bits, source)
    value, sha = _evaluated_value(
        run, doc, dataset, bits, root, metric, map_at, source, by_id=record is None, which=which
    )
    tags = run.data.tags
    model_uri = run_model_uri(client, run, uri, record.get("model_uri") if record else None)
    with span("mlflow: load the model, check its weights"):
        load_checked_model(model_uri, run_id, uri)  # NaN or inf anywhere: refused, nothing registered
    with span("mlflow: register, decide, tag"), promotion_lock(client, uri, name):
        out, version, registered, moved = _register_and_decide(
            client,
            uri,
            name,
            alias,
            metric,
            map_at,
            run_id,
            value,
            sha,
            tags,
            model_uri,
            dataset,
            bits,
            run.data.metrics,
        )
    path = write_json_atomic(promotion_file(dataset, bits, root, **which), out)
    return Promotion(out, path, registered, moved)


def _rounded(value: float) -> str:
    """A metric as a tag: four decimals are what a reader compares (the files keep all)."""
    return repr(round(float(value), 4))


def _version_description(
    metrics: dict[str, float], tags: dict[str, str], dataset: str, bits: int, map_at, run_id: str
) -> str:
    """What a model version is, in the registry's words (Markdown): the data, the query
    metrics, where its figures are."""
    radius = tags.get("eval.radius", "2")

    def number(key: str) -> str:
        return f"{metrics[key]:.4f}" if key in metrics else "not measured"

    empty = (
        f" ({metrics['query_empty_ball_share']:.0%} of queries with an empty ball)"
        if "query_empty_ball_share" in metrics
        else ""
    )
    return (
        f"**{tags.get('method', 'dpfah')}** on **{dataset}** (protocol {tags.get('protocol', '?')}, shards {tags.get('manifest_sha256', '?')[:12]}), "
        f"**{bits} bits**.\n\n"
        f"Query mAP@{map_at}: **{number('query_map')}** (tie-aware {number('query_map_tie_aware')}); "
        f"P@H<={radius}: **{number('query_precision_within_radius')}**{empty}.\n\n"
        f"Figures (PR curves, P@N, top-k retrieval grid), curve data and packed codes: artifacts `evaluation/` of run `{run_id}` "
        f"(`evaluation/pr_curves.png`, `evaluation/p_at_n.png`, `evaluation/retrieval_grid.png`).\n\n"
        f'Input: uint8 RGB images (N, H, W, 3); output: int8 codes (N, {bits}) in {{-1, +1}} (docs/serving.md, "The logged model").'
    )


def _register_and_decide(
    client, uri, name, alias, metric, map_at, run_id, value, sha, tags, model_uri, dataset, bits, run_metrics
):
    """Register the run's model once and move the alias when it wins; the record, the
    version, whether a version was created, whether the alias moved."""
    import mlflow
    from mlflow.entities import RunTag

    with mlflow_errors(f"registering run {run_id} as {name}", uri):
        version_tags = {
            "dataset": dataset,
            "bits": str(bits),
            "protocol": tags.get("protocol", ""),
            "manifest_sha256": sha,
            "map_at": str(map_at),
            metric: _rounded(value),
            "git_commit": tags.get("git_commit", ""),
        }
        found = _find_version(client, name, run_id)
        version = None if found is None else int(found.version)
        holder = _alias_holder(client, name, alias)
        stored = None if version is None else _stored(client, name, version)
        reuse = (
            stored is not None
            and stored.get("value") == value
            and stored.get("metric") == metric
            and stored.get("map_at") == map_at
            and stored.get("alias") == alias
            and stored.get("alias_version") == holder
        )
        registered = moved = False
        if reuse:
            out = stored
        else:
            # Decide first: a refusal (nothing comparable) registers nothing.
            decision, previous = _decide(client, name, version, run_id, value, holder, metric, map_at, sha, uri)
            if version is None:
                with using_tracking_uri(uri), stderr_muted():  # our own line says what happened
                    version = int(
                        mlflow.register_model(
                            model_uri, name, tags={k: v for k, v in version_tags.items() if v}
                        ).version
                    )
                registered = True
                client.update_model_version(
                    name,
                    str(version),
                    description=_version_description(run_metrics, tags, dataset, bits, map_at, run_id),
                )
            if decision == "promoted":
                client.set_registered_model_alias(name, alias, str(version))
                moved = True
                holder = _verify_alias(client, uri, name, alias, version, value, metric)
                if holder != version:  # a better one took it meanwhile (outside any lock of ours)
                    decision, moved = "kept", False
                    champion = client.get_model_version(name, str(holder))
                    previous = {
                        "version": holder,
                        "run_id": champion.run_id,
                        "value": get_run(client, champion.run_id, uri).data.metrics.get(metric),
                    }
            out = {
                "dataset": dataset,
                "bits": bits,
                "model_name": name,
                "alias": alias,
                "metric": metric,
                "map_at": map_at,
                "run_id": run_id,
                "version": version,
                "value": value,
                "previous": previous,
                "decision": decision,
                "alias_version": version if decision == "promoted" else holder,
            }
            client.set_model_version_tag(name, str(version), RECORD_TAG, json.dumps(out, sort_keys=True))
        prev = out["previous"] or {}
        run_tags = {
            "promote.decision": out["decision"],
            "promote.model_name": name,
            "promote.version": str(version),
            "promote.alias": alias,
            "promote.alias_version": str(out["alias_version"]),
            f"promote.{metric}": _rounded(value),
        }
        if prev.get("value") is not None:  # no champion before: no empty tags
            run_tags[f"promote.champion_{metric}"] = _rounded(prev["value"])
        if prev.get("version") is not None:
            run_tags["promote.champion_version"] = str(prev["version"])
        if any(tags.get(k) != v for k, v in run_tags.items()):
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
    return out, version, registered, moved


@contextlib.contextmanager
def promotion_lock(client, uri: str, name: str):
    """Held across read-compare-register-alias-tag, so concurrent promotions act one after
    the other: one version per run, and the alias never moves to a worse model.

    A local SQLite store: ``fcntl.flock`` on ``<store>.promote.lock`` beside it (released by
    the kernel when the process dies). Anything else (a tracking server): the registered
    model ``<name>.promote-lock``, whose creation fails for everyone but one (the store's
    unique name); deleted on release; taken over when the same lock has been held for
    LOCK_WAIT_S (its holder died). See docs/operations.md for what that leaves."""
    if uri.startswith("sqlite:"):
        path = sqlite_path(uri)
        if path is None:  # in-memory: one process only
            yield
            return
        with _file_lock(path + ".promote.lock", uri):
            yield
        return
    with _registry_lock(client, uri, name):
        yield


def _waiting(since: float, announced: bool, what: str) -> bool:
    if not announced and time.monotonic() - since > 2.0:
        print(f"promote: waiting for {what}", file=sys.stderr, flush=True)
        return True
    return announced


@contextlib.contextmanager
def _file_lock(path: str, uri: str):
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise LockTimeout(f"{path}: cannot open the promotion lock beside the store {uri} ({e.strerror})") from None
    try:
        start, announced = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - start > LOCK_WAIT_S:
                    raise LockTimeout(
                        f"{path}: another promotion into {uri} has held this lock for over {LOCK_WAIT_S:g} s; try again when it ends"
                    ) from None
                announced = _waiting(start, announced, f"another promotion into {uri} (lock {path})")
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _registry_lock(client, uri: str, name: str):
    from mlflow.exceptions import MlflowException

    lock = name + LOCK_SUFFIX
    owner = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
    start, announced, seen = time.monotonic(), False, None  # seen: (creation stamp, first seen)
    with mlflow_errors(f"taking the promotion lock {lock}", uri):
        while True:
            try:
                client.create_registered_model(
                    lock,
                    tags={"owner": owner},
                    description=f"held by pipeline.promote while it promotes into {name}; removed when it ends",
                )
                break
            except MlflowException as e:
                # A server on SQLite may answer a contended write with a transient error
                # (database locked); whether the write landed is read back below. "Does not
                # exist": the name was taken when MLflow's SQL store tried to insert it and gone
                # when it read the holder back to word its "already exists" error; the read
                # below finds it released (or taken again) as well.
                if (
                    e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", *TRANSIENT)
                    or time.monotonic() - start > LOCK_WAIT_S
                ):
                    raise
            try:
                held = client.get_registered_model(lock)
            except MlflowException as e:
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    continue  # released meanwhile
                if e.error_code in TRANSIENT and time.monotonic() - start <= LOCK_WAIT_S:
                    time.sleep(0.1 + 0.2 * random.random())
                    continue
                raise
            if (held.tags or {}).get("owner") == owner:
                break  # our create landed although its answer was an error
            if seen is None or seen[0] != held.creation_timestamp:
                seen = (held.creation_timestamp, time.monotonic())
            elif time.monotonic() - seen[1] > LOCK_WAIT_S:
                print(
                    f"promote: taking over {lock} at {uri}, held by {(held.tags or {}).get('owner', '?')} for over {LOCK_WAIT_S:g} s",
                    file=sys.stderr,
                    flush=True,
                )
                with contextlib.suppress(MlflowException):
                    client.delete_registered_model(lock)
                seen = None
                continue
            announced = _waiting(
                start,
                announced,
                f"another promotion into {name} at {uri} ({lock} held by {(held.tags or {}).get('owner', '?')})",
            )
            time.sleep(0.1 + 0.2 * random.random())
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            if (client.get_registered_model(lock).tags or {}).get("owner") == owner:
                client.delete_registered_model(lock)


def _verify_alias(client, uri: str, name: str, alias: str, version: int, value: float, metric: str) -> int:
    """Read the alias back after moving it to ``version``: if another writer moved it to a
    worse model meanwhile, move it back; if to one at least as good, that one stands.
    Returns the version that holds the alias."""
    for _ in range(3):
        held = _alias_holder(client, name, alias)
        if held == version:
            return version
        if held is not None:
            other = client.get_model_version(name, str(held))
            other_value = get_run(client, other.run_id, uri, f"{name} version {held}").data.metrics.get(metric)
            if other_value is not None and other_value >= value:
                return held
        client.set_registered_model_alias(name, alias, str(version))
    return _alias_holder(client, name, alias)


def _stored(client, name: str, version: int) -> dict[str, Any] | None:
    text = (client.get_model_version(name, str(version)).tags or {}).get(RECORD_TAG)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.promote",
        description=(
            "Register an evaluated hashing model in the MLflow model registry as\n"
            "<method>-<dataset>-<bits>b (promote.model_name; DPFAH's: dpfah-<dataset>-<bits>b) and move\n"
            "the `champion` alias (promote.alias) to it only when its query mAP (promote.metric) beats\n"
            "the current champion's. Writes promotions/<dataset>-<bits>-<method>-s<seed>.json and tags\n"
            "the run with the decision. Running it again changes nothing."
        ),
        epilog=(
            "examples:\n"
            "  python -m pipeline.promote --dataset cifar10 --bits 64\n"
            "  python -m pipeline.promote --dataset cifar10 --bits 64 --run-id 0123abcd...   # after evaluate --run-id\n"
            "Load the champion with mlflow.pytorch.load_model('models:/dpfah-cifar10-64b@champion').\n"
            "Refuses (one line, exit 2; no alias moves) when the run has no evaluation or the metrics file\n"
            "belongs to another run."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, metavar="NAME", help="dataset name from params.yaml")
    parser.add_argument("--bits", type=int, required=True, metavar="L", help="code length of the model")
    parser.add_argument(
        "--method",
        metavar="NAME",
        default=DEFAULT_METHOD,
        help="the method or variant trained (names the files and, by default, the registered model; default: dpfah)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", help="the training seed (names the files; default: params.yaml's seed)"
    )
    parser.add_argument(
        "--run-id",
        metavar="ID",
        help="promote this evaluated MLflow run instead of the run record's (its evaluation is read from MLflow)",
    )
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    record("promote: main entered", time.time())
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    result = promote(params, args.dataset, args.bits, run_id=args.run_id, method=args.method, seed=args.seed)
    r = result.record
    prev = r["previous"]
    versus = (
        f"version {prev['version']} has {prev['value']:.4f}"
        if prev and prev.get("value") is not None
        else "no champion before"
    )
    what = {
        "promoted": f"{r['alias']} -> version {r['version']}"
        if result.moved
        else f"{r['alias']} on version {r['version']} (decided before)",
        "kept": f"{r['alias']} stays on version {r['alias_version']}",
        "unchanged": f"version {r['version']} already holds {r['alias']}",
    }[r["decision"]]
    print(
        f"{r['model_name']} version {r['version']}{' (new)' if result.registered else ''}: {r['metric']} {r['value']:.4f} "
        f"({versus}): {what}; wrote {result.path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
