// Split-KV decode attention over an INT8 KV cache (ABI and recipe: decode_s8_params.hpp).
// Plain CUDA on the CUDA cores (dp4a for Q.K, fp32 FMA for P.V): a decode call reads the cache
// once and does ~2 flops per byte, so it is bound by memory, not by the tensor cores.
//
// CTA = (b, kv head) x split of split_tokens keys x block of kRows query rows (the rows of a kv
// head's group: (h_q / h_kv) * s_q, so GQA heads share every K/V byte they read). 128 threads,
// 64-key tiles: the next tile's K/V codes and scales are loaded into registers while the current
// one is computed (one shared buffer), then
//   scores : thread = (key, half of the rows); its key's codes in registers, q rows broadcast
//            from shared memory, D/4 dp4a per row; t = (float(dot) * k_scale) * c_row, masked -inf
//   softmax: warp = rows w, w+4, ...; running max / sum in registers; p * v_scale to shared
//   P.V    : thread = channel (x half of the rows at D=64), acc = acc * alpha + sum_j p'_j v_j
// Query rows (times k_chan) are quantized in the prologue with sage_quant's per-token INT8
// arithmetic (IEEE division, round half to even, clamp 127), so scores are bit for bit the emulation's.
// splits > 1: unnormalized partials + (max, sum) per row to the workspace, combined by a second
// launch; splits == 1 writes o directly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "sage/decode/decode_s8_params.hpp"

namespace sage::decode {
namespace detail {

inline constexpr int kThreads = 128;
inline constexpr int kTile = kTileTokens;

template <class T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <int D, int kRows>
struct Smem {
  alignas(16) int8_t q8[kRows][D];
  alignas(16) int8_t k[kTile][D + 16];  // +16: 8 consecutive keys' 16-byte reads hit distinct banks
  alignas(16) int8_t v[kTile][D];
  alignas(16) float t[kRows][kTile];    // scores, then p * v_scale
  alignas(16) float ks[kTile];
  alignas(16) float vs[kTile];
  float cq[kRows];     // q_scale * scale_log2
  int lim[kRows];      // keys the row sees: j < lim (0 for a padding row)
  float alpha[kRows];
  float l[kRows];
  float m[kRows];
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One tile's codes and scales in flight: K and V codes are D*64 bytes each, 16 bytes per load.
template <int D>
struct TileRegs {
  static constexpr int kChunks = kTile * D / 16 / kThreads;  // per tensor per thread: 2 (D=64) / 4
  uint4 k[kChunks];
  uint4 v[kChunks];
  float4 sc;  // threads 0-15: k scales, 16-31: v scales
};

template <int D>
__device__ __forceinline__ void load_tile(TileRegs<D>& r, const int8_t* kg, const int8_t* vg, const float* ksg,
                                          const float* vsg, int j0) {
  constexpr int kRowChunks = D / 16;
#pragma unroll
  for (int i = 0; i < TileRegs<D>::kChunks; ++i) {
    const int c = i * kThreads + threadIdx.x;
    const int64_t off = int64_t(j0 + c / kRowChunks) * D + (c % kRowChunks) * 16;
    r.k[i] = __ldg(reinterpret_cast<const uint4*>(kg + off));
    r.v[i] = __ldg(reinterpret_cast<const uint4*>(vg + off));
  }
  if (threadIdx.x < 32) {
    const float* s = threadIdx.x < 16 ? ksg : vsg;
    r.sc = __ldg(reinterpret_cast<const float4*>(s + j0) + (threadIdx.x & 15));
  }
}

template <int D, int kRows>
__device__ __forceinline__ void store_tile(const TileRegs<D>& r, Smem<D, kRows>& sm) {
  constexpr int kRowChunks = D / 16;
#pragma unroll
  for (int i = 0; i < TileRegs<D>::kChunks; ++i) {
    const int c = i * kThreads + threadIdx.x;
    *reinterpret_cast<uint4*>(&sm.k[c / kRowChunks][(c % kRowChunks) * 16]) = r.k[i];
    *reinterpret_cast<uint4*>(&sm.v[c / kRowChunks][(c % kRowChunks) * 16]) = r.v[i];
  }
  if (threadIdx.x < 32) {
    float* s = threadIdx.x < 16 ? sm.ks : sm.vs;
    reinterpret_cast<float4*>(s)[threadIdx.x & 15] = r.sc;
  }
}

template <class T, int D, int kRows>
__global__ void __launch_bounds__(kThreads) decode_s8_kernel(const DecodeS8Params p) {
  __shared__ Smem<D, kRows> sm;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int bk = blockIdx.x;  // b * h_kv + kv head
  const int split = blockIdx.y;
  const int b = bk / p.h_kv, kvh = bk % p.h_kv;
  const int group = p.h_q / p.h_kv;
  const int rows_total = group * p.s_q;
  const int r0 = blockIdx.z * kRows;

  // ---- prologue: this block's query rows, INT8 per row (sage_quant per_token arithmetic)
  for (int r = warp; r < kRows; r += kThreads / 32) {
    const int rg = r0 + r;
    constexpr int kPer = D / 32;
    float x[kPer];
    float amax = 0.f;
    if (rg < rows_total) {
      const int h = kvh * group + rg / p.s_q, i = rg % p.s_q;
      const T* qr = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + i * p.q_ss + lane * kPer;
      const float* kc = p.k_chan + (int64_t(b) * p.h_kv + kvh) * D + lane * kPer;
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        x[e] = to_f32(qr[e]);
        if (p.k_chan != nullptr) x[e] *= kc[e];  // q . k = (q * k_chan) . (k / k_chan)
        amax = fmaxf(amax, fabsf(x[e]));
      }
    } else {
#pragma unroll
      for (int e = 0; e < kPer; ++e) x[e] = 0.f;
    }
    amax = warp_max(amax);
    const float s = amax == 0.f ? 1.f : __fdiv_rn(amax, 127.f);
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const float qv = rintf(__fdiv_rn(x[e], s));
      sm.q8[r][lane * kPer + e] = int8_t(fminf(fmaxf(qv, -127.f), 127.f));
    }
    if (lane == 0) {
      int lim = 0;
      if (rg < rows_total) {
        const int i = rg % p.s_q;
        lim = p.causal ? p.len - p.s_q + i + 1 : p.len;
      }
      sm.cq[r] = s * p.scale_log2;
      sm.lim[r] = lim;
    }
  }

  const int j_begin = split * p.split_tokens;
  const int j_end = min(p.len, j_begin + p.split_tokens);
  const int64_t kv_off = (int64_t(b) * p.h_kv + kvh) * p.capacity;
  const int8_t* kg = p.k + kv_off * D;
  const int8_t* vg = p.v + kv_off * D;
  const float* ksg = p.k_scale + kv_off;
  const float* vsg = p.v_scale + kv_off;

  constexpr int kRowsPerWarp = (kRows + 3) / 4;
  float m_run[kRowsPerWarp], l_run[kRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    m_run[k] = -INFINITY;
    l_run[k] = 0.f;
  }
  // P.V ownership: channel c, rows [pv_r0, pv_r0 + kPvRows)
  constexpr int kPvHalves = kThreads / D;  // 1 (D=128) or 2 (D=64)
  constexpr int kPvRows = kRows / kPvHalves > 0 ? kRows / kPvHalves : 1;
  const int pv_c = tid % D;
  const int pv_r0 = (tid / D) * kPvRows;
  const bool pv_active = pv_r0 < kRows;
  float acc[kPvRows];
#pragma unroll
  for (int k = 0; k < kPvRows; ++k) acc[k] = 0.f;

  // scores: key j = tid % 64, rows [sc_r0, sc_r0 + kScRows)
  constexpr int kScRows = kRows / 2 > 0 ? kRows / 2 : 1;
  const int sc_j = tid % kTile;
  const int sc_r0 = (tid / kTile) * kScRows;
  const bool sc_active = sc_r0 < kRows;

  TileRegs<D> regs;
  if (j_begin < j_end) load_tile<D>(regs, kg, vg, ksg, vsg, j_begin);
  for (int j0 = j_begin; j0 < j_end; j0 += kTile) {
    __syncthreads();  // the previous tile's P.V is done with sm.v / sm.t (and the prologue's sm.q8)
    store_tile<D, kRows>(regs, sm);
    __syncthreads();
    if (j0 + kTile < j_end) load_tile<D>(regs, kg, vg, ksg, vsg, j0 + kTile);  // in flight meanwhile

    if (sc_active) {
      int kw[D / 4];
#pragma unroll
      for (int c = 0; c < D / 16; ++c) {
        const int4 w = *reinterpret_cast<const int4*>(&sm.k[sc_j][c * 16]);
        kw[4 * c] = w.x; kw[4 * c + 1] = w.y; kw[4 * c + 2] = w.z; kw[4 * c + 3] = w.w;
      }
      const float ksj = sm.ks[sc_j];
      const int jg = j0 + sc_j;
#pragma unroll
      for (int rr = 0; rr < kScRows; ++rr) {
        const int r = sc_r0 + rr;
        int dot = 0;
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
          const int4 qw = *reinterpret_cast<const int4*>(&sm.q8[r][c * 16]);
          dot = __dp4a(kw[4 * c], qw.x, dot);
          dot = __dp4a(kw[4 * c + 1], qw.y, dot);
          dot = __dp4a(kw[4 * c + 2], qw.z, dot);
          dot = __dp4a(kw[4 * c + 3], qw.w, dot);
        }
        const float t = (float(dot) * ksj) * sm.cq[r];
        sm.t[r][sc_j] = jg < sm.lim[r] ? t : -INFINITY;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int r = warp + 4 * k;
      if (r < kRows) {
        const float t0 = sm.t[r][lane], t1 = sm.t[r][lane + 32];
        const float m_new = fmaxf(m_run[k], warp_max(fmaxf(t0, t1)));
        float alpha = 1.f, p0 = 0.f, p1 = 0.f;
        if (m_new != -INFINITY) {
          alpha = exp2f(m_run[k] - m_new);  // 0 on the first keys the row sees
          p0 = exp2f(t0 - m_new);
          p1 = exp2f(t1 - m_new);
        }
        l_run[k] = l_run[k] * alpha + warp_sum(p0 + p1);
        m_run[k] = m_new;
        // p == 0 (masked, or underflow) contributes nothing, whatever the scale slot holds
        sm.t[r][lane] = p0 > 0.f ? p0 * sm.vs[lane] : 0.f;
        sm.t[r][lane + 32] = p1 > 0.f ? p1 * sm.vs[lane + 32] : 0.f;
        if (lane == 0) sm.alpha[r] = alpha;
      }
    }
    __syncthreads();
    if (pv_active) {
#pragma unroll
      for (int k = 0; k < kPvRows; ++k) acc[k] *= sm.alpha[pv_r0 + k];
#pragma unroll 4
      for (int j = 0; j < kTile; j += 4) {
        const float v0 = float(sm.v[j][pv_c]), v1 = float(sm.v[j + 1][pv_c]);
        const float v2 = float(sm.v[j + 2][pv_c]), v3 = float(sm.v[j + 3][pv_c]);
#pragma unroll
        for (int k = 0; k < kPvRows; ++k) {
          const float4 pp = *reinterpret_cast<const float4*>(&sm.t[pv_r0 + k][j]);
          acc[k] = fmaf(pp.x, v0, acc[k]);
          acc[k] = fmaf(pp.y, v1, acc[k]);
          acc[k] = fmaf(pp.z, v2, acc[k]);
          acc[k] = fmaf(pp.w, v3, acc[k]);
        }
      }
    }
  }

  // ---- epilogue
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int r = warp + 4 * k;
    if (r < kRows && lane == 0) {
      sm.l[r] = l_run[k];
      sm.m[r] = m_run[k];
    }
  }
  __syncthreads();
  if (!pv_active) return;
  const int64_t rows_all = int64_t(p.b) * p.h_q * p.s_q;
#pragma unroll
  for (int k = 0; k < kPvRows; ++k) {
    const int r = pv_r0 + k, rg = r0 + r;
    if (rg >= rows_total) continue;
    const int h = kvh * group + rg / p.s_q, i = rg % p.s_q;
    const int64_t row = (int64_t(b) * p.h_q + h) * p.s_q + i;
    if (p.splits > 1) {
      const int64_t w = int64_t(split) * rows_all + row;
      p.ws_o[w * D + pv_c] = acc[k];
      if (pv_c == 0) {
        p.ws_ml[2 * w] = sm.m[r];
        p.ws_ml[2 * w + 1] = sm.l[r];
      }
    } else {
      const float l = sm.l[r];
      float o = 0.f;
      if (l > 0.f) {
        const int64_t ch = (int64_t(b) * p.h_kv + kvh) * D + pv_c;
        o = acc[k] / l;
        if (p.v_chan != nullptr) o *= p.v_chan[ch];
        if (p.v_mean != nullptr) o += p.v_mean[ch];
      }
      T* out = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh + i * p.o_ss;
      out[pv_c] = from_f32<T>(o);
    }
  }
}

// One CTA per query row, D threads: o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (+ v_mean).
template <class T, int D>
__global__ void __launch_bounds__(D) decode_s8_combine_kernel(const DecodeS8Params p) {
  const int64_t row = blockIdx.x;
  const int64_t rows_all = int64_t(p.b) * p.h_q * p.s_q;
  const int c = threadIdx.x;
  float mx = -INFINITY;
  for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, p.ws_ml[2 * (s * rows_all + row)]);
  float l = 0.f, acc = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) {
      const int64_t w = s * rows_all + row;
      const float f = exp2f(p.ws_ml[2 * w] - mx);  // 0 for a split the row sees no key of
      l = fmaf(p.ws_ml[2 * w + 1], f, l);
      acc = fmaf(p.ws_o[w * D + c], f, acc);
    }
  }
  const int i = int(row % p.s_q);
  const int h = int((row / p.s_q) % p.h_q);
  const int b = int(row / (int64_t(p.s_q) * p.h_q));
  float o = 0.f;
  if (l > 0.f) {
    const int64_t ch = (int64_t(b) * p.h_kv + h / (p.h_q / p.h_kv)) * D + c;
    o = acc / l;
    if (p.v_chan != nullptr) o *= p.v_chan[ch];
    if (p.v_mean != nullptr) o += p.v_mean[ch];
  }
  T* out = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh + i * p.o_ss;
  out[c] = from_f32<T>(o);
}

template <class T, int D, int kRows>
cudaError_t launch_rows(const DecodeS8Params& p, cudaStream_t stream) {
  const int rows_total = (p.h_q / p.h_kv) * p.s_q;
  const dim3 grid(unsigned(int64_t(p.b) * p.h_kv), unsigned(p.splits), unsigned(decode_s8_row_blocks(rows_total)));
  decode_s8_kernel<T, D, kRows><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.splits <= 1) return err;
  decode_s8_combine_kernel<T, D><<<unsigned(int64_t(p.b) * p.h_q * p.s_q), D, 0, stream>>>(p);
  return cudaGetLastError();
}

template <class T, int D, int kRows>
int ctas_per_sm_rows() {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_s8_kernel<T, D, kRows>, kThreads, 0) != cudaSuccess)
    return 0;
  return n;
}

template <class T, int D>
int ctas_per_sm_t(int rows_total) {
  if (rows_total <= 1) return ctas_per_sm_rows<T, D, 1>();
  if (rows_total <= 4) return ctas_per_sm_rows<T, D, 4>();
  return ctas_per_sm_rows<T, D, kMaxRowsPerCta>();
}

template <class T, int D>
cudaError_t launch_t(const DecodeS8Params& p, cudaStream_t stream) {
  const int rows_total = (p.h_q / p.h_kv) * p.s_q;
  if (rows_total <= 1) return launch_rows<T, D, 1>(p, stream);
  if (rows_total <= 4) return launch_rows<T, D, 4>(p, stream);
  return launch_rows<T, D, kMaxRowsPerCta>(p, stream);
}

}  // namespace detail

// What the kernels rely on (the binding raises readable errors first).
inline bool decode_s8_params_ok(const DecodeS8Params& p, int d) {
  auto a16 = [](const void* x) { return (reinterpret_cast<uintptr_t>(x) % 16) == 0; };
  return p.head_dim == d && p.b >= 1 && p.h_kv >= 1 && p.h_q >= p.h_kv && p.h_q % p.h_kv == 0 &&
         p.s_q >= 1 && p.len >= 1 && p.len <= p.capacity && p.capacity % kTileTokens == 0 &&
         p.split_tokens >= kTileTokens && p.split_tokens % kTileTokens == 0 && p.splits >= 1 &&
         int64_t(p.splits) * p.split_tokens >= p.len && int64_t(p.splits - 1) * p.split_tokens < p.len &&
         p.splits <= 65535 && int64_t(p.b) * p.h_kv <= 0x7fffffff &&
         ((p.h_q / p.h_kv) * int64_t(p.s_q) + kMaxRowsPerCta - 1) / kMaxRowsPerCta <= 65535 &&
         p.q != nullptr && p.o != nullptr && p.k != nullptr && p.v != nullptr && p.k_scale != nullptr &&
         p.v_scale != nullptr && a16(p.k) && a16(p.v) && a16(p.k_scale) && a16(p.v_scale) &&
         (p.splits == 1 || (p.ws_o != nullptr && p.ws_ml != nullptr));
}

template <int D>
int decode_s8_ctas_per_sm_impl(InDType dtype, int rows_per_kv_head) {
  return dtype == InDType::kF16 ? detail::ctas_per_sm_t<__half, D>(rows_per_kv_head)
                                : detail::ctas_per_sm_t<__nv_bfloat16, D>(rows_per_kv_head);
}

template <int D>
cudaError_t launch_decode_s8_impl(const DecodeS8Params& p, cudaStream_t stream) {
  if (!decode_s8_params_ok(p, D)) return cudaErrorInvalidValue;
  return p.dtype == InDType::kF16 ? detail::launch_t<__half, D>(p, stream)
                                  : detail::launch_t<__nv_bfloat16, D>(p, stream);
}

}  // namespace sage::decode
