"""The shape of the code: which module may import which.

Read from the source (every import statement, those inside functions included), so a
lazy import cannot hide a cycle or a layering break."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.codegraph import PACKAGES, RUNS_ALSO, graph, imports, module_name, stage_code

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path):
    return imports(path)


def _graph() -> dict[str, set[str]]:
    return graph()


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
            found.add(module_name(path))
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
        "pipeline.matrix",
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
    assert {m for m, _ in stages.values()} >= {"pipeline.matrix", "pipeline.tune", "pipeline.index"}
    problems = [
        f"{name}: {p}" for name, (module, deps) in stages.items() for p in code_dep_problems(module, deps, graph)
    ]
    assert not problems, "dvc.yaml code deps:\n" + "\n".join(problems)


def test_the_code_deps_check_sees_a_missing_and_a_stale_entry():
    """The check above can fail: the matrix's deps without dpfah/metrics.py (its validation
    mAP and the evaluation) and with a module it does not run."""
    module, deps = _dvc_stages()["train"]
    assert "pipeline/matrix.py" in deps and not code_dep_problems(module, deps)
    changed = [d for d in deps if d != "dpfah/metrics.py"] + ["pipeline/search.py"]
    assert code_dep_problems(module, changed) == [
        "missing dpfah/metrics.py (run by pipeline.matrix)",
        "stale pipeline/search.py (pipeline.matrix does not run it)",
    ]
