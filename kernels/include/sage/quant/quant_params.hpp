// Kernel ABI of the quantization kernels (host-side; no device code, no framework types).
// Formats and arithmetic: docs/design/quant-formats.md. Launchers are defined in
// kernels/src/quant/*.cu; bindings validate every argument before calling them, the launchers
// only re-check what could make them write out of bounds and return cudaErrorInvalidValue.
//
// Conventions: inputs are fp16/bf16 logical (b, h, s, d) arrays read through int64 element
// strides (last dim contiguous), so bhsd and bshd (and slices of packed qkv) need no copy.
// Outputs and scales are contiguous and preallocated by the caller.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sage::quant {

enum class InDType : int32_t { kF16 = 0, kBF16 = 1 };

// Token groups that share one scale (quant-formats.md, "Integer Q/K formats").
enum class Granularity : int32_t {
  kPerTensor = 0,  // (b, h, 1)
  kPerBlock = 1,   // (b, h, ceil(s/block)),       group t / block
  kPerWarp = 2,    // (b, h, ceil(s/block)),       group t / block (block = warp rows, 16)
  kPerThreadQ = 3, // (b, h, ceil(s/16)*8),        group (t/16)*8 + t%8
  kPerThreadK = 4, // (b, h, ceil(s/block)*4),     group (t/block)*4 + (t%8)/2
  kPerToken = 5,   // (b, h, s),                   group t
};

// A logical (b, h, s, d) fp16/bf16 input; element (i, j, t, c) at
// ptr + i*stride_b + j*stride_h + t*stride_s + c (elements).
struct InputBHSD {
  const void* ptr = nullptr;
  InDType dtype = InDType::kF16;
  int64_t stride_b = 0, stride_h = 0, stride_s = 0;
  int32_t b = 0, h = 0, s = 0, d = 0;
};

// Mean over token blocks: out (b, h, ceil(s/block), d) f32 contiguous; the last block averages
// only its valid tokens. block >= s gives the token mean (b, h, 1, d) == (b, h, d).
struct MeanParams {
  InputBHSD x;
  float* out = nullptr;
  int32_t block = 0;
};

// Integer quantization with optional fused mean subtraction (x' = fp32(x) - mean).
struct QuantIntParams {
  InputBHSD x;
  // Optional mean (nullptr = none): token t of (i, j) uses
  // mean[i*mean_stride_b + j*mean_stride_h + (t/mean_block)*mean_stride_blk + c].
  // K smoothing: (b, h, d) with mean_stride_blk = 0; Q smoothing: (b, h, ceil(s/mean_block), d).
  const float* mean = nullptr;
  int64_t mean_stride_b = 0, mean_stride_h = 0, mean_stride_blk = 0;
  int32_t mean_block = 1;
  // bits 8: (b, h, s, d) int8; bits 4: (b, h, s, d/2) uint8 (element 2i in the low nibble).
  void* q = nullptr;
  float* scale = nullptr;  // (b, h, num_groups) f32
  Granularity granularity = Granularity::kPerBlock;
  int32_t block = 0;       // per_block / per_thread_k: token block; per_warp: warp rows
  int32_t num_groups = 0;  // scale extent per (b, h), as in the table above
};

// V per channel over all tokens. scale (b, h, d) f32 = amax/qmax (1.0 for an all-zero channel).
// e4m3_t: out (b, h, d, s_pad) uint8 E4M3 bits, transposed, zero padding for t >= s,
//         s_pad a multiple of 128 (>= s).
// s8:     out (b, h, s, d) int8.
struct QuantVParams {
  InputBHSD v;
  // Optional V smoothing mean (nullptr = none), (b, h, d) f32: V' = fp32(V) - mean is used for
  // the amax and the stored values; element (i, j, c) at mean[i*mean_stride_b + j*mean_stride_h + c].
  const float* mean = nullptr;
  int64_t mean_stride_b = 0, mean_stride_h = 0;
  void* out = nullptr;
  float* scale = nullptr;
  int32_t s_pad = 0;  // e4m3_t only
  // e4m3_t only: the code a channel's amax maps to, in (0, 448]. Below 448 it bounds |V^| so that
  // a 64-key P~V block cannot overflow an FP16 MMA accumulator (2.25: 64 x 448 x 2.25 < 65504).
  float e4m3_max = 448.f;
};

enum class Fp4Format : int32_t { kNvfp4 = 0, kMxfp4 = 1 };

// Microscaling FP4 along the last dim of a (d0, d1, d2, n) view (rank < 4: leading dims of 1).
// Any strides (e.g. a transposed V view with stride(n) != 1). rows = d0*d1*d2, row-major.
// packed: (rows, n/2) uint8 contiguous. scale: linear (rows, n/G) uint8, or swizzled
// (ceil(rows/128)*128 x ceil(n/G/4)*4 bytes, 128x4 tiles of 512 B, padding written as 0).
// tensor_scale: (d0*d1) f32 contiguous, one per (d2, n) matrix: NVFP4's second level
// (finite amax / 2688, guarded), all 1 for MXFP4. Written by the launch (3 kernels for NVFP4).
struct QuantFp4Params {
  const void* x = nullptr;
  InDType dtype = InDType::kF16;
  int64_t shape[4] = {1, 1, 1, 0};
  int64_t stride[4] = {0, 0, 0, 1};
  Fp4Format format = Fp4Format::kNvfp4;
  bool swizzled = false;
  uint8_t* packed = nullptr;
  uint8_t* scale = nullptr;
  float* tensor_scale = nullptr;
  // Elements at n-index >= n_valid read as 0 (never loaded): a V^T view of s tokens quantized to
  // shape[3] = s_pad (sm120 attention). -1: all of shape[3].
  int64_t n_valid = -1;
  // Optional mean (nullptr = none), subtracted in fp32 before the amax and the codes: element
  // (r0, r1, r2, c) uses mean[r0*mean_stride[0] + r1*mean_stride[1] + (r2/mean_block)*mean_stride[2] + c].
  // K smoothing: (b, h, d) with mean_stride[2] = 0; Q smoothing: (b, h, ceil(s/mean_block), d).
  const float* mean = nullptr;
  int64_t mean_stride[3] = {0, 0, 0};
  int64_t mean_block = 1;
};

// Group size of each FP4 format.
inline constexpr int32_t kNvfp4Group = 16;
inline constexpr int32_t kMxfp4Group = 32;
inline constexpr int32_t kVTokenPad = 128;  // s_pad multiple for v_e4m3_t

cudaError_t launch_block_mean(const MeanParams& p, cudaStream_t stream);
cudaError_t launch_quant_int8(const QuantIntParams& p, cudaStream_t stream);
cudaError_t launch_quant_int4(const QuantIntParams& p, cudaStream_t stream);
cudaError_t launch_quant_v_e4m3_t(const QuantVParams& p, cudaStream_t stream);
cudaError_t launch_quant_v_s8(const QuantVParams& p, cudaStream_t stream);
cudaError_t launch_quant_fp4(const QuantFp4Params& p, cudaStream_t stream);

}  // namespace sage::quant
