// Instantiation: INT4 Q/K quantization, every granularity, fused mean (fp16, bf16).
#include "sage/quant/quant_int.cuh"

namespace sage::quant {

cudaError_t launch_quant_int4(const QuantIntParams& p, cudaStream_t stream) {
  if (!quant_int_params_ok(p, 4)) return cudaErrorInvalidValue;
  return p.x.dtype == InDType::kF16 ? launch_quant_int_t<__half, 4>(p, stream)
                                    : launch_quant_int_t<__nv_bfloat16, 4>(p, stream);
}

}  // namespace sage::quant
