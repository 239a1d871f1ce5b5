"""Train a hashing model with Ray Train (DDP over N workers) and record it in MLflow.

    python -m pipeline.train --dataset cifar10 --bits 64 [--method NAME] [--seed N] [--objective FILE]
        [--params FILE] [--profile NAME] [--set key=value ...]

The driver (this process, :mod:`pipeline.train_driver`) reads the prepared dataset's manifest, resolves what to train
(``--objective``, the file the ``objective`` stage writes under DVC, or ``--method`` /
``train.method`` resolved here: DPFAH, a comparison method of :mod:`dpfah.methods`, or a
variant), opens the MLflow run, fits a ``TorchTrainer`` whose workers (:mod:`pipeline.train_worker`) each build the
network and the method's objective and run ``dpfah.train.fit``, then logs the best
validation checkpoint as an MLflow model and writes
``runs/<dataset>-<bits>-<method>-s<seed>.json`` (run id, model URI) for the evaluate and
promote stages.

What a training reads: its dataset's shards, its code length, the objective file, its seed,
and the ``train`` (but the matrix lists), ``model`` and ``mlflow`` sections (dvc.yaml lists
exactly these).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from . import recipes
from .cluster import shutdown_before_exit
from .config import add_config_args, config_from_args
from .errors import ConfigError, run_main
from .runkey import RunKey, add_key_args
from .timing import record, span
from .tracking import check_store, tracking_uri
from .train_driver import run_training

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train a hashing model (DPFAH, a comparison method or a variant) on a prepared dataset with Ray "
        "Train (DDP) and record the run, its per-epoch metrics and the best-validation model in MLflow. "
        "Writes runs/<dataset>-<bits>-<method>-s<seed>.json.",
        epilog="Profiles: the defaults in params.yaml train on a CPU in minutes; "
        "`--profile paper` selects the paper's settings (224 px, RMSProp 5e-5, batch 128, GPUs) for this run.",
    )
    add_key_args(parser, what="the codes to learn (16, 32, 48 or 64 in the paper)")
    parser.add_argument(
        "--objective",
        metavar="FILE",
        help="take the method and its hyper-parameters from this file (written by python -m pipeline.objective; "
        "what DVC runs) instead of resolving params.yaml here",
    )
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    record("train: main entered", time.time())
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    check_store(tracking_uri(params), create=True)  # before the imports and Ray: fail in a second
    recipe = recipes.read(args.objective, args.dataset, args.bits) if args.objective else None
    if recipe is not None and args.method and args.method != recipe.entry:
        raise ConfigError(f"--method {args.method}: {args.objective} is the objective of {recipe.entry}")
    key = RunKey.from_args(args, params)
    if recipe is not None:
        key = RunKey(key.dataset, key.bits, recipe.entry, key.seed)
    with span("train: run_training"):
        outcome = run_training(params, key, recipe=recipe)
    at = f"epoch {outcome.best_epoch} of 0..{outcome.epochs - 1} (numbered from 0, as MLflow's steps)"
    chosen = (
        f"best validation mAP {outcome.best_val_map:.4f} at {at}"
        if outcome.best_val_map is not None
        else f"no validation split, the last epoch's model: {at}"
    )
    print(
        f"trained {args.dataset} {args.bits} bits ({outcome.method}): {chosen}; MLflow run {outcome.run_id}; "
        f"model {outcome.model_uri}; wrote {outcome.run_file}"
    )
    return 0


if __name__ == "__main__":
    code = run_main(main)
    shutdown_before_exit()
    sys.exit(code)
