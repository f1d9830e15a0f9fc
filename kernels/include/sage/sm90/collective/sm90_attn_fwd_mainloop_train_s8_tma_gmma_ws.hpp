// Collective mainloop of the Hopper (sm_90a) training forward, recipe `train_s8` (SageBwd's
// forward; exact emulation: sage_quant.emulation.train_s8.train_s8_forward). Same skeleton as the
// inference mainloop (sm90_attn_fwd_mainloop_qk_s8_pv_e4m3_tma_gmma_ws.hpp: one TMA producer
// thread, K / V^T rings on PipelineTmaAsync barriers, consumer warpgroups taking turns on the
// tensor cores, QK(n) and PV(n-1) issued back to back with softmax(n) under PV(n-1)); what the
// recipe changes:
//   S   = Q_s8 K_s8^T            wgmma s8 -> s32 (SS), KV tiles of 64 keys = the K/V scale block
//   P~  = exp2(S*c - m)          c = s_Q(block of 128 rows) * s_K(tile) * sm_scale * log2e
//   P^  = rne(P~ / s_P)          INT8 per row of the tile, s_P = max_j P~ / 127 (1 if 0)
//   buf = P^ V_s8                wgmma s8 -> s32 (RS, P from registers), fresh per tile
//   O   = O * exp2(m_old - m_new) + buf * s_P * s_V(tile)   two-level, on the CUDA cores
// and leaves O dequantized (rows not divided by l) with the row statistics to the epilogue; the
// LSE is that of the smoothed scores (what the backward recomputes P from).
// V^T is INT8 with the tokens permuted inside every 32-token chunk as for E4M3 (the 8-bit A
// fragment of a k32 wgmma is type-independent, so the thread's own P values are its fragment).
// Compiled and checked in SASS only; the GPU test against the emulation is
// tests/gpu/test_train_sm90.py.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "sage/common/arch.hpp"
#include "sage/common/div_rn.cuh"
#include "sage/sm90/collective/sm90_attn_fwd_softmax_online.hpp"
#include "sage/sm90/kernel/sm90_attn_fwd_tile_scheduler.hpp"
#include "sage/sm90/sm90_attn_fwd_train_s8_params.hpp"
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

template <int kHeadDim_, int kNumConsumerWG_>
struct CollectiveMainloopFwdSm90TrainS8
    : AttnFwdSm90TmaLoadsFor<kHeadDim_, kNumConsumerWG_, kSm90TrainBlockKV> {
  static_assert(kHeadDim_ == 64 || kHeadDim_ == 128, "head dim 64 or 128");
  static_assert(kNumConsumerWG_ == 2 || kNumConsumerWG_ == 3, "2 or 3 consumer warpgroups");
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNumConsumerWG = kNumConsumerWG_;
  static constexpr int kRowsPerWG = 64;  // one wgmma m64 tile
  static constexpr int kBlockQ = kRowsPerWG * kNumConsumerWG;
  static constexpr int kBlockKV = kSm90TrainBlockKV;  // the recipe's K/V scale block
  static_assert(kSm90TrainBlockQ % kRowsPerWG == 0, "a warpgroup's rows lie in one Q scale block");
  static constexpr int kConsumerThreads = 128 * kNumConsumerWG;
  static constexpr int kConsumerWarps = kConsumerThreads / 32;
  static constexpr int kStages = 4;  // 64-key tiles: twice as many in flight as the 128-key kernel
  static constexpr int kEmptyArrivals = kConsumerWarps;  // lane 0 of each consumer warp

  // Q/K rows are d bytes; V^T rows are 64 tokens = 64 bytes: the 64-byte swizzle.
  using SmemAtomQK = std::conditional_t<kHeadDim == 128, cute::GMMA::Layout_K_SW128_Atom<int8_t>,
                                        cute::GMMA::Layout_K_SW64_Atom<int8_t>>;
  static constexpr CUtensorMapSwizzle kSwizzleQK =
      kHeadDim == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  static constexpr CUtensorMapSwizzle kSwizzleV = CU_TENSOR_MAP_SWIZZLE_64B;

  using SmemLayoutQWG = decltype(cute::tile_to_shape(
      SmemAtomQK{}, cute::Shape<cute::Int<kRowsPerWG>, cute::Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      SmemAtomQK{}, cute::Shape<cute::Int<kBlockKV>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  using SmemLayoutVt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW64_Atom<int8_t>{},
      cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockKV>, cute::Int<kStages>>{}));

  using TiledMmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<int8_t, int8_t, int32_t,
                                 cute::Shape<cute::Int<kRowsPerWG>, cute::Int<kBlockKV>, cute::Int<kHeadDim>>>()));
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<int8_t, int8_t, int32_t,
                                 cute::Shape<cute::Int<kRowsPerWG>, cute::Int<kHeadDim>, cute::Int<kBlockKV>>>()));

  static constexpr uint32_t kQTileBytes = kBlockQ * kHeadDim;
  static constexpr uint32_t kKTileBytes = kBlockKV * kHeadDim;
  static constexpr uint32_t kVTileBytes = kHeadDim * kBlockKV;
  // The shared pieces (tile bounds, barrier setup, the TMA producer): the base, at these sizes.
  using Loads = AttnFwdSm90TmaLoadsFor<kHeadDim, kNumConsumerWG, kBlockKV>;
  static_assert(kRowsPerWG == 64 && kQTileBytes == uint32_t(kBlockQ * kHeadDim), "the loads' tile sizes");

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;
  using Softmax = OnlineSoftmaxS32Sm90<kBlockKV, /*kE4m3Bias=*/false>;

  static constexpr uint32_t kPingPongThreads = 2 * 128;  // the GEMM turns' named barriers (Loads::kv_loop)

  struct SharedStorage {
    alignas(1024) int8_t q[kQTileBytes];
    alignas(1024) int8_t k[kStages * kKTileBytes];
    alignas(1024) int8_t v[kStages * kVTileBytes];
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
    alignas(8) uint64_t bar_q;
    float pin[kConsumerThreads];  // write-only slots of pin_before_wgmma_wait
  };

  struct Params {
    CUtensorMap tma_q;  // {d, s_q, b*h_q} bytes, box {d, kBlockQ}
    CUtensorMap tma_k;  // {d, s_kv, b*h_kv} bytes, box {d, 64}
    CUtensorMap tma_v;  // {s_kv_pad, d, b*h_kv} bytes, box {64, d}
    const float* q_scale;
    const float* k_scale;
    const float* v_scale;
    float scale_log2;  // sm_scale * log2(e)
    int seq_q, seq_kv, heads_q, heads_kv;
    int num_n_blocks;  // = KV scale blocks per head
    int q_blocks;      // Q scale blocks per head
    bool causal;
  };

  static cudaError_t to_params(const AttnFwdTrainS8Args& a, Params& p) {
    p = Params{};
    p.q_scale = a.q_scale;
    p.k_scale = a.k_scale;
    p.v_scale = a.v_scale;
    p.scale_log2 = a.sm_scale * kLog2e;
    p.seq_q = a.seq_q;
    p.seq_kv = a.seq_kv;
    p.heads_q = a.heads_q;
    p.heads_kv = a.heads_kv;
    p.num_n_blocks = int(sm90_train_kv_blocks(a.seq_kv));
    p.q_blocks = int(sm90_train_q_blocks(a.seq_q));
    p.causal = a.mask == MaskKind::kCausal;
    return Loads::encode_tmas(p, a.q, a.k, a.v_t, a.batch, a.heads_q, a.heads_kv, a.seq_q, a.seq_kv, kHeadDim,
                              uint64_t(sm90_train_v_pad(a.seq_kv)), kSwizzleQK, kSwizzleV);
  }

#if defined(__CUDACC__)
  // The O accumulator of one consumer warpgroup: f32, the PV accumulator's layout.
  static __device__ __forceinline__ auto make_fragment_o() {
    return cute::make_tensor<float>(
        cute::partition_shape_C(TiledMmaPV{}, cute::Shape<cute::Int<kRowsPerWG>, cute::Int<kHeadDim>>{}));
  }

  // Consumer warpgroup cw, thread tid of 128: the whole KV loop (see the file comment). Leaves
  // tOrO = sum_j P~_ij V_j (dequantized, rows not divided by l) and the row statistics in sm.
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
    Tensor sK = make_tensor(make_smem_ptr(ss.k), SmemLayoutK{});                          // (64, D, stages)
    Tensor sVt = make_tensor(make_smem_ptr(ss.v), SmemLayoutVt{});                        // (D, 64, stages)
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
    Tensor tSrK = thr_qk.partition_fragment_B(sK);
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);
    Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kRowsPerWG>, Int<kBlockKV>>{});  // s32
    Tensor tOrBuf = partition_fragment_C(mma_pv, Shape<Int<kRowsPerWG>, Int<D>>{});      // s32, per KV tile
    Tensor tOrP = make_tensor<int8_t>(partition_shape_A(mma_pv, Shape<Int<kRowsPerWG>, Int<kBlockKV>>{}));
    Tensor tOrP32 = recast<uint32_t>(tOrP);  // word 4c + {0,1,2,3} = a0..a3 of k-chunk c
    static_assert(size(tSrS) == Softmax::kScores && size(tOrP32) == kBlockKV / 8, "fragment shapes");
    static_assert(size(tOrBuf) == D / 2, "fragment shapes");

    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) tOrO(i) = 0.f;
    if (n_end == 0) return;

    const WgmmaAccumMap map(tid);
    const int bh_q = t.batch * p.heads_q + t.head;
    const int bh_kv = t.batch * p.heads_kv + Loads::kv_head(p, t.head);
    const int wg_row_begin = t.m_block * kBlockQ + cw * kRowsPerWG;
    const int grow0 = wg_row_begin + map.row0;
    // One Q scale per 128 rows: the warpgroup's 64 rows share it (rows past s_q store nothing).
    const int q_blk = wg_row_begin / kSm90TrainBlockQ;
    const float q_scale = q_blk < p.q_blocks ? p.q_scale[int64_t(bh_q) * p.q_blocks + q_blk] : 0.f;
    const float* k_scale_head = p.k_scale + int64_t(bh_kv) * p.num_n_blocks;
    const float* v_scale_head = p.v_scale + int64_t(bh_kv) * p.num_n_blocks;
    // (s_Q * s_K) * sm_scale * log2e, the emulation's order of the products
    auto tile_scale = [&](int n) { return (q_scale * k_scale_head[n]) * p.scale_log2; };

    const typename Loads::KeyLimits lim(p, grow0, wg_row_begin);

    auto issue_qk = [&](int stage) { Loads::issue_gemm(mma_qk, tSrQ, tSrK, stage, tSrS, GMMA::ScaleOut::Zero); };
    // buf = P^ V^ (fresh s32 accumulator), from the INT8 registers tOrP; committed, not waited for.
    auto issue_pv = [&](int stage) { Loads::issue_gemm(mma_pv, tOrP, tOrV, stage, tOrBuf, GMMA::ScaleOut::Zero); };
    // P~ -> INT8 A fragment, one scale per row of the tile: s_P = max P~ / 127 (1 if 0), codes
    // rne(P~ / s_P) bit for bit as the emulation's IEEE division (sage/common/div_rn.cuh: one
    // reciprocal per row; __fdiv_rn only where s_P leaves [2^-64, 2^64], i.e. a row whose tile
    // maximum underflowed). P~ >= 0 and P~ <= max, so no clamp. Returns s_P of both rows in sp.
    auto pack_p = [&](const float (&sf)[Softmax::kScores], float (&sp)[2]) {
      float mx[2] = {0.f, 0.f};
      CUTE_UNROLL
      for (int j = 0; j < kBlockKV / 8; ++j) {
        CUTE_UNROLL
        for (int half = 0; half < 2; ++half) {
          const int i = WgmmaAccumMap::index(j, half, 0);
          mx[half] = fmaxf(mx[half], fmaxf(sf[i], sf[i + 1]));
        }
      }
      float rcp[2];
      bool fast[2];
      CUTE_UNROLL
      for (int half = 0; half < 2; ++half) {
        float a = fmaxf(mx[half], __shfl_xor_sync(0xffffffffu, mx[half], 1));
        a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 2));
        sp[half] = a == 0.f ? 1.f : __fdiv_rn(a, 127.f);
        rcp[half] = __frcp_rn(sp[half]);
        fast[half] = div_rn_fast_ok(sp[half]);
      }
      uint32_t code[Softmax::kScores];
      if (fast[0] && fast[1]) {  // the common case: one branch per tile, not per element
        CUTE_UNROLL
        for (int i = 0; i < Softmax::kScores; ++i) {
          const int half = (i / 2) % 2;  // WgmmaAccumMap::index(j, half, e) = 4j + 2 half + e
          code[i] = __float_as_uint(__fadd_rn(div_rn_fast(sf[i], sp[half], rcp[half]), kRoundMagic));
        }
      } else {
        CUTE_UNROLL
        for (int i = 0; i < Softmax::kScores; ++i) code[i] = uint32_t(__float2int_rn(__fdiv_rn(sf[i], sp[(i / 2) % 2])));
      }
      CUTE_UNROLL
      for (int cch = 0; cch < kBlockKV / 32; ++cch) {
        const int j0 = 4 * cch;  // accumulator column groups 4c .. 4c+3 = keys 32c .. 32c+31
        tOrP32(4 * cch + 0) = pack_low_bytes(code[4 * j0 + 0], code[4 * j0 + 1], code[4 * j0 + 4], code[4 * j0 + 5]);
        tOrP32(4 * cch + 1) = pack_low_bytes(code[4 * j0 + 2], code[4 * j0 + 3], code[4 * j0 + 6], code[4 * j0 + 7]);
        tOrP32(4 * cch + 2) = pack_low_bytes(code[4 * j0 + 8], code[4 * j0 + 9], code[4 * j0 + 12], code[4 * j0 + 13]);
        tOrP32(4 * cch + 3) = pack_low_bytes(code[4 * j0 + 10], code[4 * j0 + 11], code[4 * j0 + 14], code[4 * j0 + 15]);
      }
    };
    // After PV(n-1) has finished: O = O * alpha(n-1) + buf * s_P(n-1) * s_V(n-1).
    auto fold_o = [&](const float (&alpha_prev)[2], const float (&pv_scale)[2]) {
      warpgroup_fence_operand(tOrBuf);
      CUTE_UNROLL
      for (int j = 0; j < D / 8; ++j) {
        CUTE_UNROLL
        for (int i = 0; i < 4; ++i) {
          tOrO(4 * j + i) = fmaf(tOrO(4 * j + i), alpha_prev[i / 2], float(tOrBuf(4 * j + i)) * pv_scale[i / 2]);
        }
      }
    };
    TxBarrier::wait(&ss.bar_q, 0);
    float sf[Softmax::kScores];
    float alpha[2];          // exp2(m_old - m_new) of tile n
    float alpha_prev[2];     // the O rescale that goes with buf = PV(n-1)
    float pv_scale_prev[2];  // s_P(n-1) * s_V(n-1) per row
    float c = 0.f;           // tile n's score scale
    float sv = 0.f;          // tile n's V scale
    auto pack_tile = [&](const float (&a)[2]) {
      float sp[2];
      pack_p(sf, sp);
      alpha_prev[0] = a[0];
      alpha_prev[1] = a[1];
      pv_scale_prev[0] = sp[0] * sv;
      pv_scale_prev[1] = sp[1] * sv;
    };
    Loads::template kv_loop<kStages, kNumConsumerWG, kPingPongThreads>(
        ss.pipeline_k, ss.pipeline_v, read, n_end, cw, tid,
        [&](int n) {
          c = tile_scale(n);
          sv = v_scale_head[n];
        },
        issue_qk, issue_pv, [&] { warpgroup_fence_operand(tSrS); },
        [&](int n) { sm.step(tSrS, c, lim.masked(n), n * kBlockKV + map.col0, lim.row, sf, alpha); },
        [&] { Loads::pin_before_wgmma_wait(&ss.pin[cw * 128 + tid], sm.l[0] + sm.l[1]); },
        [&](int) {
          fold_o(alpha_prev, pv_scale_prev);
          pack_tile(alpha);
        },
        [&] { pack_tile(alpha); });
    fold_o(alpha_prev, pv_scale_prev);
  }

#endif  // __CUDACC__
};

}  // namespace sage::sm90
