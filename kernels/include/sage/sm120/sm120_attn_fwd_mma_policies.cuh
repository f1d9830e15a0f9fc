// MMA policies of the sm120 FP4 attention mainloop (sm120_attn_fwd_kernel_mma_sync.cuh): the one
// block-scaled product D = (A . sfa)(B . sfb) + C of an m16n8k64 tile, and E2M1 packing of P.
// Both read the same registers with the conventions of sm120_attn_fwd_fragments.hpp.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>

#include <cute/arch/mma_sm80.hpp>
#include <cute/arch/mma_sm120.hpp>

#include "sage/sm120/sm120_attn_fwd_fragments.hpp"

namespace sage::sm120 {

inline constexpr unsigned kFullMask = 0xffffffffu;

// sm_120a/121a: one mma.sync.aligned.kind::mxf4nvf4.block_scale.scale_vec::4X.m16n8k64 (CuTe's
// SM120 block-scaled atom, thread-id/byte-id selectors 0).
struct MmaNativeSm120 {
  static constexpr bool kNative = true;
  using Atom = cute::SM120::BLOCKSCALED::SM120_16x8x64_TN_VS<cute::float_e2m1_t, cute::float_e2m1_t, float,
                                                             cute::float_ue4m3_t, kFp4Group>;

  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                             uint32_t sfa, uint32_t sfb) {
    Atom::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2], d[3], sfa, sfb);
  }

  // Eight non-negative floats -> eight E2M1 codes (x[0] in the lowest nibble), RN-even, satfinite.
  // cvt.*.e2m1x2.f32 d, a, b puts a in the upper, b in the lower nibble.
  __device__ __forceinline__ static uint32_t pack_e2m1x8(const float (&x)[8]) {
    uint32_t out;
    asm("{\n\t.reg .b8 b0, b1, b2, b3;\n\t"
        "cvt.rn.satfinite.e2m1x2.f32 b0, %2, %1;\n\t"
        "cvt.rn.satfinite.e2m1x2.f32 b1, %4, %3;\n\t"
        "cvt.rn.satfinite.e2m1x2.f32 b2, %6, %5;\n\t"
        "cvt.rn.satfinite.e2m1x2.f32 b3, %8, %7;\n\t"
        "mov.b32 %0, {b0, b1, b2, b3};\n\t}"
        : "=r"(out)
        : "f"(x[0]), "f"(x[1]), "f"(x[2]), "f"(x[3]), "f"(x[4]), "f"(x[5]), "f"(x[6]), "f"(x[7]));
    return out;
  }
};

// sm_90a twin. Each E2M1 element times its UE4M3 scale is exact in FP16 (|e2m1| <= 6 with two
// significant bits, a scale has four, and 2^-10 <= |product| <= 2688), so four FP16 m16n8k16
// MMAs with FP32 accumulation over the slots of sm120_twin_k compute the block-scaled product
// exactly up to FP32 accumulation order. Only the scale words move between lanes (the lanes the
// native instruction reads them from).
struct MmaTwinSm90 {
  static constexpr bool kNative = false;

  // fp16 bits of E2M1 magnitudes 0..7 {0, .5, 1, 1.5, 2, 3, 4, 6}: the high bytes (low bytes 0),
  // indexed by the magnitude through prmt.
  static constexpr uint32_t kE2m1HiLo = 0x3E3C3800u;  // magnitudes 3, 2, 1, 0
  static constexpr uint32_t kE2m1HiHi = 0x46444240u;  // magnitudes 7, 6, 5, 4

  // Four E2M1 codes (nibbles 0..3 of `w`) times `scale2` (the group scale in both halves) ->
  // two half2 (element 0 in the low half of lo).
  __device__ __forceinline__ static void dequant4(uint32_t w, __half2 scale2, uint32_t& lo, uint32_t& hi) {
    const uint32_t hib = __byte_perm(kE2m1HiLo, kE2m1HiHi, w & 0x7777u);  // fp16 high byte per element
    const uint32_t sign = ((w << 12) & 0x8000u) | ((w << 24) & 0x80000000u);  // nibbles 0, 1
    const uint32_t sign23 = ((w << 4) & 0x8000u) | ((w << 16) & 0x80000000u);  // nibbles 2, 3
    uint32_t h01 = __byte_perm(hib, 0u, 0x1404) | sign;
    uint32_t h23 = __byte_perm(hib, 0u, 0x3424) | sign23;
    __half2 a = __hmul2(*reinterpret_cast<__half2*>(&h01), scale2);
    __half2 b = __hmul2(*reinterpret_cast<__half2*>(&h23), scale2);
    lo = *reinterpret_cast<uint32_t*>(&a);
    hi = *reinterpret_cast<uint32_t*>(&b);
  }

  // UE4M3 byte q of `word` -> (s, s) as half2 (exact; the E4M3 NaN stays NaN).
  __device__ __forceinline__ static __half2 scale_half2(uint32_t word, int q) {
    const uint32_t b = (word >> (8 * q)) & 0xffu;
    const unsigned short pair = static_cast<unsigned short>(b | (b << 8));
    uint32_t h;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(pair));
    return *reinterpret_cast<__half2*>(&h);
  }

  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                             uint32_t sfa, uint32_t sfb) {
    // Opaque copies: without them the compiler decodes each A operand (Q, reused by 16 n-tiles
    // and hoisted out of the KV loop; P, reused by every channel tile) once and keeps the FP16
    // values live, 32+ registers more than the native kernel (spills). Decoding again per MMA
    // keeps the twin's register allocation close to the native one.
    uint32_t av[4] = {a[0], a[1], a[2], a[3]};
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(av[i]));
    asm volatile("" : "+r"(sfa), "+r"(sfb));
    const int lane = threadIdx.x % 32;
    const int t = lane % 4;
    const int quad = lane & ~3;
    const uint32_t sfa_g = __shfl_sync(kFullMask, sfa, quad);       // row g (lane 4g)
    const uint32_t sfa_g8 = __shfl_sync(kFullMask, sfa, quad + 1);  // row g + 8 (lane 4g + 1)
    const uint32_t sfb_n = __shfl_sync(kFullMask, sfb, quad);       // col g
    const uint32_t b[2] = {b0, b1};
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // k values 8t.. (h = 0: a0, a1, b0) and 32 + 8t.. (a2, a3, b1)
      const int q = sm120_a_group(2 * h, t);
      const __half2 sg = scale_half2(sfa_g, q), sg8 = scale_half2(sfa_g8, q), sn = scale_half2(sfb_n, q);
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // FP16 MMA u = 2h + half: nibbles 4*half..4*half+3
        const int sh = 16 * half;
        uint32_t ag_lo, ag_hi, ag8_lo, ag8_hi, b_lo, b_hi;
        dequant4(av[2 * h] >> sh, sg, ag_lo, ag_hi);
        dequant4(av[2 * h + 1] >> sh, sg8, ag8_lo, ag8_hi);
        dequant4(b[h] >> sh, sn, b_lo, b_hi);
        // Volatile touches keep each decode next to its MMA (volatile asm keeps program order):
        // decoding several MMAs ahead cost the d=128 twin 28 bytes of spills.
        asm volatile("" : "+r"(ag_lo), "+r"(ag_hi), "+r"(ag8_lo), "+r"(ag8_hi), "+r"(b_lo), "+r"(b_hi));
        // slots {2t, 2t+1} <- k offsets e = 0, 1; {2t+8, 2t+9} <- e = 2, 3 (sm120_twin_k)
        cute::SM80_16x8x16_F32F16F16F32_TN::fma(d[0], d[1], d[2], d[3], ag_lo, ag8_lo, ag_hi, ag8_hi, b_lo,
                                                b_hi, d[0], d[1], d[2], d[3]);
      }
    }
  }

  // Software RN-even E2M1 of non-negative floats (thresholds of sage::quant::f32_to_e2m1).
  __device__ __forceinline__ static uint32_t e2m1_code(float a) {
    return uint32_t(a > 0.25f) + uint32_t(a >= 0.75f) + uint32_t(a > 1.25f) + uint32_t(a >= 1.75f) +
           uint32_t(a > 2.5f) + uint32_t(a >= 3.5f) + uint32_t(a > 5.0f);
  }
  __device__ __forceinline__ static uint32_t pack_e2m1x8(const float (&x)[8]) {
    uint32_t out = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) out |= e2m1_code(x[i]) << (4 * i);
    return out;
  }
};

}  // namespace sage::sm120
