#!/usr/bin/env bash
# Where the sm90 attention's time goes at short lengths (GPU machine, no network): builds sage-core
# for sm_90a (quant + sm90 families), then per-CTA overhead fit, quantizer timings, a torch profile
# of whole calls.
# (The clock64 phase trace of a few CTAs, SAGE_SM90_ATTN_TRACE, left the kernel with the
# restructure; its findings are in docs/perf/sm90_qk_s8_pv_e4m3.md.)
#   bash ci/gpu_diag_sm90.sh          (logs under $OUT)
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
sed -i "/^sage_instantiation(sm80 /d" packages/sage-core/cmake/instantiations.cmake
python3 -m pip install -q --no-deps --no-build-isolation -e packages/sage-quant -e packages/sage-torch -e packages/sage-train
build() {
  python3 -m pip install -q --no-build-isolation --no-deps ./packages/sage-core \
    --config-settings=cmake.define.SAGE_CUDA_ARCHS=90a --config-settings=build-dir=/tmp/diagbuild \
    "--config-settings=cmake.define.CMAKE_CUDA_FLAGS=$1" >> "$OUT/build.log" 2>&1
}
t0=$(date +%s); build "" || { tail -30 "$OUT/build.log"; exit 1; }; echo "[diag] built in $(( $(date +%s) - t0 )) s"
P="timeout 90 python3 tools/profile_sm90.py"
{
  for d in 128 64; do $P --overhead --d $d --b 1 --h 1 --n 128 --reps 10; done
  for bn in "32 1024" "8 4096" "4 16384"; do set -- $bn; $P --quant-only --b $1 --n $2; done
  for bn in "32 1024" "8 4096"; do set -- $bn; $P --torch-profile --b $1 --n $2; done
} 2>&1 | tee "$OUT/diag.log" | grep -vE "^-{5}|^\s*$"
