"""The compiled kernels of ``dpfah``: the one place that knows their module names.

Two C extensions, built by ``setup.py`` from ``dpfah/_hamming.c`` and ``dpfah/_ranking.c`` (with
``dpfah/_ranking_top.h``, the scan of the nearest items for mAP@R):

* ``_dpfah_hamming``: exact Hamming search (``dpfah.codes``);
* ``_dpfah_ranking``: the ranking scan of the retrieval metrics (``dpfah.metrics``).

They are top-level modules, not ``dpfah._hamming``: a ``ray job submit --working-dir .`` job
puts its upload of the sources (without the .gitignore'd .so files) first on ``sys.path``, and
a ``dpfah/`` extension would be shadowed by it, so the job would quietly run the numpy
fallback. Nothing shadows ``_dpfah_*``: the job's ``dpfah`` sources use the installed kernels.

Each picks its instruction set at import with the same routine (``dpfah/_cpu.h``): one of
``"portable"`` (plain C), ``"popcnt"``, ``"avx2"`` (Hamming only), ``"avx512bw"``,
``"avx512vpopcntdq"`` (Hamming only: CPUs with the vector popcount, Ice Lake and Zen 4 on).
``status()`` says which kernel each part uses, or ``"numpy"`` where the extension did not
import; ``announce_fallback()`` logs that once per process (logger ``dpfah.kernels``).

``python -m dpfah.kernels [--require]`` prints, for each part, the kernel and the file it came
from, and where ``dpfah`` itself was imported from; with ``--require`` it exits 1 when a part
falls back to numpy. Run from a directory holding a copy of the sources (a Ray job's working
directory, the cluster image's ``WORKDIR``), it checks what a job there will run.

Imports neither numpy nor torch (nor Ray, MLflow, DVC or the pipeline).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from types import ModuleType

__all__ = [
    "MODULES",
    "REQUIRE_ENV",
    "announce_fallback",
    "hamming",
    "import_error",
    "module",
    "ranking",
    "required",
    "status",
]

log = logging.getLogger("dpfah.kernels")

#: Part of dpfah -> module name of its compiled kernels.
MODULES: dict[str, str] = {"hamming": "_dpfah_hamming", "ranking": "_dpfah_ranking"}
#: Python-visible interface version each C module must report (``API_VERSION`` in the C
#: files): a job's ``dpfah/`` sources may be newer or older than the installed kernels.
API_VERSIONS: dict[str, int] = {"hamming": 1, "ranking": 2}
#: Users of each part, for the fallback message.
_USERS = {"hamming": "dpfah.codes", "ranking": "dpfah.metrics"}
#: Set to 1 (CI) to make the kernels required: setup.py fails on a compile error and the
#: kernel tests fail rather than skip when an extension does not import.
REQUIRE_ENV = "DPFAH_REQUIRE_KERNELS"


def required() -> bool:
    """True when ``DPFAH_REQUIRE_KERNELS`` asks for the compiled kernels (CI)."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _load(part: str) -> tuple[ModuleType | None, str | None]:
    name = MODULES[part]
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    version = getattr(mod, "API_VERSION", None)
    if version != API_VERSIONS[part]:
        return None, (
            f"{name} ({getattr(mod, '__file__', '?')}) has API_VERSION {version}, these sources need "
            f"{API_VERSIONS[part]}: rebuild it (pip install -e . or python setup.py build_ext --inplace)"
        )
    return mod, None


_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str | None] = {}
for _part in MODULES:
    _modules[_part], _errors[_part] = _load(_part)
del _part

#: The extension modules, or None where they did not import.
hamming: ModuleType | None = _modules["hamming"]
ranking: ModuleType | None = _modules["ranking"]


def module(part: str) -> ModuleType | None:
    """The compiled module of ``part`` ("hamming" or "ranking"), or None."""
    return _modules[part]


def import_error(part: str) -> str | None:
    """Why ``part``'s compiled module is missing (the ImportError), or None when it imported."""
    return _errors[part] if _modules[part] is None else None


def status() -> dict[str, str]:
    """``{"hamming": kernel, "ranking": kernel}``: the kernel each compiled module selected
    (e.g. ``"avx512bw"``, ``"portable"``), or ``"numpy"`` where it did not import."""
    return {part: (mod.get_kernel() if mod is not None else "numpy") for part, mod in _modules.items()}


_announced = False
_lock = threading.Lock()


def announce_fallback() -> bool:
    """Log one warning (logger ``dpfah.kernels``) naming the parts that fall back to numpy
    and why, the first time it is called in a process while a compiled module is missing.

    ``dpfah.codes`` and ``dpfah.metrics`` call it whenever they take the fallback; it is
    cheap after the first call. Returns True when it logged now.
    """
    global _announced
    if _announced:
        return False
    missing = {part: _errors[part] for part, mod in _modules.items() if mod is None}
    if not missing:
        return False
    with _lock:
        if _announced:
            return False
        _announced = True
    why = "; ".join(f"{part} ({_USERS[part]}): {err}" for part, err in missing.items())
    log.warning(
        "compiled kernels missing, using the numpy fallback (same results, slower) for %s. Why: %s. "
        "Build them with a C compiler (pip install -e . ; %s=1 makes a failed build an error).",
        ", ".join(missing),
        why,
        REQUIRE_ENV,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m dpfah.kernels [--require]``: which kernels this interpreter, from this
    directory, runs; exit status 1 with ``--require`` when any part falls back to numpy."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dpfah.kernels",
        description="Say which compiled kernel each part of dpfah runs here (or 'numpy' for the fallback), "
        "from which file, and where dpfah itself was imported from.",
    )
    parser.add_argument(
        "--require", action="store_true", help="exit 1 when a part falls back to numpy (cluster image, node setup)"
    )
    args = parser.parse_args(argv)
    package = sys.modules[__package__ or "dpfah"]
    print(f"dpfah: {getattr(package, '__file__', '?')}")
    for part, kernel in status().items():
        mod = _modules[part]
        where = getattr(mod, "__file__", "?") if mod is not None else f"not imported ({_errors[part]})"
        print(f"{part}: {kernel} ({MODULES[part]}: {where})")
    missing = [part for part, mod in _modules.items() if mod is None]
    if args.require and missing:
        print(
            f"error: no compiled kernel for {', '.join(missing)}: build them (pip install . with a C compiler and "
            f"{REQUIRE_ENV}=1 to make a failed build an error)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
