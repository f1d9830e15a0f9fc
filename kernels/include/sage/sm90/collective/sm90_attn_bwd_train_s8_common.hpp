// Pieces the two Hopper train_s8 backward mainloops (dK/dV and dQ) share: the 16-bit wgmma
// element of an output dtype, one committed wgmma batch, INT8 quantization of a register tile with
// one scale per tile (the recipe's P and dS tiles of 128 queries x 64 keys), the repacking of an
// accumulator tile's codes into a k32 register A fragment, and the store of an f32 accumulator.
// Include after sage/sm90/sm90_tma_desc.hpp (driver typedefs before CUTLASS).
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "sage/common/div_rn.cuh"
#include "sage/sm90/sm90_attn_bwd_train_s8_params.hpp"
#include "sage/sm90/sm90_tma_desc.hpp"
#include "sage/sm90/collective/sm90_attn_fwd_epilogue_store_regs.hpp"  // OutF16 / OutBF16
#include "sage/sm90/collective/sm90_attn_fwd_softmax_online.hpp"       // WgmmaAccumMap

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

namespace sage::sm90 {

// What both backward mainloops (dK/dV and dQ) are built on: the tiles of the recipe, the element
// and shared-memory atoms of their operands, and the Params fields they both read.
template <int kHeadDim_, class OutTag_>
struct BwdSm90TrainS8Base {
  static_assert(kHeadDim_ == 64 || kHeadDim_ == 128, "head dim 64 or 128");
  static constexpr int D = kHeadDim_;
  using OutTag = OutTag_;
  // The CUTLASS type of the 16-bit operands (V, dO): the output's dtype.
  using Elem = std::conditional_t<std::is_same_v<OutTag, OutBF16>, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kNumConsumerWG = 2;
  static constexpr int kEmptyArrivals = 8;            // lane 0 of each consumer warp
  static constexpr int kBlockQ = kSm90TrainBlockQ;    // 128 queries: the recipe's P / dS tile
  static constexpr int kBlockKV = kSm90TrainBlockKV;  // 64 keys
  // Rows of d INT8 (Q^, K^) and of 64 16-bit elements (128 bytes: V and dO, in 64-column boxes).
  using AtomRowsS8 = std::conditional_t<D == 128, cute::GMMA::Layout_K_SW128_Atom<int8_t>,
                                        cute::GMMA::Layout_K_SW64_Atom<int8_t>>;
  static constexpr CUtensorMapSwizzle kSwizzleRowsS8 = D == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  using Atom16 = cute::GMMA::Layout_K_SW128_Atom<Elem>;
  static constexpr CUtensorMapDataType kTma16 = CU_TENSOR_MAP_DATA_TYPE_UINT16;

  struct ParamsBase {
    const float* lse2;
    const float* delta;
    const float* q_scale;
    const float* k_scale;
    float scale_log2, sm_scale;
    int batch, seq_q, seq_kv, heads_q, heads_kv, q_blocks, kv_blocks, s_q_pad;
    bool causal;
  };
  static void fill_base(const AttnBwdTrainS8Args& a, ParamsBase& p) {
    p.lse2 = a.lse2;
    p.delta = a.delta;
    p.q_scale = a.q_scale;
    p.k_scale = a.k_scale;
    p.scale_log2 = a.sm_scale * kLog2e;
    p.sm_scale = a.sm_scale;
    p.batch = a.batch;
    p.seq_q = a.seq_q;
    p.seq_kv = a.seq_kv;
    p.heads_q = a.heads_q;
    p.heads_kv = a.heads_kv;
    p.q_blocks = int(sm90_train_q_blocks(a.seq_q));
    p.kv_blocks = int(sm90_train_kv_blocks(a.seq_kv));
    p.s_q_pad = int(sm90_train_q_pad(a.seq_q));
    p.causal = a.mask == MaskKind::kCausal;
  }
};

#if defined(__CUDACC__)

// C (+)= A(:, :, kb) B(:, :, kb) over the k-blocks (A in shared memory or registers, B in shared
// memory, both already sliced to their stage), ScaleOut::Zero on the first: fenced, committed,
// not waited for.
template <class TiledMma, class FragA, class FragB, class FragC>
__device__ __forceinline__ void wgmma_batch(TiledMma& mma, const FragA& a, const FragB& b, FragC& c,
                                            cute::GMMA::ScaleOut first) {
  cute::warpgroup_fence_operand(c);
  cute::warpgroup_arrive();
  mma.accumulate_ = first;
  CUTE_UNROLL
  for (int kb = 0; kb < cute::size<2>(a); ++kb) {
    cute::gemm(mma, a(cute::_, cute::_, kb), b(cute::_, cute::_, kb), c);
    mma.accumulate_ = cute::GMMA::ScaleOut::One;
  }
  cute::warpgroup_commit_batch();
}

// max |x| over the kThreads threads of named barrier `bar` (warps [warp0, warp0 + kThreads/32) of
// the CTA write slots red[warp - warp0]; `red` alternates between two buffers by the caller's
// step parity so a fast warp's next write never meets a slow warp's read).
template <int kThreads, int kN>
__device__ __forceinline__ float tile_amax(const float (&x)[kN], float* red, uint32_t bar, int local_warp) {
  float a = 0.f;
  CUTE_UNROLL
  for (int i = 0; i < kN; ++i) a = fmaxf(a, fabsf(x[i]));
  CUTE_UNROLL
  for (int o = 16; o > 0; o /= 2) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  if (threadIdx.x % 32 == 0) red[local_warp] = a;
  cutlass::arch::NamedBarrier::sync(kThreads, bar);
  float r = red[0];
  CUTE_UNROLL
  for (int w = 1; w < kThreads / 32; ++w) r = fmaxf(r, red[w]);
  return r;
}

// The recipe's symmetric INT8 scale of a group with maximum |x| = amax: amax / 127 (IEEE), 1 if 0.
__device__ __forceinline__ float int8_scale(float amax) { return amax == 0.f ? 1.f : __fdiv_rn(amax, 127.f); }

// codes[i] (low byte) = rne(x[i] / s) bit for bit as the IEEE quotient (|x| <= 127 s: no clamp).
template <int kN>
__device__ __forceinline__ void int8_codes(const float (&x)[kN], float s, uint32_t (&codes)[kN]) {
  if (div_rn_fast_ok(s)) {
    const float y = __frcp_rn(s);
    CUTE_UNROLL
    for (int i = 0; i < kN; ++i) codes[i] = __float_as_uint(__fadd_rn(div_rn_fast(x[i], s, y), kRoundMagic));
  } else {
    CUTE_UNROLL
    for (int i = 0; i < kN; ++i) codes[i] = uint32_t(__float2int_rn(__fdiv_rn(x[i], s)));
  }
}

// Codes of an m64 x kCols accumulator tile (WgmmaAccumMap order) -> the register A fragment of a
// k32 8-bit wgmma over those kCols columns as its K (the B operand's K is permuted inside every 32
// as v_e4m3_t_perm32, so a thread's own values are its fragment): word 4c + w of k-chunk c.
template <int kCols, class FragA32>
__device__ __forceinline__ void pack_codes_a_k32(const uint32_t (&code)[kCols / 2], FragA32& a) {
  CUTE_UNROLL
  for (int c = 0; c < kCols / 32; ++c) {
    const int b = 16 * c;  // 4 * (first column group 4c)
    a(4 * c + 0) = pack_low_bytes(code[b + 0], code[b + 1], code[b + 4], code[b + 5]);
    a(4 * c + 1) = pack_low_bytes(code[b + 2], code[b + 3], code[b + 6], code[b + 7]);
    a(4 * c + 2) = pack_low_bytes(code[b + 8], code[b + 9], code[b + 12], code[b + 13]);
    a(4 * c + 3) = pack_low_bytes(code[b + 10], code[b + 11], code[b + 14], code[b + 15]);
  }
}

// Whether any of the four threads of a quad (which hold the same two accumulator rows) says so.
__device__ __forceinline__ bool quad_any(bool x) {
  int v = x;
  v |= __shfl_xor_sync(0xffffffffu, v, 1);
  v |= __shfl_xor_sync(0xffffffffu, v, 2);
  return v != 0;
}

// acc (m64 x kCols f32, WgmmaAccumMap order) times `mul` -> rows [row_begin, row_begin + 64) of a
// 16-bit matrix at `base` (row stride in elements), rows >= row_limit skipped, rows with nan_row
// (the thread's row0 / row0 + 8) stored as NaN; 4-byte stores.
template <class OutTag, int kCols, class Frag>
__device__ __forceinline__ void store_accum_rows(const Frag& acc, void* base, int64_t row_stride, int row_begin,
                                                 int row_limit, int tid, float mul, const bool (&nan_row)[2]) {
  using T = typename OutTag::T;
  const WgmmaAccumMap map(tid);
  CUTE_UNROLL
  for (int half = 0; half < 2; ++half) {
    const int r = row_begin + map.row0 + 8 * half;
    if (r >= row_limit) continue;
    T* row = static_cast<T*>(base) + int64_t(r) * row_stride;
    CUTE_UNROLL
    for (int j = 0; j < kCols / 8; ++j) {
      const int i = WgmmaAccumMap::index(j, half, 0);
      const float a0 = nan_row[half] ? NAN : __fmul_rn(acc(i), mul);
      const float a1 = nan_row[half] ? NAN : __fmul_rn(acc(i + 1), mul);
      *reinterpret_cast<uint32_t*>(row + 8 * j + map.col0) = OutTag::pack2(a0, a1);
    }
  }
}

#endif  // __CUDACC__

}  // namespace sage::sm90
