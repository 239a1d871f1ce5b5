#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project with its pinned dependencies and the
# test/bench extras. Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if ! command -v "$PYTHON" >/dev/null; then
    echo "setup: $PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
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
