"""The shape of the code: which module may import which.

Read from the source (every import statement, those inside functions included), so a
lazy import cannot hide a cycle or a layering break."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dpfah", "pipeline")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path) -> list[tuple[str, tuple[str, ...], int]]:
    """(imported module, names imported from it, line) of every import in the file,
    relative imports resolved."""
    module = _module_name(path)
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
            found += [(f"{target}.{n}", (), node.lineno) for n in names if _is_module(f"{target}.{n}")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _, _ in _imports(path):
            # the deepest project module the import names (a.b.c -> a.b.c, else a.b)
            parts = target.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in modules:
                    if candidate != module:
                        graph[module].add(candidate)
                    break
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_of_the_project_has_no_cycle():
    graph = _graph()
    assert len(graph) > 15 and "pipeline.train" in graph and "dpfah.train" in graph
    # package __init__ files importing their own submodules are not layering; leave them out
    inner = {m: {t for t in ts if not (m in PACKAGES and t.startswith(m + "."))} for m, ts in graph.items()}
    cycle = _cycle(inner)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_finder_sees_a_cycle():
    """The check above can fail: a made-up graph with a cycle is caught."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_dpfah_is_a_library_of_torch_and_numpy_only():
    for path in (ROOT / "dpfah").rglob("*.py"):
        for target, _, line in _imports(path):
            top = target.split(".")[0]
            assert top not in ("pipeline", "ray", "mlflow", "dvc"), f"{path.relative_to(ROOT)}:{line} imports {target}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_is_imported_across_modules(package):
    for path in (ROOT / package).rglob("*.py"):
        for target, names, line in _imports(path):
            private = [n for n in names if n.startswith("_") and n != "__future__" and not n.startswith("__")]
            assert not private, f"{path.relative_to(ROOT)}:{line} imports private {private} from {target}"


def _stages() -> set[str]:
    """The stages: modules under pipeline/ run as ``python -m pipeline.<stage>`` (a top-level
    ``main`` and an ``if __name__ == "__main__"`` block)."""
    found = set()
    for path in (ROOT / "pipeline").glob("*.py"):
        body = ast.parse(path.read_text(), str(path)).body
        has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in body)
        runs = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in body)
        if has_main and runs:
            found.add(_module_name(path))
    return found


def test_no_stage_imports_another_stage():
    """A stage is a command; what two stages share (a file format, a service) lives in a
    module below the stages: index format (index_format), codes files (codefiles), model
    resolution and trained runs (registry), collection readers and the list format
    (collection, sources), recipes (recipes), a training (train_driver, train_worker). So a
    stage can change without changing another, and its code deps in dvc.yaml are its own."""
    stages = _stages()
    known = {
        "pipeline.prepare",
        "pipeline.objective",
        "pipeline.train",
        "pipeline.tune",
        "pipeline.evaluate",
        "pipeline.promote",
        "pipeline.report",
        "pipeline.index",
        "pipeline.search",
        "pipeline.profile",
    }
    assert known <= stages, f"not found as stages: {sorted(known - stages)}"
    graph = _graph()
    wrong = sorted(f"{stage} imports the stage {target}" for stage in stages for target in graph[stage] & stages)
    assert not wrong, "; ".join(wrong)


# ----------------------------------------------------------------------------- dvc.yaml's code deps

#: Imports not followed when collecting what a stage runs, each with why its code cannot
#: change what the stage writes. pipeline.config checks the objectives' knobs against the
#: methods while it parses the parameters (pipeline.config_schema): it accepts or refuses params.yaml and returns
#: nothing, so following it would rerun prepare, evaluate, promote, report and index on any
#: edit of a method's loss. The stages that run a method import it themselves.
NOT_FOLLOWED = {("pipeline.config_schema", "pipeline.methods")}
#: Files other than Python sources that a module runs: the C kernels dpfah.kernels loads.
RUNS_ALSO = {"dpfah.kernels": ("dpfah/_hamming.c", "dpfah/_ranking.c", "dpfah/_cpu.h")}


def _module_file(module: str) -> str:
    path = ROOT / Path(*module.split("."))
    return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT).as_posix()


def _runs_code(module: str) -> bool:
    """Whether importing ``module`` runs code (an __init__.py of a docstring alone does not)."""
    body = ast.parse((ROOT / _module_file(module)).read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def stage_code(module: str, graph: dict[str, set[str]] | None = None) -> set[str]:
    """The files of the project that the stage ``module`` may run: the modules it imports,
    transitively (imports inside functions included: stages import lazily), the packages
    around them (Python runs their __init__), and the C sources of the kernels."""
    graph = graph if graph is not None else _graph()
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:n]) for n in range(1, len(parts))]  # the enclosing packages
        todo += [t for t in graph[current] if (current, t) not in NOT_FOLLOWED]
    files = {_module_file(m) for m in seen if _runs_code(m)}
    for m, extra in RUNS_ALSO.items():
        if m in seen:
            files.update(extra)
    return files


def _is_code_dep(dep: str) -> bool:
    """A dep naming the project's code (a module, a C source, a folder holding modules);
    data (pipeline/protocols, runs/, tune, ...) is not."""
    path = ROOT / dep
    if dep.split("/")[0] not in PACKAGES:
        return False
    return path.suffix in (".py", ".c", ".h") or (path.is_dir() and any(path.rglob("*.py")))


def _covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def _dvc_stages() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (the pipeline module its command runs, its deps)."""
    import re

    import yaml

    stages = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        m = re.search(r"python -m (pipeline\.\w+)", body["cmd"])
        assert m, f"dvc.yaml stage {name}: its cmd runs no pipeline module"
        stages[name] = (m.group(1), [str(d) for d in body.get("deps", [])])
    return stages


def code_dep_problems(module: str, deps: list[str], graph: dict[str, set[str]] | None = None) -> list[str]:
    """What is wrong with a stage's code deps: a file it runs that no dep covers (missing),
    a code dep that covers nothing it runs (stale)."""
    needed = stage_code(module, graph)
    code = [d for d in deps if _is_code_dep(d)]
    missing = sorted(f for f in needed if not any(_covers(d, f) for d in code))
    stale = sorted(d for d in code if not any(_covers(d, f) for f in needed))
    return [f"missing {f} (run by {module})" for f in missing] + [
        f"stale {d} ({module} does not run it)" for d in stale
    ]


def test_the_kernels_sources_are_all_listed():
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "dpfah").glob("*.[ch]")}
    assert sources == set(RUNS_ALSO["dpfah.kernels"])
    assert all(Path(f).name in (ROOT / "dpfah" / "kernels.py").read_text() for f in RUNS_ALSO["dpfah.kernels"])


def test_each_dvc_stage_depends_on_exactly_the_code_it_runs():
    """dvc.yaml's code deps of each stage are what its module imports (transitively), so an
    edit of code a stage runs reruns that stage and no other edit does: a module missing from
    the deps, or a code dep the stage no longer runs, fails naming the stage."""
    graph = _graph()
    stages = _dvc_stages()
    assert {m for m, _ in stages.values()} >= {"pipeline.train", "pipeline.tune", "pipeline.index"}
    problems = [
        f"{name}: {p}" for name, (module, deps) in stages.items() for p in code_dep_problems(module, deps, graph)
    ]
    assert not problems, "dvc.yaml code deps:\n" + "\n".join(problems)


def test_the_code_deps_check_sees_a_missing_and_a_stale_entry():
    """The check above can fail: train's deps without dpfah/metrics.py (its validation mAP)
    and with a module it does not run."""
    module, deps = _dvc_stages()["train"]
    assert "pipeline/train.py" in deps and not code_dep_problems(module, deps)
    changed = [d for d in deps if d != "dpfah/metrics.py"] + ["pipeline/search.py"]
    assert code_dep_problems(module, changed) == [
        "missing dpfah/metrics.py (run by pipeline.train)",
        "stale pipeline/search.py (pipeline.train does not run it)",
    ]
