// Instantiation: appending tokens to the INT8 KV cache (head dims 64, 128; fp16, bf16).
#include "sage/decode/kv_append_s8.cuh"

namespace sage::decode {

cudaError_t launch_kv_append_s8(const KvAppendS8Params& p, cudaStream_t stream) {
  return launch_kv_append_s8_impl(p, stream);
}

}  // namespace sage::decode
