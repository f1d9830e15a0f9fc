#!/usr/bin/env bash
# Diagnose a host-side crash seen only on the GPU machine: addressing mode, nanobind version,
# a host backtrace under cuda-gdb, and compute-sanitizer memcheck over the crashing tests.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
nvidia-smi -q | grep -i -A1 "addressing" | head -4
python3 -c "import nanobind, sys; print('nanobind', nanobind.__version__, sys.version)"
T="tests/gpu/test_attn_sm80.py::test_binding_rejects_bad_input_before_launch tests/gpu/test_attn_sm90.py::test_quant_fused_v_mean_arguments packages/sage-core/tests"
for t in $T; do
  timeout 60 python3 -X faulthandler -m pytest -q -x -p no:cacheprovider $t > "$OUT/one.log" 2>&1
  echo "[diag] $t rc=$?"
done
timeout 120 cuda-gdb -q -batch -ex run -ex bt --args python3 -m pytest -q -x -p no:cacheprovider $T > "$OUT/gdb.log" 2>&1
grep -E "^#[0-9]+ " "$OUT/gdb.log" | head -25
timeout 150 compute-sanitizer --tool memcheck --print-limit 5 python3 -m pytest -q -x -p no:cacheprovider \
  tests/gpu/test_attn_sm80.py::test_binding_rejects_bad_input_before_launch \
  tests/gpu/test_attn_sm90.py::test_quant_fused_v_mean_arguments > "$OUT/memcheck.log" 2>&1
echo "[diag] memcheck rc=$?"; grep -E "ERROR SUMMARY|Invalid|at 0x|by thread" "$OUT/memcheck.log" | head -20
