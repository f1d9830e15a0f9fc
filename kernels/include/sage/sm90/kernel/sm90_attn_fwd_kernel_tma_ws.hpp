// The Hopper attention forward kernel as a composition (CUTLASS's contract): a collective
// mainloop (producer load + consumer MMA/softmax), a collective epilogue and a tile scheduler,
// each with Params built on the host. Warp specialization: warpgroup 0 produces (one thread
// issues TMA, setmaxnreg down to 24), the consumer warpgroups run the mainloop and the epilogue
// (setmaxnreg up to 240). A backward or a Blackwell kernel swaps the mainloop, a varlen or
// persistent one the scheduler.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "sage/common/arch.hpp"

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace sage::sm90 {

template <class Mainloop_, class Epilogue_, class Scheduler_>
struct AttnFwdSm90KernelTmaWs {
  using Mainloop = Mainloop_;
  using Epilogue = Epilogue_;
  using Scheduler = Scheduler_;
  static constexpr int kNumConsumerWG = Mainloop::kNumConsumerWG;
  static constexpr int kThreads = 128 * (1 + kNumConsumerWG);
  // setmaxnreg split of the 64K registers: the producer needs few, consumers get the rest
  // (multiples of 8).
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = kNumConsumerWG == 2 ? 240 : 160;
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kNumConsumerWG <= 65536, "register file");

  struct SharedStorage {
    typename Mainloop::SharedStorage mainloop;
  };
  // + 1024: the dynamic smem base is only guaranteed 16-byte aligned; swizzled TMA/GMMA tiles
  // need 1024-byte alignment, so the kernel rounds the base up.
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;

  struct Params {
    typename Mainloop::Params mainloop;
    typename Epilogue::Params epilogue;
    typename Scheduler::Params scheduler;
  };

#if defined(__CUDACC__)
  __device__ void operator()(const Params& p, char* smem_raw) const {
    using Pipeline = typename Mainloop::Pipeline;
    SharedStorage& ss = *reinterpret_cast<SharedStorage*>(
        (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    // Warp-uniform by construction (shuffle from lane 0), so that ptxas keeps everything derived
    // from it (the warpgroup's Q descriptor, its rows) in uniform registers.
    const int wg = cutlass::canonical_warp_group_idx();
    const AttnFwdTile tile = Scheduler::tile(p.scheduler);
    const int n_end = Mainloop::n_block_end(p.mainloop, tile.m_block);

    // Producer: thread 0 (the leader, which also sets the expected bytes). Consumers: the
    // mainloop's arrivals per stage on the empty barriers (Mainloop::kEmptyArrivals).
    typename Pipeline::Params pipe_params;
    pipe_params.role = wg == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
    pipe_params.is_leader = threadIdx.x == 0;
    pipe_params.num_consumers = Mainloop::kEmptyArrivals;
    pipe_params.transaction_bytes = Mainloop::kKTileBytes;
    Pipeline pipe_k(ss.mainloop.pipeline_k, pipe_params, cute::Shape<cute::_1, cute::_1, cute::_1>{});
    pipe_params.transaction_bytes = Mainloop::kVTileBytes;
    Pipeline pipe_v(ss.mainloop.pipeline_v, pipe_params, cute::Shape<cute::_1, cute::_1, cute::_1>{});
    if (threadIdx.x == 0) Mainloop::init(p.mainloop, ss.mainloop);
    cutlass::arch::fence_barrier_init();
    __syncthreads();

    if (wg == 0) {
      cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
      if (threadIdx.x == 0 && n_end > 0) {
        auto write = cutlass::make_producer_start_state<Pipeline>();
        Mainloop::load(p.mainloop, ss.mainloop, pipe_k, pipe_v, write, tile, n_end);
      }
      return;
    }
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    const int cw = wg - 1;
    const int tid = threadIdx.x % 128;
    auto tOrO = Mainloop::make_fragment_o();
    typename Mainloop::Softmax softmax;
    typename Mainloop::PipelineState read;
    Mainloop::mma(p.mainloop, ss.mainloop, read, tile, n_end, cw, tid, tOrO, softmax);
    Epilogue::store(p.epilogue, tile, tile.m_block * Mainloop::kBlockQ + cw * Mainloop::kRowsPerWG, tid, tOrO,
                    softmax);
  }
#endif
};

#if defined(__CUDACC__)
template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreads, 1)
    attn_fwd_sm90_device_kernel(const __grid_constant__ typename Kernel::Params p) {
#if SAGE_DEVICE_SM90A
  extern __shared__ char smem[];
  Kernel{}(p, smem);
#else
  SAGE_DEVICE_TRAP_WRONG_ARCH();
#endif
}

// The checks every recipe's launcher makes on the fields its args share (shapes, grid limits,
// scale, the pointers every recipe has); a recipe adds its own.
template <class Args>
inline bool attn_fwd_sm90_args_ok(const Args& a, int head_dim) {
  return a.head_dim == head_dim && a.batch > 0 && a.heads_q > 0 && a.heads_kv > 0 && a.seq_q > 0 &&
         a.seq_kv > 0 && a.heads_q % a.heads_kv == 0 && a.heads_q <= 65535 && a.batch <= 65535 &&
         a.sm_scale > 0.f && a.q != nullptr && a.k != nullptr && a.v_t != nullptr && a.q_scale != nullptr &&
         a.k_scale != nullptr && a.v_scale != nullptr && a.o != nullptr;
}

// Run the composed kernel over a recipe's args: the mainloop's and epilogue's Params from them,
// one CTA per tile.
template <class Kernel, class Args>
cudaError_t launch_attn_fwd_sm90_from_args(const Args& a, cudaStream_t stream);

// Launch `kernel` (a __global__ of Kernel's Params) with Kernel's block and shared memory on
// `stream`. The dynamic shared memory opt-in is a per-device function attribute: set once per
// device (a bit per ordinal; one set of bits per Kernel), not on every call. Every sm90 kernel of
// this family (forward and backward) launches through here.
template <class Kernel, class Params>
cudaError_t launch_sm90_kernel(void (*kernel)(const Params), dim3 grid, const Params& p, cudaStream_t stream) {
  static std::atomic<uint64_t> attr_set{0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
  if (bit == 0 || !(attr_set.load(std::memory_order_acquire) & bit)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kernel::kSmemBytes);
    if (err != cudaSuccess) return err;
    attr_set.fetch_or(bit, std::memory_order_acq_rel);
  }
  kernel<<<grid, Kernel::kThreads, Kernel::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <class Kernel>
cudaError_t launch_attn_fwd_sm90(const typename Kernel::Params& p, cudaStream_t stream) {
  return launch_sm90_kernel<Kernel>(attn_fwd_sm90_device_kernel<Kernel>, Kernel::Scheduler::grid(p.scheduler), p,
                                    stream);
}
#endif

#if defined(__CUDACC__)
template <class Kernel, class Args>
cudaError_t launch_attn_fwd_sm90_from_args(const Args& a, cudaStream_t stream) {
  typename Kernel::Params p;
  cudaError_t err = Kernel::Mainloop::to_params(a, p.mainloop);
  if (err != cudaSuccess) return err;
  p.epilogue = Kernel::Epilogue::to_params(a);
  p.scheduler = Kernel::Scheduler::to_params(a.seq_q, a.heads_q, a.batch, Kernel::Mainloop::kBlockQ);
  return launch_attn_fwd_sm90<Kernel>(p, stream);
}
#endif

}  // namespace sage::sm90
