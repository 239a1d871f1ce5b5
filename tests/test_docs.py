"""The README and the documentation site (docs/, mkdocs.yml): the README stays a short
front page whose commands are CI's, its links land on pages that exist, every stage has its
generated command-line reference, and the site builds strictly (as .ci/run builds it)."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _fenced(text: str) -> list[str]:
    """The lines of the ```bash blocks of a markdown text."""
    return [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if line.strip()
    ]


def test_the_readme_is_a_short_front_page():
    assert len(README.read_text().splitlines()) <= 200


def test_ci_runs_the_readme_setup_and_test_commands():
    """.ci/run installs as the README's one command does and runs the README's test command."""
    commands = _fenced(README.read_text())
    run_and_setup = [c for c in commands if c.startswith("bash scripts/setup.sh")]
    assert len(run_and_setup) == 1 and "dvc exp run" in run_and_setup[0], commands
    assert ".venv/bin/python -m pytest" in commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "bash scripts/setup.sh" in ci and ".venv/bin/python -m pytest" in ci
    assert ci.index("bash scripts/setup.sh") < ci.index(".venv/bin/python -m pytest")
    assert any(".venv/bin/mkdocs build --strict" in line and not line.startswith("#") for line in ci)


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    """Every relative link of the README and of a docs page names a file that exists (the
    strict build checks the docs' links too, anchors included, where MkDocs is installed)."""
    links = _relative_links(page)
    if page == README:
        assert any(link.startswith("docs/") for link in links)
    for link in links:
        target = (page.parent / link.split("#")[0]).resolve()
        assert target.is_file(), f"{page.relative_to(ROOT)}: {link}"


def _stages() -> set[str]:
    """The pipeline modules that build a command line (a `build_parser` function)."""
    found = set()
    for path in (ROOT / "pipeline").glob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name == "build_parser" for node in tree.body):
            found.add(f"pipeline.{path.stem}")
    return found


def test_every_stage_has_a_generated_reference_and_the_readme_links_every_page():
    cli = (DOCS / "cli.md").read_text()
    assert set(re.findall(r"^<!-- cli: (pipeline\.\w+) -->$", cli, re.M)) == _stages()
    assert len(_stages()) >= 10
    nav = [page for entry in yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"] for page in entry.values()]
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert set(nav) == pages
    readme_links = {link.split("#")[0].removeprefix("docs/") for link in _relative_links(README)}
    assert {p for p in pages if not p.startswith("reports/")} <= readme_links


def test_the_cli_hook_prints_each_parsers_help():
    spec = importlib.util.spec_from_file_location("mkdocs_cli", ROOT / "scripts" / "mkdocs_cli.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = hook.on_page_markdown("# x\n\n<!-- cli: pipeline.search -->\n\nafter\n")
    assert page.startswith("# x\n\n```text\nusage: python -m pipeline.search ") and page.endswith("```\n\nafter\n")
    assert "--radius R" in page and "<!--" not in page
    assert len(page.splitlines()[3]) <= hook.WIDTH  # the usage line, wrapped at the hook's width, not the terminal's


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs and mkdocs-material are not installed (the dev extra pins them)",
)
def test_the_site_builds_strictly_with_every_stage_reference(tmp_path):
    """`mkdocs build --strict`, as .ci/run runs it: any warning (a broken link or anchor, a
    page outside the nav) fails; offline; the reference page holds every stage's usage."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    html = (tmp_path / "site" / "cli" / "index.html").read_text()
    for stage in _stages():
        assert f"usage: python -m {stage} " in html, stage
    assert (tmp_path / "site" / "reports" / "cifar10-cpu" / "gradcam_64.png").is_file()
