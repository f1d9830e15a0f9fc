// FP32 -> FP8 E4M3 packing shared by the sm90 attention kernel and the fused quantizer.
// cvt.rn.satfinite.e4m3x2.f32 needs sm_89+; only kernels built for 89/90a include this.
#pragma once

#include <cstdint>

namespace sage {

// Four floats -> four E4M3 bytes (x0 in the lowest byte), RN + satfinite.
// cvt.*.e4m3x2.f32 d, a, b puts a in the upper and b in the lower byte of d.
__device__ __forceinline__ uint32_t pack_e4m3x4(float x0, float x1, float x2, float x3) {
  uint32_t out;
  asm("{\n\t.reg .b16 lo, hi;\n\t"
      "cvt.rn.satfinite.e4m3x2.f32 lo, %2, %1;\n\t"
      "cvt.rn.satfinite.e4m3x2.f32 hi, %4, %3;\n\t"
      "mov.b32 %0, {lo, hi};\n\t}"
      : "=r"(out)
      : "f"(x0), "f"(x1), "f"(x2), "f"(x3));
  return out;
}

}  // namespace sage
