"""Write a profile (``profiles/<name>.yaml``) into params.yaml, where DVC sees it.

    python -m pipeline.profile paper [--params FILE] [--dry-run]

DVC reads params.yaml alone: its matrix of code lengths, the values its stages depend on.
A profile applied only inside the stages (``--profile``) would be invisible to it, so under
DVC the profile's values are written into the file itself: every key the profile names is
set, nothing else changes, and the comments stay. Then ``dvc repro`` (or ``dvc exp run``)
plans exactly what the profile describes, and ``git diff params.yaml`` shows what changed.
The result is checked like any params file before it replaces the old one; a bad profile
leaves params.yaml untouched.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .artifacts import write_atomic
from .config import DEFAULT_PARAMS, parse_params, profile_overlay, read_params_file, read_yaml
from .errors import run_main

__all__ = ["apply_profile", "main"]


def _leaves(overlay: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def apply_profile(
    name: str, params_path: str | Path = DEFAULT_PARAMS, *, dry_run: bool = False
) -> list[tuple[str, Any, Any]]:
    """Set every value of profile ``name`` in ``params_path`` (comments kept); returns the
    ``(dotted key, old, new)`` of the values that changed."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    path = Path(params_path)
    overlay = profile_overlay(name, path)
    read_params_file(path)  # a clear error for a missing or broken file
    yaml = YAML()  # round trip: comments, order and layout kept
    yaml.width = 4096
    yaml.representer.add_representer(float, _represent_float)
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = yaml.load(path.read_text())
    changes = []
    for dotted, value in _leaves(overlay):
        node = doc
        *parents, last = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), Mapping):
                node[part] = CommentedMap()
            node = node[part]
        old = node.get(last)
        if isinstance(value, list):
            seq = CommentedSeq(value)
            seq.fa.set_flow_style()
            value_out: Any = seq
        else:
            value_out = value
        if old != value or last not in node:  # a null it sets is a value too (a method's own default)
            changes.append((dotted, None if old is None else _plain(old), value))
            node[last] = value_out
    buf = io.StringIO()
    yaml.dump(doc, buf)
    text = buf.getvalue()
    parse_params(read_yaml(text) or {})  # the result must be valid params
    if not dry_run and changes:
        write_atomic(path, text)
    return changes


def _represent_float(representer, value: float):
    """Floats as YAML 1.1 readers (PyYAML, DVC) parse them back: ``5.0e-05``, not ``5e-05``."""
    text = repr(value)
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.profile",
        description="Write profiles/NAME.yaml into the parameters file (comments kept), so that DVC plans and "
        "tracks the profile's values: e.g. `python -m pipeline.profile paper && dvc exp run`.",
    )
    parser.add_argument("name", help="profile name: profiles/NAME.yaml beside the parameters file (e.g. paper)")
    parser.add_argument(
        "--params",
        metavar="FILE",
        default=DEFAULT_PARAMS,
        help=f"parameters file to update (default: {DEFAULT_PARAMS})",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    changes = apply_profile(args.name, args.params, dry_run=args.dry_run)
    if not changes:
        print(f"{args.params} already has every value of profile {args.name!r}")
        return 0
    verb = "would set" if args.dry_run else "set"
    for dotted, old, new in changes:
        print(f"  {dotted}: {old!r} -> {new!r}")
    print(f"{verb} {len(changes)} values of profile {args.name!r} in {args.params}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
