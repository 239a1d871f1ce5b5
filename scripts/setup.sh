#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies and the test/bench
# extras. Python 3.11 to 3.13: $PYTHON when set, else the first of python3.11, python3.12,
# python3.13, python3 that runs and is 3.11 or newer. Idempotent: re-running only installs
# what changed (an existing .venv keeps its Python).
set -euo pipefail
cd "$(dirname "$0")/.."

# Prints "<version>" when $1 runs and is Python >= 3.11 (a pyenv shim for a version that is
# not selected exists but does not run, so running it is the test).
python_version() {
    "$1" -c 'import sys; assert sys.version_info >= (3, 11); print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null
}

choose_python() {
    local candidates candidate
    if [ -n "${PYTHON:-}" ]; then
        candidates=("$PYTHON")
    else
        candidates=(python3.11 python3.12 python3.13 python3)
    fi
    for candidate in "${candidates[@]}"; do
        if version=$(python_version "$candidate"); then
            chosen=$candidate
            return 0
        fi
    done
    echo "setup: no Python 3.11 or newer found (tried: ${candidates[*]}); install Python 3.11, 3.12 or 3.13, or set PYTHON=/path/to/python3" >&2
    return 1
}

if [ "${1:-}" = "--which-python" ]; then  # say which Python a new .venv would get, and stop
    choose_python
    echo "$chosen $version"
    exit 0
fi
if [ -x .venv/bin/python ]; then
    echo "setup: using the existing .venv (Python $(python_version .venv/bin/python || echo '?'); remove .venv to choose again)"
else
    choose_python
    echo "setup: Python $version ($(command -v "$chosen" || echo "$chosen"))"
    "$chosen" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The editable install also compiles the C kernels (dpfah/_hamming.c, _ranking.c, as the
# top-level modules _dpfah_hamming and _dpfah_ranking). They are optional (numpy fallback)
# unless DPFAH_REQUIRE_KERNELS=1 (CI sets it): then setup.py fails the install on a compile
# error. pip hands the environment, this variable included, to its isolated build.
export DPFAH_REQUIRE_KERNELS="${DPFAH_REQUIRE_KERNELS:-0}"
echo "setup: DPFAH_REQUIRE_KERNELS=$DPFAH_REQUIRE_KERNELS"
.venv/bin/python -m pip install --quiet -e '.[dev]'
# -I: the installed package, whatever the current directory holds.
.venv/bin/python -I -c "
import sys
import dpfah.kernels as k
st = k.status()
print('setup: ok; compiled kernels:', st)
missing = [f'{p}: {k.import_error(p)}' for p, name in st.items() if name == 'numpy']
if missing and k.required():
    sys.exit(f'setup: {k.REQUIRE_ENV}=1 but the compiled kernels did not import: ' + '; '.join(missing))
"
