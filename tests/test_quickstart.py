"""The README's quick start (issue 29): a local copy of CIFAR-10 named by DPFAH_CIFAR10_SOURCE
stands in for the download, in a real DVC repository, and leaves params.yaml (and so the
commit the models record) clean; the md5 in params.yaml, which DVC sees, says which data."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_dag import BIN, copy_project, stage_env
from tests.test_prepare import make_cifar_archive

pytestmark = pytest.mark.slow

OFFICIAL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def sh(repo: Path, env: dict, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_local_copy_of_cifar10_leaves_params_alone_and_dvc_sees_the_md5(tmp_path):
    if not (BIN / "dvc").exists():
        pytest.skip("dvc is not installed")
    first, second = tmp_path / "one" / "cifar-10-python.tar.gz", tmp_path / "two" / "cifar-10-python.tar.gz"
    for seed, path in enumerate((first, second)):
        path.parent.mkdir()
        make_cifar_archive(path, per_class=600, seed=seed)
    repo = copy_project(tmp_path / "repo")
    # The checkout's params with this test's archive as "the official one" (its md5) and a
    # small shard size; committed, as a clone's params.yaml is.
    text = (repo / "params.yaml").read_text()
    official = yaml.safe_load(text)["datasets"]["cifar10"]
    assert official["source"] == OFFICIAL
    text = text.replace(official["md5"], md5(first)).replace("shard_size: 5000", "shard_size: 2000", 1)
    (repo / "params.yaml").write_text(text)
    env = stage_env(DPFAH_CIFAR10_SOURCE=str(first), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t")
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    sh(repo, env, "git", "init", "-q")
    sh(repo, env, str(BIN / "dvc"), "init", "-q")
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-qm", "clone")

    out = sh(repo, env, str(BIN / "dvc"), "repro", "prepare@cifar10").stdout
    assert "Running stage 'prepare@cifar10'" in out and "downloading" not in out
    assert sh(repo, env, "git", "status", "--porcelain", "--untracked-files=no").stdout == "", "params.yaml untouched"
    manifest = json.loads((repo / "data" / "shards" / "cifar10" / "manifest.json").read_text())
    assert manifest["source"] == {
        "url": OFFICIAL,
        "md5": md5(first),
        "size": first.stat().st_size,
        "type": "cifar-10-python",
    }
    assert not (repo / "data" / "downloads").exists(), "nothing downloaded"
    assert "didn't change" in sh(repo, env, str(BIN / "dvc"), "repro", "prepare@cifar10").stdout

    # Other data under the variable is refused, one line naming it (DVC would not see it).
    env["DPFAH_CIFAR10_SOURCE"] = str(second)
    proc = sh(repo, env, "python", "-m", "pipeline.prepare", "--dataset", "cifar10", "--quiet", ok=False)
    assert (proc.returncode, proc.stderr) == (
        2,
        f"error: DPFAH_CIFAR10_SOURCE={second}: md5 {md5(second)} is not datasets.cifar10.md5 ({md5(first)}), "
        f"so it is not {OFFICIAL}; for other CIFAR-10 files set datasets.cifar10.source instead\n",
    )
    # New data comes with its md5 in params.yaml, which DVC sees: the stage is stale and reruns.
    (repo / "params.yaml").write_text(text.replace(md5(first), md5(second)))
    assert "prepare@cifar10" in sh(repo, env, str(BIN / "dvc"), "status", "prepare@cifar10").stdout
    sh(repo, env, str(BIN / "dvc"), "repro", "prepare@cifar10")
    manifest = json.loads((repo / "data" / "shards" / "cifar10" / "manifest.json").read_text())
    assert manifest["source"]["md5"] == md5(second)
