"""The project's import graph, read from the source: which files a stage runs, and their digest.

dvc.yaml's code deps are checked against :func:`stage_code` (tests/test_structure.py), and the
matrix stage records :func:`code_digest` with every training so that an edit of code a training
runs retrains it, and no other edit does.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

__all__ = ["ROOT", "PACKAGES", "imports", "graph", "stage_code", "code_digest", "module_name"]

#: The folder holding the project's packages (the repository in a checkout).
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dpfah", "pipeline")

#: Imports not followed when collecting what a stage runs, each with why its code cannot
#: change what the stage writes. pipeline.config checks the objectives' knobs against the
#: methods while it parses the parameters (pipeline.config_schema): it accepts or refuses params.yaml and returns
#: nothing, so following it would rerun prepare, evaluate, promote, report and index on any
#: edit of a method's loss. The stages that run a method import it themselves.
NOT_FOLLOWED = {("pipeline.config_schema", "pipeline.methods")}
#: Files other than Python sources that a module runs: the C kernels dpfah.kernels loads.
RUNS_ALSO = {"dpfah.kernels": ("dpfah/_hamming.c", "dpfah/_ranking.c", "dpfah/_cpu.h", "dpfah/_ranking_top.h")}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    path = root / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(path: Path, root: Path = ROOT) -> list[tuple[str, tuple[str, ...], int]]:
    """(imported module, names imported from it, line) of every import in the file (those
    inside functions included: stages import lazily), relative imports resolved."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = tuple(alias.name for alias in node.names)
            found.append((target, names, node.lineno))
            # `from . import x` imports the submodule (or subpackage) x
            found += [(f"{target}.{n}", (), node.lineno) for n in names if _is_module(f"{target}.{n}", root)]
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _, _ in imports(path, root):
            # the deepest project module the import names (a.b.c -> a.b.c, else a.b)
            parts = target.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in modules:
                    if candidate != module:
                        edges[module].add(candidate)
                    break
    return edges


def module_file(module: str, root: Path = ROOT) -> str:
    path = root / Path(*module.split("."))
    return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(root).as_posix()


def _runs_code(module: str, root: Path) -> bool:
    """Whether importing ``module`` runs code (an __init__.py of a docstring alone does not)."""
    body = ast.parse((root / module_file(module, root)).read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def stage_code(module: str, edges: dict[str, set[str]] | None = None, root: Path = ROOT) -> set[str]:
    """The files of the project that ``module`` may run: the modules it imports, transitively,
    the packages around them (Python runs their __init__), and the C sources of the kernels."""
    edges = edges if edges is not None else graph(root)
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:n]) for n in range(1, len(parts))]  # the enclosing packages
        todo += [t for t in edges[current] if (current, t) not in NOT_FOLLOWED]
    files = {module_file(m, root) for m in seen if _runs_code(m, root)}
    for m, extra in RUNS_ALSO.items():
        if m in seen:
            files.update(extra)
    return files


@functools.cache
def code_digest(module: str, root: Path = ROOT) -> str:
    """sha256 over the path and bytes of every file ``module`` runs (:func:`stage_code`); a
    file absent here (an installed wheel ships no C sources) counts by its name alone."""
    h = hashlib.sha256()
    for rel in sorted(stage_code(module, root=root)):
        path = root / rel
        h.update(rel.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"<absent>")
        h.update(b"\0")
    return h.hexdigest()


def dvc_code_deps(module: str, root: Path = ROOT) -> list[str]:
    """The code deps of a dvc.yaml stage that runs ``module``: :func:`stage_code`, with a package
    folder named once where every module of it is run (``dpfah/methods``)."""
    files = stage_code(module, root=root)
    out = set(files)
    for package in {str(Path(f).parent) for f in files if Path(f).parent.name not in PACKAGES}:
        every = {p.relative_to(root).as_posix() for p in (root / package).rglob("*.py")}
        if every and every <= files:
            out = {f for f in out if not f.startswith(package + "/")} | {package}
    return sorted(out)
