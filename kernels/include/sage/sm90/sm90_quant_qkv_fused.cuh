// Fused quantization of Q, K, V for the Hopper `qk_s8_pv_e4m3` attention
// (sm90_attn_fwd_qk_s8_pv_e4m3_kernel.cuh). Plain CUDA (no wgmma); built with the sm90 family.
//
// Three launches, no host synchronization, deterministic (fixed reduction orders):
//   1. kv_stats_partial : grid (ceil(s_kv/512), b*h_kv). Per 512-token chunk and channel: the fp32
//                         sum of K, and the sum, max and min of V -> workspace.
//   2. kv_stats_finalize: grid (b*h_kv). k_mean = (sum of the chunk sums, in chunk order) / s_kv
//                         (skipped when the caller gives k_mean); V smoothing (v_mean != nullptr):
//                         v_mean likewise (unless given), else v_mean = 0;
//                         v_scale = max(vmax - v_mean, v_mean - vmin) / 448 (1 if 0).
//                         That is exactly amax_t |fl(V - v_mean)|: fp32 subtraction of a constant
//                         is monotonic, so the extremes of fl(v - m) are fl(vmax - m), fl(vmin - m),
//                         and negation is exact. Without smoothing it is amax|V| as before.
//   3. quant_tiles      : one CTA per 128-token tile of Q (per head), of K, or of V:
//                         Q int8 per-thread groups (t//16)*8 + t%8,
//                         K int8 per-thread groups (t//128)*4 + (t%8)//2 of K - k_mean,
//                         V E4M3 per channel of V - v_mean, transposed to (d, s_pad) and permuted inside every
//                         32-token chunk (v_e4m3_t_perm32 in quant-formats.md), padding 0.
// Q/K/V are read once each by pass 3 and K/V once more by pass 1: 5 reads of fp16 and 1.5 bytes
// written per element, versus separate passes per tensor plus a transpose in the original.
//
// Arithmetic is exactly the contract (docs/design/quant-formats.md): fp32 from the exact input,
// one fp32 subtraction for smoothing, IEEE division (__fdiv_rn), round-half-even, clamp to 127;
// E4M3 by cvt.rn.satfinite. Max is NaN-propagating so a non-finite group gets a non-finite scale.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sage/sm90/sm90_attn_fwd_qk_s8_pv_e4m3_params.hpp"

namespace sage::sm90 {
namespace quant_detail {

inline constexpr int kThreads = 256;
inline constexpr int kTile = 128;          // tokens per quantization tile (= attention KV tile)
inline constexpr float kInt8Max = 127.f;
inline constexpr float kE4m3Max = 448.f;
inline constexpr int kPermChunk = 32;      // V token permutation period (one k32 wgmma)
inline constexpr int kVRowPitch = kTile + 4;  // smem transpose row pitch (bytes), fewer bank conflicts

struct InF16 {
  using T = __half;
  static __device__ __forceinline__ float2 to_f2(uint32_t w) {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
};
struct InBF16 {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float2 to_f2(uint32_t w) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
  }
};

__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float min_nan(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

inline constexpr int kStatsArrays = 4;  // workspace planes: K sum, V sum, V max, V min

// 8 consecutive channels (16 bytes) of one token -> fp32.
template <class InTag>
__device__ __forceinline__ void load8(const void* p, float (&x)[8]) {
  const uint4 w = *reinterpret_cast<const uint4*>(p);
  float2 f;
  f = InTag::to_f2(w.x); x[0] = f.x; x[1] = f.y;
  f = InTag::to_f2(w.y); x[2] = f.x; x[3] = f.y;
  f = InTag::to_f2(w.z); x[4] = f.x; x[5] = f.y;
  f = InTag::to_f2(w.w); x[6] = f.x; x[7] = f.y;
}

__device__ __forceinline__ float int8_scale(float amax) { return amax == 0.f ? 1.f : __fdiv_rn(amax, kInt8Max); }

__device__ __forceinline__ int quant_s8(float x, float s) {
  const float y = __fdiv_rn(x, s);
  if (y != y) return 0;  // NaN: the reference picks 0 (values of a non-finite group are unspecified)
  const int q = __float2int_rn(y);
  return q > 127 ? 127 : (q < -127 ? -127 : q);
}

// Position of token k (0..31) inside its 32-token chunk of v_t (inverse of the permutation
// pi(p) = 16*(p/16) + 8*((p%4)/2) + 2*((p%16)/4) + p%2 documented in quant-formats.md).
__device__ __forceinline__ int v_perm_pos(int k) {
  const int half = k >> 4, r = k & 15;
  return 16 * half + 4 * ((r & 7) >> 1) + 2 * (r >> 3) + (r & 1);
}

template <int D>
struct Layout {
  static constexpr int kThreadsPerToken = D / 8;                       // 16 B of input each
  static constexpr int kTokensPerPass = kThreads / kThreadsPerToken;   // 16 (d=128) / 32 (d=64)
  static constexpr int kPasses = kTile / kTokensPerPass;               // 8 / 4
};

// ---- pass 1 ------------------------------------------------------------------------------------
template <class InTag, int D>
__global__ void __launch_bounds__(kThreads)
    kv_stats_partial_kernel(const QuantQkvSm90Args a, int n_chunks) {
  using L = Layout<D>;
  // 4 planes x kTokensPerPass x D floats = 32 KiB for both head dims
  __shared__ float red[kStatsArrays][L::kTokensPerPass][D];
  const int chunk = blockIdx.x;
  const int bh = blockIdx.y;
  const int b = bh / a.heads_kv, h = bh % a.heads_kv;
  const int c8 = threadIdx.x % L::kThreadsPerToken;
  const int r = threadIdx.x / L::kThreadsPerToken;
  const char* kp = static_cast<const char*>(a.k) +
                   (int64_t(b) * a.k_stride_b + int64_t(h) * a.k_stride_h + c8 * 8) * 2;
  const char* vp = static_cast<const char*>(a.v) +
                   (int64_t(b) * a.v_stride_b + int64_t(h) * a.v_stride_h + c8 * 8) * 2;
  float ksum[8], vsum[8], vmax[8], vmin[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) ksum[i] = 0.f, vsum[i] = 0.f, vmax[i] = -INFINITY, vmin[i] = INFINITY;
  const int t_end = min(a.seq_kv, (chunk + 1) * kSm90StatsChunk);
  for (int t = chunk * kSm90StatsChunk + r; t < t_end; t += L::kTokensPerPass) {
    float xk[8], xv[8];
    load8<InTag>(kp + int64_t(t) * a.k_stride_s * 2, xk);
    load8<InTag>(vp + int64_t(t) * a.v_stride_s * 2, xv);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      ksum[i] += xk[i];
      vsum[i] += xv[i];
      vmax[i] = max_nan(vmax[i], xv[i]);
      vmin[i] = min_nan(vmin[i], xv[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    red[0][r][c8 * 8 + i] = ksum[i];
    red[1][r][c8 * 8 + i] = vsum[i];
    red[2][r][c8 * 8 + i] = vmax[i];
    red[3][r][c8 * 8 + i] = vmin[i];
  }
  __syncthreads();
  if (threadIdx.x < D) {
    // Rows r without a token in a short chunk hold the neutral values (0, 0, -inf, +inf).
    const int c = threadIdx.x;
    float ks = 0.f, vs = 0.f, mx = -INFINITY, mn = INFINITY;
    for (int rr = 0; rr < L::kTokensPerPass; ++rr) {
      ks += red[0][rr][c];
      vs += red[1][rr][c];
      mx = max_nan(mx, red[2][rr][c]);
      mn = min_nan(mn, red[3][rr][c]);
    }
    const int64_t n_part = int64_t(a.batch) * a.heads_kv * n_chunks * D;
    const int64_t idx = (int64_t(bh) * n_chunks + chunk) * D + c;
    a.workspace[idx] = ks;
    a.workspace[n_part + idx] = vs;
    a.workspace[2 * n_part + idx] = mx;
    a.workspace[3 * n_part + idx] = mn;
  }
}

// ---- pass 2 ------------------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(D) kv_stats_finalize_kernel(const QuantQkvSm90Args a, int n_chunks) {
  const int bh = blockIdx.x;
  const int c = threadIdx.x;
  const int64_t n_part = int64_t(a.batch) * a.heads_kv * n_chunks * D;
  float ks = 0.f, vs = 0.f, mx = -INFINITY, mn = INFINITY;
  for (int ch = 0; ch < n_chunks; ++ch) {
    const int64_t idx = (int64_t(bh) * n_chunks + ch) * D + c;
    ks += a.workspace[idx];
    vs += a.workspace[n_part + idx];
    mx = max_nan(mx, a.workspace[2 * n_part + idx]);
    mn = min_nan(mn, a.workspace[3 * n_part + idx]);
  }
  const int64_t o = int64_t(bh) * D + c;
  if (!a.k_mean_given) a.k_mean[o] = __fdiv_rn(ks, float(a.seq_kv));
  float vm = 0.f;  // no V smoothing: amax = max(vmax, -vmin) = amax|V|
  if (a.v_mean != nullptr) {
    if (a.v_mean_given) {
      vm = a.v_mean[o];
    } else {
      vm = __fdiv_rn(vs, float(a.seq_kv));
      a.v_mean[o] = vm;
    }
  }
  // amax_t |fl(v - vm)| (see the file comment); every channel has >= 1 token, so mx, mn are finite
  // or NaN here, never the +-inf initial values.
  const float amax = max_nan(__fsub_rn(mx, vm), __fsub_rn(vm, mn));
  a.v_scale[o] = amax == 0.f ? 1.f : __fdiv_rn(amax, kE4m3Max);
}

// ---- pass 3 ------------------------------------------------------------------------------------
// Per-token amax of |x| over the D channels (the kThreadsPerToken lanes of a token are adjacent).
template <int D>
__device__ __forceinline__ float token_amax(const float (&x)[8]) {
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = max_nan(m, fabsf(x[i]));
#pragma unroll
  for (int off = Layout<D>::kThreadsPerToken / 2; off > 0; off /= 2) {
    m = max_nan(m, __shfl_xor_sync(0xffffffffu, m, off));
  }
  return m;
}

template <class InTag, int D>
__global__ void __launch_bounds__(kThreads) quant_tiles_kernel(const QuantQkvSm90Args a, int q_jobs, int kv_jobs) {
  using L = Layout<D>;
  __shared__ float tok_amax[kTile];
  __shared__ float grp_amax[4];
  __shared__ __align__(16) uint8_t v_tr[D * kVRowPitch];

  const int c8 = threadIdx.x % L::kThreadsPerToken;
  const int r = threadIdx.x / L::kThreadsPerToken;
  int job = blockIdx.x;
  const int role = job < q_jobs ? 0 : (job < q_jobs + kv_jobs ? 1 : 2);  // Q, K, V
  job -= role == 0 ? 0 : (role == 1 ? q_jobs : q_jobs + kv_jobs);

  const int heads = role == 0 ? a.heads_q : a.heads_kv;
  const int seq = role == 0 ? a.seq_q : a.seq_kv;
  const int n_tiles = (seq + kTile - 1) / kTile;
  const int tile = job % n_tiles;
  const int bh = job / n_tiles;
  const int b = bh / heads, h = bh % heads;
  const int t0 = tile * kTile;
  const void* src = role == 0 ? a.q : (role == 1 ? a.k : a.v);
  const int64_t sb = role == 0 ? a.q_stride_b : (role == 1 ? a.k_stride_b : a.v_stride_b);
  const int64_t sh = role == 0 ? a.q_stride_h : (role == 1 ? a.k_stride_h : a.v_stride_h);
  const int64_t st = role == 0 ? a.q_stride_s : (role == 1 ? a.k_stride_s : a.v_stride_s);
  const char* base = static_cast<const char*>(src) + (int64_t(b) * sb + int64_t(h) * sh + c8 * 8) * 2;

  // Per-channel constants: the smoothing mean to subtract (K: k_mean, V: v_mean or 0) and the
  // V scale.
  float mean[8], chan[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) mean[i] = 0.f, chan[i] = 1.f;
  if (role == 1) {
#pragma unroll
    for (int i = 0; i < 8; ++i) mean[i] = a.k_mean[int64_t(bh) * D + c8 * 8 + i];
  } else if (role == 2) {
#pragma unroll
    for (int i = 0; i < 8; ++i) chan[i] = a.v_scale[int64_t(bh) * D + c8 * 8 + i];
    if (a.v_mean != nullptr) {
#pragma unroll
      for (int i = 0; i < 8; ++i) mean[i] = a.v_mean[int64_t(bh) * D + c8 * 8 + i];
    }
  }

  float x[L::kPasses][8];
#pragma unroll
  for (int p = 0; p < L::kPasses; ++p) {
    const int t = t0 + p * L::kTokensPerPass + r;
    if (t < seq) {
      load8<InTag>(base + int64_t(t) * st * 2, x[p]);
      if (role != 0) {
        // x - 0 == x exactly (also for -0 and NaN), so unsmoothed V takes the same path
#pragma unroll
        for (int i = 0; i < 8; ++i) x[p][i] = __fsub_rn(x[p][i], mean[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) x[p][i] = 0.f;  // padding tokens: 0 (never changes an amax)
    }
  }

  if (role == 2) {
    // ---- V: E4M3 per channel, transpose + permute through shared memory ----
#pragma unroll
    for (int p = 0; p < L::kPasses; ++p) {
      const int tt = p * L::kTokensPerPass + r;
      const int pos = (tt & ~(kPermChunk - 1)) | v_perm_pos(tt & (kPermChunk - 1));
      const bool valid = t0 + tt < seq;  // padding is code 0 even if a scale is non-finite
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        v_tr[(c8 * 8 + i) * kVRowPitch + pos] =
            valid ? __nv_cvt_float_to_fp8(__fdiv_rn(x[p][i], chan[i]), __NV_SATFINITE, __NV_E4M3) : 0;
      }
    }
    __syncthreads();
    const int64_t s_pad = sm90_v_pad(a.seq_kv);
    uint8_t* out = a.v_out + int64_t(bh) * D * s_pad + t0;
    for (int w = threadIdx.x; w < D * (kTile / 4); w += kThreads) {
      const int c = w / (kTile / 4), word = w % (kTile / 4);
      *reinterpret_cast<uint32_t*>(out + int64_t(c) * s_pad + 4 * word) =
          *reinterpret_cast<const uint32_t*>(&v_tr[c * kVRowPitch + 4 * word]);
    }
    return;
  }

  // ---- Q / K: per-token amax -> per-thread group amax -> int8 ----
#pragma unroll
  for (int p = 0; p < L::kPasses; ++p) {
    const float m = token_amax<D>(x[p]);
    if (c8 == 0) tok_amax[p * L::kTokensPerPass + r] = m;
  }
  __syncthreads();
  if (role == 1 && threadIdx.x < 4) {
    // K group j of this tile: tokens 8i + 2j + e, i < 16, e < 2
    const int j = threadIdx.x;
    float m = 0.f;
    for (int i = 0; i < kTile / 8; ++i) {
      m = max_nan(m, max_nan(tok_amax[8 * i + 2 * j], tok_amax[8 * i + 2 * j + 1]));
    }
    grp_amax[j] = m;
    a.k_scale[int64_t(bh) * sm90_k_scale_groups(a.seq_kv) + tile * 4 + j] = int8_scale(m);
  }
  __syncthreads();

  int8_t* out = (role == 0 ? a.q_out : a.k_out) + (int64_t(bh) * seq + t0) * D + c8 * 8;
  const int64_t q_groups = sm90_q_scale_groups(a.seq_q);
#pragma unroll
  for (int p = 0; p < L::kPasses; ++p) {
    const int tt = p * L::kTokensPerPass + r;
    float s;
    if (role == 0) {
      // Q group of token tt: rows tt and tt ^ 8 of its 16-row block
      s = int8_scale(max_nan(tok_amax[tt], tok_amax[tt ^ 8]));
      const int64_t g = int64_t(t0 + tt) / 16 * 8 + tt % 8;
      if (c8 == 0 && (tt & 8) == 0 && g < q_groups) a.q_scale[int64_t(bh) * q_groups + g] = s;
    } else {
      s = int8_scale(grp_amax[(tt % 8) / 2]);
    }
    if (t0 + tt < seq) {
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        lo |= uint32_t(uint8_t(int8_t(quant_s8(x[p][i], s)))) << (8 * i);
        hi |= uint32_t(uint8_t(int8_t(quant_s8(x[p][4 + i], s)))) << (8 * i);
      }
      *reinterpret_cast<uint2*>(out + int64_t(tt) * D) = make_uint2(lo, hi);
    }
  }
}

template <class InTag, int D>
cudaError_t launch_quant_qkv_sm90(const QuantQkvSm90Args& a, cudaStream_t stream) {
  const int n_chunks = int(sm90_stats_chunks(a.seq_kv));
  const int bh_kv = a.batch * a.heads_kv;
  kv_stats_partial_kernel<InTag, D><<<dim3(n_chunks, bh_kv), kThreads, 0, stream>>>(a, n_chunks);
  kv_stats_finalize_kernel<D><<<bh_kv, D, 0, stream>>>(a, n_chunks);
  const int64_t q_jobs = int64_t(a.batch) * a.heads_q * ((a.seq_q + kTile - 1) / kTile);
  const int64_t kv_jobs = int64_t(bh_kv) * ((a.seq_kv + kTile - 1) / kTile);
  const int64_t jobs = q_jobs + 2 * kv_jobs;
  if (jobs > 0x7fffffff) return cudaErrorInvalidValue;
  quant_tiles_kernel<InTag, D><<<unsigned(jobs), kThreads, 0, stream>>>(a, int(q_jobs), int(kv_jobs));
  return cudaGetLastError();
}

}  // namespace quant_detail

// Validates what the kernels rely on (the binding raises readable errors first) and dispatches.
inline cudaError_t quant_qkv_sm90_fused_impl(const QuantQkvSm90Args& a, cudaStream_t stream) {
  auto row_ok = [](const void* p, int64_t sb, int64_t sh, int64_t ss) {
    // 16-byte vector loads of 8 fp16/bf16: base and every row start 16-byte aligned
    return p != nullptr && (reinterpret_cast<uintptr_t>(p) % 16) == 0 && sb % 8 == 0 && sh % 8 == 0 &&
           ss % 8 == 0;
  };
  if (a.batch <= 0 || a.heads_q <= 0 || a.heads_kv <= 0 || a.seq_q <= 0 || a.seq_kv <= 0 ||
      a.heads_q % a.heads_kv != 0 || a.batch * int64_t(a.heads_kv) > 65535 ||
      !(a.head_dim == 64 || a.head_dim == 128) ||
      !row_ok(a.q, a.q_stride_b, a.q_stride_h, a.q_stride_s) ||
      !row_ok(a.k, a.k_stride_b, a.k_stride_h, a.k_stride_s) ||
      !row_ok(a.v, a.v_stride_b, a.v_stride_h, a.v_stride_s) || a.q_out == nullptr ||
      a.q_scale == nullptr || a.k_out == nullptr || a.k_scale == nullptr || a.v_out == nullptr ||
      a.v_scale == nullptr || a.k_mean == nullptr || a.workspace == nullptr ||
      (a.v_mean_given && a.v_mean == nullptr)) {
    return cudaErrorInvalidValue;
  }
  using namespace quant_detail;
  if (a.head_dim == 128) {
    return a.in_bf16 ? launch_quant_qkv_sm90<InBF16, 128>(a, stream) : launch_quant_qkv_sm90<InF16, 128>(a, stream);
  }
  return a.in_bf16 ? launch_quant_qkv_sm90<InBF16, 64>(a, stream) : launch_quant_qkv_sm90<InF16, 64>(a, stream);
}

}  // namespace sage::sm90
