// Collective mainloop of the Hopper (sm_90a) train_s8 backward, dQ (the second of the two
// kernels, sm90_attn_bwd_train_s8_params.hpp). One CTA per 128-query block m of one (batch, q
// head): Q^ (INT8) and dO (16-bit) of the block stay in shared memory, the producer streams K^,
// V (16-bit) and K^T (INT8, keys permuted per 32) of every KV tile n the block sees. Each consumer
// warpgroup owns 64 of the 128 rows:
//   S   = Q^ K^T             wgmma s8 (SS)          dP = dO V^T   wgmma f16/bf16 -> f32 (SS)
//   P   = exp2(S c - lse2)   0 where masked        dS = P (dP - D)
//   dS^ = rne(dS / s_dS)     one scale per 128 x 64 tile: the maximum over both warpgroups
//   dQ += (dS^ K^) s_dS s_K  wgmma s8 (RS: dS^ from registers) into a fresh s32 buffer; dQ times
//                            sm_scale at the end
// P and dS are those of the dK/dV kernel (same integers, same scale products, same order), so the
// two kernels quantize the same tiles; dQ is summed in registers, KV tile by tile (deterministic).
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
struct CollectiveMainloopBwdSm90TrainS8Dq : BwdSm90TrainS8Base<kHeadDim_, OutTag_> {
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
  static constexpr int kRowsPerWG = 64;
  static constexpr int kStages = 4;

  using SmemLayoutQWG = decltype(cute::tile_to_shape(AtomRowsS8{}, cute::Shape<cute::_64, cute::Int<D>>{}));
  using SmemLayoutDOWG = decltype(cute::tile_to_shape(Atom16{}, cute::Shape<cute::_64, cute::Int<D>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      AtomRowsS8{}, cute::Shape<cute::_64, cute::Int<D>, cute::Int<kStages>>{}));
  using SmemLayoutV = decltype(cute::tile_to_shape(
      Atom16{}, cute::Shape<cute::_64, cute::Int<D>, cute::Int<kStages>>{}));
  using SmemLayoutKt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW64_Atom<int8_t>{}, cute::Shape<cute::Int<D>, cute::_64, cute::Int<kStages>>{}));

  using TiledMmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<int8_t, int8_t, int32_t, cute::Shape<cute::_64, cute::_64, cute::Int<D>>>()));
  using TiledMmaDP = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Elem, Elem, float, cute::Shape<cute::_64, cute::_64, cute::Int<D>>>()));
  using TiledMmaG = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<int8_t, int8_t, int32_t, cute::Shape<cute::_64, cute::Int<D>, cute::_64>>()));

  static constexpr uint32_t kKBytes = kBlockKV * D;
  static constexpr uint32_t kVBytes = kBlockKV * D * 2;
  static constexpr uint32_t kStageBytes = 2 * kKBytes + kVBytes;  // K^, K^T, V
  static constexpr uint32_t kQBytes = kBlockQ * D + kBlockQ * D * 2;
  static constexpr int kScores = kRowsPerWG * kBlockKV / 128;  // 32

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;
  static constexpr uint32_t kBarRed = 0;  // the 256-thread tile maximum

  struct SharedStorage {
    alignas(1024) int8_t q[kBlockQ * D];
    alignas(1024) Elem dout[kBlockQ * D];  // two 64-row halves, one per warpgroup
    alignas(1024) int8_t k[kStages * kKBytes];
    alignas(1024) int8_t kt[kStages * kKBytes];
    alignas(1024) Elem v[kStages * kBlockKV * D];
    float red[2][8];  // [step parity][consumer warp]
    typename Pipeline::SharedStorage pipe;
    alignas(8) uint64_t bar_q;
  };

  struct Params : Base::ParamsBase {
    CUtensorMap tma_q;   // {d, s_q, b*h_q} bytes, box {d, 128}
    CUtensorMap tma_do;  // {d, s_q, b*h_q} 16-bit, box {64, 64}
    CUtensorMap tma_k;   // {d, s_kv, b*h_kv} bytes, box {d, 64}
    CUtensorMap tma_kt;  // {s_kv_pad, d, b*h_kv} bytes, box {64, d}
    CUtensorMap tma_v;   // {d, s_kv, b*h_kv} 16-bit, box {64, 64}
    void* dq;
    int64_t dq_stride_b, dq_stride_h, dq_stride_s;
  };

  static cudaError_t to_params(const AttnBwdTrainS8Args& a, Params& p) {
    p = Params{};
    const uint64_t bh_q = uint64_t(a.batch) * a.heads_q, bh_kv = uint64_t(a.batch) * a.heads_kv;
    const uint64_t sq = a.seq_q, skv = a.seq_kv, skvp = uint64_t(sm90_train_v_pad(a.seq_kv));
    cudaError_t err = encode_tma_3d_u8(&p.tma_q, a.q, D, sq, bh_q, D, sq * D, D, kBlockQ, kSwizzleRowsS8);
    if (err == cudaSuccess)
      err = encode_tma_3d(&p.tma_do, kTma16, a.dout, D, sq, bh_q, 2 * D, 2 * sq * D, 64, kRowsPerWG,
                          CU_TENSOR_MAP_SWIZZLE_128B);
    if (err == cudaSuccess)
      err = encode_tma_3d_u8(&p.tma_k, a.k, D, skv, bh_kv, D, skv * D, D, kBlockKV, kSwizzleRowsS8);
    if (err == cudaSuccess)
      err = encode_tma_3d_u8(&p.tma_kt, a.k_t, skvp, D, bh_kv, skvp, skvp * D, kBlockKV, D, CU_TENSOR_MAP_SWIZZLE_64B);
    if (err == cudaSuccess)
      err = encode_tma_3d(&p.tma_v, kTma16, a.v, D, skv, bh_kv, 2 * D, 2 * skv * D, 64, kBlockKV,
                          CU_TENSOR_MAP_SWIZZLE_128B);
    if (err != cudaSuccess) return err;
    Base::fill_base(a, p);
    p.dq = a.dq;
    p.dq_stride_b = a.dq_stride_b;
    p.dq_stride_h = a.dq_stride_h;
    p.dq_stride_s = a.dq_stride_s;
    return cudaSuccess;
  }

  static dim3 grid(const Params& p) { return dim3(p.q_blocks, p.heads_q, p.batch); }

#if defined(__CUDACC__)
  // Query blocks in reverse (the causal ones that see the most tiles start first).
  static __device__ __forceinline__ int m_block(const Params& p) { return p.q_blocks - 1 - int(blockIdx.x); }

  // KV tiles block m sees: [0, n_end) (bottom-right causal: row i sees keys <= i + s_kv - s_q).
  static __device__ __forceinline__ int n_end(const Params& p, int m) {
    if (!p.causal) return p.kv_blocks;
    const int last_key = min(m * kBlockQ + kBlockQ - 1, p.seq_q - 1) + p.seq_kv - p.seq_q;
    return last_key < 0 ? 0 : min(p.kv_blocks, last_key / kBlockKV + 1);
  }

  static __device__ __forceinline__ void init(const Params& p, SharedStorage& ss) {
    cutlass::arch::ClusterBarrier::init(&ss.bar_q, 1);
    cute::prefetch_tma_descriptor(&p.tma_q);
    cute::prefetch_tma_descriptor(&p.tma_do);
    cute::prefetch_tma_descriptor(&p.tma_k);
    cute::prefetch_tma_descriptor(&p.tma_kt);
    cute::prefetch_tma_descriptor(&p.tma_v);
  }

  static __device__ void load(const Params& p, SharedStorage& ss, Pipeline& pipe) {
    using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
    constexpr uint64_t kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
    const int m = m_block(p), h = blockIdx.y, b = blockIdx.z;
    const int bh_q = b * p.heads_q + h;
    const int bh_kv = b * p.heads_kv + h / (p.heads_q / p.heads_kv);
    TxBarrier::arrive_and_expect_tx(&ss.bar_q, kQBytes);
    cute::SM90_TMA_LOAD_3D::copy(&p.tma_q, &ss.bar_q, kHint, ss.q, 0, m * kBlockQ, bh_q);
    CUTE_UNROLL
    for (int w = 0; w < 2; ++w) {
      CUTE_UNROLL
      for (int c = 0; c < D / 64; ++c) {
        cute::SM90_TMA_LOAD_3D::copy(&p.tma_do, &ss.bar_q, kHint, ss.dout + w * kRowsPerWG * D + c * kRowsPerWG * 64,
                                     c * 64, m * kBlockQ + w * kRowsPerWG, bh_q);
      }
    }
    auto write = cutlass::make_producer_start_state<Pipeline>();
    const int ne = n_end(p, m);
    for (int n = 0; n < ne; ++n) {
      pipe.producer_acquire(write);
      uint64_t* bar = pipe.producer_get_barrier(write);
      const int s = write.index();
      cute::SM90_TMA_LOAD_3D::copy(&p.tma_k, bar, kHint, ss.k + s * kKBytes, 0, n * kBlockKV, bh_kv);
      cute::SM90_TMA_LOAD_3D::copy(&p.tma_kt, bar, kHint, ss.kt + s * kKBytes, n * kBlockKV, 0, bh_kv);
      CUTE_UNROLL
      for (int c = 0; c < D / 64; ++c) {
        cute::SM90_TMA_LOAD_3D::copy(&p.tma_v, bar, kHint, ss.v + s * kBlockKV * D + c * kBlockKV * 64, c * 64,
                                     n * kBlockKV, bh_kv);
      }
      ++write;
    }
  }

  static __device__ void consume(const Params& p, SharedStorage& ss, int cw, int tid) {
    using namespace cute;
    const int m = m_block(p), h = blockIdx.y, b = blockIdx.z;
    const int bh_q = b * p.heads_q + h;
    const int bh_kv = b * p.heads_kv + h / (p.heads_q / p.heads_kv);
    const int ne = n_end(p, m);
    const WgmmaAccumMap map(tid);
    const bool release_lane = tid % 32 == 0;

    TiledMmaS mma_s;
    TiledMmaDP mma_dp;
    TiledMmaG mma_g;
    auto thr_s = mma_s.get_thread_slice(tid);
    auto thr_dp = mma_dp.get_thread_slice(tid);
    auto thr_g = mma_g.get_thread_slice(tid);
    Tensor sQ = make_tensor(make_smem_ptr(ss.q + cw * kRowsPerWG * D), SmemLayoutQWG{});
    Tensor sDO = make_tensor(make_smem_ptr(ss.dout + cw * kRowsPerWG * D), SmemLayoutDOWG{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k), SmemLayoutK{});
    Tensor sKt = make_tensor(make_smem_ptr(ss.kt), SmemLayoutKt{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v), SmemLayoutV{});
    Tensor tSrQ = thr_s.partition_fragment_A(sQ);
    Tensor tSrK = thr_s.partition_fragment_B(sK);
    Tensor tPrDO = thr_dp.partition_fragment_A(sDO);
    Tensor tPrV = thr_dp.partition_fragment_B(sV);
    Tensor tGrKt = thr_g.partition_fragment_B(sKt);
    Tensor tSrS = partition_fragment_C(mma_s, Shape<_64, Int<kBlockKV>>{});   // s32
    Tensor tPrP = partition_fragment_C(mma_dp, Shape<_64, Int<kBlockKV>>{});  // f32
    Tensor buf = partition_fragment_C(mma_g, Shape<_64, Int<D>>{});           // s32
    Tensor dq = make_tensor<float>(partition_shape_C(mma_g, Shape<_64, Int<D>>{}));
    Tensor tA = make_tensor<int8_t>(partition_shape_A(mma_g, Shape<_64, Int<kBlockKV>>{}));
    Tensor tA32 = recast<uint32_t>(tA);
    static_assert(size(tSrS) == kScores && size(tPrP) == kScores, "S / dP fragments");
    CUTE_UNROLL
    for (int i = 0; i < size(dq); ++i) dq(i) = 0.f;

    const int row_wg = m * kBlockQ + cw * kRowsPerWG;
    const int row[2] = {row_wg + map.row0, row_wg + map.row0 + 8};
    float lse2[2], delta[2];
    CUTE_UNROLL
    for (int half = 0; half < 2; ++half) {  // the padded rows past s_q are read, masked below
      lse2[half] = p.lse2[int64_t(bh_q) * p.s_q_pad + row[half]];
      delta[half] = p.delta[int64_t(bh_q) * p.s_q_pad + row[half]];
    }
    const float sq = p.q_scale[int64_t(bh_q) * p.q_blocks + m];
    const float* k_scale = p.k_scale + int64_t(bh_kv) * p.kv_blocks;
    const int causal_offset = p.seq_kv - p.seq_q;
    const bool rows_masked = m * kBlockQ + kBlockQ > p.seq_q;
    cutlass::arch::ClusterBarrier::wait(&ss.bar_q, 0);
    float x[kScores];
    uint32_t code[kScores];
    bool bad[2] = {false, false};  // a non-finite dS in row row[half]: that row of dQ is NaN
    for (int n = 0; n < ne; ++n) {
      const PipelineState st(n % kStages, (n / kStages) & 1, n);
      ss.pipe.full_barrier_[st.index()].wait(st.phase());
      wgmma_batch(mma_s, tSrQ, tSrK(_, _, _, st.index()), tSrS, GMMA::ScaleOut::Zero);
      wgmma_batch(mma_dp, tPrDO, tPrV(_, _, _, st.index()), tPrP, GMMA::ScaleOut::Zero);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      warpgroup_fence_operand(tPrP);
      const float sk = k_scale[n];
      const float c = (sq * sk) * p.scale_log2;
      const int last_key = n * kBlockKV + kBlockKV - 1;
      const bool masked = rows_masked || last_key >= p.seq_kv || (p.causal && last_key > m * kBlockQ + causal_offset);
      CUTE_UNROLL
      for (int j = 0; j < kBlockKV / 8; ++j) {
        CUTE_UNROLL
        for (int half = 0; half < 2; ++half) {
          CUTE_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int i = WgmmaAccumMap::index(j, half, e);
            const float pv = detail::ex2_approx(fmaf(float(tSrS(i)), c, -lse2[half]));
            float ds = __fmul_rn(pv, __fsub_rn(tPrP(i), delta[half]));
            if (masked) {
              const int key = n * kBlockKV + 8 * j + map.col0 + e;
              const bool ok = row[half] < p.seq_q && key < p.seq_kv && (!p.causal || key <= row[half] + causal_offset);
              ds = ok ? ds : 0.f;
            }
            const bool finite = fabsf(ds) < INFINITY;  // a non-finite D (dO) row: NaN compares false
            bad[half] |= !finite;
            x[i] = finite ? ds : 0.f;
          }
        }
      }
      const float sds = int8_scale(tile_amax<256>(x, ss.red[n & 1], kBarRed, cw * 4 + tid / 32));
      int8_codes(x, sds, code);
      pack_codes_a_k32<kBlockKV>(code, tA32);
      wgmma_batch(mma_g, tA, tGrKt(_, _, _, st.index()), buf, GMMA::ScaleOut::Zero);
      warpgroup_wait<0>();
      warpgroup_fence_operand(buf);
      if (release_lane) ss.pipe.empty_barrier_[st.index()].arrive();
      const float f = sds * sk;
      CUTE_UNROLL
      for (int i = 0; i < size(dq); ++i) dq(i) = __fadd_rn(dq(i), __fmul_rn(float(buf(i)), f));
    }
    char* base = static_cast<char*>(p.dq) +
                 (int64_t(b) * p.dq_stride_b + int64_t(h) * p.dq_stride_h) * int64_t(sizeof(typename OutTag::T));
    store_accum_rows<OutTag, D>(dq, base, p.dq_stride_s, row_wg, p.seq_q, tid, p.sm_scale,
                                {quad_any(bad[0]), quad_any(bad[1])});
  }
#endif  // __CUDACC__
};

}  // namespace sage::sm90
