// What every Hopper forward mainloop of this family does the same way (the inference
// qk_s8_pv_e4m3 and the training train_s8 collectives derive from it): which KV tiles a query
// block sees, barrier and descriptor setup, and the TMA producer that streams Q once and K / V^T
// tiles into PipelineTmaAsync rings. Parameterized by the derived mainloop's tile sizes; its
// Params / SharedStorage provide tma_q, tma_k, tma_v, seq_q, seq_kv, heads_q, heads_kv,
// num_n_blocks, causal and q, k, v, bar_q, pin.
#pragma once

#include <cuda_runtime.h>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "sage/sm90/kernel/sm90_attn_fwd_tile_scheduler.hpp"

namespace sage::sm90 {

template <int kBlockQ, int kBlockKV, uint32_t kQTileBytes, uint32_t kKTileBytes, uint32_t kVTileBytes>
struct AttnFwdSm90TmaLoads {
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
