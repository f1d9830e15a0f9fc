// Hopper (sm_90a) training forward, recipe `train_s8`: the composition of its mainloop, the
// shared epilogue (no per-channel V scale: the mainloop dequantizes per KV tile) and the tile
// scheduler, and the launcher the per-configuration translation units instantiate.
//   mainloop   collective/sm90_attn_fwd_mainloop_train_s8_tma_gmma_ws.hpp
#pragma once

// First: the mainloop header orders the CUDA driver typedefs before CUTLASS.
#include "sage/sm90/collective/sm90_attn_fwd_mainloop_train_s8_tma_gmma_ws.hpp"
#include "sage/sm90/collective/sm90_attn_fwd_epilogue_store_regs.hpp"
#include "sage/sm90/kernel/sm90_attn_fwd_kernel_tma_ws.hpp"
#include "sage/sm90/kernel/sm90_attn_fwd_tile_scheduler.hpp"

namespace sage::sm90 {

// d=64: three consumer warpgroups (160 registers: S 32 + O 32 + buf 32 + P 8); d=128: two
// (S 32 + O 64 + buf 64 + P 8 is over 160), as in the inference kernel.
template <int kHeadDim>
inline constexpr int kSm90TrainS8ConsumerWG = kHeadDim == 64 ? 3 : 2;

template <int kHeadDim, class OutTag>
using AttnFwdSm90TrainS8Kernel = AttnFwdSm90KernelTmaWs<
    CollectiveMainloopFwdSm90TrainS8<kHeadDim, kSm90TrainS8ConsumerWG<kHeadDim>>,
    CollectiveEpilogueFwdSm90StoreRegs<kHeadDim, OutTag, /*kVChannelScale=*/false>, AttnFwdSingleTileScheduler>;

template <int kHeadDim, class OutTag>
cudaError_t launch_attn_fwd_sm90_train_s8(const AttnFwdTrainS8Args& a, cudaStream_t stream) {
  using Kernel = AttnFwdSm90TrainS8Kernel<kHeadDim, OutTag>;
  if (!attn_fwd_sm90_args_ok(a, kHeadDim)) return cudaErrorInvalidValue;
  return launch_attn_fwd_sm90_from_args<Kernel>(a, stream);
}

}  // namespace sage::sm90
