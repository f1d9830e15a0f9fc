// Driver-API entry points without linking libcuda (host code only).
//
// sage_core links cudart statically and never links -lcuda, so the module imports on machines
// with no GPU and no driver (CI, build hosts). Driver functions that cudart does not wrap
// (cuTensorMapEncodeTiled for TMA descriptors, ...) are fetched at run time through
// cudaGetDriverEntryPoint[ByVersion]; cudart loads libcuda.so.1 lazily.
//
//   PFN_cuTensorMapEncodeTiled_v12000 encode = sage::get_tensor_map_encode_tiled();
//   if (!encode) -> raise "no CUDA driver / driver too old" (the function never throws)
//   CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, rank, ptr, dims, strides, box, ...);
#pragma once

#include <cuda.h>          // driver types only (CUtensorMap, CUresult); nothing is linked from it
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_runtime_api.h>

namespace sage {

// Looks up driver symbol `symbol` with the ABI of CUDA version `abi_version` (e.g. 12000).
// Returns nullptr when there is no driver, the driver lacks it, or on any error.
inline void* get_driver_entry_point(const char* symbol, unsigned int abi_version) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  cudaError_t err =
      cudaGetDriverEntryPointByVersion(symbol, &fn, abi_version, cudaEnableDefault, &status);
#else
  (void)abi_version;
  cudaError_t err = cudaGetDriverEntryPoint(symbol, &fn, cudaEnableDefault, &status);
#endif
  if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) {
    (void)cudaGetLastError();  // do not leave a sticky error for the next launch check
    return nullptr;
  }
  return fn;
}

// cuTensorMapEncodeTiled (driver >= 12.0), looked up once per process; nullptr if unavailable.
inline PFN_cuTensorMapEncodeTiled_v12000 get_tensor_map_encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(
      get_driver_entry_point("cuTensorMapEncodeTiled", 12000));
  return fn;
}

}  // namespace sage
