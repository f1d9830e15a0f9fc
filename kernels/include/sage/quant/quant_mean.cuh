// Token means for smoothing: mean of x over blocks of `block` tokens (block >= s: token mean).
// One CTA per (block, h, b); fp32 sums in a fixed order for a given d (deterministic run to run),
// IEEE division by the number of valid tokens. The summation order differs from the PyTorch
// reference (the one documented exception), so consumers pass the mean in to compare bits.
#pragma once

#include "sage/quant/quant_common.cuh"

namespace sage::quant {

inline constexpr int kMeanThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kMeanThreads) block_mean_kernel(MeanParams p, int lanes, bool vec16) {
  __shared__ float partial[kMeanThreads * kVec];  // [row][lane*8 + i]
  const int tid = threadIdx.x;
  const int rows = kMeanThreads / lanes;
  const int row = tid / lanes, lane = tid % lanes;
  const int blk = blockIdx.x, j = blockIdx.y, i = blockIdx.z;
  const int t0 = blk * p.block;
  const int t1 = static_cast<int>(min(static_cast<int64_t>(t0) + p.block, static_cast<int64_t>(p.x.s)));
  const int nblk = static_cast<int>((static_cast<int64_t>(p.x.s) + p.block - 1) / p.block);
  const int width = lanes * kVec;  // channels per pass
  float* out = p.out + ((static_cast<int64_t>(i) * p.x.h + j) * nblk + blk) * p.x.d;
  const float count = static_cast<float>(t1 - t0);

  for (int c0 = 0; c0 < p.x.d; c0 += width) {
    const int c = c0 + lane * kVec;
    float acc[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (c < p.x.d) {
      for (int t = t0 + row; t < t1; t += rows) {
        float v[kVec];
        load8_f32(row_ptr<T>(p.x, i, j, t) + c, vec16, v);
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc[k] += v[k];
      }
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) partial[row * width + lane * kVec + k] = acc[k];
    __syncthreads();
    for (int col = tid; col < width; col += kMeanThreads) {
      if (c0 + col < p.x.d) {
        float sum = 0.f;
        for (int r = 0; r < rows; ++r) sum += partial[r * width + col];
        out[c0 + col] = __fdiv_rn(sum, count);
      }
    }
    __syncthreads();
  }
}

template <typename T>
cudaError_t launch_block_mean_t(const MeanParams& p, cudaStream_t stream) {
  // int64: s + block - 1 overflows int32 for s near 2^31 and a large user block.
  if (p.x.ptr == nullptr || p.out == nullptr || p.block <= 0 || p.x.s <= 0 || p.x.d <= 0 || p.x.h <= 0 ||
      p.x.b <= 0 || p.x.h > 65535 || p.x.b > 65535)
    return cudaErrorInvalidValue;
  const int64_t nblk64 = (static_cast<int64_t>(p.x.s) + p.block - 1) / p.block;
  if (nblk64 > INT32_MAX) return cudaErrorInvalidValue;
  const int nblk = static_cast<int>(nblk64);
  const int lanes = lanes_per_row(p.x.d);
  dim3 grid(nblk, p.x.h, p.x.b);
  block_mean_kernel<T><<<grid, kMeanThreads, 0, stream>>>(p, lanes, all_strides_vec_ok(p.x));
  return cudaGetLastError();
}

}  // namespace sage::quant
