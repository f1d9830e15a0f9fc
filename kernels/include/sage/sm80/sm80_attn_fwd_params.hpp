// Plain parameter struct (kernel ABI) of the Ampere/Ada mma.sync attention forward family.
// Host-includable without CuTe: the binding fills it, sm80_attn_fwd_launch.hpp launches it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace sage::sm80 {

// The four recipes of docs/design/NUMERICS.md §Recipes this family implements (one mainloop, recipe = policy type).
enum class Sm80Recipe : int32_t {
  kQkS8PvF16 = 0,   // SageAttention: INT8 QK, FP16 P and V, FP32 accumulation
  kQkS8PvS8 = 1,    // INT-FlashAttention: INT8 QK, INT8 P (scale 1/127) and V, INT32 per block
  kQkS8PvE4m3 = 2,  // SageAttention2 8-bit: INT8 QK, E4M3 P~ and V, two-level FP32 (sm89+)
  kQkS4PvE4m3 = 3,  // SageAttention2 4-bit: INT4 QK + Q smoothing (dS in-kernel), E4M3 PV (sm89+)
  // FP16-accumulate variants ("f16_buffer"): each KV tile's P.V in an FP16 MMA accumulator, added
  // into FP32 O (GeForce Ampere/Ada run FP16-accumulate MMAs at twice the FP32-accumulate rate).
  kQkS8PvF16AccF16 = 4,   // qk_s8_pv_f16, FP16 buffer; a tile that overflows is redone in FP32
  kQkS8PvE4m3AccF16 = 5,  // qk_s8_pv_e4m3, FP16 buffer; V quantized with |V^| <= 2.25 (sm89+)
};

// Input/output dtype of the fp16/bf16 tensors (O, and V for kQkS8PvF16).
enum class Sm80IoDtype : int32_t { kF16 = 0, kBf16 = 1 };

// Which tokens share one Q/K scale (docs/design/quant-formats.md, "Granularity of the scales").
// The kernel evaluates the group of every token it touches, so every granularity works with
// every tile shape; the K scales of a KV tile are staged in shared memory once per tile.
enum class Sm80ScaleGranularity : int32_t {
  kPerTensor = 0,
  kPerBlock = 1,
  kPerWarp = 2,    // Q only: 16-row groups
  kPerThread = 3,  // Q: (t/16)*8 + t%8;  K: (t/block)*4 + (t%8)/2
  kPerToken = 4,
};

// All strides are in elements of the tensor's storage type (bytes for int8/uint8 tensors),
// like torch strides. The last dim of every tensor is contiguous.
struct Sm80AttnFwdParams {
  // Q: int8 (b, h_q, s_q, d), or INT4 packed uint8 (b, h_q, s_q, d/2) for kQkS4PvE4m3.
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_s = 0;
  // K: like Q with h_kv heads and s_kv tokens (smoothed before quantization).
  const void* k = nullptr;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  // V: kQkS8PvF16: fp16/bf16 (b, h_kv, s_kv, d) read in place (stride_row = token stride);
  //    8-bit recipes: (b, h_kv, d, s_pad) "v_*_t_p32" (stride_row = channel stride), tokens
  //    permuted within each 32-token chunk (see sm80_attn_fwd_kernel_mma_sync.cuh), s_pad >=
  //    ceil(s_kv/64)*64, padding zero.
  const void* v = nullptr;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_row = 0;
  // O: fp16/bf16 (b, h_q, s_q, d).
  void* o = nullptr;
  int64_t o_stride_b = 0, o_stride_h = 0, o_stride_s = 0;
  // LSE (optional, nullptr = off): float32 (b, h_q, s_q), natural log of the (smoothed) scores.
  float* lse = nullptr;
  int64_t lse_stride_b = 0, lse_stride_h = 0;

  // Scales, float32, last dim contiguous: q (b, h_q, G_q), k (b, h_kv, G_k), v (b, h_kv, d).
  const float* q_scale = nullptr;
  int64_t q_scale_stride_b = 0, q_scale_stride_h = 0;
  const float* k_scale = nullptr;
  int64_t k_scale_stride_b = 0, k_scale_stride_h = 0;
  const float* v_scale = nullptr;  // 8-bit PV recipes only
  int64_t v_scale_stride_b = 0, v_scale_stride_h = 0;
  int32_t q_granularity = 0, q_block = 128;  // Sm80ScaleGranularity, token block (per_block/thread)
  int32_t k_granularity = 0, k_block = 64;

  // Q smoothing (kQkS4PvE4m3): q_mean float32 (b, h_q, ceil(s_q/q_mean_block), d); the kernel
  // adds dS = q_mean . dequant(K) to S. q_mean_block must be a multiple of the CTA's 64 rows.
  const float* q_mean = nullptr;
  int64_t q_mean_stride_b = 0, q_mean_stride_h = 0, q_mean_stride_blk = 0;
  int32_t q_mean_block = 128;

  int32_t batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_kv = 0;
  float softmax_scale_log2 = 0.f;  // softmax scale * log2(e)
  int32_t is_causal = 0;           // bottom-right aligned
};

}  // namespace sage::sm80
