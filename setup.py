"""Build the compiled kernels of `dpfah`.

Metadata lives in pyproject.toml; this file only declares the C extensions.

* They are top-level modules (`_dpfah_hamming`, `_dpfah_ranking`), not `dpfah._hamming`: a
  `ray job submit --working-dir .` job puts its upload of the sources first on sys.path, and
  that upload has no .so files (they are .gitignore'd), so a `dpfah/` extension would be
  shadowed and the job would silently run the numpy fallback. No source tree holds a
  `_dpfah_*` module, so the installed one is always found. `dpfah.kernels` imports them.
* They are optional by default: where no C compiler exists the install still succeeds and
  `dpfah` falls back to its numpy implementations (same results, slower; logged once).
  With DPFAH_REQUIRE_KERNELS=1 (CI: .ci/run) they are required: a compile error fails the
  install. pip passes the environment through to its (isolated) build.
* Nothing is compiled with -march=native: the kernels pick their instruction set at run time
  (dpfah/_cpu.h), so one build runs on any x86-64 CPU.
"""

import os

from setuptools import Extension, setup

_FLAGS = ["-O3", "-std=c11", "-fno-strict-aliasing"]
_REQUIRED = os.environ.get("DPFAH_REQUIRE_KERNELS", "").strip().lower() in ("1", "true", "yes", "on")


def _kernel(name: str, source: str) -> Extension:
    return Extension(
        name,
        [source],
        depends=["dpfah/_cpu.h", "dpfah/_ranking_top.h"],
        extra_compile_args=_FLAGS,
        optional=not _REQUIRED,
    )


setup(
    ext_modules=[
        _kernel("_dpfah_hamming", "dpfah/_hamming.c"),
        _kernel("_dpfah_ranking", "dpfah/_ranking.c"),
    ]
)
