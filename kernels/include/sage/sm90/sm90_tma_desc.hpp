// Host-side TMA descriptor encoding for the sm90 kernels (no libcuda link: the driver entry
// point comes from sage/common/driver_api.hpp, i.e. cudaGetDriverEntryPoint at run time).
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "sage/common/driver_api.hpp"

namespace sage::sm90 {

// A rank-3 byte tensor map: dims {d0 (contiguous), d1, d2}, byte strides of d1 and d2, box
// {box0, box1, 1}. Rank 3 (not a flattened 2-D view) so that a box never reads across the
// d2 boundary (the next head): rows past d1 are zero-filled by TMA instead.
// Returns cudaErrorNotSupported if the driver entry point is missing, cudaErrorInvalidValue if
// the driver rejects the description.
inline cudaError_t encode_tma_3d_u8(CUtensorMap* map, const void* base, uint64_t d0, uint64_t d1,
                                    uint64_t d2, uint64_t stride1_bytes, uint64_t stride2_bytes,
                                    uint32_t box0, uint32_t box1, CUtensorMapSwizzle swizzle) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = sage::get_tensor_map_encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[3] = {d0, d1, d2};
  const cuuint64_t strides[2] = {stride1_bytes, stride2_bytes};
  const cuuint32_t box[3] = {box0, box1, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<void*>(base), dims, strides,
                      box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                      // FLOAT_OOB_FILL_NONE = out-of-bounds elements are written as zeros.
                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace sage::sm90
