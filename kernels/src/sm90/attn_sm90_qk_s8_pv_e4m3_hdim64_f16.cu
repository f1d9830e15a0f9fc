// One configuration of the Hopper qk_s8_pv_e4m3 attention forward: head dim 64, f16 output.
// (Causal / non-causal is a runtime flag: the mask only runs on tiles that cross it.)
#include "sage/sm90/sm90_attn_fwd_qk_s8_pv_e4m3_kernel.cuh"

namespace sage::sm90 {

cudaError_t attn_fwd_sm90_qk_s8_pv_e4m3_hdim64_f16(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t s) {
  return launch_attn_fwd_sm90_qk_s8_pv_e4m3<64, OutF16, false>(a, s);
}

}  // namespace sage::sm90
