// Host-side TMA descriptor encoding for the sm90 kernels (no libcuda link: the driver entry
// point comes from sage/common/driver_api.hpp, i.e. cudaGetDriverEntryPoint at run time).
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "sage/common/driver_api.hpp"

namespace sage::sm90 {

// A rank-3 tensor map of `dtype` elements: dims {d0 (contiguous), d1, d2} in elements, byte
// strides of d1 and d2, box {box0, box1, 1} in elements (encode_tma_3d_u8: bytes). Rank 3 (not a flattened 2-D view) so that a box never reads across the
// d2 boundary (the next head): rows past d1 are zero-filled by TMA instead.
// Returns cudaErrorNotSupported if the driver entry point is missing, cudaErrorInvalidValue if
// the driver rejects the description.
//
// A descriptor is a pure function of these arguments, and a loop of same-shaped calls gets the same
// buffers back from PyTorch's caching allocator: the last kTmaCacheEntries encodings of this thread
// are kept and reused when every argument matches (a lookup instead of a driver call, 3 per
// attention call).
inline constexpr int kTmaCacheEntries = 8;

struct TmaDesc3dKey {
  const void* base;
  uint64_t d0, d1, d2, stride1, stride2;
  uint32_t box0, box1;
  int swizzle;
  int dtype;
  bool operator==(const TmaDesc3dKey& o) const {
    return base == o.base && dtype == o.dtype && d0 == o.d0 && d1 == o.d1 && d2 == o.d2 && stride1 == o.stride1 &&
           stride2 == o.stride2 && box0 == o.box0 && box1 == o.box1 && swizzle == o.swizzle;
  }
};

inline cudaError_t encode_tma_3d(CUtensorMap* map, CUtensorMapDataType dtype, const void* base, uint64_t d0,
                                 uint64_t d1, uint64_t d2, uint64_t stride1_bytes, uint64_t stride2_bytes,
                                 uint32_t box0, uint32_t box1, CUtensorMapSwizzle swizzle) {
  struct Entry {
    TmaDesc3dKey key;
    CUtensorMap map;
    bool valid;
  };
  thread_local Entry cache[kTmaCacheEntries] = {};
  thread_local unsigned next = 0;
  const TmaDesc3dKey key{base, d0, d1, d2, stride1_bytes, stride2_bytes, box0, box1, int(swizzle), int(dtype)};
  for (const Entry& e : cache) {
    if (e.valid && e.key == key) {
      *map = e.map;
      return cudaSuccess;
    }
  }
  PFN_cuTensorMapEncodeTiled_v12000 encode = sage::get_tensor_map_encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[3] = {d0, d1, d2};
  const cuuint64_t strides[2] = {stride1_bytes, stride2_bytes};
  const cuuint32_t box[3] = {box0, box1, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  CUresult r = encode(map, dtype, 3, const_cast<void*>(base), dims, strides,
                      box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                      // FLOAT_OOB_FILL_NONE = out-of-bounds elements are written as zeros.
                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return cudaErrorInvalidValue;
  Entry& slot = cache[next++ % kTmaCacheEntries];
  slot.key = key;
  slot.map = *map;
  slot.valid = true;
  return cudaSuccess;
}

inline cudaError_t encode_tma_3d_u8(CUtensorMap* map, const void* base, uint64_t d0, uint64_t d1,
                                    uint64_t d2, uint64_t stride1_bytes, uint64_t stride2_bytes,
                                    uint32_t box0, uint32_t box1, CUtensorMapSwizzle swizzle) {
  return encode_tma_3d(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, base, d0, d1, d2, stride1_bytes, stride2_bytes, box0,
                       box1, swizzle);
}

}  // namespace sage::sm90
