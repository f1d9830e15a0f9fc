// Hopper (sm_90a) attention forward, recipe `qk_s8_pv_e4m3` (SageAttention2 8-bit): the
// composition of its mainloop, epilogue and tile scheduler, and the launcher the per-
// configuration translation units instantiate.
//   mainloop   collective/sm90_attn_fwd_mainloop_qk_s8_pv_e4m3_tma_gmma_ws.hpp
//   softmax    collective/sm90_attn_fwd_softmax_online.hpp
//   epilogue   collective/sm90_attn_fwd_epilogue_store_regs.hpp
//   scheduler  kernel/sm90_attn_fwd_tile_scheduler.hpp
//   kernel     kernel/sm90_attn_fwd_kernel_tma_ws.hpp
#pragma once

// First: the mainloop header orders the CUDA driver typedefs before CUTLASS (see there).
#include "sage/sm90/collective/sm90_attn_fwd_mainloop_qk_s8_pv_e4m3_tma_gmma_ws.hpp"
#include "sage/sm90/collective/sm90_attn_fwd_epilogue_store_regs.hpp"
#include "sage/sm90/kernel/sm90_attn_fwd_kernel_tma_ws.hpp"
#include "sage/sm90/kernel/sm90_attn_fwd_tile_scheduler.hpp"

namespace sage::sm90 {

// Consumer warpgroups per CTA: the tile time is the softmax's wherever the GEMMs are short (d=64:
// half of d=128's GEMM work per score); a third warpgroup (192-row tiles, 160 registers each)
// keeps two softmaxes in flight while one warpgroup runs its GEMMs (FA3's FP8 d=64 layout).
// d=128 stays at two: two-level does not fit 160 registers (S 64 + O 64 + buf 64 + P 16), and
// one-level with three spilled 144 B per thread and ran 8 % slower than with two (H200 A/B,
// docs/perf/sm90_qk_s8_pv_e4m3.md step 9).
template <int kHeadDim>
inline constexpr int kSm90QkS8PvE4m3ConsumerWG = kHeadDim == 64 ? 3 : 2;

template <int kHeadDim, class OutTag, bool kOneLevel>
using AttnFwdSm90QkS8PvE4m3Kernel = AttnFwdSm90KernelTmaWs<
    CollectiveMainloopFwdSm90QkS8PvE4m3<kHeadDim, kSm90QkS8PvE4m3ConsumerWG<kHeadDim>, kOneLevel>,
    CollectiveEpilogueFwdSm90StoreRegs<kHeadDim, OutTag>, AttnFwdSingleTileScheduler>;

template <int kHeadDim, class OutTag, bool kOneLevel>
cudaError_t launch_attn_fwd_sm90_qk_s8_pv_e4m3(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t stream) {
  using Kernel = AttnFwdSm90QkS8PvE4m3Kernel<kHeadDim, OutTag, kOneLevel>;
  if (a.head_dim != kHeadDim || a.batch <= 0 || a.heads_q <= 0 || a.heads_kv <= 0 || a.seq_q <= 0 ||
      a.seq_kv <= 0 || a.heads_q % a.heads_kv != 0 || a.heads_q > 65535 || a.batch > 65535 ||
      !(a.sm_scale > 0.f) || a.q == nullptr || a.k == nullptr || a.v_t == nullptr ||
      a.q_scale == nullptr || a.k_scale == nullptr || a.v_scale == nullptr || a.o == nullptr ||
      // stored columns: all, or a multiple of 8 below (the epilogue stores whole 8-column groups)
      !(a.head_dim_out == 0 || a.head_dim_out == kHeadDim ||
        (a.head_dim_out >= 8 && a.head_dim_out < kHeadDim && a.head_dim_out % 8 == 0))) {
    return cudaErrorInvalidValue;
  }
  typename Kernel::Params p;
  cudaError_t err = Kernel::Mainloop::to_params(a, p.mainloop);
  if (err != cudaSuccess) return err;
  p.epilogue = Kernel::Epilogue::to_params(a);
  p.scheduler = AttnFwdSingleTileScheduler::to_params(a.seq_q, a.heads_q, a.batch, Kernel::Mainloop::kBlockQ);
  return launch_attn_fwd_sm90<Kernel>(p, stream);
}

}  // namespace sage::sm90
