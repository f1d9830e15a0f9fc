// Collective mainloop of the Hopper (sm_90a) train_s8 backward, dK and dV (SageBwd; exact
// emulation: sage_quant.emulation.train_s8.train_s8_backward). One CTA per 64-key tile n of one
// (batch, kv head); K^ (INT8) and V (16-bit) of the tile stay in shared memory, and the producer
// streams, for every q head of the GQA group and every 128-query block m that sees the tile:
// Q^ (rows), Q^T, dO^T (INT8, tokens permuted per 32), dO (16-bit), LSE*log2e and D (128 floats).
// Two consumer warpgroups split the recipe's work per (m, n) tile (registers: dV or dK f32 plus an
// s32 buffer plus a 64 x 128 tile each, ~150 of 240):
//   WG 0:  S^T  = K^ Q^T              wgmma s8 (SS), 64 keys x 128 queries
//          P    = exp2(S^T c - lse2)  c = s_Q s_K sm_scale log2e; 0 where masked
//          P^   = rne(P / s_P)        one scale per tile (s_P = max P / 127), the whole warpgroup
//          dV  += (P^T dO^) s_P s_dO  wgmma s8 (RS: P^ from registers) into a fresh s32 buffer
//          P (f32) goes to WG 1 through shared memory (named barriers P_FULL / P_EMPTY)
//   WG 1:  dP^T = V dO^T              wgmma f16/bf16 -> f32 (SS)
//          dS   = P (dP - D)          per tile INT8 as P
//          dK  += (dS^T Q^) s_dS s_Q  wgmma s8 (RS), dK times sm_scale at the end
// Both warpgroups' dP^T / S^T of the next tile run while the other's tail is on the CUDA cores.
// GQA: dK, dV of a kv head are summed over its q heads here, in registers (deterministic).
// Non-finite dO (sage_quant.emulation.train_s8's rule): the caller zeroes it in the dO operands
// and passes D (non-finite in those rows) and the last bad row per channel; a non-finite dS is
// quantized as 0, left out of the tile maximum, and its key row of dK stored as NaN; dV gets NaN
// in the channels and keys the bad rows reach.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "sage/common/arch.hpp"
#include "sage/sm90/sm90_tma_desc.hpp"
#include "sage/sm90/collective/sm90_attn_bwd_train_s8_common.hpp"

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace sage::sm90 {

template <int kHeadDim_, class OutTag_>
struct CollectiveMainloopBwdSm90TrainS8DkDv : BwdSm90TrainS8Base<kHeadDim_, OutTag_> {
  using Base = BwdSm90TrainS8Base<kHeadDim_, OutTag_>;
  using typename Base::Elem;
  using typename Base::OutTag;
  using typename Base::AtomRowsS8;
  using typename Base::Atom16;
  using Base::D;
  using Base::kBlockQ;
  using Base::kBlockKV;
  using Base::kSwizzleRowsS8;
  using Base::kTma16;
  using Base::kNumConsumerWG;
  static constexpr int kStages = D == 128 ? 2 : 3;

  using AtomT = cute::GMMA::Layout_K_SW128_Atom<int8_t>;          // rows of 128 queries
  using SmemLayoutK = decltype(cute::tile_to_shape(AtomRowsS8{}, cute::Shape<cute::_64, cute::Int<D>>{}));
  using SmemLayoutV = decltype(cute::tile_to_shape(Atom16{}, cute::Shape<cute::_64, cute::Int<D>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      AtomRowsS8{}, cute::Shape<cute::_128, cute::Int<D>, cute::Int<kStages>>{}));
  using SmemLayoutDO = decltype(cute::tile_to_shape(
      Atom16{}, cute::Shape<cute::_128, cute::Int<D>, cute::Int<kStages>>{}));
  using SmemLayoutT = decltype(cute::tile_to_shape(
      AtomT{}, cute::Shape<cute::Int<D>, cute::_128, cute::Int<kStages>>{}));

  using TiledMmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<int8_t, int8_t, int32_t, cute::Shape<cute::_64, cute::_128, cute::Int<D>>>()));
  using TiledMmaDP = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Elem, Elem, float, cute::Shape<cute::_64, cute::_128, cute::Int<D>>>()));
  using TiledMmaG = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<int8_t, int8_t, int32_t, cute::Shape<cute::_64, cute::Int<D>, cute::_128>>()));

  static constexpr uint32_t kQBytes = kBlockQ * D;
  static constexpr uint32_t kTBytes = D * kBlockQ;
  static constexpr uint32_t kDOBytes = kBlockQ * D * 2;
  static constexpr uint32_t kRowBytes = kBlockQ * 4;
  static constexpr uint32_t kStageBytes = kQBytes + 2 * kTBytes + kDOBytes + 2 * kRowBytes;
  static constexpr uint32_t kKVBytes = kBlockKV * D + kBlockKV * D * 2;
  static constexpr int kScores = kBlockKV * kBlockQ / 128;  // per thread: 64

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  // Named barriers (CUTLASS adds its reserved count): the P hand-over and the two tile maxima.
  static constexpr uint32_t kBarPFull = 0, kBarPEmpty = 1, kBarRed0 = 2;

  struct SharedStorage {
    alignas(1024) int8_t q[kStages * kQBytes];
    alignas(1024) int8_t qt[kStages * kTBytes];
    alignas(1024) int8_t dot[kStages * kTBytes];
    alignas(1024) Elem dout[kStages * kBlockQ * D];
    alignas(1024) int8_t k[kBlockKV * D];
    alignas(1024) Elem v[kBlockKV * D];
    alignas(16) float lse2[kStages][kBlockQ];
    alignas(16) float delta[kStages][kBlockQ];
    alignas(16) float p[kScores * 128];  // P of one tile, [value][thread]: conflict-free
    float red[kNumConsumerWG][2][4];      // [warpgroup][step parity][warp]
    typename Pipeline::SharedStorage pipe;
    alignas(8) uint64_t bar_kv;
  };

  struct Params : Base::ParamsBase {
    CUtensorMap tma_q;    // {d, s_q, b*h_q} bytes, box {d, 128}
    CUtensorMap tma_qt;   // {s_q_pad, d, b*h_q} bytes, box {128, d}
    CUtensorMap tma_dot;  // same
    CUtensorMap tma_do;   // {d, s_q, b*h_q} 16-bit, box {64, 128}
    CUtensorMap tma_k;    // {d, s_kv, b*h_kv} bytes, box {d, 64}
    CUtensorMap tma_v;    // {d, s_kv, b*h_kv} 16-bit, box {64, 64}
    const float* do_scale;
    const int* do_bad_last;  // (b, h_q, d): last query row whose dO is non-finite in channel c, -1 if none
    void* dk;
    int64_t dk_stride_b, dk_stride_h, dk_stride_s;
    void* dv;
    int64_t dv_stride_b, dv_stride_h, dv_stride_s;
  };

  static cudaError_t to_params(const AttnBwdTrainS8Args& a, Params& p) {
    p = Params{};
    const uint64_t bh_q = uint64_t(a.batch) * a.heads_q, bh_kv = uint64_t(a.batch) * a.heads_kv;
    const uint64_t sq = a.seq_q, skv = a.seq_kv, sqp = uint64_t(sm90_train_q_pad(a.seq_q));
    cudaError_t err = encode_tma_3d_u8(&p.tma_q, a.q, D, sq, bh_q, D, sq * D, D, kBlockQ, kSwizzleRowsS8);
    if (err == cudaSuccess)
      err = encode_tma_3d_u8(&p.tma_qt, a.q_t, sqp, D, bh_q, sqp, sqp * D, kBlockQ, D, CU_TENSOR_MAP_SWIZZLE_128B);
    if (err == cudaSuccess)
      err = encode_tma_3d_u8(&p.tma_dot, a.do_t, sqp, D, bh_q, sqp, sqp * D, kBlockQ, D, CU_TENSOR_MAP_SWIZZLE_128B);
    if (err == cudaSuccess)
      err = encode_tma_3d(&p.tma_do, kTma16, a.dout, D, sq, bh_q, 2 * D, 2 * sq * D, 64, kBlockQ,
                          CU_TENSOR_MAP_SWIZZLE_128B);
    if (err == cudaSuccess)
      err = encode_tma_3d_u8(&p.tma_k, a.k, D, skv, bh_kv, D, skv * D, D, kBlockKV, kSwizzleRowsS8);
    if (err == cudaSuccess)
      err = encode_tma_3d(&p.tma_v, kTma16, a.v, D, skv, bh_kv, 2 * D, 2 * skv * D, 64, kBlockKV,
                          CU_TENSOR_MAP_SWIZZLE_128B);
    if (err != cudaSuccess) return err;
    Base::fill_base(a, p);
    p.do_scale = a.do_scale;
    p.do_bad_last = a.do_bad_last;
    p.dk = a.dk;
    p.dk_stride_b = a.dk_stride_b;
    p.dk_stride_h = a.dk_stride_h;
    p.dk_stride_s = a.dk_stride_s;
    p.dv = a.dv;
    p.dv_stride_b = a.dv_stride_b;
    p.dv_stride_h = a.dv_stride_h;
    p.dv_stride_s = a.dv_stride_s;
    return cudaSuccess;
  }

  static dim3 grid(const Params& p) { return dim3(p.kv_blocks, p.heads_kv, p.batch); }

#if defined(__CUDACC__)
  // The query blocks that see key tile n: [m_begin, q_blocks). Bottom-right causal: query i sees
  // keys <= i + s_kv - s_q, so the tile's first key n*64 is first seen by query n*64 - (s_kv - s_q).
  static __device__ __forceinline__ int m_begin(const Params& p, int n) {
    if (!p.causal) return 0;
    const int first_q = n * kBlockKV - (p.seq_kv - p.seq_q);
    return first_q <= 0 ? 0 : min(first_q / kBlockQ, p.q_blocks);
  }

  static __device__ __forceinline__ void init(const Params& p, SharedStorage& ss) {
    cutlass::arch::ClusterBarrier::init(&ss.bar_kv, 1);
    cute::prefetch_tma_descriptor(&p.tma_q);
    cute::prefetch_tma_descriptor(&p.tma_qt);
    cute::prefetch_tma_descriptor(&p.tma_dot);
    cute::prefetch_tma_descriptor(&p.tma_do);
    cute::prefetch_tma_descriptor(&p.tma_k);
    cute::prefetch_tma_descriptor(&p.tma_v);
  }

  // Producer (one thread): K^, V of the tile once; per step (q head g of the group, block m) the
  // stage's six loads on one barrier.
  static __device__ void load(const Params& p, SharedStorage& ss, Pipeline& pipe) {
    using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
    constexpr uint64_t kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
    const int n = blockIdx.x, hkv = blockIdx.y, b = blockIdx.z;
    const int bh_kv = b * p.heads_kv + hkv;
    TxBarrier::arrive_and_expect_tx(&ss.bar_kv, kKVBytes);
    cute::SM90_TMA_LOAD_3D::copy(&p.tma_k, &ss.bar_kv, kHint, ss.k, 0, n * kBlockKV, bh_kv);
    CUTE_UNROLL
    for (int c = 0; c < D / 64; ++c) {
      cute::SM90_TMA_LOAD_3D::copy(&p.tma_v, &ss.bar_kv, kHint, ss.v + c * kBlockKV * 64, c * 64, n * kBlockKV,
                                   bh_kv);
    }
    const int group = p.heads_q / p.heads_kv;
    const int m0 = m_begin(p, n), m_count = p.q_blocks - m0;
    auto write = cutlass::make_producer_start_state<Pipeline>();
    for (int step = 0; step < group * m_count; ++step) {
      const int g = step / m_count, m = m0 + step % m_count;
      const int bh_q = b * p.heads_q + hkv * group + g;
      pipe.producer_acquire(write);
      uint64_t* bar = pipe.producer_get_barrier(write);
      const int s = write.index();
      cute::SM90_TMA_LOAD_3D::copy(&p.tma_q, bar, kHint, ss.q + s * kQBytes, 0, m * kBlockQ, bh_q);
      cute::SM90_TMA_LOAD_3D::copy(&p.tma_qt, bar, kHint, ss.qt + s * kTBytes, m * kBlockQ, 0, bh_q);
      cute::SM90_TMA_LOAD_3D::copy(&p.tma_dot, bar, kHint, ss.dot + s * kTBytes, m * kBlockQ, 0, bh_q);
      CUTE_UNROLL
      for (int c = 0; c < D / 64; ++c) {
        cute::SM90_TMA_LOAD_3D::copy(&p.tma_do, bar, kHint, ss.dout + s * kBlockQ * D + c * kBlockQ * 64, c * 64,
                                     m * kBlockQ, bh_q);
      }
      const int64_t row = int64_t(bh_q) * p.s_q_pad + m * kBlockQ;
      cute::SM90_BULK_COPY_G2S::copy(p.lse2 + row, bar, ss.lse2[s], int(kRowBytes));
      cute::SM90_BULK_COPY_G2S::copy(p.delta + row, bar, ss.delta[s], int(kRowBytes));
      ++write;
    }
  }

  // Whether tile (m, n) needs the element mask: it crosses s_q, s_kv or the causal diagonal.
  static __device__ __forceinline__ bool tile_masked(const Params& p, int m, int n) {
    const int last_key = n * kBlockKV + kBlockKV - 1;
    return last_key >= p.seq_kv || m * kBlockQ + kBlockQ > p.seq_q ||
           (p.causal && last_key > m * kBlockQ + (p.seq_kv - p.seq_q));
  }

  // A non-finite dO[r, c] reaches dV[j, c] for every key j that query r sees (the emulation's
  // rule; the kernel read dO with those values zeroed): keys <= r + s_kv - s_q under the causal
  // mask, so the last such r per channel decides, over the q heads of the group.
  template <class Frag>
  static __device__ __forceinline__ void mark_dv_non_finite(const Params& p, Frag& acc, int b, int hkv, int n,
                                                            const WgmmaAccumMap& map) {
    const int group = p.heads_q / p.heads_kv;
    for (int g = 0; g < group; ++g) {
      const int* last = p.do_bad_last + (int64_t(b) * p.heads_q + hkv * group + g) * D;
      CUTE_UNROLL
      for (int j = 0; j < D / 8; ++j) {
        CUTE_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int r = last[8 * j + map.col0 + e];
          CUTE_UNROLL
          for (int half = 0; half < 2; ++half) {
            const int key = n * kBlockKV + map.row0 + 8 * half;
            if (r >= 0 && (!p.causal || key <= r + (p.seq_kv - p.seq_q))) acc(WgmmaAccumMap::index(j, half, e)) = NAN;
          }
        }
      }
    }
  }

  static __device__ void consume(const Params& p, SharedStorage& ss, int cw, int tid) {
    using namespace cute;
    using NamedBarrier = cutlass::arch::NamedBarrier;
    const int n = blockIdx.x, hkv = blockIdx.y, b = blockIdx.z;
    const int bh_kv = b * p.heads_kv + hkv;
    const int group = p.heads_q / p.heads_kv;
    const int m0 = m_begin(p, n), m_count = p.q_blocks - m0;
    const int steps = group * m_count;
    const WgmmaAccumMap map(tid);
    const int warp = tid / 32;
    const bool release_lane = tid % 32 == 0;
    auto stage_of = [](int step) { return PipelineState(step % kStages, (step / kStages) & 1, step); };

    TiledMmaG mma_g;
    auto thr_g = mma_g.get_thread_slice(tid);
    Tensor accf = make_tensor<float>(partition_shape_C(mma_g, Shape<_64, Int<D>>{}));  // dV (WG 0) / dK (WG 1)
    Tensor buf = partition_fragment_C(mma_g, Shape<_64, Int<D>>{});  // s32, one tile's product
    Tensor tA = make_tensor<int8_t>(partition_shape_A(mma_g, Shape<_64, Int<kBlockQ>>{}));  // P^ / dS^
    Tensor tA32 = recast<uint32_t>(tA);
    static_assert(size(tA32) == kBlockQ / 8, "A fragment: 4 words per 32 queries");
    CUTE_UNROLL
    for (int i = 0; i < size(accf); ++i) accf(i) = 0.f;

    cutlass::arch::ClusterBarrier::wait(&ss.bar_kv, 0);
    float x[kScores];
    uint32_t code[kScores];
    if (cw == 0) {
      TiledMmaS mma_s;
      auto thr_s = mma_s.get_thread_slice(tid);
      Tensor sK = make_tensor(make_smem_ptr(ss.k), SmemLayoutK{});
      Tensor sQ = make_tensor(make_smem_ptr(ss.q), SmemLayoutQ{});
      Tensor sDOt = make_tensor(make_smem_ptr(ss.dot), SmemLayoutT{});
      Tensor tSrK = thr_s.partition_fragment_A(sK);
      Tensor tSrQ = thr_s.partition_fragment_B(sQ);
      Tensor tGrB = thr_g.partition_fragment_B(sDOt);
      Tensor tSrS = partition_fragment_C(mma_s, Shape<_64, Int<kBlockQ>>{});
      static_assert(size(tSrS) == kScores, "S^T fragment");
      const float sk = p.k_scale[int64_t(bh_kv) * p.kv_blocks + n];
      const int key[2] = {n * kBlockKV + map.row0, n * kBlockKV + map.row0 + 8};
      const int causal_offset = p.seq_kv - p.seq_q;
      for (int step = 0; step < steps; ++step) {
        const int g = step / m_count, m = m0 + step % m_count;
        const int bh_q = b * p.heads_q + hkv * group + g;
        const PipelineState st = stage_of(step);
        ss.pipe.full_barrier_[st.index()].wait(st.phase());
        wgmma_batch(mma_s, tSrK, tSrQ(_, _, _, st.index()), tSrS, GMMA::ScaleOut::Zero);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tSrS);
        const float c = (p.q_scale[int64_t(bh_q) * p.q_blocks + m] * sk) * p.scale_log2;
        const bool masked = tile_masked(p, m, n);
        const float* lse2 = ss.lse2[st.index()];
        CUTE_UNROLL
        for (int j = 0; j < kBlockQ / 8; ++j) {
          CUTE_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int ql = 8 * j + map.col0 + e;
            const float l2 = lse2[ql];
            CUTE_UNROLL
            for (int half = 0; half < 2; ++half) {
              const int i = WgmmaAccumMap::index(j, half, e);
              float v = detail::ex2_approx(fmaf(float(tSrS(i)), c, -l2));
              if (masked) {
                const int qg = m * kBlockQ + ql;
                const bool ok = key[half] < p.seq_kv && qg < p.seq_q && (!p.causal || key[half] <= qg + causal_offset);
                v = ok ? v : -0.f;  // -0: "masked" for WG 1 (an underflowed P is +0)
              }
              x[i] = v;
            }
          }
        }
        const float sp = int8_scale(tile_amax<128>(x, ss.red[0][step & 1], kBarRed0, warp));
        NamedBarrier::sync(256, kBarPEmpty);
        CUTE_UNROLL
        for (int i = 0; i < kScores; ++i) ss.p[i * 128 + tid] = x[i];
        NamedBarrier::arrive(256, kBarPFull);
        int8_codes(x, sp, code);
        pack_codes_a_k32<kBlockQ>(code, tA32);
        wgmma_batch(mma_g, tA, tGrB(_, _, _, st.index()), buf, GMMA::ScaleOut::Zero);
        warpgroup_wait<0>();
        warpgroup_fence_operand(buf);
        if (release_lane) ss.pipe.empty_barrier_[st.index()].arrive();
        const float f = sp * p.do_scale[int64_t(bh_q) * p.q_blocks + m];
        CUTE_UNROLL
        for (int i = 0; i < size(accf); ++i) accf(i) = __fadd_rn(accf(i), __fmul_rn(float(buf(i)), f));
      }
      NamedBarrier::sync(256, kBarPEmpty);  // WG 1's last arrival (it pre-arrived once)
      char* dv = static_cast<char*>(p.dv) +
                 (int64_t(b) * p.dv_stride_b + int64_t(hkv) * p.dv_stride_h) * int64_t(sizeof(typename OutTag::T));
      if (p.do_bad_last != nullptr) mark_dv_non_finite(p, accf, b, hkv, n, map);
      store_accum_rows<OutTag, D>(accf, dv, p.dv_stride_s, n * kBlockKV, p.seq_kv, tid, 1.f, {false, false});
    } else {
      TiledMmaDP mma_dp;
      auto thr_dp = mma_dp.get_thread_slice(tid);
      Tensor sV = make_tensor(make_smem_ptr(ss.v), SmemLayoutV{});
      Tensor sDO = make_tensor(make_smem_ptr(ss.dout), SmemLayoutDO{});
      Tensor sQt = make_tensor(make_smem_ptr(ss.qt), SmemLayoutT{});
      Tensor tPrV = thr_dp.partition_fragment_A(sV);
      Tensor tPrDO = thr_dp.partition_fragment_B(sDO);
      Tensor tGrB = thr_g.partition_fragment_B(sQt);
      Tensor tPrP = partition_fragment_C(mma_dp, Shape<_64, Int<kBlockQ>>{});  // dP^T, f32
      static_assert(size(tPrP) == kScores, "dP^T fragment");
      NamedBarrier::arrive(256, kBarPEmpty);  // the P buffer starts empty
      bool bad[2] = {false, false};  // a non-finite dS in key row row0 / row0 + 8 (module comment)
      for (int step = 0; step < steps; ++step) {
        const int g = step / m_count, m = m0 + step % m_count;
        const int bh_q = b * p.heads_q + hkv * group + g;
        const PipelineState st = stage_of(step);
        ss.pipe.full_barrier_[st.index()].wait(st.phase());
        wgmma_batch(mma_dp, tPrV, tPrDO(_, _, _, st.index()), tPrP, GMMA::ScaleOut::Zero);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tPrP);
        const float* delta = ss.delta[st.index()];
        NamedBarrier::sync(256, kBarPFull);
        CUTE_UNROLL
        for (int j = 0; j < kBlockQ / 8; ++j) {
          CUTE_UNROLL
          for (int e = 0; e < 2; ++e) {
            const float dl = delta[8 * j + map.col0 + e];
            CUTE_UNROLL
            for (int half = 0; half < 2; ++half) {
              const int i = WgmmaAccumMap::index(j, half, e);
              const float pv = ss.p[i * 128 + tid];
              const float ds = signbit(pv) ? 0.f : __fmul_rn(pv, __fsub_rn(tPrP(i), dl));
              const bool finite = fabsf(ds) < INFINITY;  // NaN compares false
              bad[half] |= !finite;
              x[i] = finite ? ds : 0.f;
            }
          }
        }
        NamedBarrier::arrive(256, kBarPEmpty);
        const float sds = int8_scale(tile_amax<128>(x, ss.red[1][step & 1], kBarRed0 + 1, warp));
        int8_codes(x, sds, code);
        pack_codes_a_k32<kBlockQ>(code, tA32);
        wgmma_batch(mma_g, tA, tGrB(_, _, _, st.index()), buf, GMMA::ScaleOut::Zero);
        warpgroup_wait<0>();
        warpgroup_fence_operand(buf);
        if (release_lane) ss.pipe.empty_barrier_[st.index()].arrive();
        const float f = sds * p.q_scale[int64_t(bh_q) * p.q_blocks + m];
        CUTE_UNROLL
        for (int i = 0; i < size(accf); ++i) accf(i) = __fadd_rn(accf(i), __fmul_rn(float(buf(i)), f));
      }
      char* dk = static_cast<char*>(p.dk) +
                 (int64_t(b) * p.dk_stride_b + int64_t(hkv) * p.dk_stride_h) * int64_t(sizeof(typename OutTag::T));
      store_accum_rows<OutTag, D>(accf, dk, p.dk_stride_s, n * kBlockKV, p.seq_kv, tid, p.sm_scale,
                                  {quad_any(bad[0]), quad_any(bad[1])});
    }
  }
#endif  // __CUDACC__
};

}  // namespace sage::sm90
