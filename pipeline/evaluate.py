"""Stage `evaluate`: retrieval metrics of a trained model, for DVC and for its MLflow run.

    python -m pipeline.evaluate --dataset cifar10 --bits 64 [--method M] [--seed S] [--run-id ID] [--set key=value ...]

The work is :func:`pipeline.evaluation.evaluate`; what and why: docs/report.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .config import add_config_args, config_from_args
from .errors import run_main
from .evaluate_outputs import P_AT, p_at_name
from .evaluation import evaluate
from .runkey import RunKey, add_key_args
from .timing import record

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description=(
            "Evaluate a trained hashing model for retrieval: encode the query and database splits once and\n"
            "compute mAP@R (index ties and tie-aware), P@H<=2 with the share of empty balls, the P@N\n"
            "curve and PR curves. Writes metrics/<dataset>-<bits>-<method>-s<seed>.json and\n"
            "plots/<dataset>-<bits>-<method>-s<seed>/*.csv\n"
            "and logs the metrics, figures and packed codes to the model's MLflow run."
        ),
        epilog=(
            "examples:\n"
            "  python -m pipeline.evaluate --dataset cifar10 --bits 64\n"
            "  python -m pipeline.evaluate --dataset cifar10 --bits 64 --run-id 0123abcd...   # no run record\n"
            "  python -m pipeline.evaluate --dataset nuswide21 --bits 32 --set evaluate.map_at.nuswide21=5000\n"
            "The model comes from runs/<dataset>-<bits>.json (written by pipeline.train) unless --run-id is\n"
            "given; the run must have been trained on the same shards. Errors print one line and exit 2."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_key_args(parser, what="the trained model")
    parser.add_argument(
        "--run-id",
        metavar="ID",
        help="evaluate this MLflow run's model instead of the run record's (e.g. after `ray job submit`)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    record("evaluate: main entered", time.time())
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    result = evaluate(
        params, RunKey.from_args(args, params), run_id=args.run_id, progress=False if args.quiet else None
    )
    d = m = result.doc
    p_at = max((n for n in P_AT if p_at_name(n) in m), default=None)
    extra = f", P@{p_at} {m[p_at_name(p_at)]:.4f}" if p_at else ""
    print(
        f"evaluated {d['dataset']} {d['bits']} bits (run {d['run_id']}, {d['n_queries']:,} queries x {d['n_db']:,}): "
        f"mAP@{d['map_at']} {m['query_map']:.4f} (tie-aware {m['query_map_tie_aware']:.4f}), "
        f"P@H<={d['radius']} {m['query_precision_within_radius']:.4f} "
        f"({m['query_empty_ball_share']:.0%} empty balls){extra}; "
        f"wrote {result.metrics_file} and the curves {', '.join(map(str, result.plot_files.values()))} "
        f"in {result.seconds['total']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
