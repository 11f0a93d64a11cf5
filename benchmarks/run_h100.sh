#!/usr/bin/env bash
# All benchmarks on one H100 within a wall-clock budget; results (JSON + log) land in $OUT.
#   OUT=/path/to/out BUDGET_S=470 bash benchmarks/run_h100.sh
# Wheels of packages missing on the machine (diffusers) may sit in .whl/: they are installed into /tmp/site first.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/sana-inductor-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/sana-triton-cache}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/run_all.log"
python3 -m benchmarks.run_all --out "$OUT" --budget-s "${BUDGET_S:-470}" "$@" 2>&1 | tee -a "$OUT/run_all.log"
