// The Hopper train_s8 backward kernels as compositions (the forward's contract,
// sm90_attn_fwd_kernel_tma_ws.hpp): a collective mainloop that owns its loads (producer), its
// consumer warpgroups' GEMMs and their stores, on one PipelineTmaAsync ring of `kStageBytes` per
// stage. Warpgroup 0 produces (one thread issues TMA, setmaxnreg 24), the consumers get 240.
#pragma once

#include <cuda_runtime.h>

#include "sage/common/arch.hpp"
#include "sage/sm90/kernel/sm90_attn_fwd_kernel_tma_ws.hpp"  // launch_sm90_kernel

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace sage::sm90 {

template <class Mainloop_>
struct AttnBwdSm90KernelTmaWs {
  using Mainloop = Mainloop_;
  static constexpr int kNumConsumerWG = Mainloop::kNumConsumerWG;
  static_assert(kNumConsumerWG == 2, "two consumer warpgroups");
  static constexpr int kThreads = 128 * (1 + kNumConsumerWG);
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kNumConsumerWG <= 65536, "register file");
  using SharedStorage = typename Mainloop::SharedStorage;
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;  // base rounded up to 1024
  static_assert(kSmemBytes <= 232448, "shared memory per block (227 KB)");
  using Params = typename Mainloop::Params;

#if defined(__CUDACC__)
  __device__ void operator()(const Params& p, char* smem_raw) const {
    using Pipeline = typename Mainloop::Pipeline;
    SharedStorage& ss = *reinterpret_cast<SharedStorage*>(
        (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    const int wg = cutlass::canonical_warp_group_idx();
    typename Pipeline::Params pipe_params;
    pipe_params.role = wg == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
    pipe_params.is_leader = threadIdx.x == 0;
    pipe_params.num_consumers = Mainloop::kEmptyArrivals;
    pipe_params.transaction_bytes = Mainloop::kStageBytes;
    Pipeline pipe(ss.pipe, pipe_params, cute::Shape<cute::_1, cute::_1, cute::_1>{});
    if (threadIdx.x == 0) Mainloop::init(p, ss);
    cutlass::arch::fence_barrier_init();
    __syncthreads();
    if (wg == 0) {
      cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
      if (threadIdx.x == 0) Mainloop::load(p, ss, pipe);
      return;
    }
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    Mainloop::consume(p, ss, wg - 1, int(threadIdx.x % 128));
  }
#endif
};

#if defined(__CUDACC__)
template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreads, 1)
    attn_bwd_sm90_device_kernel(const __grid_constant__ typename Kernel::Params p) {
#if SAGE_DEVICE_SM90A
  extern __shared__ char smem[];
  Kernel{}(p, smem);
#else
  SAGE_DEVICE_TRAP_WRONG_ARCH();
#endif
}

template <class Kernel>
cudaError_t launch_attn_bwd_sm90(const typename Kernel::Params& p, cudaStream_t stream) {
  return launch_sm90_kernel<Kernel>(attn_bwd_sm90_device_kernel<Kernel>, Kernel::Mainloop::grid(p), p, stream);
}
#endif

}  // namespace sage::sm90
