"""Stage `promote`: register evaluated models; the `champion` alias goes only to a better one.

    python -m pipeline.promote --dataset cifar10 --bits 64 [--method NAME] [--seed N] [--run-id ID]
    python -m pipeline.promote --all [--dataset NAME ...]      # every entry of the matrix (dvc.yaml's stage)

The work is :mod:`pipeline.promotion`; what it checks and why running it twice changes
nothing: docs/pipeline.md, "Promotion".
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .config import add_config_args, config_from_args
from .errors import ConfigError, run_main
from .promotion import describe, promote, promote_all
from .runkey import RunKey, add_key_args
from .timing import record

__all__ = ["build_parser", "main"]


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
            "  python -m pipeline.promote --dataset cifar10 --bits 64 --run-id 0123abcd...   # after evaluate "
            "--run-id\n"
            "Load the champion with pipeline.model_files.load_encoder('models:/dpfah-cifar10-64b@champion', URI)\n"
            "or mlflow.pyfunc.load_model; serve it with mlflow models serve (docs/serving.md).\n"
            "Refuses (one line, exit 2; no alias moves) when the run has no evaluation or the metrics file\n"
            "belongs to another run."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="promote every entry of the matrix (bits x train.methods x train.seeds of each --dataset, "
        "default: prepare.datasets), each registered model in one pass; entries already decided on their "
        "current run and value are left as they are (what dvc.yaml's promote stage runs)",
    )
    add_key_args(parser, what="the model", required=False)
    parser.add_argument(
        "--run-id",
        metavar="ID",
        help="promote this evaluated MLflow run instead of the run record's (its evaluation is read from MLflow)",
    )
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    record("promote: main entered", time.time())
    parser = build_parser()
    args = parser.parse_args(argv)
    params = config_from_args(args)
    if args.all:
        if args.bits is not None or args.run_id or args.method or args.seed is not None:
            raise ConfigError("--all promotes the whole matrix: give no --bits, --method, --seed or --run-id with it")
        datasets = [args.dataset] if args.dataset else list(params.prepare.datasets)
        results = promote_all(params, RunKey.matrix(params, datasets))
        decided = sum(r is None for _, r in results)
        print(f"promoted {len(results) - decided} entries of {', '.join(datasets)}; {decided} decided before")
        return 0
    if args.dataset is None or args.bits is None:
        raise ConfigError("give --dataset and --bits (one entry), or --all (every entry of the matrix)")
    result = promote(params, RunKey.from_args(args, params), run_id=args.run_id)
    print(f"{describe(result)}; wrote {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
