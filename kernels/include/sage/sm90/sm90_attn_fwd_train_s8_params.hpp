// Plain parameter struct and launcher declarations of the Hopper (sm_90a) `train_s8` attention
// forward (SageBwd's forward, docs/design/NUMERICS.md; the exact emulation is
// sage_quant.emulation.train_s8). Host-includable from ordinary C++ (the bindings).
//
// Tensor formats (per-block INT8 everywhere, symmetric, s = amax / 127):
//   q        int8  (b, h_q,  s_q,  d)          contiguous, one scale per 128 query tokens
//   k        int8  (b, h_kv, s_kv, d)          contiguous, smoothed (k - k_mean), one scale per 64 keys
//   v_t      int8  (b, h_kv, d, s_kv_pad64)    V transposed, tokens permuted inside every 32-token
//                                              chunk (the v_e4m3_t_perm32 order), padding 0
//   q_scale  f32   (b, h_q,  ceil(s_q/128))
//   k_scale  f32   (b, h_kv, ceil(s_kv/64))
//   v_scale  f32   (b, h_kv, ceil(s_kv/64))
//   o        fp16/bf16, logical (b, h_q, s_q, d), element strides given, last dim contiguous
//   lse      f32   logical (b, h_q, s_q): natural log of the *smoothed* scaled scores (what the
//            backward recomputes P from; -inf for a row that sees no key); nullptr = not wanted
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "sage/sm90/sm90_attn_fwd_qk_s8_pv_e4m3_params.hpp"  // OutDType, MaskKind, SAGE_SM90_HD

namespace sage::sm90 {

// The recipe's blocks (sage_quant.emulation.train_s8 kDefaultBlockQ / kDefaultBlockKv): Q and dO
// scale blocks of 128 tokens, K / V scale blocks of 64 keys = the kernel's KV tile.
constexpr int kSm90TrainBlockQ = 128;
constexpr int kSm90TrainBlockKV = 64;

SAGE_SM90_HD inline int64_t sm90_train_q_blocks(int64_t s) { return (s + kSm90TrainBlockQ - 1) / kSm90TrainBlockQ; }
SAGE_SM90_HD inline int64_t sm90_train_kv_blocks(int64_t s) { return (s + kSm90TrainBlockKV - 1) / kSm90TrainBlockKV; }
SAGE_SM90_HD inline int64_t sm90_train_v_pad(int64_t s) { return sm90_train_kv_blocks(s) * kSm90TrainBlockKV; }

struct AttnFwdTrainS8Args {
  const int8_t* q = nullptr;
  const int8_t* k = nullptr;
  const int8_t* v_t = nullptr;
  const float* q_scale = nullptr;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  void* o = nullptr;
  int64_t o_stride_b = 0, o_stride_h = 0, o_stride_s = 0;  // elements
  float* lse = nullptr;                                     // optional
  int64_t lse_stride_b = 0, lse_stride_h = 0;               // elements (token stride 1)
  int batch = 0, heads_q = 0, heads_kv = 0;
  int seq_q = 0, seq_kv = 0;
  int head_dim = 0;      // 64 or 128 (must match the instantiation)
  float sm_scale = 0.f;  // softmax scale (natural-log domain), > 0
  MaskKind mask = MaskKind::kNone;
};

// Launchers (kernels/src/sm90/attn_sm90_train_s8_fwd_*.cu): cudaErrorInvalidValue for arguments
// the instantiation cannot run (the binding validates first), else the launch error.
cudaError_t attn_fwd_sm90_train_s8_hdim64_f16(const AttnFwdTrainS8Args& a, cudaStream_t s);
cudaError_t attn_fwd_sm90_train_s8_hdim64_bf16(const AttnFwdTrainS8Args& a, cudaStream_t s);
cudaError_t attn_fwd_sm90_train_s8_hdim128_f16(const AttnFwdTrainS8Args& a, cudaStream_t s);
cudaError_t attn_fwd_sm90_train_s8_hdim128_bf16(const AttnFwdTrainS8Args& a, cudaStream_t s);

}  // namespace sage::sm90
