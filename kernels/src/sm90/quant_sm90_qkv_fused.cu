// Fused Q/K/V quantization for the Hopper qk_s8_pv_e4m3 attention (fp16/bf16 in, d 64/128).
#include "sage/sm90/sm90_quant_qkv_fused.cuh"

namespace sage::sm90 {

cudaError_t quant_qkv_sm90_fused(const QuantQkvSm90Args& a, cudaStream_t stream) {
  return quant_qkv_sm90_fused_impl(a, stream);
}

}  // namespace sage::sm90
