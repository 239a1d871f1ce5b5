"""Stage `objective`: what one training optimises, resolved into a small file.

    python -m pipeline.objective --dataset cifar10 --bits 64 [--method NAME] [--params FILE] [--set key=value ...]

A training runs a method of :mod:`dpfah.methods` or a named variant (a method with network
and hyper-parameter changes). A method's hyper-parameters (DPFAH's like any other's) come
from ``objectives.<method>`` over its own defaults (its paper's), and, with ``use_tuned``
and a search over that method, its searched knobs from the tune stage's
``tune/<dataset>/best.json`` (the best trial at this code length, else the best overall;
:mod:`pipeline.recipes`). DVC has no conditional dependencies,
so this stage makes the dependency exact: it reads all of that and writes
``objectives/<dataset>-<bits>-<method>.json`` (the method, its hyper-parameters, a
variant's network changes, and where the weights came from), and the training depends on
that file alone. A new search result rewrites the file
only for the trainings that use it; for the others the file stays byte-identical, and DVC
does not retrain them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import add_config_args, config_from_args
from .errors import run_main
from .recipes import resolve, write

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.objective",
        description="Resolve what one training optimises - the method (or variant), its hyper-parameters (for DPFAH "
        "params.yaml's `objectives.<method>` over the method's defaults, with use_tuned the search's best knobs) "
        "and a variant's network changes - into objectives/<dataset>-<bits>-<method>.json, a file `python -m "
        "pipeline.train --objective FILE` reads (the matrix resolves the same in its own process).",
    )
    parser.add_argument("--dataset", required=True, help="dataset name from params.yaml")
    parser.add_argument("--bits", type=int, required=True, help="code length of the training")
    parser.add_argument(
        "--method",
        metavar="NAME",
        help="a method (dpfah, dsh, hashnet, ...) or a variant of params.yaml (default: train.method)",
    )
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    recipe = resolve(params, args.dataset, args.bits, args.method)
    path = write(recipe, args.dataset, args.bits)
    shown = (
        ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in recipe.hparams.items())
        or "its defaults"
    )
    what = recipe.entry if recipe.entry == recipe.method else f"{recipe.entry} ({recipe.method})"
    print(f"{args.dataset} {args.bits} bits, {what}: {shown} (from {recipe.source['weights_from']}); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
