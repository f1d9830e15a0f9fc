// Instantiation: token / block means (fp16, bf16).
#include "sage/quant/quant_mean.cuh"

namespace sage::quant {

cudaError_t launch_block_mean(const MeanParams& p, cudaStream_t stream) {
  if (!p.x.ptr || !p.out || p.block <= 0 || p.x.b <= 0 || p.x.h <= 0 || p.x.s <= 0 || p.x.d <= 0 ||
      p.x.d % kVec != 0 || p.x.h > 65535 || p.x.b > 65535)
    return cudaErrorInvalidValue;
  return p.x.dtype == InDType::kF16 ? launch_block_mean_t<__half>(p, stream)
                                    : launch_block_mean_t<__nv_bfloat16>(p, stream);
}

}  // namespace sage::quant
