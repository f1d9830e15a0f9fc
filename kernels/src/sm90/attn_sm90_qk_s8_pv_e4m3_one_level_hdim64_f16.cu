// One configuration of the Hopper qk_s8_pv_e4m3 attention forward with pv_accum="one_level"
// (P~V accumulated straight into O; three consumer warpgroups): head dim 64, f16 output.
#include "sage/sm90/sm90_attn_fwd_qk_s8_pv_e4m3_kernel.cuh"

namespace sage::sm90 {

cudaError_t attn_fwd_sm90_qk_s8_pv_e4m3_one_level_hdim64_f16(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t s) {
  return launch_attn_fwd_sm90_qk_s8_pv_e4m3<64, OutF16, true>(a, s);
}

}  // namespace sage::sm90
