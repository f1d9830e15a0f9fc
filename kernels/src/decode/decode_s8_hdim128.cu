// Instantiation: decode attention over an INT8 KV cache, head dim 128 (fp16, bf16).
#include "sage/decode/decode_s8.cuh"

namespace sage::decode {

cudaError_t launch_decode_s8_hdim128(const DecodeS8Params& p, cudaStream_t stream) {
  return launch_decode_s8_impl<128>(p, stream);
}

int decode_s8_ctas_per_sm_hdim128(InDType dtype, int rows_per_kv_head) {
  return decode_s8_ctas_per_sm_impl<128>(dtype, rows_per_kv_head);
}

}  // namespace sage::decode
