#!/usr/bin/env bash
# The GPU check: the CUDA tests, training and encoding throughput, and a time-boxed CIFAR-10
# training, in one run of at most 8 minutes on a bare GPU machine (torch, torchvision, numpy,
# PIL, pyarrow, pyyaml, tqdm and pytest; no Ray, MLflow, DVC or webdataset; no network).
#
# From the repository root, with the CIFAR-10 archive in .gpu_payload/ (git-ignored):
#   mkdir -p .gpu_payload && cp ../shared/data/cifar10-jpg.tar.gz .gpu_payload/
#   device tool: run(command="bash bench/gpu_check.sh", carry=[".gpu_payload"], timeout_s=540)
# Writes JSON and logs to $OUT (default bench/results/gpu) and prints a table at the end.
# Expected about 6.5 minutes; each step is capped (100 + 140 + 250 s) so the whole stays
# under a 9-minute call even when a step hangs.
#
# GPU_CHECK_SMOKE=1 runs every step with tiny settings (what its CPU test does);
# GPU_CHECK_SHARDS=DIR uses an already prepared dataset instead of the archive.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SOURCE=${GPU_CHECK_SOURCE:-.gpu_payload/cifar10-jpg.tar.gz}
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    THROUGHPUT=(--size 32 --source-size 48 --batch 8 --steps 2 --workers 0)
    CIFAR=(--size 32 --batch 8 --minutes 0.02 --workers 0 --encode-seconds 2 --max-steps 2)
else
    THROUGHPUT=(--size 224 --batch 128 --steps 30 --workers 16)
    CIFAR=(--minutes 3 --workers 12 --encode-seconds 20)
fi
if [ -n "${GPU_CHECK_SHARDS:-}" ]; then DATA=(--shards "$GPU_CHECK_SHARDS"); else DATA=(--source "$SOURCE" --work /tmp/gpu_cifar); fi
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "device"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/device.txt"
step "compiled kernels (numpy fallback if they do not build)"
# the compiler's object files in a temporary folder, not build/ in the checkout
build_temp=$(mktemp -d)
"$PY" setup.py -q build_ext --inplace --build-temp "$build_temp/temp" --build-lib "$build_temp/lib" > "$OUT/build.log" 2>&1 || echo "kernels did not build: see $OUT/build.log"
rm -rf "$build_temp"
"$PY" -c "import dpfah.kernels as k; print('kernels:', k.status())" | tee -a "$OUT/device.txt"
step "CUDA tests"
timeout 100 "$PY" -m pytest -m gpu tests/test_gpu.py -q -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
step "training throughput: ours against the PIL + DataLoader reference"
timeout 140 "$PY" -m bench.train_throughput "${THROUGHPUT[@]}" --out "$OUT/train_throughput.json"
step "CIFAR-10: encode throughput and a time-boxed training"
timeout 250 "$PY" -m bench.gpu_cifar "${DATA[@]}" "${CIFAR[@]}" --out "$OUT/cifar10.json"
step "summary"
"$PY" -m bench.gpu_cifar --summary "$OUT"
echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $OUT"
