// Plain parameter struct and launcher declarations of the Hopper (sm_90a) `train_s8` attention
// backward (SageBwd's backward, docs/design/NUMERICS.md; the exact emulation is
// sage_quant.emulation.train_s8.train_s8_backward). Host-includable from ordinary C++ (the bindings).
//
// Two deterministic kernels (no atomics; docs/perf/sm90_train_s8.md):
//   dK/dV  one CTA per 64-key tile of a (batch, kv head), walking every 128-query block of every q
//          head of its GQA group: S^T, P (INT8 per 128 x 64 tile), dV += P^T dO (INT8); dP^T in 16
//          bits, dS = P (dP - D) (INT8 per tile), dK += dS^T Q (INT8)
//   dQ     one CTA per 128-query block of a (batch, q head), walking its KV tiles: S, P, dP, dS
//          again, dQ += dS K (INT8)
//
// Tensor formats (the sizes come from q / k; s_q_pad = ceil(s_q/128)*128, s_kv_pad = ceil(s_kv/64)*64):
//   q        int8  (b, h_q,  s_q,  d)          per-block INT8 (128 tokens), as the forward's
//   q_t      int8  (b, h_q,  d, s_q_pad)       q transposed, tokens permuted inside every 32-token
//                                              chunk (the v_e4m3_t_perm32 order), padding 0
//   k        int8  (b, h_kv, s_kv, d)          smoothed (k - k_mean), per block of 64 keys
//   k_t      int8  (b, h_kv, d, s_kv_pad)      k transposed and permuted like q_t
//   v        fp16/bf16 (b, h_kv, s_kv, d)      contiguous, the 16-bit V of dP = dO V^T
//   dout     fp16/bf16 (b, h_q, s_q, d)        contiguous, the 16-bit dO (same dtype as v)
//   do_t     int8  (b, h_q,  d, s_q_pad)       dO per-block INT8 (128 tokens), transposed + permuted
//   q_scale, do_scale  f32 (b, h_q, ceil(s_q/128));  k_scale f32 (b, h_kv, ceil(s_kv/64))
//   lse2     f32   (b, h_q, s_q_pad)           the forward's smoothed LSE times log2(e); -inf -> 0
//   delta    f32   (b, h_q, s_q_pad)           D = rowsum(dO o O) (non-finite where dO's row is)
//   do_bad_last  int32 (b, h_q, d) or null     the last row r with a non-finite dO[r, c], -1 if none;
//            dout / do_t hold dO with its non-finite values zeroed (the emulation's rule: NaN reaches
//            dQ rows, dK rows, dV (key, channel) exactly where exact attention's gradient has it)
//   dq, dk, dv  fp16/bf16 (v's dtype), logical (b, h, s, d), element strides given, last dim contiguous
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "sage/sm90/sm90_attn_fwd_train_s8_params.hpp"  // kSm90TrainBlockQ / KV, MaskKind

namespace sage::sm90 {

SAGE_SM90_HD inline int64_t sm90_train_q_pad(int64_t s) { return sm90_train_q_blocks(s) * kSm90TrainBlockQ; }

struct AttnBwdTrainS8Args {
  const int8_t* q = nullptr;
  const int8_t* q_t = nullptr;
  const int8_t* k = nullptr;
  const int8_t* k_t = nullptr;
  const void* v = nullptr;
  const void* dout = nullptr;
  const int8_t* do_t = nullptr;
  const float* q_scale = nullptr;
  const float* k_scale = nullptr;
  const float* do_scale = nullptr;
  const int* do_bad_last = nullptr;  // optional, see below
  const float* lse2 = nullptr;
  const float* delta = nullptr;
  void* dq = nullptr;
  int64_t dq_stride_b = 0, dq_stride_h = 0, dq_stride_s = 0;  // elements
  void* dk = nullptr;
  int64_t dk_stride_b = 0, dk_stride_h = 0, dk_stride_s = 0;
  void* dv = nullptr;
  int64_t dv_stride_b = 0, dv_stride_h = 0, dv_stride_s = 0;
  int batch = 0, heads_q = 0, heads_kv = 0;
  int seq_q = 0, seq_kv = 0;
  int head_dim = 0;      // 64 or 128 (must match the instantiation)
  float sm_scale = 0.f;  // softmax scale (natural-log domain), > 0
  MaskKind mask = MaskKind::kNone;
};

// Launchers (kernels/src/sm90/attn_sm90_train_s8_bwd_*.cu): the dK/dV kernel, then the dQ kernel, on
// `s`. cudaErrorInvalidValue for arguments the instantiation cannot run (the binding validates
// first), else the launch error.
cudaError_t attn_bwd_sm90_train_s8_hdim64_f16(const AttnBwdTrainS8Args& a, cudaStream_t s);
cudaError_t attn_bwd_sm90_train_s8_hdim64_bf16(const AttnBwdTrainS8Args& a, cudaStream_t s);
cudaError_t attn_bwd_sm90_train_s8_hdim128_f16(const AttnBwdTrainS8Args& a, cudaStream_t s);
cudaError_t attn_bwd_sm90_train_s8_hdim128_bf16(const AttnBwdTrainS8Args& a, cudaStream_t s);

}  // namespace sage::sm90
