// One configuration of the Hopper train_s8 forward: head dim 64, bf16 output.
#include "sage/sm90/sm90_attn_fwd_train_s8_kernel.cuh"

namespace sage::sm90 {

cudaError_t attn_fwd_sm90_train_s8_hdim64_bf16(const AttnFwdTrainS8Args& a, cudaStream_t s) {
  return launch_attn_fwd_sm90_train_s8<64, OutBF16>(a, s);
}

}  // namespace sage::sm90
