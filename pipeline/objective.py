"""Stage `objective`: the loss settings one training uses, resolved into a small file.

    python -m pipeline.objective --dataset cifar10 --bits 64 [--params FILE] [--set key=value ...]

A training's loss weights come from params.yaml's ``loss`` section, or, with
``loss.use_tuned``, from the tune stage's ``tune/<dataset>/best.json`` (the best trial at
this code length, else the best overall). DVC has no conditional dependencies, so this
stage makes the dependency exact: it reads both and writes
``objectives/<dataset>-<bits>.json`` (eta, zeta, delta, pairs and where eta and zeta came
from), and the training depends on that file alone. A new search result rewrites the file
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
from pathlib import Path
from typing import Any

from dpfah.settings import LossSettings, pick

from .artifacts import best_file, objective_file, write_json_atomic
from .config import Params, add_config_args, config_from_args
from .errors import ConfigError, run_main

__all__ = ["Resolved", "resolve", "write", "read", "main"]

Resolved = tuple[LossSettings, dict[str, str]]


def _tuned(dataset: str, bits: int, root: str | os.PathLike) -> tuple[dict[str, float], dict[str, str]]:
    path = best_file(dataset, root)
    if not path.is_file():
        raise ConfigError(
            f"loss.use_tuned: {path} not found (run the search first: python -m pipeline.tune --dataset {dataset}, "
            f"or dvc repro tune@{dataset} with {dataset} in tune.datasets)"
        )
    try:
        record = json.loads(path.read_text())
        entry = record.get("by_bits", {}).get(str(bits)) or record
        weights = {"eta": float(entry["eta"]), "zeta": float(entry["zeta"])}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"loss.use_tuned: {path} is not a tune result ({type(e).__name__}: {e})") from None
    source = {
        "tuned_from": str(path),
        "tuned_search_run_id": str(record.get("search_run_id", "")),
        "tuned_trial_run_id": str(entry.get("run_id", "")),
        "tuned_bits": str(entry.get("bits", "")),
    }
    return weights, source


def resolve(params: Params, dataset: str, bits: int, root: str | os.PathLike = ".") -> Resolved:
    """(the loss settings, where eta and zeta came from) for ``dataset`` at ``bits``."""
    params.dataset(dataset)
    if not params.loss.use_tuned:
        return pick(LossSettings, params.loss), {"weights_from": "params"}
    weights, source = _tuned(dataset, bits, root)
    return pick(LossSettings, params.loss, **weights), {"weights_from": "tune", **source}


def write(resolved: Resolved, dataset: str, bits: int, root: str | os.PathLike = ".") -> Path:
    settings, source = resolved
    doc = {"dataset": dataset, "bits": bits, "loss": dataclasses.asdict(settings), "source": source}
    return write_json_atomic(objective_file(dataset, bits, root), doc)


def read(path: str | os.PathLike, dataset: str, bits: int) -> Resolved:
    """The loss settings of an objective file, checked to belong to ``dataset`` at ``bits``."""
    path = Path(path)
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        if (doc["dataset"], doc["bits"]) != (dataset, bits):
            raise ConfigError(f"{path}: the objective of {doc['dataset']!r} at {doc['bits']} bits, not {dataset!r} at {bits}")
        return LossSettings(**doc["loss"]), {k: str(v) for k, v in doc.get("source", {}).items()}
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (python -m pipeline.objective --dataset {dataset} --bits {bits} writes it)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not an objective file ({type(e).__name__}: {e})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.objective",
        description="Resolve the loss settings of one training (params.yaml's `loss`, or with loss.use_tuned the "
        "search's best eta and zeta) into objectives/<dataset>-<bits>.json, the file the train stage reads under DVC.",
    )
    parser.add_argument("--dataset", required=True, help="dataset name from params.yaml")
    parser.add_argument("--bits", type=int, required=True, help="code length of the training")
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    resolved = resolve(params, args.dataset, args.bits)
    path = write(resolved, args.dataset, args.bits)
    s = resolved[0]
    print(f"{args.dataset} {args.bits} bits: eta {s.eta:g}, zeta {s.zeta:g} (from {resolved[1]['weights_from']}); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
