// Host-side entry points of the sm80 mma.sync attention forward family (no CuTe, no device code):
// what the sage-core binding includes. Definitions: sm80_attn_fwd_kernel_mma_sync.cuh,
// instantiated one configuration per translation unit in kernels/src/sm80/.
#pragma once

#include <cuda_runtime_api.h>

#include "sage/sm80/sm80_attn_fwd_params.hpp"

namespace sage::sm80 {

// Launches one configuration on `stream`. Returns the launch status (no synchronization).
// Preconditions (the binding validates them): see Sm80AttnFwdParams; every global row/tile
// base and row stride 16-byte aligned; heads_q % heads_kv == 0; seqlen_q, seqlen_kv >= 1.
template <Sm80Recipe R, int kHeadDim, Sm80IoDtype kIo>
cudaError_t sm80_attn_fwd_run(const Sm80AttnFwdParams& p, cudaStream_t stream);

// Dynamic shared memory the configuration needs (bytes).
template <Sm80Recipe R, int kHeadDim, Sm80IoDtype kIo>
int sm80_attn_fwd_smem_bytes();

// Lowest compute capability (major*10+minor) a recipe runs on: FP8 mma.sync needs sm_89.
constexpr int sm80_recipe_min_cc(Sm80Recipe r) {
  return (r == Sm80Recipe::kQkS8PvE4m3 || r == Sm80Recipe::kQkS4PvE4m3 ||
          r == Sm80Recipe::kQkS8PvE4m3AccF16)
             ? 89
             : 80;
}

// FP8 mma.sync with an FP16 accumulator needs PTX ISA 8.7 (CUDA 12.8); with an older toolkit
// kQkS8PvE4m3AccF16 compiles to an empty kernel and the binding refuses it.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12080
inline constexpr bool kSm80Fp8F16AccCompiled = true;
#else
inline constexpr bool kSm80Fp8F16AccCompiled = false;
#endif

// Query rows per CTA / keys per KV tile (the binding checks q_mean_block and V padding).
inline constexpr int kSm80BlockM = 64;
inline constexpr int kSm80BlockN = 64;

// Every configuration of the family (recipe, name, head dim, io dtype, io name). The binding
// dispatches over this list; cmake/instantiations.cmake lists one .cu per entry.
#define SAGE_SM80_ATTN_FWD_CONFIGS(X)                       \
  X(kQkS8PvF16, qk_s8_pv_f16, 64, kF16, f16)                \
  X(kQkS8PvF16, qk_s8_pv_f16, 64, kBf16, bf16)              \
  X(kQkS8PvF16, qk_s8_pv_f16, 128, kF16, f16)               \
  X(kQkS8PvF16, qk_s8_pv_f16, 128, kBf16, bf16)             \
  X(kQkS8PvS8, qk_s8_pv_s8, 64, kF16, f16)                  \
  X(kQkS8PvS8, qk_s8_pv_s8, 64, kBf16, bf16)                \
  X(kQkS8PvS8, qk_s8_pv_s8, 128, kF16, f16)                 \
  X(kQkS8PvS8, qk_s8_pv_s8, 128, kBf16, bf16)               \
  X(kQkS8PvE4m3, qk_s8_pv_e4m3, 64, kF16, f16)              \
  X(kQkS8PvE4m3, qk_s8_pv_e4m3, 64, kBf16, bf16)            \
  X(kQkS8PvE4m3, qk_s8_pv_e4m3, 128, kF16, f16)             \
  X(kQkS8PvE4m3, qk_s8_pv_e4m3, 128, kBf16, bf16)           \
  X(kQkS4PvE4m3, qk_s4_pv_e4m3, 64, kF16, f16)              \
  X(kQkS4PvE4m3, qk_s4_pv_e4m3, 64, kBf16, bf16)            \
  X(kQkS4PvE4m3, qk_s4_pv_e4m3, 128, kF16, f16)             \
  X(kQkS4PvE4m3, qk_s4_pv_e4m3, 128, kBf16, bf16)           \
  X(kQkS8PvF16AccF16, qk_s8_pv_f16_acc_f16, 64, kF16, f16)   \
  X(kQkS8PvF16AccF16, qk_s8_pv_f16_acc_f16, 64, kBf16, bf16) \
  X(kQkS8PvF16AccF16, qk_s8_pv_f16_acc_f16, 128, kF16, f16)  \
  X(kQkS8PvF16AccF16, qk_s8_pv_f16_acc_f16, 128, kBf16, bf16) \
  X(kQkS8PvE4m3AccF16, qk_s8_pv_e4m3_acc_f16, 64, kF16, f16)   \
  X(kQkS8PvE4m3AccF16, qk_s8_pv_e4m3_acc_f16, 64, kBf16, bf16) \
  X(kQkS8PvE4m3AccF16, qk_s8_pv_e4m3_acc_f16, 128, kF16, f16)  \
  X(kQkS8PvE4m3AccF16, qk_s8_pv_e4m3_acc_f16, 128, kBf16, bf16)

}  // namespace sage::sm80
