// Kernel ABI of the decode attention over an INT8 KV cache (family `decode`, every arch; host
// side, no device code). Recipe and arithmetic: sage_quant.emulation.kvcache (the oracle) and
// docs/decode.md. Launchers: kernels/src/decode/*.cu; the binding (csrc/bind_decode.cpp)
// validates every argument first, the launcher re-checks what could make it access out of bounds
// and returns cudaErrorInvalidValue.
//
// Cache: K and V codes int8 (b, h_kv, capacity, D) with per-token float32 scales (b, h_kv,
// capacity): per-token INT8 of (K - k_mean) / k_chan and (V - v_mean) / v_chan, the means and the
// channel equalizers (b, h_kv, D) fixed when the cache was first filled. Query rows are
// q * k_chan (fp32), quantized per row inside the kernel (INT8, sage_quant's per_token
// arithmetic); scores are exact int32 dot products:
//   t[r, j] = (float(q8[r] . k8[j]) * k_scale[j]) * (q_scale[r] * scale_log2)
//   o[r]    = (sum_j 2^(t[r,j] - m) * v_scale[j] * v8[j] / sum_j 2^(t[r,j] - m)) * v_chan + v_mean
// over the keys row r sees (causal: bottom-right, j <= len - s_q + i). A row that sees no key is 0.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sage::decode {

enum class InDType : int32_t { kF16 = 0, kBF16 = 1 };

inline constexpr int kTileTokens = 64;  // keys per tile; capacity and split_tokens are multiples
inline constexpr int kMaxRowsPerCta = 16;

struct DecodeS8Params {
  // q, o: logical (b, h_q, s_q, head_dim), element strides, last dim contiguous, 16-byte aligned rows
  const void* q = nullptr;
  int64_t q_sb = 0, q_sh = 0, q_ss = 0;
  void* o = nullptr;
  int64_t o_sb = 0, o_sh = 0, o_ss = 0;
  InDType dtype = InDType::kF16;
  // cache: codes (b, h_kv, capacity, head_dim) and scales (b, h_kv, capacity), contiguous
  const int8_t* k = nullptr;
  const int8_t* v = nullptr;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  const float* v_mean = nullptr;  // (b, h_kv, head_dim) contiguous, or nullptr (no V smoothing)
  const float* k_chan = nullptr;  // (b, h_kv, head_dim) contiguous, or nullptr (1)
  const float* v_chan = nullptr;  // (b, h_kv, head_dim) contiguous, or nullptr (1)
  int32_t capacity = 0;
  int32_t len = 0;  // valid cache tokens (1 <= len <= capacity)
  int32_t b = 0, h_q = 0, h_kv = 0, s_q = 0, head_dim = 0;
  int32_t causal = 1;
  float scale_log2 = 0.f;  // softmax scale * log2(e), rounded to float once
  // split-KV: splits CTAs per (b, kv head, row block), split_tokens keys each; with splits > 1
  // the partials go to ws_o (splits, b, h_q, s_q, head_dim) f32 and ws_ml (splits, b, h_q, s_q, 2)
  // f32, and a second launch combines them into o.
  int32_t splits = 1;
  int32_t split_tokens = 0;
  float* ws_o = nullptr;
  float* ws_ml = nullptr;
};

// Appending n tokens to the cache: per-token INT8 of (x - mean) / chan for K and V into slots
// [start, start + n) (sage_quant.emulation.kvcache.quantize_kv_tokens, bit for bit).
struct KvAppendS8Params {
  const void* k = nullptr;  // logical (b, h_kv, n, head_dim), element strides, last dim contiguous
  const void* v = nullptr;
  int64_t k_sb = 0, k_sh = 0, k_ss = 0, v_sb = 0, v_sh = 0, v_ss = 0;
  InDType dtype = InDType::kF16;
  const float* k_mean = nullptr;  // (b, h_kv, head_dim) contiguous, each
  const float* k_chan = nullptr;
  const float* v_mean = nullptr;
  const float* v_chan = nullptr;
  int8_t* k_out = nullptr;  // the cache: (b, h_kv, capacity, head_dim) / (b, h_kv, capacity)
  int8_t* v_out = nullptr;
  float* k_scale = nullptr;
  float* v_scale = nullptr;
  int32_t b = 0, h_kv = 0, n = 0, head_dim = 0, capacity = 0, start = 0;
};
cudaError_t launch_kv_append_s8(const KvAppendS8Params& p, cudaStream_t stream);

// Workspace floats for a call (0 when splits == 1).
inline int64_t decode_s8_workspace_floats(const DecodeS8Params& p) {
  if (p.splits <= 1) return 0;
  const int64_t rows = int64_t(p.b) * p.h_q * p.s_q;
  return int64_t(p.splits) * rows * (p.head_dim + 2);
}

cudaError_t launch_decode_s8_hdim64(const DecodeS8Params& p, cudaStream_t stream);
cudaError_t launch_decode_s8_hdim128(const DecodeS8Params& p, cudaStream_t stream);
// CTAs of the main kernel one SM holds for (dtype, query rows per kv head): the split-KV policy
// sizes the grid to whole waves of them. 0 on error.
int decode_s8_ctas_per_sm_hdim64(InDType dtype, int rows_per_kv_head);
int decode_s8_ctas_per_sm_hdim128(InDType dtype, int rows_per_kv_head);
// CTAs of the main kernel per (b, kv head) and split: the row blocks.
inline int decode_s8_row_blocks(int rows_per_kv_head) {
  return rows_per_kv_head <= 4 ? 1 : (rows_per_kv_head + kMaxRowsPerCta - 1) / kMaxRowsPerCta;
}

}  // namespace sage::decode
