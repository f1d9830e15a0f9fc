#!/usr/bin/env bash
# One whole GPU round on the lent Hopper machine (no network): install the wheels brought in
# .whl/, build sage-core for sm_90a with all cores, run the GPU tests through nox, run the
# benchmark, leave logs + JSON + plot under $OUT, print a short table last.
#   usage (from the repo root): SAGE_COMMIT=<sha> bash ci/gpu_round.sh [bench args...]
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 SAGE_NOX_SYSTEM=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
t0=$(date +%s)
python3 -m nox -s "test(arch='sm90')" -- ${SAGE_PYTEST_ARGS:-} 2>&1 | tee "$OUT/test.log"
test_rc=${PIPESTATUS[0]}
echo "[gpu_round] tests rc=$test_rc in $(( $(date +%s) - t0 )) s"
if [ "${SAGE_SKIP_BENCH:-0}" != "1" ]; then
  python3 -m sage_torch.bench --out "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^{'
fi
grep -E "passed|failed|error" "$OUT/test.log" | tail -3
exit $test_rc
