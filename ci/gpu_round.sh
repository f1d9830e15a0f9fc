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
timeout ${SAGE_TEST_TIMEOUT:-330} python3 -m nox -s "test(arch='sm90')" -- ${SAGE_PYTEST_ARGS:-} > "$OUT/test.log" 2>&1
test_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/test.log" | head -20
echo "[gpu_round] tests rc=$test_rc in $(( $(date +%s) - t0 )) s"
if [ "${SAGE_SKIP_BENCH:-0}" != "1" ]; then
  timeout ${SAGE_BENCH_TIMEOUT:-240} python3 -m sage_torch.bench --out "$OUT/bench" "$@" > "$OUT/bench.log" 2>&1
  grep -v '^{' "$OUT/bench.log" | tail -60
fi
if [ "${SAGE_SANITIZE:-0}" = "1" ]; then  # memcheck + racecheck of the sm90 kernels on a small case
  for kernel in "--pv-accum two_level" "--pv-accum one_level" "--train"; do
    for d in 128 64; do
      for tool in memcheck racecheck; do
        timeout 120 compute-sanitizer --tool $tool --print-limit 5 python3 tools/profile_sm90.py \
          --b 1 --h 2 --n 300 --d $d --causal --iters 1 $kernel > "$OUT/sanitize.log" 2>&1
        echo "[gpu_round] $tool d=$d $kernel rc=$? $(grep -E "(ERROR|RACECHECK) SUMMARY" "$OUT/sanitize.log" | tail -1)"
      done
    done
  done
fi
grep -E "passed|failed|error" "$OUT/test.log" | tail -3
exit $test_rc
