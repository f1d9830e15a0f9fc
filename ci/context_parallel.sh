#!/usr/bin/env bash
# Context-parallel attention on every visible GPU (issue 14): ring and Ulysses over sage's kernels
# vs the same schemes over PyTorch SDPA, d=128, 32k-256k tokens in total, causal and not; each
# checked against a single-GPU reference on a shorter sequence; per-rank time spread and the
# communication time reported separately; JSON under $OUT (default out/context_parallel).
#
#   bash ci/context_parallel.sh [options of python -m sage_torch.bench_context_parallel]
#   SAGE_CP_NPROC=1 bash ci/context_parallel.sh       # world size 1 on one GPU
#   SAGE_CP_DRY_RUN=1 bash ci/context_parallel.sh     # print the environment and the command only
#
# NVLink multicast stays off in every process torchrun starts (exported here, inherited by each
# rank; the benchmark records what every rank saw).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/out}/context_parallel
NPROC=${SAGE_CP_NPROC:-$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")}
CMD=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC"
     -m sage_torch.bench_context_parallel --out "$OUT" "$@")
echo "[context_parallel] NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS=$NVSHMEM_DISABLE_NVLS"
echo "[context_parallel] ${CMD[*]}"
if [ "${SAGE_CP_DRY_RUN:-0}" = "1" ]; then exit 0; fi
mkdir -p "$OUT"
"${CMD[@]}"
