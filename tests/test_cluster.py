"""pipeline.cluster: the local Ray instance a stage starts says nothing a user need not read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_local_start_keeps_token_auth_without_its_notice(tmp_path):
    """Ray starts a local instance with token authentication on when RAY_AUTH_MODE is unset,
    and says so in a WARNING line at every stage's start (issue 29). The stage keeps the
    authentication and drops the line; --verbose shows it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "import sys; from pipeline.cluster import ensure_ray, started_here; from pipeline.console import set_verbose\n"
        "set_verbose(sys.argv[1] == 'loud'); ensure_ray(); assert started_here()\n"
        "import os; print(os.environ.get('RAY_AUTH_MODE'))\n"  # Ray sets it when it turns token auth on
        "import ray; ray.shutdown()"
    )
    for mode, shown in (("quiet", False), ("loud", True)):
        proc = subprocess.run(
            [sys.executable, "-c", code, mode], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "token", "token authentication on"
        said = "Token authentication is enabled for this Ray cluster" in proc.stderr + proc.stdout
        assert said is shown, (mode, proc.stderr)
