// IEEE round-to-nearest quotients x / s for a divisor shared by many x (a quantization group's
// scale), without __fdiv_rn's per-element cost: y = rcp.rn(s) once, then per element q0 = x*y and
// two corrections q <- fma(fma(-s, q, x), y, q). With y = RN(1/s) and q faithful, the last
// correction returns RN(x / s) (Markstein's theorem): bit for bit the IEEE quotient, for s in
// [2^-64, 2^64] (no intermediate under/overflow where a quotient can reach a nonzero int8 code;
// quotients below 2^-30 give code 0 either way). Any other s takes __fdiv_rn. Checked on the CPU
// with fmaf against x / s: 0 mismatches over 4.6e8 quotients (docs/perf/sm90_qk_s8_pv_e4m3.md).
#pragma once

#include <cuda_runtime.h>

namespace sage {

inline constexpr float kDivRnFastMin = 0x1p-64f;
inline constexpr float kDivRnFastMax = 0x1p64f;
// x + 1.5 * 2^23 rounds x (|x| < 2^22) to an integer, half to even, in the low mantissa bits.
inline constexpr float kRoundMagic = 12582912.f;

#if defined(__CUDACC__)
__device__ __forceinline__ bool div_rn_fast_ok(float s) { return s >= kDivRnFastMin && s <= kDivRnFastMax; }

// RN(x / s) given y = RN(1/s), s in [kDivRnFastMin, kDivRnFastMax]. Explicit __fmul_rn /
// __fmaf_rn: no contraction may change the rounding steps.
__device__ __forceinline__ float div_rn_fast(float x, float s, float y) {
  float q = __fmul_rn(x, y);
  q = __fmaf_rn(__fmaf_rn(-s, q, x), y, q);
  return __fmaf_rn(__fmaf_rn(-s, q, x), y, q);
}

// Four int8 codes, each in the low byte of its word -> one word (c0 in the lowest byte).
__device__ __forceinline__ uint32_t pack_low_bytes(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  return __byte_perm(__byte_perm(c0, c1, 0x0040), __byte_perm(c2, c3, 0x0040), 0x5410);
}
#endif

}  // namespace sage
