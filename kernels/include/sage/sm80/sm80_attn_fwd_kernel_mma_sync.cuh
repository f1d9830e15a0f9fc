// Ampere/Ada attention forward on mma.sync: ONE mainloop, the recipe is a policy type
// (sm80_attn_fwd_recipes.hpp). Built for sm_80/86/89, sm_90a and the Blackwell targets
// sm_100a/103a/120a/121a, which keep mma.sync (e4m3 recipes: sm_89+ only).
//
// CTA = 4 warps x 16 query rows (kBlockM = 64), KV tiles of kBlockN = 64 keys, 2-stage cp.async
// pipeline for K, V and the K tile's scales. Every operand tile lives in shared memory as rows
// of bytes, 16-byte chunks XOR-swizzled (cute::Swizzle) so that ldmatrix is conflict-free.
// At the byte level every non-transposed MMA operand fragment has the same shape (16 or 8 rows
// x 32 bytes per MMA: INT8 m16n8k32, INT4 m16n8k64, E4M3 m16n8k32, FP16 m16n8k16 for A), so one
// ldmatrix.x4 path serves all recipes; FP16 V (token-major) uses ldmatrix.x4.trans.
//
// Fragments (PTX ISA, mma.m16n8kX; g = lane/4, t = lane%4): the S accumulator gives a thread
// rows {g, g+8} x key columns {8j + 2t, 8j + 2t + 1} of each 8-key n-tile j.
//  * FP16 P (A of m16n8k16) wants keys {2t,2t+1, 8+2t,9+2t}: exactly S n-tiles 2kk, 2kk+1.
//  * 8-bit P (A of m16n8k32) wants contraction slots {4t..4t+3, 16+4t..19+4t}. Slot
//    k = 16h + 4t + 2jj + e of a 32-key chunk is filled with key 8(2h + jj) + 2t + e
//    (S n-tiles 4kk..4kk+3 in order), so P needs no shuffles; V's tokens are stored in the same
//    order ("v_*_t_p32" formats: v_t[c, 32m + k] = V[32m + perm32(k), c], see
//    sm80_attn_fwd_perm32 below), the contraction order being free.
//
// Numerics (docs/design/NUMERICS.md §Recipes): S = int32(Qq Kq^T) * q_scale[row] * k_scale[col] * scale*log2e
// (+ dS for Q smoothing), online softmax in exp2, fully masked rows -> O = 0, LSE = -inf.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/arch/mma_sm89.hpp>
#include <cute/numeric/int.hpp>
#include <cute/swizzle.hpp>

#include "sage/sm80/sm80_attn_fwd_launch.hpp"
#include "sage/sm80/sm80_attn_fwd_recipes.hpp"

namespace sage::sm80 {
namespace detail {

inline constexpr int kBlockM = 64;  // query rows per CTA
inline constexpr int kBlockN = 64;  // keys per KV tile
inline constexpr int kNumWarps = 4;
inline constexpr int kNumThreads = kNumWarps * 32;
inline constexpr int kWarpRows = 16;     // rows of one m16 MMA tile = rows a warp owns
inline constexpr int kChunkBytes = 16;   // cp.async / ldmatrix row granularity
inline constexpr int kMmaKBytes = 32;    // contraction bytes of one 8-bit (k32) / 4-bit (k64) MMA
inline constexpr int kF16KKeys = 16;     // keys per FP16 PV MMA (k16)
inline constexpr int k8bitKKeys = 32;    // keys per 8-bit PV MMA (k32)
inline constexpr float kLn2 = 0.69314718055994531f;
inline constexpr float kNegInf = -__builtin_huge_valf();
inline constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kBlockM == kNumWarps * kWarpRows, "one m16 row tile per warp");

constexpr int log2_int(int x) { return x <= 1 ? 0 : 1 + log2_int(x / 2); }

// exp2 as one MUFU.EX2 (ex2.approx.ftz, max rel. error ~2^-22, as the sm90 kernel uses). Built
// without fast math, exp2f adds a subnormal-range fix-up around it: 102 of 766 instructions per
// 64-key tile and warp (docs/perf/sm80_paper_estimate.md); P~ below 2^-126 flushes to 0, which
// changes no E4M3/INT8/FP16 code of P and adds < 1e-37 to l.
#if defined(__CUDACC__)
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

// Byte offset of (row, byte) in a row-major smem tile with kRowBytes-byte rows. The 16-byte
// chunk index is XORed with row bits so that the 8 row addresses of one ldmatrix 8x8 matrix
// (same chunk column, 8 consecutive rows) land in 8 distinct 16-byte bank groups.
template <int kRowBytes>
struct SmemTileSwizzle {
  static_assert(kRowBytes >= 32 && (kRowBytes & (kRowBytes - 1)) == 0, "row bytes: 2^n >= 32");
  static constexpr int kChunksPerRow = kRowBytes / kChunkBytes;
  static constexpr int kBits = log2_int(kChunksPerRow < 8 ? kChunksPerRow : 8);
  static constexpr int kShift = (log2_int(kRowBytes) > 7 ? log2_int(kRowBytes) : 7) - 4;
  using Swizzle = cute::Swizzle<kBits, 4, kShift>;
  CUTE_HOST_DEVICE static int offset(int row, int byte) { return Swizzle{}(row * kRowBytes + byte); }
};

// Rows [0, kRows) of a tile, 16-byte cp.async chunks; rows >= valid_rows are zero-filled
// (no global read), so padding rows contribute exact zeros to both GEMMs.
template <int kRows, int kRowBytes>
CUTE_DEVICE void copy_tile_async(uint8_t* smem, const uint8_t* gmem, int64_t row_stride_bytes,
                                 int valid_rows, int tid) {
  using Sw = SmemTileSwizzle<kRowBytes>;
  constexpr int kChunks = kRows * Sw::kChunksPerRow;
  static_assert(kChunks % kNumThreads == 0, "tile chunks must split evenly over the CTA");
#pragma unroll
  for (int i = 0; i < kChunks / kNumThreads; ++i) {
    const int c = tid + i * kNumThreads;
    const int row = c / Sw::kChunksPerRow;
    const int byte = (c % Sw::kChunksPerRow) * kChunkBytes;
    const bool ok = row < valid_rows;
    const uint8_t* src = gmem + int64_t(ok ? row : 0) * row_stride_bytes + byte;
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(src),
        *reinterpret_cast<cute::uint128_t*>(smem + Sw::offset(row, byte)), ok);
  }
}

CUTE_DEVICE void ldsm_x4(const uint8_t* p, uint32_t (&r)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(p), r[0], r[1], r[2], r[3]);
}

// ldmatrix on a 32-bit shared address (so constant offsets fold into the instruction).
CUTE_DEVICE void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.x4.m8n8.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
CUTE_DEVICE void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.x4.trans.m8n8.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Address of (row_const + row_lane, byte_const + byte_lane) in a swizzled tile from the lane's
// precomputed `stage_lane_off` = stage offset + Sw::offset(row_lane, byte_lane). Valid when
// row_const is a multiple of 16 rows (the swizzle repeats every 8 rows; row_lane < 16),
// byte_const is a multiple of 32 below the row length (it only touches chunk bits the swizzle
// does not read, so XOR commutes with the swizzle) and byte_lane is 0 or 16. Computing it from
// the stage-dependent offset keeps the compiler from hoisting one register per fragment.
template <int kRowBytes>
CUTE_DEVICE uint32_t swizzled_addr(uint32_t tile_base, int stage_lane_off, int row_const,
                                   int byte_const) {
  return tile_base + uint32_t((stage_lane_off ^ byte_const) + row_const * kRowBytes);
}

// Scale group of token t (docs/design/quant-formats.md).
CUTE_DEVICE int scale_group(int t, int granularity, int block, bool is_q) {
  switch (static_cast<Sm80ScaleGranularity>(granularity)) {
    case Sm80ScaleGranularity::kPerTensor: return 0;
    case Sm80ScaleGranularity::kPerBlock: return t / block;
    case Sm80ScaleGranularity::kPerWarp: return t / kWarpRows;
    case Sm80ScaleGranularity::kPerThread:
      return is_q ? (t / kWarpRows) * 8 + t % 8 : (t / block) * 4 + (t % 8) / 2;
    default: return t;  // per token
  }
}

CUTE_DEVICE uint32_t pack_f16x2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// bf16 pair -> fp16 pair (exact widening to fp32, then RN; |x| > 65504 becomes inf).
CUTE_DEVICE uint32_t bf16x2_to_f16x2(uint32_t w) {
  return pack_f16x2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

// INT-FlashAttention P: rint(127 * p), p in [0, 1] -> 0..127 (NaN -> 0; l carries the NaN).
CUTE_DEVICE uint32_t pack_p_s8x4(float a, float b, float c, float d) {
  const uint32_t x0 = uint32_t(__float2int_rn(a * kInt8PMax)) & 0xffu;
  const uint32_t x1 = uint32_t(__float2int_rn(b * kInt8PMax)) & 0xffu;
  const uint32_t x2 = uint32_t(__float2int_rn(c * kInt8PMax)) & 0xffu;
  const uint32_t x3 = uint32_t(__float2int_rn(d * kInt8PMax)) & 0xffu;
  return x0 | (x1 << 8) | (x2 << 16) | (x3 << 24);
}

// E4M3 with RN + satfinite; a in the lowest byte. Only instantiated for sm_89+.
CUTE_DEVICE uint32_t pack_p_e4m3x4(float a, float b, float c, float d) {
  uint16_t lo, hi;
  // cvt ... d, x, y puts x in the upper byte, y in the lower one.
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(b), "f"(a));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(d), "f"(c));
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

// Overflow guard of the FP16-accumulate variants: true on every lane if any lane's FP16 buffer
// of an O tile pair holds |x| >= 65504 (FP16's max), inf or NaN: the unsigned compare of the
// magnitude bits against 0x7bff catches all three, so the guard holds whether the MMA's overflow
// gives inf or saturates. Warp-uniform, so the FP32 recompute that follows can use mma.sync.
CUTE_DEVICE bool f16_buffer_overflowed(const uint32_t (&acc)[2][2]) {
  uint32_t bad = 0u;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) bad |= __vcmpgeu2(acc[i][r] & 0x7fff7fffu, 0x7bff7bffu);
  return __any_sync(kFullMask, bad != 0u);
}

// FP16 accumulator pair (regs: rows g / g+8, low half = even column) -> the FP32 layout
// {row g: c, c+1, row g+8: c, c+1} of one 8-channel O tile.
CUTE_DEVICE void unpack_f16_buffer(const uint32_t (&acc)[2][2], float (&out)[2][4]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&acc[i][r]));
      out[i][2 * r] = f.x;
      out[i][2 * r + 1] = f.y;
    }
}

template <class OutT>
CUTE_DEVICE void store_pair(OutT* dst, float a, float b) {
  if constexpr (std::is_same_v<OutT, __half>) {
    *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
  }
}

template <class Recipe_, int kHeadDim_, class OutT_>
struct Sm80AttnFwdMainloop {
  using Recipe = Recipe_;
  using OutT = OutT_;
  using QkMma = typename Recipe::Qk::Mma;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128");

  static constexpr bool kVIsF16 = Recipe::kPv == PvMath::kF16;
  // bf16 inputs: V is converted to fp16 in shared memory so that P can stay fp16 (11-bit
  // mantissa, like the original SageAttention, which casts V to fp16); O is written in bf16.
  static constexpr bool kVBf16ToF16 = kVIsF16 && std::is_same_v<OutT, __nv_bfloat16>;

  static constexpr int kQkRowBytes = kHeadDim * Recipe::Qk::kBits / 8;
  static constexpr int kQkKSteps = kQkRowBytes / kMmaKBytes;
  static constexpr int kVRows = kVIsF16 ? kBlockN : kHeadDim;        // tokens x d, or d x tokens
  static constexpr int kVRowBytes = kVIsF16 ? kHeadDim * 2 : kBlockN;
  static constexpr int kSTiles = kBlockN / 8;    // 8-key n-tiles of S
  static constexpr int kOTiles = kHeadDim / 8;   // 8-channel n-tiles of O
  using SwQk = SmemTileSwizzle<kQkRowBytes>;
  using SwV = SmemTileSwizzle<kVRowBytes>;

  static constexpr int kSmemQ = kBlockM * kQkRowBytes;
  static constexpr int kSmemK = kBlockN * kQkRowBytes;
  static constexpr int kSmemV = kVRows * kVRowBytes;
  static constexpr int kSmemKScale = kBlockN * int(sizeof(float));
  static constexpr int kSmemDeltaS = Recipe::kQSmoothing ? kBlockN * int(sizeof(float)) : 0;
  static constexpr int kSmemQMean = Recipe::kQSmoothing ? kHeadDim * int(sizeof(float)) : 0;
  static constexpr int kOffK = kSmemQ;
  static constexpr int kOffV = kOffK + 2 * kSmemK;
  static constexpr int kOffKScale = kOffV + 2 * kSmemV;
  static constexpr int kOffDeltaS = kOffKScale + 2 * kSmemKScale;
  static constexpr int kOffQMean = kOffDeltaS + 2 * kSmemDeltaS;
  static constexpr int kSmemBytes = kOffQMean + kSmemQMean;

  // O tiles j, j+1 = O * alpha + this KV tile's P V, the *AccF16 recipes' way: P V in a fresh
  // FP16 MMA accumulator, converted and added in FP32; if any lane's buffer is inf/NaN, the warp
  // recomputes the pair with the FP32-accumulate MMA. load_v(kk, bv) loads the V^T fragments
  // (b0, b1 of tile j, then of j+1) of the kk-th PV MMA step.
  template <int kKSteps, class LoadV>
  CUTE_DEVICE static void pv_pair_f16_buffer(const uint32_t (&tOrP)[kKSteps][4], int j,
                                             const float (&alpha)[2], float (&tOrO)[kOTiles][4],
                                             LoadV&& load_v) {
    uint32_t acc16[2][2] = {{0u, 0u}, {0u, 0u}};
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t bv[4];
      load_v(kk, bv);
#pragma unroll
      for (int i = 0; i < 2; ++i)
        Recipe::PvMmaF16Acc::fma(acc16[i][0], acc16[i][1], tOrP[kk][0], tOrP[kk][1], tOrP[kk][2],
                                 tOrP[kk][3], bv[2 * i], bv[2 * i + 1], acc16[i][0], acc16[i][1]);
    }
    float add[2][4];
    if (f16_buffer_overflowed(acc16)) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) add[i][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        uint32_t bv[4];
        load_v(kk, bv);
#pragma unroll
        for (int i = 0; i < 2; ++i)
          Recipe::PvMmaF32Acc::fma(add[i][0], add[i][1], add[i][2], add[i][3], tOrP[kk][0],
                                   tOrP[kk][1], tOrP[kk][2], tOrP[kk][3], bv[2 * i], bv[2 * i + 1],
                                   add[i][0], add[i][1], add[i][2], add[i][3]);
      }
    } else {
      unpack_f16_buffer(acc16, add);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) tOrO[j + i][e] = tOrO[j + i][e] * alpha[e >> 1] + add[i][e];
  }

  CUTE_DEVICE static void run(const Sm80AttnFwdParams& p, uint8_t* smem) {
    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);  // longest (causal) rows first
    const int h = blockIdx.y, b = blockIdx.z;
    const int h_kv = h / (p.heads_q / p.heads_kv);  // GQA: no copies, just an index
    const int s_q = p.seqlen_q, s_kv = p.seqlen_kv;
    const int q0 = m_block * kBlockM;
    const int q_valid = min(kBlockM, s_q - q0);
    const int causal_off = s_kv - s_q;  // bottom-right: row i sees keys j <= i + causal_off

    int n_tiles = (s_kv + kBlockN - 1) / kBlockN;
    if (p.is_causal) {
      const int last_key = q0 + q_valid - 1 + causal_off;
      n_tiles = last_key < 0 ? 0 : min(n_tiles, last_key / kBlockN + 1);
    }

    uint8_t* sQ = smem;
    uint8_t* sK = smem + kOffK;
    uint8_t* sV = smem + kOffV;
    float* sKScale = reinterpret_cast<float*>(smem + kOffKScale);
    float* sDeltaS = reinterpret_cast<float*>(smem + kOffDeltaS);
    float* sQMean = reinterpret_cast<float*>(smem + kOffQMean);

    constexpr int kVElemBytes = kVIsF16 ? 2 : 1;
    const uint8_t* gQ = static_cast<const uint8_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
                        int64_t(q0) * p.q_stride_s;
    const uint8_t* gK = static_cast<const uint8_t*>(p.k) + b * p.k_stride_b + h_kv * p.k_stride_h;
    const uint8_t* gV = static_cast<const uint8_t*>(p.v) +
                        (b * p.v_stride_b + h_kv * p.v_stride_h) * kVElemBytes;
    const int64_t v_row_bytes = p.v_stride_row * kVElemBytes;
    const float* gKScale = p.k_scale + b * p.k_scale_stride_b + h_kv * p.k_scale_stride_h;

    auto load_kv_tile = [&](int n, int stage) {
      const int kv0 = n * kBlockN;
      copy_tile_async<kBlockN, kQkRowBytes>(sK + stage * kSmemK, gK + kv0 * p.k_stride_s,
                                            p.k_stride_s, s_kv - kv0, tid);
      if constexpr (kVIsF16) {
        copy_tile_async<kBlockN, kVRowBytes>(sV + stage * kSmemV, gV + kv0 * v_row_bytes,
                                             v_row_bytes, s_kv - kv0, tid);
      } else {  // d rows of 64 token bytes; tokens past s_kv are the format's zero padding
        copy_tile_async<kHeadDim, kVRowBytes>(sV + stage * kSmemV, gV + kv0, v_row_bytes,
                                              kHeadDim, tid);
      }
      if (tid < kBlockN) {
        const int tok = kv0 + tid;
        const bool ok = tok < s_kv;
        const float* src = gKScale + (ok ? scale_group(tok, p.k_granularity, p.k_block, false) : 0);
        cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(
            *reinterpret_cast<const uint32_t*>(src),
            *reinterpret_cast<uint32_t*>(sKScale + stage * kBlockN + tid), ok);
      }
    };

    // ---- prologue: Q tile (+ Q block mean) and KV tile 0 -----------------------------------
    copy_tile_async<kBlockM, kQkRowBytes>(sQ, gQ, p.q_stride_s, q_valid, tid);
    if constexpr (Recipe::kQSmoothing) {
      // q_mean_block is a multiple of kBlockM (checked by the binding): one mean per CTA.
      const float* gQMean = p.q_mean + b * p.q_mean_stride_b + h * p.q_mean_stride_h +
                            int64_t(q0 / p.q_mean_block) * p.q_mean_stride_blk;
      for (int c = tid; c < kHeadDim; c += kNumThreads) sQMean[c] = gQMean[c];
    }
    if (n_tiles > 0) load_kv_tile(0, 0);
    cute::cp_async_fence();
    cute::cp_async_wait<0>();
    __syncthreads();

    // Q fragments (A of the QK MMA) stay in registers for the whole KV loop.
    uint32_t tSrQ[kQkKSteps][4];
#pragma unroll
    for (int ks = 0; ks < kQkKSteps; ++ks) {
      ldsm_x4(sQ + SwQk::offset(warp * kWarpRows + lane % 16, ks * kMmaKBytes + (lane / 16) * 16),
              tSrQ[ks]);
    }

    // This thread's two rows (g and g+8 of the warp's m16 tile), their Q scales with the softmax
    // scale and log2(e) folded in (rows past s_q: scale 0, never written).
    int row_idx[2];
    float q_scale_log2[2];
    const float* gQScale = p.q_scale + b * p.q_scale_stride_b + h * p.q_scale_stride_h;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_idx[r] = q0 + warp * kWarpRows + g + 8 * r;
      q_scale_log2[r] = row_idx[r] < s_q
                            ? gQScale[scale_group(row_idx[r], p.q_granularity, p.q_block, true)] *
                                  p.softmax_scale_log2
                            : 0.f;
    }

    float tOrO[kOTiles][4];  // O accumulator, FP32: rows {g, g+8} x channels {8j+2t, 8j+2t+1}
#pragma unroll
    for (int j = 0; j < kOTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) tOrO[j][e] = 0.f;
    float row_max[2] = {kNegInf, kNegInf};  // running max of S (log2 domain)
    float row_sum[2] = {0.f, 0.f};          // this thread's partial of l (quad-reduced at the end)

    // Lane parts of the ldmatrix addresses. K and 8-bit V^T: matrices (rows +0/+8, bytes +0/+16)
    // = lanes 0-7, 8-15 (bytes +16), 16-23 (rows +8), 24-31; FP16 V (.trans): lanes 8-15 take
    // rows +8, lanes 16-31 the next 8 channels (bytes +16).
    const uint32_t smem_u32 = cute::cast_smem_ptr_to_uint(smem);
    const int k_lane_swz = SwQk::offset((lane / 16) * 8 + lane % 8, ((lane / 8) % 2) * 16);
    const int v_lane_swz = kVIsF16 ? SwV::offset(((lane / 8) % 2) * 8 + lane % 8, (lane / 16) * 16)
                                   : SwV::offset((lane / 16) * 8 + lane % 8, ((lane / 8) % 2) * 16);

    // ---- mainloop over KV tiles ---------------------------------------------------------------
    for (int n = 0; n < n_tiles; ++n) {
      const int stage = n & 1;
      if (n + 1 < n_tiles) load_kv_tile(n + 1, stage ^ 1);
      cute::cp_async_fence();
      cute::cp_async_wait<1>();  // tile n has landed (tile n+1 may still be in flight)
      __syncthreads();

      const uint8_t* sKs = sK + stage * kSmemK;
      uint8_t* sVs = sV + stage * kSmemV;
      // ldmatrix lane offsets inside this stage's K and V tiles (see swizzled_addr).
      const int k_lane_off = stage * kSmemK + k_lane_swz;
      const int v_lane_off = stage * kSmemV + v_lane_swz;
      const float* sKScaleS = sKScale + stage * kBlockN;
      float* sDeltaSS = sDeltaS + stage * kBlockN;

      if constexpr (kVBf16ToF16) {
        // Unrolled (the trip count is constant): nvcc already did so for sm_80-90a (identical
        // SASS), but not for sm_100a-121a, where the rolled loop cost registers (120a d=64: 8 B
        // spilled, two local loads per KV tile; docs/perf/sm80_family_blackwell.md).
#pragma unroll
        for (int i = tid; i < kSmemV / kChunkBytes; i += kNumThreads) {
          uint4* chunk = reinterpret_cast<uint4*>(sVs) + i;
          uint4 w = *chunk;
          w.x = bf16x2_to_f16x2(w.x);
          w.y = bf16x2_to_f16x2(w.y);
          w.z = bf16x2_to_f16x2(w.z);
          w.w = bf16x2_to_f16x2(w.w);
          *chunk = w;
        }
      }
      if constexpr (Recipe::kQSmoothing) {
        // dS[col] = q_mean . dequant(K[col]) (GEMV on the smem tile), scaled to the log2 domain.
        if (tid < kBlockN) {
          float acc = 0.f;
#pragma unroll 2
          for (int ch = 0; ch < kQkRowBytes / kChunkBytes; ++ch) {
            const uint4 w = *reinterpret_cast<const uint4*>(sKs + SwQk::offset(tid, ch * kChunkBytes));
            const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int wi = 0; wi < 4; ++wi)
#pragma unroll
              for (int nib = 0; nib < 8; ++nib) {
                const int val = int(words[wi] << (28 - 4 * nib)) >> 28;  // sign-extend nibble
                acc += sQMean[ch * 32 + wi * 8 + nib] * float(val);
              }
          }
          sDeltaSS[tid] = acc * sKScaleS[tid] * p.softmax_scale_log2;
        }
      }
      if constexpr (kVBf16ToF16 || Recipe::kQSmoothing) __syncthreads();

      // ---- S = Q K^T (INT32) ---------------------------------------------------------------
      uint32_t tSrS[kSTiles][4];
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) tSrS[j][e] = 0u;
#pragma unroll
      for (int ks = 0; ks < kQkKSteps; ++ks) {
#pragma unroll
        for (int j = 0; j < kSTiles; j += 2) {
          uint32_t bk[4];  // B fragments (b0, b1) of n-tiles j and j+1
          ldsm_x4(swizzled_addr<kQkRowBytes>(smem_u32 + kOffK, k_lane_off, j * 8, ks * kMmaKBytes),
                  bk);
          QkMma::fma(tSrS[j][0], tSrS[j][1], tSrS[j][2], tSrS[j][3], tSrQ[ks][0], tSrQ[ks][1],
                     tSrQ[ks][2], tSrQ[ks][3], bk[0], bk[1], tSrS[j][0], tSrS[j][1], tSrS[j][2],
                     tSrS[j][3]);
          QkMma::fma(tSrS[j + 1][0], tSrS[j + 1][1], tSrS[j + 1][2], tSrS[j + 1][3], tSrQ[ks][0],
                     tSrQ[ks][1], tSrQ[ks][2], tSrQ[ks][3], bk[2], bk[3], tSrS[j + 1][0],
                     tSrS[j + 1][1], tSrS[j + 1][2], tSrS[j + 1][3]);
        }
      }

      // ---- dequantize into the log2 domain, mask -------------------------------------------
      float s[kSTiles][4];
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = j * 8 + 2 * t4 + (e & 1);
          s[j][e] = float(int32_t(tSrS[j][e])) * q_scale_log2[e >> 1] * sKScaleS[col];
          if constexpr (Recipe::kQSmoothing) s[j][e] += sDeltaSS[col];
        }
      const int kv0 = n * kBlockN;
      const bool need_mask =
          kv0 + kBlockN > s_kv || (p.is_causal && kv0 + kBlockN - 1 > q0 + causal_off);
      if (need_mask) {
#pragma unroll
        for (int j = 0; j < kSTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = kv0 + j * 8 + 2 * t4 + (e & 1);
            if (col >= s_kv || (p.is_causal && col > row_idx[e >> 1] + causal_off)) {
              s[j][e] = kNegInf;
            }
          }
      }

      // ---- online softmax (exp2); s becomes P (or P~ for e4m3) ------------------------------
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = kNegInf;
#pragma unroll
        for (int j = 0; j < kSTiles; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));  // the 4 threads of a quad share rows
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
        const float m_new = fmaxf(row_max[r], mx);
        const float m_base = m_new == kNegInf ? 0.f : m_new;  // fully masked so far: no NaN
        alpha[r] = ex2_approx(row_max[r] - m_base);
        row_max[r] = m_new;
        row_sum[r] *= alpha[r];
        const float bias = Recipe::kPLog2Bias - m_base;
#pragma unroll
        for (int j = 0; j < kSTiles; ++j)
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            s[j][e] = ex2_approx(s[j][e] + bias);
            row_sum[r] += s[j][e];  // l from the FP32 P, before P is rounded
          }
      }

      // ---- O += P V ------------------------------------------------------------------------
      if constexpr (Recipe::kPv == PvMath::kF16) {
        if constexpr (!Recipe::kPvF16Buffer) {
#pragma unroll
          for (int j = 0; j < kOTiles; ++j) {
            tOrO[j][0] *= alpha[0];
            tOrO[j][1] *= alpha[0];
            tOrO[j][2] *= alpha[1];
            tOrO[j][3] *= alpha[1];
          }
        }
        uint32_t tOrP[kBlockN / kF16KKeys][4];  // A of m16n8k16: S n-tiles 2kk, 2kk+1
#pragma unroll
        for (int kk = 0; kk < kBlockN / kF16KKeys; ++kk) {
          tOrP[kk][0] = pack_f16x2(s[2 * kk][0], s[2 * kk][1]);
          tOrP[kk][1] = pack_f16x2(s[2 * kk][2], s[2 * kk][3]);
          tOrP[kk][2] = pack_f16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          tOrP[kk][3] = pack_f16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }
        if constexpr (Recipe::kPvF16Buffer) {
#pragma unroll
          for (int j = 0; j < kOTiles; j += 2) {
            pv_pair_f16_buffer(tOrP, j, alpha, tOrO, [&](int kk, uint32_t (&bv)[4]) {
              ldsm_x4_trans(swizzled_addr<kVRowBytes>(smem_u32 + kOffV, v_lane_off, kk * kF16KKeys,
                                                      j * kChunkBytes),
                            bv);
            });
          }
        } else {
#pragma unroll
          for (int kk = 0; kk < kBlockN / kF16KKeys; ++kk) {
#pragma unroll
            for (int j = 0; j < kOTiles; j += 2) {
              uint32_t bv[4];  // V^T fragments (b0, b1) of channel tiles j and j+1
              ldsm_x4_trans(swizzled_addr<kVRowBytes>(smem_u32 + kOffV, v_lane_off, kk * kF16KKeys,
                                                      j * kChunkBytes),
                            bv);
              cute::SM80_16x8x16_F32F16F16F32_TN::fma(
                  tOrO[j][0], tOrO[j][1], tOrO[j][2], tOrO[j][3], tOrP[kk][0], tOrP[kk][1],
                  tOrP[kk][2], tOrP[kk][3], bv[0], bv[1], tOrO[j][0], tOrO[j][1], tOrO[j][2],
                  tOrO[j][3]);
              cute::SM80_16x8x16_F32F16F16F32_TN::fma(
                  tOrO[j + 1][0], tOrO[j + 1][1], tOrO[j + 1][2], tOrO[j + 1][3], tOrP[kk][0],
                  tOrP[kk][1], tOrP[kk][2], tOrP[kk][3], bv[2], bv[3], tOrO[j + 1][0],
                  tOrO[j + 1][1], tOrO[j + 1][2], tOrO[j + 1][3]);
            }
          }
        }
      } else {
        using PvMma = typename Recipe::PvMma;
        using BufT = std::conditional_t<Recipe::kPv == PvMath::kS8, uint32_t, float>;
        uint32_t tOrP[kBlockN / k8bitKKeys][4];  // A of m16n8k32: S n-tiles 4kk..4kk+3
#pragma unroll
        for (int kk = 0; kk < kBlockN / k8bitKKeys; ++kk) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {  // slots 0..15 / 16..31 of the 32-key chunk
            const int j0 = 4 * kk + 2 * half;
            if constexpr (Recipe::kPv == PvMath::kS8) {
              tOrP[kk][2 * half] = pack_p_s8x4(s[j0][0], s[j0][1], s[j0 + 1][0], s[j0 + 1][1]);
              tOrP[kk][2 * half + 1] = pack_p_s8x4(s[j0][2], s[j0][3], s[j0 + 1][2], s[j0 + 1][3]);
            } else {
              tOrP[kk][2 * half] = pack_p_e4m3x4(s[j0][0], s[j0][1], s[j0 + 1][0], s[j0 + 1][1]);
              tOrP[kk][2 * half + 1] =
                  pack_p_e4m3x4(s[j0][2], s[j0][3], s[j0 + 1][2], s[j0 + 1][3]);
            }
          }
        }
#pragma unroll
        for (int j = 0; j < kOTiles; j += 2) {
          if constexpr (Recipe::kPvF16Buffer) {
            pv_pair_f16_buffer(tOrP, j, alpha, tOrO, [&](int kk, uint32_t (&bv)[4]) {
              ldsm_x4(swizzled_addr<kVRowBytes>(smem_u32 + kOffV, v_lane_off, j * 8, kk * kMmaKBytes),
                      bv);
            });
          } else {
            // Two-level accumulation: this tile's P V in a fresh buffer (INT32 exact for s8,
            // FP32 for e4m3), then O = O * alpha + buf on CUDA cores.
            BufT buf[2][4];
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
              for (int e = 0; e < 4; ++e) buf[i][e] = BufT(0);
#pragma unroll
            for (int kk = 0; kk < kBlockN / k8bitKKeys; ++kk) {
              uint32_t bv[4];  // V^T rows = channels j*8.., (j+1)*8..; 32 permuted token bytes
              ldsm_x4(swizzled_addr<kVRowBytes>(smem_u32 + kOffV, v_lane_off, j * 8, kk * kMmaKBytes),
                      bv);
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                PvMma::fma(buf[i][0], buf[i][1], buf[i][2], buf[i][3], tOrP[kk][0], tOrP[kk][1],
                           tOrP[kk][2], tOrP[kk][3], bv[2 * i], bv[2 * i + 1], buf[i][0], buf[i][1],
                           buf[i][2], buf[i][3]);
              }
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                float add;
                if constexpr (Recipe::kPv == PvMath::kS8) {
                  add = float(int32_t(buf[i][e]));  // |.| <= 64*127*127 < 2^24: exact
                } else {
                  add = buf[i][e];
                }
                tOrO[j + i][e] = tOrO[j + i][e] * alpha[e >> 1] + add;
              }
          }
        }
      }
      __syncthreads();  // every warp is done with this stage before it is refilled
    }

    // ---- epilogue: O / l (x V scale), LSE ----------------------------------------------------
    OutT* gO = static_cast<OutT*>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
    // The thread's V channel scales, loaded before any store: interleaved with the stores the
    // loads were serialized (possible aliasing), one memory round trip per 8 channels.
    float vscale[kOTiles][2];
#pragma unroll
    for (int j = 0; j < kOTiles; ++j) vscale[j][0] = vscale[j][1] = 1.f;
    if constexpr (!kVIsF16) {
      const float* gVScale = p.v_scale + b * p.v_scale_stride_b + h_kv * p.v_scale_stride_h;
#pragma unroll
      for (int j = 0; j < kOTiles; ++j) {
        vscale[j][0] = __ldg(gVScale + j * 8 + 2 * t4);
        vscale[j][1] = __ldg(gVScale + j * 8 + 2 * t4 + 1);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[r];
      l += __shfl_xor_sync(kFullMask, l, 1);
      l += __shfl_xor_sync(kFullMask, l, 2);
      const int row = row_idx[r];
      if (row >= s_q) continue;
      // l == 0: fully masked row -> O = 0. A NaN l (NaN input) keeps NaN.
      const float inv_l = l == 0.f ? 0.f : 1.f / (l * Recipe::kPScale);
      OutT* gOrow = gO + int64_t(row) * p.o_stride_s;
#pragma unroll
      for (int j = 0; j < kOTiles; ++j) {
        const int c = j * 8 + 2 * t4;
        float f0 = inv_l, f1 = inv_l;
        if constexpr (!kVIsF16) {
          f0 *= vscale[j][0];
          f1 *= vscale[j][1];
        }
        store_pair(gOrow + c, tOrO[j][2 * r] * f0, tOrO[j][2 * r + 1] * f1);
      }
      if (p.lse != nullptr && t4 == 0) {
        p.lse[b * p.lse_stride_b + h * p.lse_stride_h + row] =
            l == 0.f ? kNegInf : (row_max[r] + log2f(l) - Recipe::kPLog2Bias) * kLn2;
      }
    }
  }
};

template <class Mainloop>
__global__ void __launch_bounds__(kNumThreads) sm80_attn_fwd_kernel(const Sm80AttnFwdParams p) {
#if defined(__CUDA_ARCH__)
  // e4m3 recipes are compiled to an empty kernel below sm_89 (and the FP8 FP16-accumulate one
  // without CUDA 12.8); the binding refuses those GPUs / builds.
  if constexpr (__CUDA_ARCH__ >= Mainloop::Recipe::kMinArch && Mainloop::Recipe::kToolkitSupported) {
    extern __shared__ __align__(128) uint8_t sage_sm80_smem[];
    Mainloop::run(p, sage_sm80_smem);
  }
#endif
}

}  // namespace detail

template <Sm80Recipe R, int kHeadDim, Sm80IoDtype kIo>
cudaError_t sm80_attn_fwd_run(const Sm80AttnFwdParams& p, cudaStream_t stream) {
  using OutT = std::conditional_t<kIo == Sm80IoDtype::kF16, __half, __nv_bfloat16>;
  using Mainloop = detail::Sm80AttnFwdMainloop<typename RecipeOf<R>::type, kHeadDim, OutT>;
  auto kernel = &detail::sm80_attn_fwd_kernel<Mainloop>;
  constexpr int kSmem = Mainloop::kSmemBytes;
  constexpr int kDefaultSmemLimit = 48 * 1024;
  if constexpr (kSmem > kDefaultSmemLimit) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((p.seqlen_q + detail::kBlockM - 1) / detail::kBlockM, p.heads_q, p.batch);
  kernel<<<grid, detail::kNumThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <Sm80Recipe R, int kHeadDim, Sm80IoDtype kIo>
int sm80_attn_fwd_smem_bytes() {
  using OutT = std::conditional_t<kIo == Sm80IoDtype::kF16, __half, __nv_bfloat16>;
  return detail::Sm80AttnFwdMainloop<typename RecipeOf<R>::type, kHeadDim, OutT>::kSmemBytes;
}

}  // namespace sage::sm80

// One configuration per translation unit (kernels/src/sm80/*.cu):
#define SAGE_SM80_ATTN_FWD_INSTANTIATE(RECIPE, HDIM, IO)                                         \
  template cudaError_t sage::sm80::sm80_attn_fwd_run<sage::sm80::Sm80Recipe::RECIPE, HDIM,        \
                                                     sage::sm80::Sm80IoDtype::IO>(                \
      const sage::sm80::Sm80AttnFwdParams&, cudaStream_t);                                        \
  template int sage::sm80::sm80_attn_fwd_smem_bytes<sage::sm80::Sm80Recipe::RECIPE, HDIM,         \
                                                    sage::sm80::Sm80IoDtype::IO>();
