#!/usr/bin/env bash
# A/B of sm90 attention compile-time switches on the GPU: for each variant rebuild sage-core,
# check vs emulation, time kernel-only and end to end. Usage: bash ci/gpu_ab_sm90.sh "name:flags" ...
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
python3 -m pip install -q --no-deps --no-build-isolation -e packages/sage-quant -e packages/sage-torch -e packages/sage-train
for v in "$@"; do
  name=${v%%:*}; flags=${v#*:}
  t0=$(date +%s)
  python3 -m pip install -q --no-build-isolation --no-deps ./packages/sage-core \
    --config-settings=cmake.define.SAGE_CUDA_ARCHS=90a --config-settings=build-dir=/tmp/abbuild \
    "--config-settings=cmake.define.CMAKE_CUDA_FLAGS=$flags" >> "$OUT/ab_build.log" 2>&1 || { echo "[ab] $name build failed"; continue; }
  echo "[ab] $name ($flags) built in $(( $(date +%s) - t0 )) s"
  timeout 120 python3 -m pytest -q -n 6 -p no:cacheprovider tests/gpu/test_attn_sm90.py -k "vs_emulation or float64" 2>&1 | tail -1
  timeout 200 python3 -m sage_torch.bench --d 128 64 --n 4096 16384 --causal no --out /tmp/ab_$name 2>&1 | grep -E "^\| sage|^d="
done
