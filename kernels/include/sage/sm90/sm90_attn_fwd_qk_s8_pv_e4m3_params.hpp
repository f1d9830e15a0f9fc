// Plain parameter structs and launcher declarations of the Hopper (sm_90a) `qk_s8_pv_e4m3`
// attention forward and of its fused quantization pass. Host-includable from ordinary C++ (the
// nanobind bindings): no device code, no CuTe, no framework types.
//
// Tensor formats are the contract of docs/design/quant-formats.md:
//   q        int8  (b, h_q,  s_q,  d)       contiguous, per-thread Q scales
//   k        int8  (b, h_kv, s_kv, d)       contiguous, smoothed (k - k_mean), per-thread K scales, blk 128
//   v_t      uint8 (b, h_kv, d, s_kv_pad)   E4M3 bits, per-channel scale, transposed AND token-permuted
//                                           inside every 32-token chunk ("v_e4m3_t_perm32")
//   q_scale  f32   (b, h_q,  ceil(s_q/16)*8)
//   k_scale  f32   (b, h_kv, ceil(s_kv/128)*4)
//   v_scale  f32   (b, h_kv, d)
//   v_mean   f32   (b, h_kv, d)  optional (nullptr = none): V smoothing, added to every output row
//   o        fp16/bf16, logical (b, h_q, s_q, d_out), element strides given, last dim contiguous
//            (d_out = head_dim_out: d unless the head dim was zero-padded inside the quantizer)
//   lse      f32   logical (b, h_q, s_q), element strides given (natural log; nullptr = not wanted)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#if defined(__CUDACC__)
#define SAGE_SM90_HD __host__ __device__
#else
#define SAGE_SM90_HD
#endif

namespace sage::sm90 {

// Which output dtype the epilogue writes (typed tag at the template level; this enum only
// crosses the host ABI).
enum class OutDType : int { kF16 = 0, kBF16 = 1 };

// Bottom-right aligned causal mask: query i sees keys j <= i + s_kv - s_q.
enum class MaskKind : int { kNone = 0, kCausal = 1 };

struct AttnFwdQkS8PvE4m3Args {
  const int8_t* q = nullptr;
  const int8_t* k = nullptr;
  const uint8_t* v_t = nullptr;
  const float* q_scale = nullptr;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  // Optional V smoothing (nullptr = none): out = P~ V^ * v_scale / l + v_mean[channel]; rows with
  // l == 0 (no visible key) stay 0.
  const float* v_mean = nullptr;
  void* o = nullptr;
  int64_t o_stride_b = 0, o_stride_h = 0, o_stride_s = 0;  // elements
  float* lse = nullptr;                                     // optional
  int64_t lse_stride_b = 0, lse_stride_h = 0;               // elements (token stride 1)
  int batch = 0, heads_q = 0, heads_kv = 0;
  int seq_q = 0, seq_kv = 0;
  int head_dim = 0;       // 64 or 128 (must match the instantiation)
  // Columns of o the epilogue stores: 0 or head_dim = all; else a multiple of 8 in [8, head_dim)
  // (a head dim zero-padded inside the quantizer, QuantQkvSm90Args::head_dim_in: o has d_out
  // columns, the kernel runs at head_dim on the zero-padded quantized tensors).
  int head_dim_out = 0;
  float sm_scale = 0.f;   // softmax scale (natural-log domain), > 0
  MaskKind mask = MaskKind::kNone;
};

// Tokens of the PV K-tile; v_t is padded to a multiple of it.
constexpr int kSm90VTokenPad = 128;
// KV tile of the attention kernel, also the per-thread K scale block. (Query tiles are the
// kernel's choice: 64 rows per consumer warpgroup.)
constexpr int kSm90BlockKV = 128;
// Tokens per partial-statistics chunk of the fused quantization pass.
constexpr int kSm90StatsChunk = 512;

SAGE_SM90_HD inline int64_t sm90_v_pad(int64_t s) { return (s + kSm90VTokenPad - 1) / kSm90VTokenPad * kSm90VTokenPad; }
SAGE_SM90_HD inline int64_t sm90_q_scale_groups(int64_t s) { return (s + 15) / 16 * 8; }
SAGE_SM90_HD inline int64_t sm90_k_scale_groups(int64_t s) { return (s + kSm90BlockKV - 1) / kSm90BlockKV * 4; }
SAGE_SM90_HD inline int64_t sm90_stats_chunks(int64_t s) { return (s + kSm90StatsChunk - 1) / kSm90StatsChunk; }

// Launchers (defined in kernels/src/sm90/*.cu, one configuration per translation unit).
// They return cudaErrorInvalidValue for arguments the instantiation cannot run (the binding
// validates first and raises readable errors), cudaErrorNotSupported when the driver entry
// point for TMA descriptors is missing, else the launch error.
cudaError_t attn_fwd_sm90_qk_s8_pv_e4m3_hdim64_f16(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t s);
cudaError_t attn_fwd_sm90_qk_s8_pv_e4m3_hdim64_bf16(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t s);
cudaError_t attn_fwd_sm90_qk_s8_pv_e4m3_hdim128_f16(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t s);
cudaError_t attn_fwd_sm90_qk_s8_pv_e4m3_hdim128_bf16(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t s);
// pv_accum="one_level": P~V accumulated straight into O (NUMERICS.md qk_s8_pv_e4m3 options).
cudaError_t attn_fwd_sm90_qk_s8_pv_e4m3_one_level_hdim64_f16(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t s);
cudaError_t attn_fwd_sm90_qk_s8_pv_e4m3_one_level_hdim64_bf16(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t s);
cudaError_t attn_fwd_sm90_qk_s8_pv_e4m3_one_level_hdim128_f16(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t s);
cudaError_t attn_fwd_sm90_qk_s8_pv_e4m3_one_level_hdim128_bf16(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t s);

// ---- fused quantization of Q, K, V for this kernel ---------------------------------------------
// Inputs fp16 or bf16 (same dtype for q, k, v), logical (b, h, s, d_in), element strides, last dim
// contiguous, every row 16-byte aligned (d_in = head_dim_in, a multiple of 8: a row is whole 16-byte
// vectors). Three launches on `stream`, no host synchronization:
//   1. per (b, kv head, 512-token chunk): partial sum of K, sum / max / min of V per channel
//   2. per (b, kv head): k_mean = sum / s_kv (unless given); with V smoothing v_mean = sum / s_kv
//      (unless given); v_scale = max(vmax - v_mean, v_mean - vmin) / 448 (1 if 0; v_mean = 0
//      without smoothing, i.e. amax|V| / 448)
//   3. per 128-token tile: Q int8 per-thread, K int8 per-thread (smoothed), V E4M3 of V - v_mean
//      transposed + permuted (padding tokens written as 0)
struct QuantQkvSm90Args {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_s = 0;  // elements
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;
  int batch = 0, heads_q = 0, heads_kv = 0, seq_q = 0, seq_kv = 0, head_dim = 0;
  // Head dim of the inputs q, k, v: 0 or head_dim = head_dim; else a multiple of 8 in [8, head_dim).
  // Channels [head_dim_in, head_dim) are not read: they quantize as zero channels (codes 0, k_mean 0,
  // v_mean 0, v_scale 1), bit for bit the outputs of the inputs zero-padded to head_dim. The outputs
  // below keep head_dim (the attention kernel's instantiation).
  int head_dim_in = 0;
  bool in_bf16 = false;          // false: fp16 inputs
  // outputs
  int8_t* q_out = nullptr;       // (b, h_q, s_q, d)
  float* q_scale = nullptr;      // (b, h_q, ceil(s_q/16)*8)
  int8_t* k_out = nullptr;       // (b, h_kv, s_kv, d)
  float* k_scale = nullptr;      // (b, h_kv, ceil(s_kv/128)*4)
  uint8_t* v_out = nullptr;      // (b, h_kv, d, ceil(s_kv/128)*128)
  float* v_scale = nullptr;      // (b, h_kv, d)
  float* k_mean = nullptr;       // (b, h_kv, d): input if k_mean_given, else written
  bool k_mean_given = false;
  float* v_mean = nullptr;       // (b, h_kv, d): nullptr = no V smoothing; input if v_mean_given, else written
  bool v_mean_given = false;
  // workspace, quant_qkv_sm90_workspace_floats() = 4 * b * h_kv * ceil(s_kv/512) * d floats
  // (partial K sums, V sums, V max, V min)
  float* workspace = nullptr;
};

cudaError_t quant_qkv_sm90_fused(const QuantQkvSm90Args& a, cudaStream_t stream);

inline int64_t quant_qkv_sm90_workspace_floats(int64_t b, int64_t h_kv, int64_t s_kv, int64_t d) {
  return 4 * b * h_kv * sm90_stats_chunks(s_kv) * d;
}

// ---- one call: quantization + attention over a single caller-allocated byte workspace ---------
// The host path of a whole attention call (the binding quant_attn_fwd_sm90_qk_s8_pv_e4m3) carves
// every quantized tensor out of one buffer, so a call costs one allocation and one binding call.
// Pieces start at kSm90CarveAlign-byte boundaries (TMA needs 16, float2 loads 8). k_mean comes
// first so that the caller can view it (the LSE correction q·k_mean·scale).
constexpr int64_t kSm90CarveAlign = 256;

struct QuantAttnSm90Workspace {
  int64_t k_mean = 0, v_mean = 0, q = 0, q_scale = 0, k = 0, k_scale = 0, v_t = 0, v_scale = 0, stats = 0;
  int64_t total = 0;  // bytes
};

inline QuantAttnSm90Workspace quant_attn_sm90_workspace(int64_t b, int64_t h_q, int64_t s_q, int64_t h_kv,
                                                        int64_t s_kv, int64_t d) {
  QuantAttnSm90Workspace w;
  int64_t at = 0;
  auto take = [&at](int64_t bytes) {
    const int64_t off = at;
    at += (bytes + kSm90CarveAlign - 1) / kSm90CarveAlign * kSm90CarveAlign;
    return off;
  };
  w.k_mean = take(4 * b * h_kv * d);
  w.v_mean = take(4 * b * h_kv * d);
  w.q = take(b * h_q * s_q * d);
  w.q_scale = take(4 * b * h_q * sm90_q_scale_groups(s_q));
  w.k = take(b * h_kv * s_kv * d);
  w.k_scale = take(4 * b * h_kv * sm90_k_scale_groups(s_kv));
  w.v_t = take(b * h_kv * d * sm90_v_pad(s_kv));
  w.v_scale = take(4 * b * h_kv * d);
  w.stats = take(4 * quant_qkv_sm90_workspace_floats(b, h_kv, s_kv, d));
  w.total = at;
  return w;
}

}  // namespace sage::sm90
