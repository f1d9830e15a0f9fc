// Collective epilogue of the Hopper forward for E4M3 V: per row 1/l, per channel V's scale (and
// V's mean under V smoothing), stores straight from the O accumulator registers (4-byte stores,
// rows of a thread 8 apart), natural-log LSE. Only the first d_out columns of O are stored (a head
// dim zero-padded inside the quantizer: o has the call's head dim, the padded columns are 0 anyway).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sage/sm90/collective/sm90_attn_fwd_softmax_online.hpp"
#include "sage/sm90/kernel/sm90_attn_fwd_tile_scheduler.hpp"
#include "sage/sm90/sm90_attn_fwd_qk_s8_pv_e4m3_params.hpp"
#include "sage/sm90/sm90_attn_fwd_train_s8_params.hpp"

namespace sage::sm90 {

// ---- output dtype tags -------------------------------------------------------------------------
struct OutF16 {
  using T = __half;
#if defined(__CUDACC__)
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
#endif
};
struct OutBF16 {
  using T = __nv_bfloat16;
#if defined(__CUDACC__)
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
#endif
};

// kVChannelScale: O is in V's per-channel quantized units (qk_s8_pv_e4m3: times v_scale, plus
// v_mean under V smoothing); false: O is already dequantized by the mainloop (train_s8's per-block
// V scales are folded per KV tile), only 1/l applies.
template <int kHeadDim_, class OutTag_, bool kVChannelScale = true>
struct CollectiveEpilogueFwdSm90StoreRegs {
  static constexpr int kHeadDim = kHeadDim_;
  using OutTag = OutTag_;

  struct Params {
    void* o;
    int64_t o_stride_b, o_stride_h, o_stride_s;  // elements
    float* lse;                                  // nullptr = not wanted
    int64_t lse_stride_b, lse_stride_h;
    const float* v_scale;  // (b, h_kv, d)
    const float* v_mean;   // (b, h_kv, d) or nullptr
    int seq_q, heads_q, heads_kv;
    int d_out;             // columns of o stored: a multiple of 8 in [8, kHeadDim]
  };

  static Params to_params(const AttnFwdQkS8PvE4m3Args& a) {
    return Params{a.o, a.o_stride_b, a.o_stride_h, a.o_stride_s, a.lse, a.lse_stride_b, a.lse_stride_h,
                  a.v_scale, a.v_mean, a.seq_q, a.heads_q, a.heads_kv,
                  a.head_dim_out > 0 && a.head_dim_out < kHeadDim ? a.head_dim_out : kHeadDim};
  }
  static Params to_params(const AttnFwdTrainS8Args& a) {
    static_assert(!kVChannelScale, "train_s8 has no per-channel V scale");
    return Params{a.o, a.o_stride_b, a.o_stride_h, a.o_stride_s, a.lse, a.lse_stride_b, a.lse_stride_h,
                  nullptr, nullptr, a.seq_q, a.heads_q, a.heads_kv, kHeadDim};
  }

#if defined(__CUDACC__)
  // Rows [row_begin, row_begin + 64) of the tile's head, held by one consumer warpgroup in
  // WgmmaAccumMap order; thread tid of 128. A row with l == 0 (no visible key) gets 0 and LSE
  // -inf; NaN in l stays NaN.
  template <class FragO, class Softmax>
  static __device__ void store(const Params& p, const AttnFwdTile& t, int row_begin, int tid, const FragO& tOrO,
                               const Softmax& sm) {
    constexpr int D = kHeadDim;
    const WgmmaAccumMap map(tid);
    const int bh_kv = t.batch * p.heads_kv + t.head / (p.heads_q / p.heads_kv);
    // All V scale / mean loads are issued before the first store: interleaved with the stores they
    // were serialized (the compiler may not move a load above a store that could alias it), one
    // L2 round trip per 8 channels, ~17k cycles per CTA on an H100 = 7 KV tiles.
    const float* vs = kVChannelScale ? p.v_scale + int64_t(bh_kv) * D + map.col0 : nullptr;
    const float* vm = kVChannelScale && p.v_mean != nullptr ? p.v_mean + int64_t(bh_kv) * D + map.col0 : nullptr;
    float2 v2[D / 8], m2[D / 8];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      v2[j] = kVChannelScale ? __ldg(reinterpret_cast<const float2*>(vs + 8 * j)) : make_float2(1.f, 1.f);
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      m2[j] = kVChannelScale && vm != nullptr ? __ldg(reinterpret_cast<const float2*>(vm + 8 * j))
                                              : make_float2(0.f, 0.f);
    }
    using OutT = typename OutTag::T;
    OutT* o_head = static_cast<OutT*>(p.o) + int64_t(t.batch) * p.o_stride_b + int64_t(t.head) * p.o_stride_h;
    // Quad shuffles: every lane takes part, before any row is skipped.
    const float row_l[2] = {sm.row_sum(0), sm.row_sum(1)};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row_begin + map.row0 + 8 * half;
      if (row >= p.seq_q) continue;
      const float l = row_l[half];
      const float inv_l = l == 0.f ? 0.f : 1.f / l;
      const float has_l = l == 0.f ? 0.f : 1.f;  // V smoothing's mean only where a key was seen
      OutT* o_row = o_head + int64_t(row) * p.o_stride_s + map.col0;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        // Columns 8j + col0 + {0, 1}: with d_out a multiple of 8, the pair is in iff 8j < d_out.
        if (8 * j >= p.d_out) continue;
        const int i = WgmmaAccumMap::index(j, half, 0);
        *reinterpret_cast<uint32_t*>(o_row + 8 * j) =
            OutTag::pack2(fmaf(m2[j].x, has_l, tOrO(i) * inv_l * v2[j].x),
                          fmaf(m2[j].y, has_l, tOrO(i + 1) * inv_l * v2[j].y));
      }
    }
    if (p.lse != nullptr && map.col0 == 0) {
      float* lse_head = p.lse + int64_t(t.batch) * p.lse_stride_b + int64_t(t.head) * p.lse_stride_h;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row_begin + map.row0 + 8 * half;
        if (row < p.seq_q) lse_head[row] = sm.lse(half, row_l[half]);
      }
    }
  }
#endif  // __CUDACC__
};

}  // namespace sage::sm90
