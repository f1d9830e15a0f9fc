// Appending tokens to the INT8 KV cache (ABI: decode_s8_params.hpp KvAppendS8Params): one warp per
// (tensor, b, kv head, token). y = fp32(x) - mean, then IEEE y / chan; amax over the head dim;
// s = amax / 127 (IEEE; 1 when amax == 0); code = clamp(round_half_even(y / s), -127, 127), NaN -> 0:
// sage_quant.emulation.kvcache.quantize_kv_tokens bit for bit, in one launch instead of ~20 ops.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sage/decode/decode_s8.cuh"  // detail::warp_max
#include "sage/decode/decode_s8_params.hpp"

namespace sage::decode {
namespace detail {

template <class T> __device__ __forceinline__ float in_f32(T x);
template <> __device__ __forceinline__ float in_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float in_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T, int D>
__global__ void __launch_bounds__(256) kv_append_s8_kernel(const KvAppendS8Params p) {
  constexpr int kPer = D / 32;
  const int64_t rows = int64_t(p.b) * p.h_kv * p.n;
  const int64_t w = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (w >= 2 * rows) return;
  const int lane = threadIdx.x % 32;
  const bool is_v = w >= rows;
  const int64_t r = is_v ? w - rows : w;
  const int t = int(r % p.n);
  const int64_t bh = r / p.n;
  const int h = int(bh % p.h_kv), b = int(bh / p.h_kv);
  const T* x = static_cast<const T*>(is_v ? p.v : p.k) +
               (is_v ? b * p.v_sb + h * p.v_sh + t * p.v_ss : b * p.k_sb + h * p.k_sh + t * p.k_ss) + lane * kPer;
  const float* mean = (is_v ? p.v_mean : p.k_mean) + bh * D + lane * kPer;
  const float* chan = (is_v ? p.v_chan : p.k_chan) + bh * D + lane * kPer;
  float y[kPer];
  float amax = 0.f;
  bool nan = false;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    y[e] = __fdiv_rn(in_f32(x[e]) - mean[e], chan[e]);
    nan |= y[e] != y[e];
    amax = fmaxf(amax, fabsf(y[e]));
  }
  amax = warp_max(amax);
  nan = __any_sync(0xffffffffu, nan);
  const float s = nan ? __int_as_float(0x7fc00000) : (amax == 0.f ? 1.f : __fdiv_rn(amax, 127.f));
  const int64_t slot = bh * p.capacity + p.start + t;
  int8_t* out = (is_v ? p.v_out : p.k_out) + slot * D + lane * kPer;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const float q = rintf(__fdiv_rn(y[e], s));
    out[e] = q != q ? int8_t(0) : int8_t(fminf(fmaxf(q, -127.f), 127.f));
  }
  if (lane == 0) (is_v ? p.v_scale : p.k_scale)[slot] = s;
}

template <class T, int D>
cudaError_t launch_append_t(const KvAppendS8Params& p, cudaStream_t stream) {
  const int64_t warps = 2 * int64_t(p.b) * p.h_kv * p.n;
  kv_append_s8_kernel<T, D><<<unsigned((warps + 7) / 8), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail

inline cudaError_t launch_kv_append_s8_impl(const KvAppendS8Params& p, cudaStream_t stream) {
  if (!(p.head_dim == 64 || p.head_dim == 128) || p.b < 1 || p.h_kv < 1 || p.n < 1 || p.start < 0 ||
      int64_t(p.start) + p.n > p.capacity || p.k == nullptr || p.v == nullptr || p.k_mean == nullptr ||
      p.k_chan == nullptr || p.v_mean == nullptr || p.v_chan == nullptr || p.k_out == nullptr ||
      p.v_out == nullptr || p.k_scale == nullptr || p.v_scale == nullptr ||
      (2 * int64_t(p.b) * p.h_kv * p.n + 7) / 8 > 0x7fffffff)
    return cudaErrorInvalidValue;
  const bool f16 = p.dtype == InDType::kF16;
  if (p.head_dim == 64)
    return f16 ? detail::launch_append_t<__half, 64>(p, stream) : detail::launch_append_t<__nv_bfloat16, 64>(p, stream);
  return f16 ? detail::launch_append_t<__half, 128>(p, stream) : detail::launch_append_t<__nv_bfloat16, 128>(p, stream);
}

}  // namespace sage::decode
