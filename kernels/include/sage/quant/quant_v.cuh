// V per-channel quantization: FP8 E4M3 transposed to (b, h, d, s_pad) (K-major B operand of the
// PV MMA) and INT8 (b, h, s, d). Scale per channel over all tokens, so three stream-ordered steps:
//   1. channel_amax_kernel: atomic max of |v| into `scale` (zeroed first by cudaMemsetAsync);
//   2. quantize with scale = amax/qmax computed in registers from the raw amax;
//   3. finalize_scale_kernel: scale = amax/qmax (amax == 0 -> 1) in place (same formula as 2).
#pragma once

#include "sage/quant/quant_common.cuh"

namespace sage::quant {

// Row of the optional V smoothing mean for (i, j); nullptr without one (then nothing is
// subtracted at all, so the no-mean path is exactly the reference's).
__device__ __forceinline__ const float* v_mean_row(const QuantVParams& p, int i, int j) {
  return p.mean == nullptr ? nullptr
                           : p.mean + static_cast<int64_t>(i) * p.mean_stride_b + static_cast<int64_t>(j) * p.mean_stride_h;
}

inline constexpr int kVThreads = 256;
inline constexpr int kVAmaxTokensPerCta = 256;
inline constexpr int kVTileTokens = kVTokenPad;  // 128: one transposed tile covers the padding
inline constexpr int kVTileChannels = 64;
inline constexpr int kVTileRowPad = 16;           // smem row pitch 144 B: 16-B aligned rows
inline constexpr int kVQuantTokensPerCta = 64;

// Step 1. grid (ceil(s / kVAmaxTokensPerCta), h, b), dynamic smem d floats.
template <typename T>
__global__ void __launch_bounds__(kVThreads) channel_amax_kernel(QuantVParams p, int lanes, bool vec16) {
  extern __shared__ unsigned int s_amax_bits[];  // [d]
  const int tid = threadIdx.x;
  const int rows = kVThreads / lanes;
  const int row = tid / lanes, lane = tid % lanes;
  const int j = blockIdx.y, i = blockIdx.z;
  const int t0 = blockIdx.x * kVAmaxTokensPerCta;
  const int t1 = min(t0 + kVAmaxTokensPerCta, p.v.s);
  const int d = p.v.d;
  for (int c = tid; c < d; c += kVThreads) s_amax_bits[c] = 0u;
  __syncthreads();
  const float* mean = v_mean_row(p, i, j);
  for (int c = lane * kVec; c < d; c += lanes * kVec) {
    float m[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    float mu[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (mean != nullptr) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) mu[k] = mean[c + k];
    }
    for (int t = t0 + row; t < t1; t += rows) {
      float v[kVec];
      load8_f32(row_ptr<T>(p.v, i, j, t) + c, vec16, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) m[k] = max_nan(m[k], fabsf(mean != nullptr ? __fsub_rn(v[k], mu[k]) : v[k]));
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) atomic_max_nonneg(reinterpret_cast<float*>(&s_amax_bits[c + k]), m[k]);
  }
  __syncthreads();
  float* amax_out = p.scale + (static_cast<int64_t>(i) * p.v.h + j) * d;
  for (int c = tid; c < d; c += kVThreads)
    atomic_max_nonneg(amax_out + c, __uint_as_float(s_amax_bits[c]));
}

// Step 2a (E4M3, transposed). grid (s_pad / 128 * ceil(d / 64), h, b).
template <typename T>
__global__ void __launch_bounds__(kVThreads) quant_v_e4m3_t_kernel(QuantVParams p, bool vec16) {
  __shared__ __align__(16) uint8_t tile[kVTileChannels][kVTileTokens + kVTileRowPad];
  __shared__ float s_scale[kVTileChannels];
  __shared__ float s_mean[kVTileChannels];
  const int tid = threadIdx.x;
  const int d = p.v.d;
  const int ctiles = (d + kVTileChannels - 1) / kVTileChannels;
  const int tt = blockIdx.x / ctiles, ct = blockIdx.x % ctiles;
  const int j = blockIdx.y, i = blockIdx.z;
  const int t0 = tt * kVTileTokens, c0 = ct * kVTileChannels;
  const int64_t bh = static_cast<int64_t>(i) * p.v.h + j;
  const float* amax = p.scale + bh * d;

  const float* mean = v_mean_row(p, i, j);
  for (int c = tid; c < kVTileChannels; c += kVThreads) {
    s_scale[c] = c0 + c < d ? int_scale(amax[c0 + c], p.e4m3_max) : 1.f;
    s_mean[c] = (mean != nullptr && c0 + c < d) ? mean[c0 + c] : 0.f;
  }
  __syncthreads();

  // Read: 8 threads cover 64 channels of one token (coalesced), 32 tokens per pass.
  constexpr int kChunksPerToken = kVTileChannels / kVec;
  for (int item = tid; item < kVTileTokens * kChunksPerToken; item += kVThreads) {
    const int tl = item / kChunksPerToken, cl = (item % kChunksPerToken) * kVec;
    const int t = t0 + tl, c = c0 + cl;
    float v[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (t < p.v.s && c < d) load8_f32(row_ptr<T>(p.v, i, j, t) + c, vec16, v);
    if (mean != nullptr) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = __fsub_rn(v[k], s_mean[cl + k]);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      tile[cl + k][tl] = t < p.v.s ? f32_to_e4m3(__fdiv_rn(v[k], s_scale[cl + k])) : uint8_t{0};
  }
  __syncthreads();

  // Write: 16-byte stores along tokens of each channel row of (b, h, d, s_pad).
  constexpr int kStoresPerRow = kVTileTokens / 16;
  uint8_t* out = static_cast<uint8_t*>(p.out) + bh * d * p.s_pad;
  for (int item = tid; item < kVTileChannels * kStoresPerRow; item += kVThreads) {
    const int cl = item / kStoresPerRow, part = item % kStoresPerRow;
    if (c0 + cl < d) {
      const uint4 val = *reinterpret_cast<const uint4*>(&tile[cl][part * 16]);
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(c0 + cl) * p.s_pad + t0 + part * 16) = val;
    }
  }
}

// Step 2b (INT8, not transposed). grid (ceil(s / 64), h, b).
template <typename T>
__global__ void __launch_bounds__(kVThreads) quant_v_s8_kernel(QuantVParams p, int lanes, bool vec16) {
  const int tid = threadIdx.x;
  const int rows = kVThreads / lanes;
  const int row = tid / lanes, lane = tid % lanes;
  const int j = blockIdx.y, i = blockIdx.z;
  const int t0 = blockIdx.x * kVQuantTokensPerCta;
  const int t1 = min(t0 + kVQuantTokensPerCta, p.v.s);
  const int d = p.v.d;
  const int64_t bh = static_cast<int64_t>(i) * p.v.h + j;
  const float* amax = p.scale + bh * d;
  const float* mean = v_mean_row(p, i, j);
  for (int c = lane * kVec; c < d; c += lanes * kVec) {
    float sc[kVec], mu[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      sc[k] = int_scale(amax[c + k], kInt8Max);
      mu[k] = mean != nullptr ? mean[c + k] : 0.f;
    }
    for (int t = t0 + row; t < t1; t += rows) {
      float v[kVec];
      load8_f32(row_ptr<T>(p.v, i, j, t) + c, vec16, v);
      int q[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) q[k] = quant_int_value(mean != nullptr ? __fsub_rn(v[k], mu[k]) : v[k], sc[k], 127);
      uint2 packed;
      packed.x = (q[0] & 0xFF) | ((q[1] & 0xFF) << 8) | ((q[2] & 0xFF) << 16) | (static_cast<unsigned>(q[3] & 0xFF) << 24);
      packed.y = (q[4] & 0xFF) | ((q[5] & 0xFF) << 8) | ((q[6] & 0xFF) << 16) | (static_cast<unsigned>(q[7] & 0xFF) << 24);
      *reinterpret_cast<uint2*>(static_cast<int8_t*>(p.out) + (bh * p.v.s + t) * d + c) = packed;
    }
  }
}

// Step 3. In place over b*h*d scales.
__global__ void finalize_scale_kernel(float* scale, int64_t n, float qmax) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < n) scale[idx] = int_scale(scale[idx], qmax);
}

inline bool quant_v_params_ok(const QuantVParams& p) {
  if (!p.v.ptr || !p.out || !p.scale) return false;
  if (p.v.b <= 0 || p.v.h <= 0 || p.v.s <= 0 || p.v.d <= 0 || p.v.d % kVec != 0) return false;
  if (p.v.h > 65535 || p.v.b > 65535) return false;
  return reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
}

template <typename T>
cudaError_t channel_amax(const QuantVParams& p, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(p.v.b) * p.v.h * p.v.d;
  cudaError_t err = cudaMemsetAsync(p.scale, 0, n * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  dim3 grid((p.v.s + kVAmaxTokensPerCta - 1) / kVAmaxTokensPerCta, p.v.h, p.v.b);
  const size_t smem = static_cast<size_t>(p.v.d) * sizeof(float);
  channel_amax_kernel<T><<<grid, kVThreads, smem, stream>>>(p, lanes_per_row(p.v.d), all_strides_vec_ok(p.v));
  return cudaGetLastError();
}

inline cudaError_t finalize_scale(const QuantVParams& p, float qmax, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(p.v.b) * p.v.h * p.v.d;
  const int threads = 256;
  finalize_scale_kernel<<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0, stream>>>(p.scale, n, qmax);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_quant_v_e4m3_t_t(const QuantVParams& p, cudaStream_t stream) {
  if (!quant_v_params_ok(p) || p.s_pad % kVTileTokens != 0 || p.s_pad < p.v.s) return cudaErrorInvalidValue;
  if (!(p.e4m3_max > 0.f && p.e4m3_max <= kFp8E4m3Max)) return cudaErrorInvalidValue;
  if (p.v.d * sizeof(float) > 48 * 1024) return cudaErrorInvalidValue;
  cudaError_t err = channel_amax<T>(p, stream);
  if (err != cudaSuccess) return err;
  const int ctiles = (p.v.d + kVTileChannels - 1) / kVTileChannels;
  dim3 grid((p.s_pad / kVTileTokens) * ctiles, p.v.h, p.v.b);
  quant_v_e4m3_t_kernel<T><<<grid, kVThreads, 0, stream>>>(p, all_strides_vec_ok(p.v));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  return finalize_scale(p, p.e4m3_max, stream);
}

template <typename T>
cudaError_t launch_quant_v_s8_t(const QuantVParams& p, cudaStream_t stream) {
  if (!quant_v_params_ok(p)) return cudaErrorInvalidValue;
  if (p.v.d * sizeof(float) > 48 * 1024) return cudaErrorInvalidValue;
  cudaError_t err = channel_amax<T>(p, stream);
  if (err != cudaSuccess) return err;
  dim3 grid((p.v.s + kVQuantTokensPerCta - 1) / kVQuantTokensPerCta, p.v.h, p.v.b);
  quant_v_s8_kernel<T><<<grid, kVThreads, 0, stream>>>(p, lanes_per_row(p.v.d), all_strides_vec_ok(p.v));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  return finalize_scale(p, kInt8Max, stream);
}

}  // namespace sage::quant
