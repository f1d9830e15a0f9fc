// Device helpers shared by the quantization kernels (plain CUDA C++, every arch >= sm_80).
// Arithmetic follows docs/design/quant-formats.md exactly: IEEE fp32 division (__fdiv_rn),
// round-half-even (__float2int_rn), NaN-propagating amax, no fast-math.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sage/quant/quant_params.hpp"

namespace sage::quant {

inline constexpr float kInt8Max = 127.f;
inline constexpr float kInt4Max = 7.f;
inline constexpr float kFp8E4m3Max = 448.f;
inline constexpr float kFp4E2m1Max = 6.f;
inline constexpr int kE8m0Bias = 127;
inline constexpr int kE8m0Min = -127;
inline constexpr int kE8m0Max = 127;
inline constexpr uint8_t kE8m0Nan = 0xFF;
inline constexpr int kVec = 8;  // elements per thread chunk: 16 bytes of fp16/bf16
inline constexpr int kWarpSize = 32;

template <InDType T> struct InType;
template <> struct InType<InDType::kF16> { using type = __half; };
template <> struct InType<InDType::kBF16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// Loads 8 consecutive elements as fp32 (exact). `vec16`: the address is 16-byte aligned, so one
// 16-byte load; otherwise element loads (odd strides or offset views are still read correctly).
template <typename T>
__device__ __forceinline__ void load8_f32(const T* p, bool vec16, float (&out)[kVec]) {
  static_assert(sizeof(T) == 2, "fp16/bf16 only");
  if (vec16) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = to_f32(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = to_f32(p[i]);
  }
}

__device__ __forceinline__ void load8_f32(const float* p, bool vec16, float (&out)[kVec]) {
  if (vec16) {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = p[i];
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// max that propagates NaN (fmaxf drops it; the contract wants a NaN scale for a NaN group).
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// Shared/global atomic max of non-negative floats through their bit patterns (monotonic for
// +0..+Inf; a NaN with the sign cleared, 0x7FC00000, compares above +Inf and so propagates).
__device__ __forceinline__ void atomic_max_nonneg(float* addr, float v) {
  atomicMax(reinterpret_cast<unsigned int*>(addr), __float_as_uint(fabsf(v)));
}

// amax over the `lanes` consecutive lanes of a row (lanes a power of two <= 32, rows aligned).
__device__ __forceinline__ float row_amax(float v, int lanes) {
  for (int o = lanes / 2; o > 0; o /= 2) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Integer scale: amax / qmax (IEEE), amax == 0 -> 1.
__device__ __forceinline__ float int_scale(float amax, float qmax) {
  return amax == 0.f ? 1.f : __fdiv_rn(amax, qmax);
}

// clamp(rint(x / s), -qmax, qmax); NaN -> 0 (cvt.rni of NaN is 0, as the reference picks).
__device__ __forceinline__ int quant_int_value(float x, float s, int qmax) {
  int q = __float2int_rn(__fdiv_rn(x, s));
  return min(max(q, -qmax), qmax);
}

// E4M3 bits with cvt.rn.satfinite semantics.
__device__ __forceinline__ uint8_t f32_to_e4m3(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float e4m3_to_f32(uint8_t bits) {
  __half_raw hr = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(bits), __NV_E4M3);
  return __half2float(__half(hr));
}

// E2M1 code (0..15): RN on {0,.5,1,1.5,2,3,4,6}, ties to the even code, saturate at 6, sign bit
// from the sign of y (so -0.0 and negatives rounding to 0 give 0x8). '>' sends a tie down and
// '>=' up so ties land on the even code; NaN compares false everywhere -> magnitude 0.
__device__ __forceinline__ uint8_t f32_to_e2m1(float y) {
  float a = fabsf(y);
  int code = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) +
             (a > 5.0f);
  return static_cast<uint8_t>(code | (signbit(y) ? 8 : 0));
}

// Exact 2**e as fp32 for e in [-127, 127] (2**-127 is subnormal).
__device__ __forceinline__ float pow2_f32(int e) {
  return e >= -126 ? __uint_as_float(static_cast<unsigned>(e + 127) << 23)
                   : __uint_as_float(1u << 22);
}

// Pointer to element (i, j, t, 0) of a logical (b, h, s, d) input.
template <typename T>
__device__ __forceinline__ const T* row_ptr(const InputBHSD& x, int i, int j, int t) {
  return static_cast<const T*>(x.ptr) + static_cast<int64_t>(i) * x.stride_b +
         static_cast<int64_t>(j) * x.stride_h + static_cast<int64_t>(t) * x.stride_s;
}

// Lanes per token row: the smallest power of two covering d/8 chunks, at least 4, at most 32.
inline int lanes_per_row(int d) {
  int chunks = (d + kVec - 1) / kVec;
  int lanes = 4;
  while (lanes < chunks && lanes < kWarpSize) lanes *= 2;
  return lanes;
}

inline bool all_strides_vec_ok(const InputBHSD& x) {
  return reinterpret_cast<uintptr_t>(x.ptr) % 16 == 0 && x.stride_b % kVec == 0 &&
         x.stride_h % kVec == 0 && x.stride_s % kVec == 0;
}

}  // namespace sage::quant
