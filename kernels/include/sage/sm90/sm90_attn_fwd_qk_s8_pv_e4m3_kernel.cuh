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
  // stored columns: all, or a multiple of 8 below (the epilogue stores whole 8-column groups)
  const bool d_out_ok = a.head_dim_out == 0 || a.head_dim_out == kHeadDim ||
                        (a.head_dim_out >= 8 && a.head_dim_out < kHeadDim && a.head_dim_out % 8 == 0);
  if (!attn_fwd_sm90_args_ok(a, kHeadDim) || !d_out_ok) return cudaErrorInvalidValue;
  return launch_attn_fwd_sm90_from_args<Kernel>(a, stream);
}

}  // namespace sage::sm90
