// Instantiation: INT8 Q/K quantization, every granularity, fused mean (fp16, bf16).
#include "sage/quant/quant_int.cuh"

namespace sage::quant {

cudaError_t launch_quant_int8(const QuantIntParams& p, cudaStream_t stream) {
  if (!quant_int_params_ok(p, 8)) return cudaErrorInvalidValue;
  return p.x.dtype == InDType::kF16 ? launch_quant_int_t<__half, 8>(p, stream)
                                    : launch_quant_int_t<__nv_bfloat16, 8>(p, stream);
}

}  // namespace sage::quant
