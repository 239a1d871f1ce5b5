"""Build the optional compiled kernels of `dpfah`.

Metadata lives in pyproject.toml; this file only declares the C extensions. They are
optional: where no C compiler exists the install still succeeds and `dpfah` falls back to
its numpy implementations (same results, slower). Nothing is compiled with -march=native:
the kernels pick their instruction set at run time, so one build runs on any x86-64 CPU.
"""

from setuptools import Extension, setup

_FLAGS = ["-O3", "-std=c11", "-fno-strict-aliasing"]

setup(
    ext_modules=[
        Extension("dpfah._hamming", ["dpfah/_hamming.c"], extra_compile_args=_FLAGS, optional=True),
        Extension("dpfah._ranking", ["dpfah/_ranking.c"], extra_compile_args=_FLAGS, optional=True),
    ]
)
