"""The package as users and the cluster image install it: a wheel, not the source tree.

`pip wheel .` must carry both compiled kernels; installed into a fresh virtual environment
(no editable install, the repository nowhere on the path) the package imports, uses the
compiled kernels and its stages answer --help. The fresh environment reaches the already
installed dependencies through a .pth file, so nothing is downloaded and CI stays fast."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from dpfah import kernels

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, timeout=600, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run(cmd, cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{(out.stdout + out.stderr)[-4000:]}"
    )
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # A copy of the sources as git has them: a wheel must not pick up a developer's build products.
    src = tmp_path_factory.mktemp("src")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD"], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-xf", "-", "-C", str(src)], input=archive, check=True)
    for path in ("setup.py", "pyproject.toml", "dpfah", "pipeline"):  # the working tree's version of what builds
        subprocess.run(["cp", "-r", str(REPO / path), str(src)], check=True)
    for so in src.rglob("*.so"):
        so.unlink()
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        cwd=src,
        DPFAH_REQUIRE_KERNELS="1",
    )
    (found,) = dist.glob("dpfah_pipeline-*.whl")
    return found


def test_the_wheel_carries_both_kernels_and_the_protocol_lists(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in kernels.MODULES.values():
        assert [n for n in names if n.startswith(module) and n.endswith(".so")], f"{module} not in {wheel.name}"
    assert (
        "pipeline/protocols/imagenet100/database.txt.gz" in names
        and "pipeline/protocols/nuswide21/train.txt.gz" in names
    )
    assert "dpfah/settings.py" in names and "pipeline/train.py" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]


def test_the_wheel_installed_in_a_fresh_environment_works_outside_the_repository(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    # The dependencies: this environment's site-packages, after the fresh one's own (a .pth
    # line is appended to sys.path; the editable install's own .pth hooks are not run).
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
    ).strip()
    deps = [p for p in site.getsitepackages() if p.endswith("site-packages")] or [sysconfig.get_paths()["purelib"]]
    Path(purelib, "zz_deps.pth").write_text("\n".join(deps) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)], cwd=tmp_path)

    away = tmp_path / "elsewhere"
    away.mkdir()
    out = _run(
        [str(python), "-I", "-c",
         "import dpfah, pipeline, dpfah.kernels as k, dpfah.codes as c, dpfah.metrics as m; "
         "print(dpfah.__file__); print(pipeline.__file__); print(k.status(), c.compiled_kernel(), m.backend())"],
        cwd=away,
    )  # fmt: skip
    lines = out.strip().splitlines()
    assert lines[0].startswith(purelib) and lines[1].startswith(purelib), out  # the installed copy, not the repository
    assert str(REPO) not in out
    assert "numpy" not in lines[2] and lines[2].endswith(" c"), out  # compiled kernels, from the wheel
    for stage in ("prepare", "train", "evaluate", "promote", "tune", "objective", "profile"):
        text = _run([str(python), "-I", "-m", f"pipeline.{stage}", "--help"], cwd=away)
        assert text.startswith("usage: python -m pipeline."), (stage, text[:300])


def _fake_python(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize(
    "fakes, expected",
    [
        # a pyenv shim for an unselected version exists but does not run: skipped
        (
            {"python3.11": "echo 'pyenv: python3.11: command not found' >&2; exit 127", "python3.12": "echo 3.12.4"},
            "python3.12 3.12.4",
        ),
        # too old (the version check fails), then 3.13
        ({"python3.11": "exit 1", "python3.12": "exit 127", "python3.13": "echo 3.13.0"}, "python3.13 3.13.0"),
        ({"python3": "echo 3.14.1"}, "python3 3.14.1"),
    ],
)
def test_setup_picks_the_first_python_that_runs_and_is_recent_enough(tmp_path, fakes, expected):
    for name, body in fakes.items():
        _fake_python(tmp_path, name, body)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{tmp_path}:/usr/bin:/bin"
    for name in ("python3.11", "python3.12", "python3.13", "python3"):  # hide the machine's own
        if name not in fakes:
            _fake_python(tmp_path, name, "exit 127")
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh"), "--which-python"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout.strip()) == (0, expected), out.stderr


def test_setup_names_what_it_tried_when_no_python_fits(tmp_path):
    _fake_python(tmp_path, "old", "exit 1")
    env = {**os.environ, "PYTHON": str(tmp_path / "old")}
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh"), "--which-python"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and f"no Python 3.11 or newer found (tried: {tmp_path / 'old'})" in out.stderr
