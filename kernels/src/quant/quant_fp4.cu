// Instantiation: NVFP4 / MXFP4 microscaling quantization (fp16, bf16).
#include "sage/quant/quant_fp4.cuh"

namespace sage::quant {

cudaError_t launch_quant_fp4(const QuantFp4Params& p, cudaStream_t stream) {
  const bool f16 = p.dtype == InDType::kF16;
  if (p.format == Fp4Format::kNvfp4)
    return f16 ? launch_quant_fp4_t<__half, kNvfp4Group>(p, stream)
               : launch_quant_fp4_t<__nv_bfloat16, kNvfp4Group>(p, stream);
  return f16 ? launch_quant_fp4_t<__half, kMxfp4Group>(p, stream)
             : launch_quant_fp4_t<__nv_bfloat16, kMxfp4Group>(p, stream);
}

}  // namespace sage::quant
