// One configuration of the Hopper train_s8 backward (dK/dV and dQ kernels): head dim 64, f16.
#include "sage/sm90/sm90_attn_bwd_train_s8_kernel.cuh"

namespace sage::sm90 {

cudaError_t attn_bwd_sm90_train_s8_hdim64_f16(const AttnBwdTrainS8Args& a, cudaStream_t s) {
  return launch_attn_bwd_sm90_train_s8<64, OutF16>(a, s);
}

}  // namespace sage::sm90
