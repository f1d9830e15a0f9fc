// Instantiation: decode attention over an INT8 KV cache, head dim 128 (fp16, bf16).
#include "sage/decode/decode_s8.cuh"

namespace sage::decode {

cudaError_t launch_decode_s8_hdim128(const DecodeS8Params& p, cudaStream_t stream) {
  return launch_decode_s8_impl<128>(p, stream);
}

}  // namespace sage::decode
