"""MkDocs hook (mkdocs.yml `hooks:`): the command-line reference, generated from the code.

A line `<!-- cli: pipeline.<stage> -->` in a page becomes that stage's `--help` (usage,
options, epilog) from its `build_parser()`, so a stage's usage is written once, in its module.
Only the stage modules are imported (they import torch, Ray and MLflow lazily): building the
site starts nothing and needs no network.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- cli: (pipeline\.\w+) -->$", re.M)
#: columns argparse wraps the help at (it reads $COLUMNS), so the page does not depend on the terminal
WIDTH = 100


def help_text(module: str) -> str:
    """`python -m <module> --help` as printed at WIDTH columns, from this checkout's code."""
    if sys.path[0] != str(ROOT):  # this checkout, not another installed copy of the project
        sys.path.insert(0, str(ROOT))
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        return importlib.import_module(module).build_parser().format_help()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def on_page_markdown(markdown: str, **kwargs) -> str:
    return MARKER.sub(lambda m: f"```text\n{help_text(m.group(1)).rstrip()}\n```", markdown)
