"""One training of the matrix, named once: dataset, code length, method and seed.

A :class:`RunKey` owns its file stem, the path of every file written for it, the command-line
arguments that name it, and the check that a record on disk describes it. :func:`read_record`
is the one reader of the small JSON records the stages hand each other.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .artifacts import (
    CODES_DIR,
    DEFAULT_METHOD,
    EVALUATIONS_DIR,
    METRICS_DIR,
    OBJECTIVES_DIR,
    PLOTS_DIR,
    PROMOTIONS_DIR,
    RUNS_DIR,
)
from .errors import PipelineError

__all__ = ["RunKey", "RecordError", "add_key_args", "read_record"]

Root = str | os.PathLike

#: The largest record read (runs/, metrics/, evaluations/, promotions/, objectives/: a few KB each).
MAX_RECORD_BYTES = 4 << 20


class RecordError(PipelineError):
    """A stage's input record is missing, unreadable, or describes another training."""


@dataclass(frozen=True, order=True)
class RunKey:
    """``<dataset>-<bits>-<method>-s<seed>``: one training and every file written for it."""

    dataset: str
    bits: int
    method: str = DEFAULT_METHOD
    seed: int = 0

    #: The curves evaluate writes for DVC plots: PR by Hamming radius, PR by rank, P@N.
    CURVES: ClassVar[tuple[str, ...]] = ("pr_radius", "pr_rank", "p_at_n")

    @classmethod
    def matrix(cls, params, datasets) -> list[RunKey]:
        """Every training of ``datasets``: bits x train.methods x train.seeds, in that order."""
        t = params.train
        return [cls(d, b, m, s) for d in datasets for b in params.bits for m in t.methods for s in t.seeds]

    @classmethod
    def from_args(cls, args: argparse.Namespace, params) -> RunKey:
        """The key a stage's ``--dataset/--bits/--method/--seed`` name; an omitted method or seed
        is ``train.method`` / the top-level ``seed`` of the parameters."""
        method = getattr(args, "method", None) or params.train.method
        seed = getattr(args, "seed", None)
        return cls(args.dataset, int(args.bits), method, params.seed if seed is None else int(seed))

    @property
    def stem(self) -> str:
        """The name of this training's files, as dvc.yaml's matrix spells it."""
        return f"{self.dataset}-{self.bits}-{self.method}-s{self.seed}"

    def describe(self) -> str:
        return f"{self.method} on {self.dataset}, {self.bits} bits, seed {self.seed}"

    def argv(self) -> list[str]:
        """The arguments that name this training on any stage's command line."""
        return ["--dataset", self.dataset, "--bits", str(self.bits), "--method", self.method, "--seed", str(self.seed)]

    def command(self, stage: str) -> str:
        """``python -m pipeline.<stage> --dataset ... --seed ...``, for hints in error messages."""
        return " ".join(["python", "-m", f"pipeline.{stage}", *self.argv()])

    # -- the files of one training (relative to ``root``, the repository by default)

    def run_file(self, root: Root = ".") -> Path:
        return Path(root) / RUNS_DIR / f"{self.stem}.json"

    def objective_file(self, root: Root = ".") -> Path:
        """The objective does not depend on the training seed: one file per method."""
        return Path(root) / OBJECTIVES_DIR / f"{self.dataset}-{self.bits}-{self.method}.json"

    def metrics_file(self, root: Root = ".") -> Path:
        return Path(root) / METRICS_DIR / f"{self.stem}.json"

    def evaluation_file(self, root: Root = ".") -> Path:
        """Which run, data and settings the metrics file's numbers measure."""
        return Path(root) / EVALUATIONS_DIR / f"{self.stem}.json"

    def plot_file(self, curve: str, root: Root = ".") -> Path:
        """The data of one of this training's curves (:attr:`CURVES`): ``plots/<curve>/<stem>.csv``,
        a folder per curve so that DVC draws every file of a folder the same way."""
        if curve not in self.CURVES:
            raise ValueError(f"unknown curve {curve!r} (curves: {', '.join(self.CURVES)})")
        return Path(root) / PLOTS_DIR / curve / f"{self.stem}.csv"

    def query_codes_file(self, root: Root = ".") -> Path:
        return Path(root) / CODES_DIR / self.stem / "query.parquet"

    def promotion_file(self, root: Root = ".") -> Path:
        return Path(root) / PROMOTIONS_DIR / f"{self.stem}.json"

    def check(self, record: dict[str, Any], path: Path) -> None:
        """``record`` (a run, evaluation or promotion record) describes this training: its
        dataset and code length, and its method and seed where it records them."""
        said = (record.get("dataset"), record.get("bits"))
        if said != (self.dataset, self.bits):
            raise RecordError(
                f"{path}: records dataset {said[0]!r} at {said[1]!r} bits, not {self.dataset!r} at {self.bits} bits"
            )
        for field in ("method", "seed"):
            if field in record and record[field] != getattr(self, field):
                raise RecordError(f"{path}: records {field} {record[field]!r}, not {getattr(self, field)!r}")


def add_key_args(parser: argparse.ArgumentParser, *, what: str = "the training", required: bool = True) -> None:
    """The four arguments that name one training, the same on every stage."""
    parser.add_argument(
        "--dataset", required=required, metavar="NAME", help="dataset name from params.yaml (its shards prepared)"
    )
    parser.add_argument("--bits", type=int, required=required, metavar="L", help=f"code length of {what}")
    parser.add_argument(
        "--method",
        metavar="NAME",
        help="a method (dpfah, dsh, ...) or a variant in params.yaml (default: train.method)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", help="the training seed (names the files; default: params.yaml's seed)"
    )


def read_record(
    path: Path,
    what: str,
    *,
    missing: str,
    error: type[PipelineError] = RecordError,
    valid: Callable[[dict[str, Any]], str | None] | None = None,
) -> dict[str, Any]:
    """The JSON object at ``path`` (a ``what``: "run record", "metrics", ...), or ``error``
    with one line: ``missing`` says what to run when the file is absent; ``valid`` returns
    what is wrong with a readable object, or None. Only regular files, at most
    MAX_RECORD_BYTES, are read."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: no {what} ({missing})") from None
    except OSError as e:
        raise error(f"{path}: unreadable {what} ({type(e).__name__}: {e.strerror or e})") from None
    if not path.is_file():
        raise error(f"{path}: not a regular file (a {what} is a small JSON file)")
    if stat.st_size > MAX_RECORD_BYTES:
        raise error(f"{path}: {stat.st_size:,} bytes, too large for a {what} (at most {MAX_RECORD_BYTES:,})")
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise error(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: not a {what} (expected a JSON object)")
    wrong = valid(doc) if valid else None
    if wrong:
        raise error(f"{path}: {wrong}")
    return doc
