// Launch-side helpers for bindings: device guard, stream handle, error check.
// Usage in a binding, after every argument check has passed:
//
//   sage_core::DeviceGuard guard(q.device_id());            // kernels run on q's device
//   cudaStream_t s = sage_core::as_stream(stream);
//   cudaError_t err;
//   { nb::gil_scoped_release release; err = sage::attn::launch_xxx(params, s); }
//   sage_core::check_launch(err, "attn_sm90_qk_s8_pv_e4m3");  // raises RuntimeError
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sage_core {

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Makes `device` current for the scope (restores the previous one); raises RuntimeError when
// the device cannot be selected.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool switched_ = false;
};

// Raises RuntimeError("<what>: CUDA error <name>: <string>") if `err` (the launcher's return)
// or cudaGetLastError() reports an error.
void check_launch(cudaError_t err, const char* what);

}  // namespace sage_core
