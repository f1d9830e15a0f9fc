// Host-side entry points of the sm120 block-scaled FP4 attention forward (no CuTe, no device
// code): what the sage-core bindings include. Definitions: sm120_attn_fwd_kernel_mma_sync.cuh,
// one configuration per translation unit in kernels/src/sm120/.
#pragma once

#include <cuda_runtime_api.h>

#include "sage/sm120/sm120_attn_fwd_params.hpp"

namespace sage::sm120 {

// Launches one configuration on `stream`; returns the launch status (no synchronization).
// Preconditions (the bindings validate them): see Sm120AttnFwdParams; code rows 16-byte aligned,
// scale rows 4 (d=64) / 8 (d=128) byte aligned; heads_q % heads_kv == 0; seqlen_q, seqlen_kv >= 1.
template <Sm120Mma M, int kHeadDim, Sm120IoDtype kIo>
cudaError_t sm120_attn_fwd_run(const Sm120AttnFwdParams& p, cudaStream_t stream);

template <Sm120Mma M, int kHeadDim, Sm120IoDtype kIo>
int sm120_attn_fwd_smem_bytes();

// Query rows per CTA / keys per KV tile. The tile is also the recipe's kv_block: P's per-row
// FP32 scale is taken over one tile's 128 keys (sage_quant RECIPES kv_block=128).
inline constexpr int kSm120BlockM = 64;
inline constexpr int kSm120BlockN = 128;
inline constexpr int kSm120VTokenPad = kSm120BlockN;  // V^T token padding the kernel reads

// Every configuration (policy, head dim, io dtype, io name). The bindings dispatch over this list;
// cmake/instantiations.cmake lists one .cu per entry (families sm120: kNative, sm120twin: kTwin).
#define SAGE_SM120_ATTN_FWD_CONFIGS(X) \
  X(64, kF16, f16)                     \
  X(64, kBf16, bf16)                   \
  X(128, kF16, f16)                    \
  X(128, kBf16, bf16)

}  // namespace sage::sm120
