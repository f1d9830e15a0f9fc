// Recipe policies of the sm80 mma.sync attention forward family (docs/design/NUMERICS.md §Recipes defines them).
// The mainloop (sm80_attn_fwd_kernel_mma_sync.cuh) is one template; everything that differs
// between recipes is a member of these policy types.
#pragma once

#include <cstdint>

#include <cute/arch/mma_sm80.hpp>
#include <cute/arch/mma_sm89.hpp>

#include "sage/sm80/sm80_attn_fwd_launch.hpp"
#include "sage/sm80/sm80_attn_fwd_params.hpp"

namespace sage::sm80 {

// How P.V is computed.
enum class PvMath : int {
  kF16,   // P fp16, V fp16 token-major (read from the input; bf16 V converted in smem), FP32 acc
  kS8,    // P = rint(127 * exp2(S - m)) int8, V int8 transposed+permuted, INT32 per KV block
  kE4m3,  // P~ = exp2(S - m + log2 448) e4m3, V e4m3 transposed+permuted, FP32 per KV block
};

inline constexpr float kFp8E4m3Max = 448.f;
inline constexpr float kLog2Fp8E4m3Max = 8.8073549220576041f;  // log2(448)
inline constexpr float kInt8PMax = 127.f;                       // INT-FlashAttention P scale 1/127

// QK operands: INT8, m16n8k32 (32 bytes of the contraction per MMA).
struct QkS8 {
  static constexpr int kBits = 8;
  using Mma = cute::SM80_16x8x32_S32S8S8S32_TN;
};
// QK operands: INT4 two per byte (element 2i low nibble), m16n8k64 (also 32 bytes per MMA).
struct QkS4 {
  static constexpr int kBits = 4;
  using Mma = cute::SM80_16x8x64_S32S4S4S32_TN;
};

// Defaults every recipe shares; a recipe states only what differs.
struct RecipeDefaults {
  static constexpr bool kPvF16Buffer = false;      // see the *AccF16 variants below
  static constexpr bool kToolkitSupported = true;  // false: empty kernel (binding refuses)
  static constexpr bool kQSmoothing = false;       // true: dS = q_mean . K^T added in-kernel
  static constexpr int kMinArch = 800;             // __CUDA_ARCH__ needed by the MMAs
  static constexpr float kPLog2Bias = 0.f;         // P = exp2(S - m + bias)
  static constexpr float kPScale = 1.f;            // O is divided by this (P's quantization scale)
};

struct RecipeQkS8PvF16 : RecipeDefaults {
  static constexpr Sm80Recipe kId = Sm80Recipe::kQkS8PvF16;
  using Qk = QkS8;
  static constexpr PvMath kPv = PvMath::kF16;
};

struct RecipeQkS8PvS8 : RecipeDefaults {
  static constexpr Sm80Recipe kId = Sm80Recipe::kQkS8PvS8;
  using Qk = QkS8;
  static constexpr PvMath kPv = PvMath::kS8;
  static constexpr float kPScale = kInt8PMax;
  using PvMma = cute::SM80_16x8x32_S32S8S8S32_TN;
};

// E4M3 P~V (FP8 mma.sync: sm_89+); the row max maps to 448 (the bias cancels in O/l).
struct PvE4m3Defaults : RecipeDefaults {
  static constexpr PvMath kPv = PvMath::kE4m3;
  static constexpr int kMinArch = 890;
  static constexpr float kPLog2Bias = kLog2Fp8E4m3Max;
  using PvMma = cute::SM89_16x8x32_F32E4M3E4M3F32_TN;
};

struct RecipeQkS8PvE4m3 : PvE4m3Defaults {
  static constexpr Sm80Recipe kId = Sm80Recipe::kQkS8PvE4m3;
  using Qk = QkS8;
};

struct RecipeQkS4PvE4m3 : PvE4m3Defaults {
  static constexpr Sm80Recipe kId = Sm80Recipe::kQkS4PvE4m3;
  using Qk = QkS4;
  static constexpr bool kQSmoothing = true;
};

// FP16-accumulate variants: each KV tile's P.V goes into a fresh FP16 MMA accumulator (PvMmaF16Acc)
// that is then added into FP32 O, like the FP32 two-level buffer. If any lane's buffer of an O
// tile pair reaches 65504, inf or NaN, the warp recomputes that pair with the FP32-accumulate MMA,
// so an overflow costs time, not accuracy. For E4M3 the quantizer bounds |V^| <= 2.25 (v_e4m3_t
// with v_max 2.25), so a 64-key tile sums to at most 64 x 448 x 2.25 = 64512 < 65504 and the guard
// never fires on finite inputs; for FP16 V (unbounded) it is the overflow guard.
struct RecipeQkS8PvF16AccF16 : RecipeQkS8PvF16 {
  static constexpr Sm80Recipe kId = Sm80Recipe::kQkS8PvF16AccF16;
  static constexpr bool kPvF16Buffer = true;
  using PvMmaF16Acc = cute::SM80_16x8x16_F16F16F16F16_TN;
  using PvMmaF32Acc = cute::SM80_16x8x16_F32F16F16F32_TN;
};

struct RecipeQkS8PvE4m3AccF16 : RecipeQkS8PvE4m3 {
  static constexpr Sm80Recipe kId = Sm80Recipe::kQkS8PvE4m3AccF16;
  static constexpr bool kPvF16Buffer = true;
  static constexpr bool kToolkitSupported = kSm80Fp8F16AccCompiled;
  using PvMmaF16Acc = cute::SM89_16x8x32_F16E4M3E4M3F16_TN;
  using PvMmaF32Acc = cute::SM89_16x8x32_F32E4M3E4M3F32_TN;
};

template <Sm80Recipe R> struct RecipeOf;
template <> struct RecipeOf<Sm80Recipe::kQkS8PvF16> { using type = RecipeQkS8PvF16; };
template <> struct RecipeOf<Sm80Recipe::kQkS8PvS8> { using type = RecipeQkS8PvS8; };
template <> struct RecipeOf<Sm80Recipe::kQkS8PvE4m3> { using type = RecipeQkS8PvE4m3; };
template <> struct RecipeOf<Sm80Recipe::kQkS4PvE4m3> { using type = RecipeQkS4PvE4m3; };
template <> struct RecipeOf<Sm80Recipe::kQkS8PvF16AccF16> { using type = RecipeQkS8PvF16AccF16; };
template <> struct RecipeOf<Sm80Recipe::kQkS8PvE4m3AccF16> { using type = RecipeQkS8PvE4m3AccF16; };

}  // namespace sage::sm80
