#!/usr/bin/env bash
# A/B of sm90 attention builds on the GPU, in one run: for each variant rebuild sage-core (sm90 +
# quant families only), check vs emulation, time kernel-only and end to end.
#   bash ci/gpu_ab_sm90.sh "name:flags" ...       compile-time switches on this tree
#   bash ci/gpu_ab_sm90.sh "name:@dir[:flags]" ... sage-core from another source tree (e.g. a
#                                                 `git archive` of an older commit carried along)
# SAGE_AB_BENCH overrides the benchmark arguments (default below), SAGE_AB_BENCH_<name> one variant's
# (an older tree's bench may lack options); SAGE_AB_TESTS=0 skips the tests.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
# A `git archive` has no .git: without SAGE_COMMIT a benchmark would record whatever checkout it
# finds above it. Pass SAGE_COMMIT=<sha> of the archived tree.
[ -n "${SAGE_COMMIT:-}" ] || echo "[ab] warning: SAGE_COMMIT is not set; results will record the commit git finds" >&2
BENCH_ARGS=${SAGE_AB_BENCH:---d 128 64 --n 4096 16384 --causal no}
for v in "$@"; do
  name=${v%%:*}; flags=${v#*:}; src=.
  if [ "${flags#@}" != "$flags" ]; then  # @dir[:flags]
    rest=${flags#@}; src=${rest%%:*}; flags=""; [ "$rest" != "$src" ] && flags=${rest#*:}
  fi
  # each variant runs its own tree's front end (an older sage_torch with its own sage_core)
  python3 -m pip install -q --no-deps --no-build-isolation -e "$src/packages/sage-quant" \
    -e "$src/packages/sage-torch" -e "$src/packages/sage-train" >> "$OUT/ab_build.log" 2>&1
  # sm90 + quant only (faster); edits the tree it builds: run it on the GPU machine's copy
  sed -i "/^sage_instantiation(sm80 /d" "$src/packages/sage-core/cmake/instantiations.cmake"
  t0=$(date +%s)
  python3 -m pip install -q --no-build-isolation --no-deps "$src/packages/sage-core" \
    --config-settings=cmake.define.SAGE_CUDA_ARCHS=90a --config-settings=build-dir=/tmp/abbuild_$name \
    "--config-settings=cmake.define.CMAKE_CUDA_FLAGS=$flags" >> "$OUT/ab_build.log" 2>&1 || { echo "[ab] $name build failed"; continue; }
  echo "[ab] $name ($flags) built in $(( $(date +%s) - t0 )) s"
  if [ "${SAGE_AB_TESTS:-1}" != "0" ]; then
    timeout 120 python3 -m pytest -q -n 6 -p no:cacheprovider tests/gpu/test_attn_sm90.py -k "vs_emulation or float64" 2>&1 | tail -1
  fi
  var=SAGE_AB_BENCH_$name; args=${!var:-$BENCH_ARGS}  # SAGE_AB_BENCH_<name>: this variant's own
  timeout ${SAGE_AB_BENCH_TIMEOUT:-200} python3 -m sage_torch.bench $args --out "$OUT/ab_$name" 2>&1 | tee "$OUT/ab_$name.log" | grep -E "^\| sage|^d="
done
