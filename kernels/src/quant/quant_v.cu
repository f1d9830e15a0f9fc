// Instantiation: V per-channel FP8 E4M3 (transposed) and INT8 (fp16, bf16).
#include "sage/quant/quant_v.cuh"

namespace sage::quant {

cudaError_t launch_quant_v_e4m3_t(const QuantVParams& p, cudaStream_t stream) {
  return p.v.dtype == InDType::kF16 ? launch_quant_v_e4m3_t_t<__half>(p, stream)
                                    : launch_quant_v_e4m3_t_t<__nv_bfloat16>(p, stream);
}

cudaError_t launch_quant_v_s8(const QuantVParams& p, cudaStream_t stream) {
  return p.v.dtype == InDType::kF16 ? launch_quant_v_s8_t<__half>(p, stream)
                                    : launch_quant_v_s8_t<__nv_bfloat16>(p, stream);
}

}  // namespace sage::quant
