// Collective mainloop of the Hopper (sm_90a) forward, recipe `qk_s8_pv_e4m3` (SageAttention2
// 8-bit), warp-specialized: a producer thread streams Q once and K / V^T tiles through TMA into
// CUTLASS PipelineTmaAsync rings; each of two consumer warpgroups owns 64 query rows and runs
//   S   = Q_s8 K_s8^T                       wgmma s8*s8 -> s32, both operands in smem (SS)
//   P~  = exp2(S*c - m + log2 448) -> E4M3  (OnlineSoftmaxS32Sm90; c folds all scales)
//   buf = P~ V_e4m3                          wgmma e4m3*e4m3 -> f32, P from registers (RS),
//                                            fresh accumulator per KV tile
//   O   = O * exp2(m_old - m_new) + buf      two-level accumulation on the CUDA cores
// and leaves O (unnormalized, in V's quantized units) and the row statistics to the epilogue.
//
// Schedule (FA3-style): QK(n) and PV(n-1) are issued back to back and softmax(n) runs while
// PV(n-1) is on the tensor cores (intra-warpgroup overlap); the consumer warpgroups take turns
// issuing their GEMMs through named barriers (ping-pong with two, round robin with three), so one
// warpgroup's GEMMs overlap the others' softmax. Schedules that lost (no overlap, no ping-pong, exp2 on the FMA
// pipe, magic-number conversion, split max/sum chains, K-scale prefetch) are recorded with their
// measurements in docs/perf/sm90_qk_s8_pv_e4m3.md and are not in the code.
//
// P from registers needs no shuffles: the s32/f32 accumulator gives thread t (= lane % 4) the key
// columns {2t, 2t+1, 8+2t, 9+2t, 16+2t, 17+2t, 24+2t, 25+2t} of every 32-key chunk, the 8-bit
// A operand of a k32 wgmma wants logical k {4t..4t+3, 16+4t..19+4t}. The fused quantizer stores
// V^T with its tokens permuted inside each 32-token chunk (quant-formats.md, v_e4m3_t_perm32) so
// that logical k = 4t+i (i<4) holds token 2t + 8*(i/2) + i%2 (and +16 for the upper half): the
// thread's own P values are exactly its A fragment, in register order.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <type_traits>

// Before any CUTLASS header: cutlass/cuda_host_adapter.hpp includes <cudaTypedefs.h> inside
// namespace cutlass, which would hide the global PFN_* typedefs that driver_api.hpp needs.
#include "sage/common/arch.hpp"
#include "sage/common/cvt_e4m3.cuh"
#include "sage/sm90/collective/sm90_attn_fwd_softmax_online.hpp"
#include "sage/sm90/kernel/sm90_attn_fwd_tile_scheduler.hpp"
#include "sage/sm90/sm90_attn_fwd_qk_s8_pv_e4m3_params.hpp"
#include "sage/sm90/sm90_tma_desc.hpp"
#include "sage/sm90/collective/sm90_attn_fwd_mainloop_tma_loads.hpp"

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace sage::sm90 {

// kNumConsumerWG consumer warpgroups of 64 rows each take turns on the tensor cores; with three
// (192-row tiles) two of them are in their softmax while one runs its GEMMs.
// kOneLevel (pv_accum="one_level"): P~V accumulates straight into O (O is rescaled by
// exp2(m_old - m_new) before each PV instead of folding a fresh per-tile accumulator into it):
// the FP22 accumulator then carries the whole row, and the 64 registers of the per-tile buffer
// at d=128 are free (what lets d=128 take three consumer warpgroups at 160 registers).
template <int kHeadDim_, int kNumConsumerWG_, bool kOneLevel_>
struct CollectiveMainloopFwdSm90QkS8PvE4m3
    : AttnFwdSm90TmaLoadsFor<kHeadDim_, kNumConsumerWG_, kSm90BlockKV> {
  static_assert(kHeadDim_ == 64 || kHeadDim_ == 128, "head dim 64 or 128");
  static_assert(kNumConsumerWG_ == 2 || kNumConsumerWG_ == 3, "2 or 3 consumer warpgroups");
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNumConsumerWG = kNumConsumerWG_;
  static constexpr bool kOneLevel = kOneLevel_;
  static constexpr int kRowsPerWG = 64;  // one wgmma m64 tile
  static constexpr int kBlockQ = kRowsPerWG * kNumConsumerWG;
  static constexpr int kBlockKV = kSm90BlockKV;  // also the per-thread K scale block
  static constexpr int kConsumerThreads = 128 * kNumConsumerWG;
  static constexpr int kConsumerWarps = kConsumerThreads / 32;
  static constexpr int kStages = 3;  // K and V^T ring depth (1 CTA/SM: smem is plentiful)
  // The empty barriers count one arrival per consumer warp (PipelineTmaAsync's num_consumers
  // without a cluster): lane 0 of each warp arrives after that warp's wgmma wait. (Every
  // consumer thread arriving, as in steps 1-5, made ptxas spill 12 B in the consumer.)
  static constexpr int kEmptyArrivals = kConsumerWarps;

  // Q/K rows are d bytes: 128 B rows take the 128-byte swizzle, 64 B rows the 64-byte one (the
  // TMA box's inner extent must not exceed the swizzle span). V^T rows are 128 tokens = 128 B.
  using SmemAtomQK = std::conditional_t<kHeadDim == 128, cute::GMMA::Layout_K_SW128_Atom<int8_t>,
                                        cute::GMMA::Layout_K_SW64_Atom<int8_t>>;
  static constexpr CUtensorMapSwizzle kSwizzleQK =
      kHeadDim == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  static constexpr CUtensorMapSwizzle kSwizzleV = CU_TENSOR_MAP_SWIZZLE_128B;

  using SmemLayoutQWG = decltype(cute::tile_to_shape(
      SmemAtomQK{}, cute::Shape<cute::Int<kRowsPerWG>, cute::Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      SmemAtomQK{}, cute::Shape<cute::Int<kBlockKV>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  using SmemLayoutVt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<cutlass::float_e4m3_t>{},
      cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockKV>, cute::Int<kStages>>{}));

  using TiledMmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<int8_t, int8_t, int32_t,
                                 cute::Shape<cute::Int<kRowsPerWG>, cute::Int<kBlockKV>, cute::Int<kHeadDim>>>()));
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<cutlass::float_e4m3_t, cutlass::float_e4m3_t, float,
                                 cute::Shape<cute::Int<kRowsPerWG>, cute::Int<kHeadDim>, cute::Int<kBlockKV>>>()));

  static constexpr uint32_t kQTileBytes = kBlockQ * kHeadDim;
  static constexpr uint32_t kKTileBytes = kBlockKV * kHeadDim;
  static constexpr uint32_t kVTileBytes = kHeadDim * kBlockKV;
  // The shared pieces (tile bounds, barrier setup, the TMA producer): the base, at these sizes.
  using Loads = AttnFwdSm90TmaLoadsFor<kHeadDim, kNumConsumerWG, kBlockKV>;
  static_assert(kRowsPerWG == 64 && kQTileBytes == uint32_t(kBlockQ * kHeadDim), "the loads' tile sizes");

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;  // one for K, one for V^T
  using PipelineState = typename Pipeline::PipelineState;
  using Softmax = OnlineSoftmaxS32Sm90<kBlockKV>;

  // Named barriers of the GEMM turns (Loads::kv_loop), one per consumer warpgroup: barrier k is
  // synced by warpgroup k and arrived at by the one before it in turn order: 2 x 128 threads.
  static constexpr uint32_t kPingPongThreads = 2 * 128;

  struct SharedStorage {
    alignas(1024) int8_t q[kQTileBytes];
    alignas(1024) int8_t k[kStages * kKTileBytes];
    alignas(1024) uint8_t v[kStages * kVTileBytes];
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
    alignas(8) uint64_t bar_q;
    float pin[kConsumerThreads];  // write-only slots of pin_before_wgmma_wait
  };

  struct Params {
    CUtensorMap tma_q;  // {d, s_q, b*h_q} bytes, box {d, 128}
    CUtensorMap tma_k;  // {d, s_kv, b*h_kv} bytes, box {d, 128}
    CUtensorMap tma_v;  // {s_kv_pad, d, b*h_kv} bytes, box {128, d}
    const float* q_scale;
    const float* k_scale;
    float scale_log2;  // sm_scale * log2(e)
    int seq_q, seq_kv, heads_q, heads_kv;
    int num_n_blocks;
    int q_scale_groups;  // ceil(s_q/16)*8
    int k_scale_groups;  // ceil(s_kv/128)*4
    bool causal;
  };

  // Host: the TMA descriptors and the loop bounds of one call (arguments validated by the caller).
  static cudaError_t to_params(const AttnFwdQkS8PvE4m3Args& a, Params& p) {
    p = Params{};
    p.q_scale = a.q_scale;
    p.k_scale = a.k_scale;
    p.scale_log2 = a.sm_scale * kLog2e;
    p.seq_q = a.seq_q;
    p.seq_kv = a.seq_kv;
    p.heads_q = a.heads_q;
    p.heads_kv = a.heads_kv;
    p.num_n_blocks = (a.seq_kv + kBlockKV - 1) / kBlockKV;
    p.q_scale_groups = int(sm90_q_scale_groups(a.seq_q));
    p.k_scale_groups = int(sm90_k_scale_groups(a.seq_kv));
    p.causal = a.mask == MaskKind::kCausal;
    return Loads::encode_tmas(p, a.q, a.k, a.v_t, a.batch, a.heads_q, a.heads_kv, a.seq_q, a.seq_kv, kHeadDim,
                              uint64_t(sm90_v_pad(a.seq_kv)), kSwizzleQK, kSwizzleV);
  }

#if defined(__CUDACC__)
  // The O accumulator of one consumer warpgroup: f32 ((2,2,D/8),1,1), WgmmaAccumMap order.
  static __device__ __forceinline__ auto make_fragment_o() {
    return cute::partition_fragment_C(TiledMmaPV{}, cute::Shape<cute::Int<kRowsPerWG>, cute::Int<kHeadDim>>{});
  }

  // Consumer warpgroup cw (rows [64*cw, 64*cw + 64) of the tile), thread tid of 128: the whole
  // KV loop. Leaves tOrO = sum_j P~_ij V^_j (V still in its quantized units, rows not divided by
  // l) and the row statistics in sm. With n_end == 0, O = 0 and l = 0.
  // The consumers wait on and release the pipelines' barriers in shared memory directly (what
  // PipelineTmaAsync's consumer wait / release do, minus the cluster addressing): a
  // PipelineTmaAsync object kept live through the loop holds generic barrier pointers in
  // registers, and at 240 registers ptxas paid for them by recomputing the Q descriptor and the
  // stage addresses every tile (+17 instructions in the loop, d=128 kernel 4-6 % slower).
  template <class FragO>
  static __device__ void mma(const Params& p, SharedStorage& ss, PipelineState& read, const AttnFwdTile& t,
                             int n_end, int cw, int tid, FragO& tOrO, Softmax& sm) {
    using namespace cute;
    using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
    constexpr int D = kHeadDim;
    TiledMmaQK mma_qk;
    TiledMmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(tid);
    auto thr_pv = mma_pv.get_thread_slice(tid);

    Tensor sQ = make_tensor(make_smem_ptr(ss.q + cw * kRowsPerWG * D), SmemLayoutQWG{});  // (64, D)
    Tensor sK = make_tensor(make_smem_ptr(ss.k), SmemLayoutK{});                          // (128, D, stages)
    Tensor sVt = make_tensor(make_smem_ptr(reinterpret_cast<cutlass::float_e4m3_t*>(ss.v)),
                             SmemLayoutVt{});                                            // (D, 128, stages)
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // (MMA, 1, D/32) descriptors
    Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, 1, D/32, stages) descriptors
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, 1, 4, stages) descriptors
    Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kRowsPerWG>, Int<kBlockKV>>{});  // s32 ((2,2,16),1,1)
    Tensor tOrBuf = partition_fragment_C(mma_pv, Shape<Int<kRowsPerWG>, Int<D>>{});      // f32, per KV tile
    auto& tOrPV = kOneLevel ? tOrO : tOrBuf;  // what the PV wgmma accumulates into (tOrBuf unused if one-level)
    Tensor tOrP = make_tensor<cutlass::float_e4m3_t>(
        partition_shape_A(mma_pv, Shape<Int<kRowsPerWG>, Int<kBlockKV>>{}));  // ((4,2,2),1,4)
    Tensor tOrP32 = recast<uint32_t>(tOrP);  // 16 words: word 4c + {0,1,2,3} = a0..a3 of k-chunk c
    static_assert(size(tSrS) == Softmax::kScores && size(tOrP32) == 16, "fragment shapes");
    static_assert(size(tOrBuf) == D / 2, "fragment shapes");

    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) tOrO(i) = 0.f;
    if (n_end == 0) return;

    const WgmmaAccumMap map(tid);
    const int bh_q = t.batch * p.heads_q + t.head;
    const int bh_kv = t.batch * p.heads_kv + Loads::kv_head(p, t.head);
    const int wg_row_begin = t.m_block * kBlockQ + cw * kRowsPerWG;
    const int grow0 = wg_row_begin + map.row0;  // global query rows grow0 and grow0 + 8
    // Rows grow0 and grow0 + 8 share one Q scale group (per-thread groups of 16-row MMA tiles).
    float q_scale = 0.f;
    if (grow0 / 16 * 8 < p.q_scale_groups) {
      q_scale = p.q_scale[int64_t(bh_q) * p.q_scale_groups + (grow0 / 16) * 8 + grow0 % 8];
    }
    const float qk_scale_log2 = q_scale * p.scale_log2;
    // Per-thread K groups: the 32 key columns of a thread in a 128-key tile share one scale.
    const float* k_scale_head = p.k_scale + int64_t(bh_kv) * p.k_scale_groups + tid % 4;
    auto tile_scale = [&](int n) { return qk_scale_log2 * k_scale_head[n * 4]; };

    // Last key each of my rows may see (inclusive); the warpgroup's smallest limit decides
    // whether a tile needs the element mask.
    const typename Loads::KeyLimits lim(p, grow0, wg_row_begin);

    // S = Q K^T (s32) into tSrS; issued and committed as one wgmma batch, not waited for.
    auto issue_qk = [&](int stage) { Loads::issue_gemm(mma_qk, tSrQ, tSrK, stage, tSrS, GMMA::ScaleOut::Zero); };
    // Two-level: buf = P~ V (fresh f32 accumulator); one-level: O += P~ V. From the E4M3
    // registers tOrP; committed, not waited for.
    auto issue_pv = [&](int stage) {
      Loads::issue_gemm(mma_pv, tOrP, tOrV, stage, tOrPV, kOneLevel ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero);
    };
    // P~ -> E4M3 A fragment of the PV wgmma (see the file comment for why no shuffle is needed).
    auto pack_p = [&](const float (&sf)[Softmax::kScores]) {
      CUTE_UNROLL
      for (int cch = 0; cch < kBlockKV / 32; ++cch) {
        const int j0 = 4 * cch;  // accumulator column groups 4c .. 4c+3 = keys 32c .. 32c+31
        tOrP32(4 * cch + 0) = pack_e4m3x4(sf[4 * j0 + 0], sf[4 * j0 + 1], sf[4 * j0 + 4], sf[4 * j0 + 5]);
        tOrP32(4 * cch + 1) = pack_e4m3x4(sf[4 * j0 + 2], sf[4 * j0 + 3], sf[4 * j0 + 6], sf[4 * j0 + 7]);
        tOrP32(4 * cch + 2) = pack_e4m3x4(sf[4 * j0 + 8], sf[4 * j0 + 9], sf[4 * j0 + 12], sf[4 * j0 + 13]);
        tOrP32(4 * cch + 3) = pack_e4m3x4(sf[4 * j0 + 10], sf[4 * j0 + 11], sf[4 * j0 + 14], sf[4 * j0 + 15]);
      }
    };
    // After PV(n-1) has finished. Two-level, on CUDA cores: O = O * alpha(n-1) + buf (the
    // rescale that goes with that tile). One-level: O *= alpha(n), so that PV(n), issued next,
    // accumulates at tile n's running max.
    auto fold_o = [&](const float (&alpha_prev)[2], const float (&alpha)[2]) {
      warpgroup_fence_operand(tOrPV);
      CUTE_UNROLL
      for (int j = 0; j < D / 8; ++j) {
        CUTE_UNROLL
        for (int i = 0; i < 4; ++i) {
          if constexpr (kOneLevel) {
            tOrO(4 * j + i) *= alpha[i / 2];
          } else {
            tOrO(4 * j + i) = fmaf(tOrO(4 * j + i), alpha_prev[i / 2], tOrBuf(4 * j + i));
          }
        }
      }
    };
    TxBarrier::wait(&ss.bar_q, 0);
    float sf[Softmax::kScores];
    float alpha[2];       // exp2(m_old - m_new) of tile n
    float alpha_prev[2];  // two-level: the O rescale that goes with buf = PV(n-1)
    float c = 0.f;        // tile n's score scale
    Loads::template kv_loop<kStages, kNumConsumerWG, kPingPongThreads>(
        ss.pipeline_k, ss.pipeline_v, read, n_end, cw, tid, [&](int n) { c = tile_scale(n); }, issue_qk, issue_pv,
        [&] { warpgroup_fence_operand(tSrS); },
        [&](int n) {
          sm.step(tSrS, c, lim.masked(n), n * kBlockKV + map.col0, lim.row, sf, n == 0 ? alpha_prev : alpha);
        },
        [&] { Loads::pin_before_wgmma_wait(&ss.pin[cw * 128 + tid], sm.l[0] + sm.l[1]); },
        [&](int) {
          fold_o(alpha_prev, alpha);
          pack_p(sf);
          alpha_prev[0] = alpha[0];
          alpha_prev[1] = alpha[1];
        },
        [&] { pack_p(sf); });
    if constexpr (kOneLevel) {
      warpgroup_fence_operand(tOrO);
    } else {
      fold_o(alpha_prev, alpha_prev);
    }
  }

#endif  // __CUDACC__
};

}  // namespace sage::sm90
