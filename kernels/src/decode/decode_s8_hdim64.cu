// Instantiation: decode attention over an INT8 KV cache, head dim 64 (fp16, bf16).
#include "sage/decode/decode_s8.cuh"

namespace sage::decode {

cudaError_t launch_decode_s8_hdim64(const DecodeS8Params& p, cudaStream_t stream) {
  return launch_decode_s8_impl<64>(p, stream);
}

}  // namespace sage::decode
