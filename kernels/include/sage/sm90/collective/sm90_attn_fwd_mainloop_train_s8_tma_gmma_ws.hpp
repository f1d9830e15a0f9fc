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
#include "sage/sm90/collective/sm90_attn_fwd_mainloop_tma_loads.hpp"
#include "sage/sm90/collective/sm90_attn_fwd_softmax_online.hpp"
#include "sage/sm90/kernel/sm90_attn_fwd_tile_scheduler.hpp"
#include "sage/sm90/sm90_attn_fwd_train_s8_params.hpp"
#include "sage/sm90/sm90_tma_desc.hpp"

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

  static constexpr uint32_t kPingPongBarrier = 0;
  static constexpr uint32_t kPingPongThreads = 2 * 128;

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
    constexpr int D = kHeadDim;
    const uint64_t s_pad = uint64_t(sm90_train_v_pad(a.seq_kv));
    const uint64_t bh_q = uint64_t(a.batch) * a.heads_q;
    const uint64_t bh_kv = uint64_t(a.batch) * a.heads_kv;
    // Rank 3 ({d, s, b*h}): a box never crosses into the next head; rows >= s are zero-filled.
    cudaError_t err = encode_tma_3d_u8(&p.tma_q, a.q, D, a.seq_q, bh_q, D, uint64_t(a.seq_q) * D, D, kBlockQ,
                                       kSwizzleQK);
    if (err != cudaSuccess) return err;
    err = encode_tma_3d_u8(&p.tma_k, a.k, D, a.seq_kv, bh_kv, D, uint64_t(a.seq_kv) * D, D, kBlockKV, kSwizzleQK);
    if (err != cudaSuccess) return err;
    return encode_tma_3d_u8(&p.tma_v, a.v_t, s_pad, D, bh_kv, s_pad, s_pad * D, kBlockKV, D, kSwizzleV);
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
    using NamedBarrier = cutlass::arch::NamedBarrier;
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

    const int causal_offset = p.seq_kv - p.seq_q;
    const int key_lim[2] = {p.causal ? min(p.seq_kv - 1, grow0 + causal_offset) : p.seq_kv - 1,
                            p.causal ? min(p.seq_kv - 1, grow0 + 8 + causal_offset) : p.seq_kv - 1};
    const int wg_key_lim = p.causal ? min(p.seq_kv - 1, wg_row_begin + causal_offset) : p.seq_kv - 1;
    auto tile_masked = [&](int n) { return n * kBlockKV + kBlockKV - 1 > wg_key_lim; };

    auto issue_qk = [&](int stage) {
      warpgroup_fence_operand(tSrS);
      warpgroup_arrive();
      mma_qk.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
        cute::gemm(mma_qk, tSrQ(_, _, kb), tSrK(_, _, kb, stage), tSrS);
        mma_qk.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };
    // buf = P^ V^ (fresh s32 accumulator), from the INT8 registers tOrP; committed, not waited for.
    auto issue_pv = [&](int stage) {
      warpgroup_fence_operand(tOrBuf);
      warpgroup_arrive();
      mma_pv.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tOrP); ++kb) {
        cute::gemm(mma_pv, tOrP(_, _, kb), tOrV(_, _, kb, stage), tOrBuf);
        mma_pv.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };
    // P~ -> INT8 A fragment, one scale per row of the tile (s_P = max P~ / 127, IEEE division and
    // round-half-even as the emulation; P~ >= 0). Returns s_P of both rows in sp.
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
      int8_t qv[Softmax::kScores];
      CUTE_UNROLL
      for (int half = 0; half < 2; ++half) {
        float a = fmaxf(mx[half], __shfl_xor_sync(0xffffffffu, mx[half], 1));
        a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 2));
        sp[half] = a == 0.f ? 1.f : __fdiv_rn(a, 127.f);
      }
      CUTE_UNROLL
      for (int i = 0; i < Softmax::kScores; ++i) {
        const int half = (i / 2) % 2;  // WgmmaAccumMap::index(j, half, e) = 4j + 2 half + e
        qv[i] = static_cast<int8_t>(min(127, __float2int_rn(__fdiv_rn(sf[i], sp[half]))));
      }
      auto word = [&](int i0, int i1, int i2, int i3) {
        return uint32_t(uint8_t(qv[i0])) | uint32_t(uint8_t(qv[i1])) << 8 | uint32_t(uint8_t(qv[i2])) << 16 |
               uint32_t(uint8_t(qv[i3])) << 24;
      };
      CUTE_UNROLL
      for (int cch = 0; cch < kBlockKV / 32; ++cch) {
        const int j0 = 4 * cch;  // accumulator column groups 4c .. 4c+3 = keys 32c .. 32c+31
        tOrP32(4 * cch + 0) = word(4 * j0 + 0, 4 * j0 + 1, 4 * j0 + 4, 4 * j0 + 5);
        tOrP32(4 * cch + 1) = word(4 * j0 + 2, 4 * j0 + 3, 4 * j0 + 6, 4 * j0 + 7);
        tOrP32(4 * cch + 2) = word(4 * j0 + 8, 4 * j0 + 9, 4 * j0 + 12, 4 * j0 + 13);
        tOrP32(4 * cch + 3) = word(4 * j0 + 10, 4 * j0 + 11, 4 * j0 + 14, 4 * j0 + 15);
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
    const bool release_lane = tid % 32 == 0;
    auto release = [&](typename Pipeline::SharedStorage& pipe, const PipelineState& st) {
      if (release_lane) pipe.empty_barrier_[st.index()].arrive();
    };
    auto wait = [](typename Pipeline::SharedStorage& pipe, const PipelineState& st) {
      pipe.full_barrier_[st.index()].wait(st.phase());
    };
    const uint32_t pp_own = kPingPongBarrier + cw;
    const uint32_t pp_next = kPingPongBarrier + (cw + 1) % kNumConsumerWG;

    TxBarrier::wait(&ss.bar_q, 0);
    const uint32_t first = read.count();
    auto state = [first](int n) {
      const uint32_t i = first + uint32_t(n);
      return PipelineState(int(i % kStages), (i / kStages) & 1, i);
    };
    float sf[Softmax::kScores];
    float alpha_prev[2];     // the O rescale that goes with buf = PV(n-1)
    float pv_scale_prev[2];  // s_P(n-1) * s_V(n-1) per row
    if (cw == kNumConsumerWG - 1) NamedBarrier::arrive(kPingPongThreads, kPingPongBarrier + 0);
    {
      const float c = tile_scale(0);
      const PipelineState k0 = state(0);
      NamedBarrier::sync(kPingPongThreads, pp_own);
      wait(ss.pipeline_k, k0);
      issue_qk(k0.index());
      NamedBarrier::arrive(kPingPongThreads, pp_next);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      release(ss.pipeline_k, k0);
      sm.step(tSrS, c, tile_masked(0), map.col0, key_lim, sf, alpha_prev);
      float sp[2];
      pack_p(sf, sp);
      const float sv = v_scale_head[0];
      pv_scale_prev[0] = sp[0] * sv;
      pv_scale_prev[1] = sp[1] * sv;
    }
    for (int n = 1; n < n_end; ++n) {
      const float c = tile_scale(n);
      const PipelineState kn = state(n);
      const PipelineState vn = state(n - 1);  // V lags K by one tile
      NamedBarrier::sync(kPingPongThreads, pp_own);
      wait(ss.pipeline_k, kn);
      issue_qk(kn.index());
      wait(ss.pipeline_v, vn);
      issue_pv(vn.index());
      NamedBarrier::arrive(kPingPongThreads, pp_next);
      warpgroup_wait<1>();  // QK(n) done, PV(n-1) may still run
      warpgroup_fence_operand(tSrS);
      release(ss.pipeline_k, kn);
      float alpha[2];
      sm.step(tSrS, c, tile_masked(n), n * kBlockKV + map.col0, key_lim, sf, alpha);
      Loads::pin_before_wgmma_wait(&ss.pin[cw * 128 + tid], sm.l[0] + sm.l[1]);
      warpgroup_wait<0>();  // PV(n-1) done: buf valid, P registers free
      release(ss.pipeline_v, vn);
      fold_o(alpha_prev, pv_scale_prev);
      float sp[2];
      pack_p(sf, sp);
      const float sv = v_scale_head[n];
      alpha_prev[0] = alpha[0];
      alpha_prev[1] = alpha[1];
      pv_scale_prev[0] = sp[0] * sv;
      pv_scale_prev[1] = sp[1] * sv;
    }
    {
      const PipelineState vl = state(n_end - 1);
      wait(ss.pipeline_v, vl);
      issue_pv(vl.index());
      warpgroup_wait<0>();
      release(ss.pipeline_v, vl);
    }
    fold_o(alpha_prev, pv_scale_prev);
    if (cw == 0) NamedBarrier::sync(kPingPongThreads, pp_own);
    read = state(n_end);
  }

#endif  // __CUDACC__
};

}  // namespace sage::sm90
