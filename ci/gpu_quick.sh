#!/usr/bin/env bash
# A targeted GPU round (no nox): build sage-core for 90a (optionally without some families),
# run chosen GPU test files with per-test timeouts, then a short benchmark. Logs under $OUT.
#   SAGE_DROP_FAMILIES="sm80" SAGE_TESTS="tests/gpu/test_attn_sm90.py" bash ci/gpu_quick.sh [bench args]
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
for fam in ${SAGE_DROP_FAMILIES:-}; do
  sed -i "/^sage_instantiation(${fam} /d" packages/sage-core/cmake/instantiations.cmake
done
nvidia-smi -L; cmake --version | head -1
t0=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL=16 SAGE_PTXAS_VERBOSE=1 python3 -m pip install --no-build-isolation \
  --no-deps -v ./packages/sage-core --config-settings=cmake.define.SAGE_CUDA_ARCHS=90a \
  > "$OUT/build.log" 2>&1
rc=$?; echo "[quick] build rc=$rc in $(( $(date +%s) - t0 )) s"
if [ $rc -ne 0 ]; then grep -E "error|Error" "$OUT/build.log" | head -40; exit $rc; fi
python3 -m pip install -q --no-deps --no-build-isolation -e packages/sage-quant -e packages/sage-torch -e packages/sage-train
python3 -c "import sage_core, json; print(json.dumps(sage_core.build_info())[:600]); print(sage_core.runtime_info())"
if [ -n "${SAGE_FIRST_TEST:-}" ]; then
  timeout 120 python3 -m pytest -q -x -rs $SAGE_FIRST_TEST 2>&1 | tail -25 || { echo "[quick] first test failed/hung"; }
fi
timeout ${SAGE_TEST_TIMEOUT:-420} python3 -m pytest -q -rfs --timeout 90 --maxfail=40 ${SAGE_TESTS:-tests/gpu} \
  > "$OUT/test.log" 2>&1
echo "[quick] tests rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/test.log" | head -30; tail -3 "$OUT/test.log"
if [ "${SAGE_SKIP_BENCH:-0}" != "1" ]; then
  timeout ${SAGE_BENCH_TIMEOUT:-240} python3 -m sage_torch.bench --out "$OUT/bench" "$@" > "$OUT/bench.log" 2>&1
  echo "[quick] bench rc=$?"; grep -v '^{' "$OUT/bench.log" | tail -30
fi
