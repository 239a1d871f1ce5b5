"""dpfah.kernels: which compiled kernels run, the numpy fallback's one-time announcement, and
the kernels of the installed package reaching a copy of the sources without .so files (what a
`ray job submit --working-dir .` job runs: its upload has no .gitignore'd build products)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpfah import codes, kernels
from dpfah import metrics as M

FAMILIES = ("portable", "popcnt", "avx2", "avx512bw", "avx512vpopcntdq")
HAMMING_ONLY = ("avx2", "avx512vpopcntdq")  # families _dpfah_ranking does not implement
PACKAGE = Path(kernels.__file__).resolve().parent


def require_compiled(part: str):
    """The compiled module of ``part``; without it, skip, or fail where DPFAH_REQUIRE_KERNELS=1."""
    mod = kernels.module(part)
    if mod is not None:
        return mod
    why = f"{kernels.MODULES[part]} did not import ({kernels.import_error(part)})"
    if kernels.required():
        pytest.fail(f"{why}, and {kernels.REQUIRE_ENV}=1 requires the compiled kernels")
    pytest.skip(f"{why}; build it with pip install -e .")


def _python(code: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_status_names_the_kernel_each_part_uses():
    st = kernels.status()
    assert set(st) == {"hamming", "ranking"} == set(kernels.MODULES)
    for part, name in st.items():
        mod = kernels.module(part)
        if mod is None:
            assert name == "numpy" and kernels.import_error(part)
        else:
            assert name in FAMILIES and name == mod.get_kernel() == mod.kernels()[0]
            assert kernels.import_error(part) is None
    assert codes.compiled_kernel() == (st["hamming"] if st["hamming"] != "numpy" else None)
    assert M.backend() == ("c" if st["ranking"] != "numpy" else "numpy")
    if kernels.required():
        assert "numpy" not in st.values(), f"{kernels.REQUIRE_ENV}=1 but {st}: {kernels._errors}"


def test_both_modules_share_one_selection_and_the_name_portable():
    hamming, ranking = require_compiled("hamming"), require_compiled("ranking")
    # One detection routine (dpfah/_cpu.h): the families ranking implements (all but the
    # Hamming-only avx2 and avx512vpopcntdq) are supported by both modules or by neither.
    assert [k for k in hamming.kernels() if k not in HAMMING_ONLY] == list(ranking.kernels())
    assert hamming.kernels()[-1] == ranking.kernels()[-1] == "portable"
    for mod in (hamming, ranking):
        before = mod.set_kernel("portable")
        try:
            assert mod.get_kernel() == "portable"
            with pytest.raises(ValueError, match="unknown kernel"):
                mod.set_kernel("generic")
            assert mod.get_kernel() == "portable"
        finally:
            assert mod.set_kernel(before) == "portable"
        assert mod.get_kernel() == before
        assert mod.API_VERSION == kernels.API_VERSIONS["hamming" if mod is hamming else "ranking"]
    for name in HAMMING_ONLY:  # not implemented there
        with pytest.raises(ValueError, match="unknown kernel"):
            ranking.set_kernel(name)


def test_fallback_is_announced_once(monkeypatch, caplog):
    """Both extensions "missing" (patched): codes and metrics take the numpy path several
    times, and one warning names both parts and why."""
    import numpy as np

    monkeypatch.setattr(kernels, "_announced", False)
    monkeypatch.setitem(kernels._modules, "hamming", None)
    monkeypatch.setitem(kernels._modules, "ranking", None)
    monkeypatch.setitem(kernels._errors, "hamming", "ImportError: test says no hamming")
    monkeypatch.setitem(kernels._errors, "ranking", "ImportError: test says no ranking")
    monkeypatch.setattr(codes, "HAVE_COMPILED_KERNEL", False)
    monkeypatch.setattr(M, "_ranking", None)
    assert kernels.status() == {"hamming": "numpy", "ranking": "numpy"}

    rng = np.random.default_rng(0)
    c = np.where(rng.random((40, 16)) < 0.5, 1, -1).astype(np.int8)
    labels = np.eye(4, dtype=np.int8)[rng.integers(0, 4, 40)]
    with caplog.at_level(logging.WARNING, logger="dpfah.kernels"):
        for _ in range(2):
            codes.topk_hamming(codes.pack_codes(c), codes.pack_codes(c), 5)
            codes.hamming_distance(codes.pack_codes(c[:3]), codes.pack_codes(c))
            M.mean_average_precision(c, c, labels, labels, topk=10)
        assert kernels.announce_fallback() is False
    records = [r for r in caplog.records if r.name == "dpfah.kernels"]
    assert len(records) == 1, [r.getMessage() for r in records]
    msg = records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    assert "numpy" in msg and "test says no hamming" in msg and "test says no ranking" in msg


def test_no_announcement_when_the_kernels_imported(monkeypatch, caplog):
    require_compiled("hamming")
    require_compiled("ranking")
    monkeypatch.setattr(kernels, "_announced", False)
    monkeypatch.setattr(codes, "HAVE_COMPILED_KERNEL", False)  # numpy on purpose: not a fallback
    with caplog.at_level(logging.WARNING, logger="dpfah.kernels"):
        assert kernels.announce_fallback() is False
        codes.hamming_distance(codes.pack_codes([[1, -1]]), codes.pack_codes([[1, 1]]))
    assert not [r for r in caplog.records if r.name == "dpfah.kernels"]


def test_missing_extension_in_a_fresh_process_logs_once(tmp_path):
    """A really missing module (import blocked): numpy results, one warning on stderr."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "_dpfah_ranking":
            raise ImportError("blocked by the test")
sys.meta_path.insert(0, Block())
import numpy as np
import dpfah.kernels as k
from dpfah import metrics as M
c = np.where(np.random.default_rng(0).random((30, 8)) < 0.5, 1, -1)
lab = np.eye(3)[np.arange(30) % 3]
for _ in range(3):
    M.mean_average_precision(c, c, lab, lab)
print("STATUS", k.status(), M.backend())
"""
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("compiled kernels missing") == 1, proc.stderr
    assert "blocked by the test" in proc.stderr and "ranking" in proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("STATUS"))
    assert "'ranking': 'numpy'" in line and line.endswith("numpy")


def test_copy_of_sources_without_so_uses_the_installed_kernels(tmp_path):
    """What `ray job submit --working-dir .` does: a copy of dpfah/ without build products,
    first on sys.path (the job's cwd). The copy's Python must run, with the kernels of the
    installed package."""
    expected = kernels.status()
    require_compiled("hamming")
    require_compiled("ranking")
    shutil.copytree(PACKAGE, tmp_path / "dpfah", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    assert not list((tmp_path / "dpfah").glob("*.so"))
    code = """
import json
import dpfah.kernels as k, dpfah.codes as c, dpfah.metrics as m
print(json.dumps({"status": k.status(), "file": k.__file__, "codes": c.compiled_kernel(), "metrics": m.backend(),
                  "modules": {p: getattr(k.module(p), "__file__", None) for p in k.MODULES}}))
"""
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve() == (tmp_path / "dpfah" / "kernels.py").resolve()  # the copy ran
    assert got["status"] == expected and "numpy" not in got["status"].values()
    assert got["codes"] == expected["hamming"] and got["metrics"] == "c"
    for f in got["modules"].values():
        assert not Path(f).resolve().is_relative_to(tmp_path.resolve())
    assert "compiled kernels missing" not in proc.stderr


def test_kernels_module_imports_no_heavy_dependencies(tmp_path):
    """dpfah/kernels.py on its own pulls in neither numpy nor torch, Ray, MLflow, DVC or the pipeline."""
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("kernels_alone", {str(PACKAGE / "kernels.py")!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
heavy = [m for m in ("numpy", "torch", "ray", "mlflow", "dvc", "pipeline") if m in sys.modules]
print("HEAVY", heavy, mod.status())
"""
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
