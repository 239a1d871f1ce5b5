"""Stage `objective`: what one training optimises, resolved into a small file.

    python -m pipeline.objective --dataset cifar10 --bits 64 [--method NAME] [--params FILE] [--set key=value ...]

A training runs a method of :mod:`dpfah.methods` or a named variant (a method with network
and hyper-parameter changes). A method's hyper-parameters (DPFAH's like any other's) come
from ``objectives.<method>`` over its own defaults (its paper's), and, with ``use_tuned``
and a search over that method, its searched knobs from the tune stage's
``tune/<dataset>/best.json`` (the best trial at this code length, else the best overall). DVC has no conditional dependencies,
so this stage makes the dependency exact: it reads all of that and writes
``objectives/<dataset>-<bits>-<method>.json`` (the method, its hyper-parameters, a
variant's network changes, and where the weights came from), and the training depends on
that file alone. A new search result rewrites the file
only for the trainings that use it; for the others the file stays byte-identical, and DVC
does not retrain them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import DEFAULT_METHOD, best_file, objective_file, write_json_atomic
from .config import Params, add_config_args, config_from_args
from .errors import ConfigError, run_main
from .methods import as_declared, method_names

__all__ = ["Recipe", "resolve", "tuned", "write", "read", "main"]


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


def resolve(params: Params, dataset: str, bits: int, method: str | None = None, root: str | os.PathLike = ".") -> Recipe:
    """The recipe of ``method`` (default: train.method; a method or a variant) for
    ``dataset`` at ``bits``: the method's `objectives.<method>` (a null keeps its default),
    with use_tuned and a search over that method its searched knobs from the search, then a
    variant's own changes on top."""
    entry = method or params.train.method
    params.dataset(dataset)
    variant = params.variants.get(entry)
    if variant is None and entry not in method_names():
        raise ConfigError(f"--method {entry}: unknown method or variant (methods: {', '.join(method_names())}; variants: {', '.join(params.variants) or 'none'})")
    base = variant.method if variant else entry
    hparams, source = dict(params.objectives.get(base, {})), {"weights_from": "params"}
    if params.use_tuned:
        searched, knobs, tuned_source = tuned(dataset, bits, root)
        if searched == base:
            hparams.update(knobs)
            source = {"weights_from": "tune", **tuned_source}
        else:
            print(f"note: use_tuned: {tuned_source['tuned_from']} is a search over {searched}'s knobs; {entry} keeps objectives.{base}", file=sys.stderr)
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
    """The recipe of an objective file, checked to belong to ``dataset`` at ``bits``."""
    path = Path(path)
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        if (doc["dataset"], doc["bits"]) != (dataset, bits):
            raise ConfigError(f"{path}: the objective of {doc['dataset']!r} at {doc['bits']} bits, not {dataset!r} at {bits}")
        return Recipe(doc["entry"], doc["method"], dict(doc["hparams"]), dict(doc["model"]), {k: str(v) for k, v in doc.get("source", {}).items()})
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (python -m pipeline.objective --dataset {dataset} --bits {bits} writes it)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not an objective file ({type(e).__name__}: {e})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.objective",
        description="Resolve what one training optimises - the method (or variant), its hyper-parameters (for DPFAH "
        "params.yaml's `objectives.<method>` over the method's defaults, with use_tuned the search's best knobs) "
        "and a variant's network changes - into objectives/<dataset>-<bits>-<method>.json, the file the train stage reads under DVC.",
    )
    parser.add_argument("--dataset", required=True, help="dataset name from params.yaml")
    parser.add_argument("--bits", type=int, required=True, help="code length of the training")
    parser.add_argument("--method", metavar="NAME", help="a method (dpfah, dsh, hashnet, ...) or a variant of params.yaml (default: train.method)")
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    recipe = resolve(params, args.dataset, args.bits, args.method)
    path = write(recipe, args.dataset, args.bits)
    shown = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in recipe.hparams.items()) or "its defaults"
    what = recipe.entry if recipe.entry == recipe.method else f"{recipe.entry} ({recipe.method})"
    print(f"{args.dataset} {args.bits} bits, {what}: {shown} (from {recipe.source['weights_from']}); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
