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
# The editable install also compiles the optional C kernels (dpfah/_hamming.c, _ranking.c).
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/python -c "import dpfah.codes as c, dpfah.metrics as m; print('setup: ok; Hamming kernel:', c.compiled_kernel() or 'numpy fallback', '| metrics backend:', m.backend())"
