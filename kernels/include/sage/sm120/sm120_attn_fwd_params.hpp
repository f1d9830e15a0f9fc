// Plain parameter struct (kernel ABI) of the sm120 block-scaled FP4 attention forward
// (recipe qk_nvfp4_pv_nvfp4, docs/design/NUMERICS.md §Recipes). Host-includable, no CuTe:
// the binding fills it, sm120_attn_fwd_launch.hpp launches it.
#pragma once

#include <cstdint>

namespace sage::sm120 {

// The MMA policy of the one mainloop (sm120_attn_fwd_mma_policies.cuh):
//  kNative: mma.sync kind::mxf4nvf4 block_scale scale_vec::4X m16n8k64 (sm_120a/121a);
//  kTwin:   the same product from the same fragments and scale registers, computed with FP16
//           mma.sync m16n8k16 (sm_90a), so that everything but that one instruction runs on Hopper.
enum class Sm120Mma : int32_t { kNative = 0, kTwin = 1 };

// Input/output dtype (O; the quantizers read Q, K, V in this dtype).
enum class Sm120IoDtype : int32_t { kF16 = 0, kBf16 = 1 };

// Operands as sage_quant's quant_fp4 writes them (two-level NVFP4, quant-formats.md): E2M1 codes
// two per byte (element 2i in the low nibble), E4M3 scales per 16 elements, row-major, and an FP32
// tensor scale per (b, head). Strides in bytes (codes, scales) or elements (O, LSE, floats); the
// last dim of every array is contiguous.
struct Sm120AttnFwdParams {
  // Q (smoothed: Q - q_mean of its block): codes (b, h_q, s_q, d/2), scales (b, h_q, s_q, d/16).
  const uint8_t* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_s = 0;
  const uint8_t* q_sf = nullptr;
  int64_t q_sf_stride_b = 0, q_sf_stride_h = 0, q_sf_stride_s = 0;
  // K (smoothed: K - token mean): codes (b, h_kv, s_kv, d/2), scales (b, h_kv, s_kv, d/16).
  const uint8_t* k = nullptr;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  const uint8_t* k_sf = nullptr;
  int64_t k_sf_stride_b = 0, k_sf_stride_h = 0, k_sf_stride_s = 0;
  // V^T (groups of 16 tokens): codes (b, h_kv, d, s_pad/2), scales (b, h_kv, d, s_pad/16),
  // s_pad a multiple of 128 >= s_kv, tokens past s_kv zero (codes and scales).
  const uint8_t* v = nullptr;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_c = 0;
  const uint8_t* v_sf = nullptr;
  int64_t v_sf_stride_b = 0, v_sf_stride_h = 0, v_sf_stride_c = 0;
  // FP32 tensor scales (second level): q (b, h_q), k (b, h_kv), v (b, h_kv).
  const float* q_gs = nullptr;
  int64_t q_gs_stride_b = 0;
  const float* k_gs = nullptr;
  int64_t k_gs_stride_b = 0;
  const float* v_gs = nullptr;
  int64_t v_gs_stride_b = 0;
  // Q smoothing (nullptr = off): q_mean float32 (b, h_q, ceil(s_q/q_mean_block), d); the kernel
  // adds dS = q_mean . dequant(K) (the emulation's delta_s="quantized_k"). q_mean_block is a
  // multiple of the CTA's 64 rows.
  const float* q_mean = nullptr;
  int64_t q_mean_stride_b = 0, q_mean_stride_h = 0, q_mean_stride_blk = 0;
  int32_t q_mean_block = 128;
  // O: fp16/bf16 (b, h_q, s_q, d).
  void* o = nullptr;
  int64_t o_stride_b = 0, o_stride_h = 0, o_stride_s = 0;
  // LSE (nullptr = off): float32 (b, h_q, s_q), natural log of the smoothed scores.
  float* lse = nullptr;
  int64_t lse_stride_b = 0, lse_stride_h = 0;

  int32_t batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_kv = 0;
  float softmax_scale_log2 = 0.f;  // softmax scale * log2(e)
  int32_t is_causal = 0;           // bottom-right aligned
};

}  // namespace sage::sm120
