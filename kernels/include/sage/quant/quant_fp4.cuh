// Microscaling FP4 (NVFP4: 16-element groups, E4M3 scale, and an FP32 scale per (d2, n) matrix
// above them; MXFP4: 32-element groups, E8M0 scale) along the last dim of a (d0, d1, d2, n) view
// with any strides. One thread per group.
// Work mapping follows memory: groups fastest when the last dim is contiguous (each thread reads
// 32/64 contiguous bytes), rows fastest otherwise (a transposed Vᵀ view: neighbouring threads
// read neighbouring rows, coalesced).
#pragma once

#include "sage/quant/quant_common.cuh"

namespace sage::quant {

inline constexpr int kFp4Threads = 256;
inline constexpr int kSwizzleTileRows = 128;
inline constexpr int kSwizzleTileCols = 4;
inline constexpr int kSwizzleTileBytes = kSwizzleTileRows * kSwizzleTileCols;  // 512
inline constexpr uint8_t kE4m3Nan = 0x7F;
// Two-level NVFP4: a matrix's amax maps to 448 * 6, so its largest E4M3 group scale is 448.
inline constexpr float kFp4TensorScaleTarget = kFp8E4m3Max * kFp4E2m1Max;
inline constexpr float kFp32MinNormal = 1.17549435e-38f;  // 2**-126

// Byte offset of scale (r, c) in the Blackwell block-scaled layout (quant-formats.md).
__host__ __device__ __forceinline__ int64_t swizzled_scale_offset(int64_t r, int64_t c, int64_t col_tiles) {
  const int64_t tile = (r / kSwizzleTileRows) * col_tiles + c / kSwizzleTileCols;
  return tile * kSwizzleTileBytes + (r % 32) * 16 + ((r % kSwizzleTileRows) / 32) * 4 + c % kSwizzleTileCols;
}

// The group a work item covers: its row r (of d0*d1*d2) and group index g along n.
struct Fp4Item {
  int64_t r, g;
};

__device__ __forceinline__ Fp4Item fp4_item(int64_t item, int64_t rows, int64_t ngroups, bool groups_fastest) {
  return groups_fastest ? Fp4Item{item / ngroups, item % ngroups} : Fp4Item{item % rows, item / rows};
}

// Loads the kGroup elements of group (r, g) as fp32 (exact).
template <typename T, int kGroup>
__device__ __forceinline__ void load_fp4_group(const QuantFp4Params& p, Fp4Item it, bool vec16, float (&v)[kGroup]) {
  const int64_t r2 = it.r % p.shape[2];
  const int64_t r1 = (it.r / p.shape[2]) % p.shape[1];
  const int64_t r0 = it.r / (p.shape[2] * p.shape[1]);
  const T* src = static_cast<const T*>(p.x) + r0 * p.stride[0] + r1 * p.stride[1] + r2 * p.stride[2] +
                 it.g * kGroup * p.stride[3];
  if (p.n_valid >= 0 && (it.g + 1) * kGroup > p.n_valid) {  // a group reaching into the zero padding
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = it.g * kGroup + k < p.n_valid ? to_f32(src[k * p.stride[3]]) : 0.f;
  } else if (vec16) {
#pragma unroll
    for (int k = 0; k < kGroup; k += kVec) {
      float w[kVec];
      load8_f32(src + k, true, w);
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[k + e] = w[e];
    }
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = to_f32(src[k * p.stride[3]]);
  }
  if (p.mean != nullptr) {  // smoothing: fp32(x) - mean, one IEEE subtraction (as the reference)
    const float* m = p.mean + r0 * p.mean_stride[0] + r1 * p.mean_stride[1] + (r2 / p.mean_block) * p.mean_stride[2] +
                     it.g * kGroup;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = __fsub_rn(v[k], m[k]);
  }
}

// NVFP4 pass 1: the largest finite |x| of every (d2, n) matrix, as fp32 bits atomically maxed
// into p.tensor_scale (zeroed before). Non-finite values are skipped: they poison only their own
// group (a NaN group scale in pass 3), not the whole matrix. Lanes of one warp that cover the same
// matrix combine first, so a matrix gets one atomic per warp, not one per group.
template <typename T, int kGroup>
__global__ void __launch_bounds__(kFp4Threads) fp4_matrix_amax_kernel(QuantFp4Params p, int64_t rows,
                                                                       bool groups_fastest, bool vec16) {
  const int64_t ngroups = p.shape[3] / kGroup;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kFp4Threads + threadIdx.x;
  const bool valid = item < rows * ngroups;  // no early return: every lane joins the warp votes
  unsigned bits = 0;
  long long matrix = -1;
  if (valid) {
    const Fp4Item it = fp4_item(item, rows, ngroups, groups_fastest);
    float v[kGroup];
    load_fp4_group<T, kGroup>(p, it, vec16, v);
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) amax = isfinite(v[k]) ? fmaxf(amax, fabsf(v[k])) : amax;
    bits = __float_as_uint(amax);  // non-negative finite: bit order is value order
    matrix = it.r / p.shape[2];
  }
  const int lane = threadIdx.x % kWarpSize;
  unsigned pending = __ballot_sync(0xffffffffu, valid);
  while (pending) {  // warp-uniform: one round per distinct matrix in this warp
    const int leader = __ffs(pending) - 1;
    const long long m = __shfl_sync(0xffffffffu, matrix, leader);
    const bool mine = valid && matrix == m;
    const unsigned top = __reduce_max_sync(0xffffffffu, mine ? bits : 0u);
    if (lane == leader) atomicMax(reinterpret_cast<unsigned*>(p.tensor_scale) + m, top);
    pending &= ~__ballot_sync(0xffffffffu, mine);
  }
}

// NVFP4 pass 2 (in place): amax bits -> g = amax / 2688, raised to FLT_MIN (a subnormal g would
// not map amax to ~2688), 1 for amax == 0. MXFP4: g = 1 (no second level).
__global__ void __launch_bounds__(kFp4Threads) fp4_tensor_scale_kernel(float* tensor_scale, int64_t matrices,
                                                                       bool ones) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kFp4Threads + threadIdx.x;
  if (m >= matrices) return;
  const float amax = tensor_scale[m];
  tensor_scale[m] = (ones || amax == 0.f) ? 1.f : fmaxf(__fdiv_rn(amax, kFp4TensorScaleTarget), kFp32MinNormal);
}

// Pass 3: one thread per group. NVFP4 quantizes y = x / g (IEEE) with its matrix's g: scale
// E4M3(amax(y) / 6), or the E4M3 NaN when amax is not finite (satfinite would make an Inf 448).
template <typename T, int kGroup>
__global__ void __launch_bounds__(kFp4Threads) quant_fp4_kernel(QuantFp4Params p, int64_t rows, bool groups_fastest,
                                                                 bool vec16) {
  const int64_t n = p.shape[3];
  const int64_t ngroups = n / kGroup;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kFp4Threads + threadIdx.x;
  if (item >= rows * ngroups) return;
  const Fp4Item it = fp4_item(item, rows, ngroups, groups_fastest);
  const int64_t r = it.r, g = it.g;

  float v[kGroup];
  load_fp4_group<T, kGroup>(p, it, vec16, v);

  uint8_t scale_bits;
  uint8_t codes[kGroup];
  if (p.format == Fp4Format::kNvfp4) {
    const float gscale = p.tensor_scale[r / p.shape[2]];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = __fdiv_rn(v[k], gscale);
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) amax = max_nan(amax, fabsf(v[k]));
    scale_bits = isfinite(amax) ? f32_to_e4m3(__fdiv_rn(amax, kFp4E2m1Max)) : kE4m3Nan;
    const float s = e4m3_to_f32(scale_bits);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) codes[k] = s == 0.f ? uint8_t{0} : f32_to_e2m1(__fdiv_rn(v[k], s));
  } else {
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) amax = max_nan(amax, fabsf(v[k]));
    float s;
    if (!isfinite(amax)) {
      s = __uint_as_float(0x7fc00000u);  // a NaN/Inf group: NaN scale (values unspecified)
      scale_bits = kE8m0Nan;
    } else {
      // floor(log2(amax)) - 2, exact (ilogbf also handles subnormal amax).
      const int e = amax == 0.f ? kE8m0Min : min(max(ilogbf(amax) - 2, kE8m0Min), kE8m0Max);
      scale_bits = static_cast<uint8_t>(e + kE8m0Bias);
      s = pow2_f32(e);
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) codes[k] = f32_to_e2m1(__fdiv_rn(v[k], s));
  }

  // Packed values: (rows, n/2), element 2i in the low nibble; kGroup/2 bytes (8 or 16).
  uint8_t* dst = p.packed + r * (n / 2) + g * (kGroup / 2);
  uint32_t words[kGroup / 8];
#pragma unroll
  for (int w = 0; w < kGroup / 8; ++w) {
    uint32_t word = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) word |= static_cast<uint32_t>(codes[w * 8 + k] & 0xF) << (4 * k);
    words[w] = word;
  }
  if constexpr (kGroup == 16) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
  } else {
    *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
  }

  if (p.swizzled) {
    const int64_t col_tiles = (ngroups + kSwizzleTileCols - 1) / kSwizzleTileCols;
    p.scale[swizzled_scale_offset(r, g, col_tiles)] = scale_bits;
  } else {
    p.scale[r * ngroups + g] = scale_bits;
  }
}

inline int64_t fp4_swizzled_scale_bytes(int64_t rows, int64_t ngroups) {
  const int64_t rows_pad = (rows + kSwizzleTileRows - 1) / kSwizzleTileRows * kSwizzleTileRows;
  const int64_t cols_pad = (ngroups + kSwizzleTileCols - 1) / kSwizzleTileCols * kSwizzleTileCols;
  return rows_pad * cols_pad;
}

template <typename T, int kGroup>
cudaError_t launch_quant_fp4_t(const QuantFp4Params& p, cudaStream_t stream) {
  const int64_t n = p.shape[3];
  const int64_t rows = p.shape[0] * p.shape[1] * p.shape[2];
  const int64_t ngroups = n / kGroup;
  const int64_t matrices = p.shape[0] * p.shape[1];
  if (!p.x || !p.packed || !p.scale || !p.tensor_scale || n <= 0 || n % kGroup != 0 || rows <= 0)
    return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(p.packed) % 16 != 0) return cudaErrorInvalidValue;
  if (p.swizzled) {
    // Padding rows/columns of the tiles hold 0.
    cudaError_t err = cudaMemsetAsync(p.scale, 0, fp4_swizzled_scale_bytes(rows, ngroups), stream);
    if (err != cudaSuccess) return err;
  }
  const bool last_contig = p.stride[3] == 1;
  const bool vec16 = last_contig && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && p.stride[0] % kVec == 0 &&
                     p.stride[1] % kVec == 0 && p.stride[2] % kVec == 0;
  const int64_t items = rows * ngroups;
  const int64_t blocks = (items + kFp4Threads - 1) / kFp4Threads;
  const int64_t scale_blocks = (matrices + kFp4Threads - 1) / kFp4Threads;
  if (blocks > 0x7fffffffLL || scale_blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  const bool nvfp4 = p.format == Fp4Format::kNvfp4;
  if (nvfp4) {
    cudaError_t err = cudaMemsetAsync(p.tensor_scale, 0, matrices * sizeof(float), stream);
    if (err != cudaSuccess) return err;
    fp4_matrix_amax_kernel<T, kGroup>
        <<<static_cast<unsigned>(blocks), kFp4Threads, 0, stream>>>(p, rows, last_contig, vec16);
  }
  fp4_tensor_scale_kernel<<<static_cast<unsigned>(scale_blocks), kFp4Threads, 0, stream>>>(p.tensor_scale, matrices,
                                                                                          !nvfp4);
  quant_fp4_kernel<T, kGroup><<<static_cast<unsigned>(blocks), kFp4Threads, 0, stream>>>(p, rows, last_contig, vec16);
  return cudaGetLastError();
}

}  // namespace sage::quant
