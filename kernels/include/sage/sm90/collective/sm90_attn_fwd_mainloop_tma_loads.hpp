// What every Hopper forward mainloop of this family does the same way (the inference
// qk_s8_pv_e4m3 and the training train_s8 collectives derive from it): which KV tiles a query
// block sees, barrier and descriptor setup, and the TMA producer that streams Q once and K / V^T
// tiles into PipelineTmaAsync rings. Parameterized by the derived mainloop's tile sizes; its
// Params / SharedStorage provide tma_q, tma_k, tma_v, seq_q, seq_kv, heads_q, heads_kv,
// num_n_blocks, causal and q, k, v, bar_q, pin. Include it after sage/sm90/sm90_tma_desc.hpp (the
// driver typedefs must come before CUTLASS's headers).
#pragma once

#include <cuda_runtime.h>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "sage/sm90/kernel/sm90_attn_fwd_tile_scheduler.hpp"
#include "sage/sm90/sm90_tma_desc.hpp"

namespace sage::sm90 {

template <int kBlockQ, int kBlockKV, uint32_t kQTileBytes, uint32_t kKTileBytes, uint32_t kVTileBytes>
struct AttnFwdSm90TmaLoads {
  // Host: the three TMA descriptors of a call. Rank 3 ({d, s, b*h}) so that a box never crosses
  // into the next head: rows >= s are zero-filled by TMA. q, k: (b*h, s, d) bytes, boxes {d, kBlockQ}
  // and {d, kBlockKV}; v_t: (b*h_kv, d, s_pad) bytes, box {kBlockKV, d}.
  template <class Params>
  static cudaError_t encode_tmas(Params& p, const void* q, const void* k, const void* v_t, int batch, int heads_q,
                                 int heads_kv, int seq_q, int seq_kv, uint64_t d, uint64_t s_pad,
                                 CUtensorMapSwizzle swizzle_qk, CUtensorMapSwizzle swizzle_v) {
    const uint64_t bh_q = uint64_t(batch) * heads_q;
    const uint64_t bh_kv = uint64_t(batch) * heads_kv;
    cudaError_t err = encode_tma_3d_u8(&p.tma_q, q, d, seq_q, bh_q, d, uint64_t(seq_q) * d, uint32_t(d), kBlockQ,
                                       swizzle_qk);
    if (err != cudaSuccess) return err;
    err = encode_tma_3d_u8(&p.tma_k, k, d, seq_kv, bh_kv, d, uint64_t(seq_kv) * d, uint32_t(d), kBlockKV, swizzle_qk);
    if (err != cudaSuccess) return err;
    return encode_tma_3d_u8(&p.tma_v, v_t, s_pad, d, bh_kv, s_pad, s_pad * d, kBlockKV, uint32_t(d), swizzle_v);
  }

#if defined(__CUDACC__)
  // KV tiles that query block m_block may see: [0, n_end). Bottom-right causal: row i sees keys
  // <= i + (s_kv - s_q); a block whose rows see no key loads nothing (n_end == 0).
  template <class Params>
  static __device__ __forceinline__ int n_block_end(const Params& p, int m_block) {
    int n_end = p.num_n_blocks;
    if (p.causal) {
      const int last_row = min(m_block * kBlockQ + kBlockQ - 1, p.seq_q - 1);
      const int last_key = last_row + p.seq_kv - p.seq_q;
      n_end = last_key < 0 ? 0 : min(n_end, last_key / kBlockKV + 1);
    }
    return n_end;
  }

  template <class Params>
  static __device__ __forceinline__ int kv_head(const Params& p, int head) { return head / (p.heads_q / p.heads_kv); }

  // One thread, before the CTA-wide barrier that follows barrier initialization.
  template <class Params, class SharedStorage>
  static __device__ __forceinline__ void init(const Params& p, SharedStorage& ss) {
    cutlass::arch::ClusterBarrier::init(&ss.bar_q, 1);
    cute::prefetch_tma_descriptor(&p.tma_q);
    cute::prefetch_tma_descriptor(&p.tma_k);
    cute::prefetch_tma_descriptor(&p.tma_v);
  }

  // Producer (one thread): Q once, then K(n) and V^T(n) for n < n_end into the rings.
  template <class Params, class SharedStorage, class Pipeline, class PipelineState>
  static __device__ void load(const Params& p, SharedStorage& ss, Pipeline& pipe_k, Pipeline& pipe_v,
                              PipelineState& write, const AttnFwdTile& t, int n_end) {
    using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
    constexpr uint64_t kCacheHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
    const int bh_q = t.batch * p.heads_q + t.head;
    const int bh_kv = t.batch * p.heads_kv + kv_head(p, t.head);
    TxBarrier::arrive_and_expect_tx(&ss.bar_q, kQTileBytes);
    cute::SM90_TMA_LOAD_3D::copy(&p.tma_q, &ss.bar_q, kCacheHint, ss.q, 0, t.m_block * kBlockQ, bh_q);
    for (int n = 0; n < n_end; ++n) {
      pipe_k.producer_acquire(write);
      cute::SM90_TMA_LOAD_3D::copy(&p.tma_k, pipe_k.producer_get_barrier(write), kCacheHint,
                                   ss.k + write.index() * kKTileBytes, 0, n * kBlockKV, bh_kv);
      pipe_v.producer_acquire(write);
      cute::SM90_TMA_LOAD_3D::copy(&p.tma_v, pipe_v.producer_get_barrier(write), kCacheHint,
                                   ss.v + write.index() * kVTileBytes, n * kBlockKV, 0, bh_kv);
      ++write;
    }
  }

  // One wgmma batch C (+)= A(:, :, kb) B(:, :, kb, stage) over the k-blocks of the fragments (A in
  // shared memory or registers, B staged in shared memory), the first k-block with `first`
  // (ScaleOut::Zero: a fresh accumulator); fenced, committed, not waited for.
  template <class TiledMma, class FragA, class FragB, class FragC>
  static __device__ __forceinline__ void issue_gemm(TiledMma& mma, const FragA& a, const FragB& b, int stage,
                                                    FragC& c, cute::GMMA::ScaleOut first) {
    cute::warpgroup_fence_operand(c);
    cute::warpgroup_arrive();
    mma.accumulate_ = first;
    CUTE_UNROLL
    for (int kb = 0; kb < cute::size<2>(a); ++kb) {
      cute::gemm(mma, a(cute::_, cute::_, kb), b(cute::_, cute::_, kb, stage), c);
      mma.accumulate_ = cute::GMMA::ScaleOut::One;
    }
    cute::warpgroup_commit_batch();
  }

  // Keys a thread's two rows (grow0, grow0 + 8) may see, inclusive (bottom-right causal or s_kv),
  // and whether tile n needs the element mask (it crosses the limit of the warpgroup's first row).
  struct KeyLimits {
    int row[2];
    int wg;
    template <class Params>
    __device__ __forceinline__ KeyLimits(const Params& p, int grow0, int wg_row_begin) {
      const int causal_offset = p.seq_kv - p.seq_q;
      row[0] = p.causal ? min(p.seq_kv - 1, grow0 + causal_offset) : p.seq_kv - 1;
      row[1] = p.causal ? min(p.seq_kv - 1, grow0 + 8 + causal_offset) : p.seq_kv - 1;
      wg = p.causal ? min(p.seq_kv - 1, wg_row_begin + causal_offset) : p.seq_kv - 1;
    }
    __device__ __forceinline__ bool masked(int n) const { return n * kBlockKV + kBlockKV - 1 > wg; }
  };

  // The consumer's schedule over the KV tiles of one query block, the same for every recipe of the
  // family: QK(n) and PV(n-1) issued back to back in the warpgroups' turn (named barriers: ping-pong
  // with two, round robin with three), softmax(n) while PV(n-1) is on the tensor cores. The recipe
  // gives the steps:
  //   begin(n)                          first in tile n's step (the tile's scale loads: issued early)
  //   issue_qk(stage), issue_pv(stage)  commit a wgmma batch, do not wait
  //   fence_s()                         warpgroup_fence_operand on the score accumulator
  //   scores(n)                         QK(n) has completed: the tile's softmax
  //   pin()                             the shared-memory store that keeps scores(n) above the PV wait
  //   pv_done(n)                        n >= 1, PV(n-1) has completed: fold its buffer, pack P(n)
  //   first_done()                      after scores(0): pack P(0)
  // The last PV is issued and waited here; folding it is the recipe's. Stage and phase come from
  // the loop counter, not from PipelineState objects carried through the loop: ptxas then keeps them
  // (and the smem descriptors built from them) in uniform registers; carried states put the
  // descriptor math on the vector path right before each wgmma issue (+17 instructions per tile).
  // The pipelines' barriers are waited on / arrived at directly in shared memory (what
  // PipelineTmaAsync's consumer wait / release do for a one-CTA cluster): a pipeline object kept
  // live through the loop held generic pointers in registers and cost 4-6 % at d=128.
  template <int kStages, int kNumConsumerWG, uint32_t kPingPongThreads, class PipelineState, class PipeStorage,
            class Begin, class IssueQk, class IssuePv, class FenceS, class Scores, class Pin, class PvDone,
            class FirstDone>
  static __device__ __forceinline__ void kv_loop(PipeStorage& pipe_k, PipeStorage& pipe_v, PipelineState& read,
                                                 int n_end, int cw, int tid, Begin&& begin, IssueQk&& issue_qk,
                                                 IssuePv&& issue_pv,
                                                 FenceS&& fence_s, Scores&& scores, Pin&& pin, PvDone&& pv_done,
                                                 FirstDone&& first_done) {
    using NamedBarrier = cutlass::arch::NamedBarrier;
    // The empty barriers count one arrival per consumer warp: lane 0, after its warp's wgmma wait.
    const bool release_lane = tid % 32 == 0;
    auto release = [&](PipeStorage& pipe, const PipelineState& st) {
      if (release_lane) pipe.empty_barrier_[st.index()].arrive();
    };
    auto wait = [](PipeStorage& pipe, const PipelineState& st) { pipe.full_barrier_[st.index()].wait(st.phase()); };
    const uint32_t pp_own = cw;
    const uint32_t pp_next = (cw + 1) % kNumConsumerWG;
    const uint32_t first = read.count();
    auto state = [first](int n) {
      const uint32_t i = first + uint32_t(n);
      return PipelineState(int(i % kStages), (i / kStages) & 1, i);
    };
    // Consumer warpgroup 0 issues first: the last one in turn order pre-arrives on its barrier.
    if (cw == kNumConsumerWG - 1) NamedBarrier::arrive(kPingPongThreads, 0);
    {
      begin(0);
      const PipelineState k0 = state(0);
      NamedBarrier::sync(kPingPongThreads, pp_own);
      wait(pipe_k, k0);
      issue_qk(k0.index());
      NamedBarrier::arrive(kPingPongThreads, pp_next);
      cute::warpgroup_wait<0>();
      fence_s();
      release(pipe_k, k0);
      scores(0);
      first_done();
    }
    for (int n = 1; n < n_end; ++n) {
      begin(n);
      const PipelineState kn = state(n);      // K of tile n
      const PipelineState vn = state(n - 1);  // V lags K by one tile
      NamedBarrier::sync(kPingPongThreads, pp_own);
      wait(pipe_k, kn);
      issue_qk(kn.index());
      wait(pipe_v, vn);
      issue_pv(vn.index());
      NamedBarrier::arrive(kPingPongThreads, pp_next);
      cute::warpgroup_wait<1>();  // QK(n) done, PV(n-1) may still run
      fence_s();
      release(pipe_k, kn);
      scores(n);
      pin();  // without it the compiler sinks the EX2s below the wait and nothing overlaps PV(n-1)
      cute::warpgroup_wait<0>();  // PV(n-1) done: its buffer valid, P registers free
      release(pipe_v, vn);
      pv_done(n);
    }
    {
      const PipelineState vl = state(n_end - 1);
      wait(pipe_v, vl);
      issue_pv(vl.index());
      cute::warpgroup_wait<0>();
      release(pipe_v, vl);
    }
    // Balance the barriers: warpgroup 0's got one arrival more (the pre-arrival) than it synced.
    if (cw == 0) NamedBarrier::sync(kPingPongThreads, pp_own);
    read = state(n_end);
  }

 protected:
  // ptxas hoists wgmma.wait_group above independent ALU work (it did so for the whole softmax,
  // which then no longer overlapped the PV wgmma). A shared-memory store is not moved across the
  // wait; storing a value that depends on every EX2 of the tile (the row sums) pins the softmax
  // before it. One STS per thread per tile; the slot is never read.
  static __device__ __forceinline__ void pin_before_wgmma_wait(float* slot, float v) {
    asm volatile("st.shared.f32 [%0], %1;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(slot))), "f"(v)
                 : "memory");
  }
#endif  // __CUDACC__
};

// The loads of a mainloop with kNumConsumerWG warpgroups of 64 rows, head dim D and kBlockKV-key
// tiles of 1-byte elements (Q, K rows and V^T columns all 8-bit).
template <int D, int kNumConsumerWG, int kBlockKV>
using AttnFwdSm90TmaLoadsFor = AttnFwdSm90TmaLoads<64 * kNumConsumerWG, kBlockKV, uint32_t(64 * kNumConsumerWG * D),
                                                   uint32_t(kBlockKV * D), uint32_t(D * kBlockKV)>;

}  // namespace sage::sm90
