"""Rewrite the code deps of every dvc.yaml stage from the import graph (pipeline.codegraph).

    python scripts/dvc_deps.py [--check]

A stage's code deps are the files its `python -m pipeline.<module>` runs: the modules it imports,
transitively, and the kernels' C sources (tests/test_structure.py checks them). This keeps each
stage's other deps (data, folders, comments) and replaces only the lines naming code under
dpfah/ or pipeline/. --check: exit 1, naming the stages, where the file is not what it would write.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.codegraph import dvc_code_deps  # noqa: E402

CODE = re.compile(r"^(\s+)- (dpfah|pipeline)/[\w/.]+$")


def _is_code(line: str) -> bool:
    m = CODE.match(line)
    return bool(m) and not line.strip().startswith("- pipeline/protocols") and "dvc_plots" not in line


def rewrite(text: str) -> tuple[str, list[str]]:
    lines = text.split("\n")
    out: list[str] = []
    changed: list[str] = []
    module = stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^  (\w+):$", line)
        if m:
            stage, module = m.group(1), None
        cmd = re.search(r"python -m (pipeline\.\w+)", line)
        if cmd and stage:
            module = cmd.group(1)
        if _is_code(line) and module:
            indent = CODE.match(line).group(1)
            block = []
            while i < len(lines) and _is_code(lines[i]):
                block.append(lines[i])
                i += 1
            new = [f"{indent}- {d}" for d in dvc_code_deps(module)]
            if new != block:
                changed.append(stage)
            out += new
            continue
        out.append(line)
        i += 1
    return "\n".join(out), changed


def main() -> int:
    path = ROOT / "dvc.yaml"
    text, changed = rewrite(path.read_text())
    if "--check" in sys.argv[1:]:
        if changed:
            print(
                f"dvc.yaml: the code deps of {', '.join(changed)} are not their imports; run python scripts/dvc_deps.py"
            )
            return 1
        return 0
    path.write_text(text)
    print(f"dvc.yaml: code deps rewritten for {', '.join(changed) or 'no stage (all were current)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
