// Tile schedulers of the Hopper attention forward: which (query block, head, batch) a CTA works
// on. The kernel asks only `grid()` on the host and `tile()` on the device, so a persistent or
// varlen scheduler replaces this type without touching the mainloop or the epilogue.
#pragma once

#include <cuda_runtime.h>

namespace sage::sm90 {

// One unit of work: query rows [m_block * kBlockQ, +kBlockQ) of head `head` of batch `batch`.
struct AttnFwdTile {
  int m_block;
  int head;
  int batch;
};

// One CTA per tile, grid (m_blocks, heads_q, batch). Query blocks run backwards in blockIdx.x:
// under a causal mask the last blocks see the most keys, and the hardware starts CTAs roughly in
// blockIdx order, so the longest ones start first.
struct AttnFwdSingleTileScheduler {
  struct Params {
    int num_m_blocks = 0;
    int heads_q = 0;
    int batch = 0;
  };

  static Params to_params(int seq_q, int heads_q, int batch, int block_q) {
    return Params{(seq_q + block_q - 1) / block_q, heads_q, batch};
  }
  static dim3 grid(const Params& p) { return dim3(p.num_m_blocks, p.heads_q, p.batch); }

#if defined(__CUDACC__)
  static __device__ __forceinline__ AttnFwdTile tile(const Params& p) {
    return AttnFwdTile{p.num_m_blocks - 1 - int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
  }
#endif
};

}  // namespace sage::sm90
