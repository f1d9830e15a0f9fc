// Hopper (sm_90a) training backward, recipe `train_s8`: the compositions of its two mainloops
// with the backward kernel, and the launcher the per-configuration translation units instantiate.
//   dK/dV   collective/sm90_attn_bwd_mainloop_train_s8_dkdv_tma_gmma_ws.hpp
//   dQ      collective/sm90_attn_bwd_mainloop_train_s8_dq_tma_gmma_ws.hpp
#pragma once

// First: the mainloop headers order the CUDA driver typedefs before CUTLASS.
#include "sage/sm90/collective/sm90_attn_bwd_mainloop_train_s8_dkdv_tma_gmma_ws.hpp"
#include "sage/sm90/collective/sm90_attn_bwd_mainloop_train_s8_dq_tma_gmma_ws.hpp"
#include "sage/sm90/kernel/sm90_attn_bwd_kernel_tma_ws.hpp"

namespace sage::sm90 {

template <int kHeadDim>
inline bool attn_bwd_sm90_args_ok(const AttnBwdTrainS8Args& a) {
  return a.head_dim == kHeadDim && a.batch > 0 && a.heads_q > 0 && a.heads_kv > 0 && a.seq_q > 0 &&
         a.seq_kv > 0 && a.heads_q % a.heads_kv == 0 && a.heads_q <= 65535 && a.batch <= 65535 &&
         a.sm_scale > 0.f && a.q && a.q_t && a.k && a.k_t && a.v && a.dout && a.do_t && a.q_scale && a.k_scale &&
         a.do_scale && a.lse2 && a.delta && a.dq && a.dk && a.dv;
}

#if defined(__CUDACC__)
template <int kHeadDim, class OutTag>
cudaError_t launch_attn_bwd_sm90_train_s8(const AttnBwdTrainS8Args& a, cudaStream_t stream) {
  using KernelDkDv = AttnBwdSm90KernelTmaWs<CollectiveMainloopBwdSm90TrainS8DkDv<kHeadDim, OutTag>>;
  using KernelDq = AttnBwdSm90KernelTmaWs<CollectiveMainloopBwdSm90TrainS8Dq<kHeadDim, OutTag>>;
  if (!attn_bwd_sm90_args_ok<kHeadDim>(a)) return cudaErrorInvalidValue;
  typename KernelDkDv::Params p_kv;
  cudaError_t err = KernelDkDv::Mainloop::to_params(a, p_kv);
  if (err != cudaSuccess) return err;
  typename KernelDq::Params p_q;
  err = KernelDq::Mainloop::to_params(a, p_q);
  if (err != cudaSuccess) return err;
  err = launch_attn_bwd_sm90<KernelDkDv>(p_kv, stream);
  if (err != cudaSuccess) return err;
  return launch_attn_bwd_sm90<KernelDq>(p_q, stream);
}
#endif

}  // namespace sage::sm90
