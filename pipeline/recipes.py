"""What one training optimises (a :class:`Recipe`): resolved from the parameters (and, with
``use_tuned``, the tune stage's ``tune/<dataset>/best.json``), written to and read
from ``objectives/<dataset>-<bits>-<method>.json``.

The objective stage resolves and writes the file; train reads it (or resolves a recipe
itself without ``--objective``), and tune resolves the base recipe its trials vary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import DEFAULT_METHOD, best_file, objective_file, write_json_atomic
from .config import ModelSettings, Params
from .config_binder import bind
from .config_schema import ObjectiveFile, check_objective
from .errors import ConfigError
from .methods import as_declared, method_names

__all__ = ["Recipe", "resolve", "tuned", "write", "read"]


@dataclass(frozen=True)
class Recipe:
    """What one training optimises: ``entry`` (a method or variant name, as train.methods
    lists it) runs ``method`` (a :mod:`dpfah.methods` name) with ``hparams`` over the
    method's defaults and ``model`` changes to the network; ``source`` says where the
    hyper-parameters came from (tags of the run)."""

    entry: str
    method: str
    hparams: dict[str, Any]
    model: dict[str, Any]
    source: dict[str, str]


def tuned(dataset: str, bits: int, root: str | os.PathLike = ".") -> tuple[str, dict[str, Any], dict[str, str]]:
    """(the method searched, its best knobs, where they came from) of ``tune/<dataset>/best.json``:
    the best trial at ``bits``, else the best overall."""
    path = best_file(dataset, root)
    if not path.is_file():
        raise ConfigError(
            f"use_tuned: {path} not found (run the search first: python -m pipeline.tune --dataset {dataset}, "
            f"or dvc repro tune@{dataset} with {dataset} in tune.datasets)"
        )
    try:
        record = json.loads(path.read_text())
        method = str(record.get("method", DEFAULT_METHOD))
        entry = record.get("by_bits", {}).get(str(bits)) or record
        knobs = {k: entry[k] for k in record.get("knobs", ("eta", "zeta"))}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"use_tuned: {path} is not a tune result ({type(e).__name__}: {e})") from None
    source = {
        "tuned_from": str(path),
        "tuned_search_run_id": str(record.get("search_run_id", "")),
        "tuned_trial_run_id": str(entry.get("run_id", "")),
        "tuned_bits": str(entry.get("bits", "")),
    }
    return method, knobs, source


def resolve(
    params: Params, dataset: str, bits: int, method: str | None = None, root: str | os.PathLike = "."
) -> Recipe:
    """The recipe of ``method`` (default: train.method; a method or a variant) for
    ``dataset`` at ``bits``: the method's `objectives.<method>` (a null keeps its default),
    with use_tuned and a search over that method its searched knobs from the search, then a
    variant's own changes on top."""
    entry = method or params.train.method
    params.dataset(dataset)
    variant = params.variants.get(entry)
    if variant is None and entry not in method_names():
        raise ConfigError(
            f"--method {entry}: unknown method or variant (methods: {', '.join(method_names())}; variants: "
            f"{', '.join(params.variants) or 'none'})"
        )
    base = variant.method if variant else entry
    hparams, source = dict(params.objectives.get(base, {})), {"weights_from": "params"}
    if params.use_tuned:
        searched, knobs, tuned_source = tuned(dataset, bits, root)
        if searched == base:
            hparams.update(knobs)
            source = {"weights_from": "tune", **tuned_source}
        else:
            print(
                f"note: use_tuned: {tuned_source['tuned_from']} is a search over {searched}'s knobs; {entry} keeps "
                f"objectives.{base}",
                file=sys.stderr,
            )
    if variant is not None:
        hparams.update(variant.objective)
        source = {**source, "variant": entry}
    hparams = {k: as_declared(base, k, v) for k, v in hparams.items() if v is not None}  # null: the method's default
    return Recipe(entry, base, hparams, dict(variant.model) if variant else {}, source)


def write(recipe: Recipe, dataset: str, bits: int, root: str | os.PathLike = ".") -> Path:
    doc = {"dataset": dataset, "bits": bits, **{k: v for k, v in dataclasses.asdict(recipe).items()}}
    doc["hparams"] = {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.hparams.items()}
    return write_json_atomic(objective_file(dataset, bits, root, method=recipe.entry), doc)


def read(path: str | os.PathLike, dataset: str, bits: int) -> Recipe:
    """The recipe of an objective file, checked as params.yaml's objectives are (its method,
    its knobs, its network changes: one line naming the key) and to belong to ``dataset`` at
    ``bits``."""
    path = Path(path)
    try:
        doc: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: not found (python -m pipeline.objective --dataset {dataset} --bits {bits} writes it)"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not an objective file ({type(e).__name__}: {e})") from None
    try:
        f = bind(ObjectiveFile, doc)
        check_objective(f.method, f.hparams, f.model, ModelSettings(), "", "hparams")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if (f.dataset, f.bits) != (dataset, bits):
        raise ConfigError(f"{path}: the objective of {f.dataset!r} at {f.bits} bits, not {dataset!r} at {bits}")
    return Recipe(f.entry, f.method, dict(f.hparams), dict(f.model), dict(f.source))
