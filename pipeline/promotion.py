"""Register an evaluated model; the `champion` alias goes only to a better one (the promote
stage's work: one entry, or every entry of the matrix, each registered model once).

What it checks (:mod:`pipeline.promote_checks`), how concurrent promotions take turns
(:mod:`pipeline.promotion_lock`), the tags it writes and why running it twice changes
nothing: docs/pipeline.md, "promote".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import write_json_atomic
from .config import Params
from .console import quiet_libraries, stderr_muted
from .promote_checks import EvaluationIncomplete, EvaluationMissing, evaluated_value, from_dvc_files
from .promotion_lock import LockTimeout, promotion_lock
from .registry import MismatchError, check_training_run, load_checked_model, model_name, run_model_uri
from .runkey import RecordError, RunKey, read_record
from .timing import span
from .tracking import connect, get_run, mlflow_errors, tracking_uri, using_tracking_uri

__all__ = [
    "EvaluationMissing",
    "EvaluationIncomplete",
    "LockTimeout",
    "Promotion",
    "promote",
    "promote_all",
    "model_name",
    "tag_alias_holder",
]

RECORD_TAG = "promote.record"


@dataclass(frozen=True)
class Promotion:
    record: dict[str, Any]
    path: Path
    registered: bool  # a new model version was created
    moved: bool  # the alias was moved


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
                description="Hashing models (uint8 images in, binary codes out), one version per promoted training; "
                "the alias (champion) marks the best by query mAP",
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


def promote(params: Params, key: RunKey, *, run_id: str | None = None, root: str | os.PathLike = ".") -> Promotion:
    """Register the evaluated model of ``key``'s run record (or ``run_id``) as
    ``promote.model_name`` (default ``<method>-<dataset>-<bits>b``: each method has its own
    champion) and move the alias to it when it beats the holder; write ``key``'s promotion record."""
    dataset, bits, method = key.dataset, key.bits, key.method
    params.dataset(dataset)
    cfg = params.promote
    metric, alias = cfg.metric, cfg.alias
    map_at = params.evaluate.map_at_label(dataset)
    name = model_name(params, dataset, bits, method)

    record: dict[str, Any] | None = None
    doc: dict[str, Any] | None = None
    if run_id is None:
        record, source, doc = from_dvc_files(key, root, map_at, metric)
        run_id = record["run_id"]
    else:
        source = "--run-id"
    uri = tracking_uri(params)
    with span("imports and mlflow: find the run"):
        client = connect(uri)
        quiet_libraries()  # MLflow's "Registered model ... already exists" and the like: ours says what happened
        run = get_run(client, run_id, uri, source)
    check_training_run(run, dataset, bits, source)
    value, sha = evaluated_value(run, doc, key, root, metric, map_at, source, by_id=record is None)
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
    path = write_json_atomic(key.promotion_file(root), out)
    return Promotion(out, path, registered, moved)


def _decided(key: RunKey, root) -> bool:
    """Whether ``key``'s promotion record already decided on its current run and evaluation:
    the same run, the metric value its metrics file holds now."""
    try:
        done = read_record(key.promotion_file(root), "promotion record", missing="-")
        run = read_record(key.run_file(root), "run record", missing="-")
        metrics = read_record(key.metrics_file(root), "metrics", missing="-")
    except RecordError:
        return False
    return done.get("run_id") == run.get("run_id") and metrics.get(done.get("metric")) == done.get("value")


def promote_all(
    params: Params, keys: Sequence[RunKey], root: str | os.PathLike = ".", *, report=print
) -> list[tuple[RunKey, Promotion | None]]:
    """Promote every entry of ``keys`` in turn, grouped by registered model (one pass over each:
    no two promotions of this process wait on one another's lock); an entry whose promotion
    record already decided on its current run and value is left as it is (None)."""
    by_model: dict[str, list[RunKey]] = {}
    for key in keys:
        by_model.setdefault(model_name(params, key.dataset, key.bits, key.method), []).append(key)
    out: list[tuple[RunKey, Promotion | None]] = []
    for _, group in sorted(by_model.items()):
        for key in group:
            if _decided(key, root):
                out.append((key, None))
                continue
            result = promote(params, key, root=root)
            report(f"{key.stem}: {describe(result)}")
            out.append((key, result))
    return out


def describe(result: Promotion) -> str:
    """One line: the version, its value against the holder's, what happened to the alias."""
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
    new = " (new)" if result.registered else ""
    return f"{r['model_name']} version {r['version']}{new}: {r['metric']} {r['value']:.4f} ({versus}): {what}"


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
    # The first line is plain text, numbers first: MLflow's version list shows it raw and cut after
    # about 32 characters (issue 29).
    return (
        f"mAP@{map_at} {number('query_map')}, P@H<={radius} {number('query_precision_within_radius')}: "
        f"{tags.get('method', 'dpfah')} on {dataset}, {bits} bits (protocol {tags.get('protocol', '?')}, shards "
        f"{tags.get('manifest_sha256', '?')[:12]}).\n\n"
        f"Query mAP@{map_at}: **{number('query_map')}** (tie-aware {number('query_map_tie_aware')}); "
        f"P@H<={radius}: **{number('query_precision_within_radius')}**{empty}.\n\n"
        "Figures (PR curves, P@N, top-k retrieval grid), curve data and packed codes: artifacts `evaluation/` of "
        f"run `{run_id}` (`evaluation/pr_curves.png`, `evaluation/p_at_n.png`, `evaluation/retrieval_grid.png`).\n\n"
        f"Input: uint8 RGB images (N, H, W, 3); output: int8 codes (N, {bits}) in {{-1, +1}} "
        '(docs/serving.md, "The logged model").'
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
        tag_alias_holder(client, name, alias, out["alias_version"])
    return out, version, registered, moved


def tag_alias_holder(client, name: str, alias: str, holder: int | None) -> None:
    """The training run of the version that holds ``alias`` carries the run tag ``<alias>`` =
    ``name`` (the runs table shows and filters it: ``tags.champion = 'dpfah-cifar10-64b'``);
    the runs of this model's other versions lose it, so the tag moves with the alias (also
    when someone moved the alias by hand: the next promotion puts the tag right)."""
    if holder is None:
        return
    versions = client.search_model_versions(f"name = '{name}'")
    holder_run = next((v.run_id for v in versions if int(v.version) == int(holder)), None)
    for run_id in sorted({v.run_id for v in versions if v.run_id}):
        has = client.get_run(run_id).data.tags.get(alias) == name
        if run_id == holder_run and not has:
            client.set_tag(run_id, alias, name)
        elif run_id != holder_run and has:
            client.delete_tag(run_id, alias)


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
