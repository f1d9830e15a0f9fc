#include "sage_core/launch.hpp"

#include <nanobind/nanobind.h>

#include <stdexcept>
#include <string>

namespace sage_core {

DeviceGuard::DeviceGuard(int device) {
  cudaError_t err = cudaGetDevice(&previous_);
  if (err == cudaSuccess && previous_ != device) {
    err = cudaSetDevice(device);
    switched_ = err == cudaSuccess;
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("cannot select CUDA device ") + std::to_string(device) +
                             ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

DeviceGuard::~DeviceGuard() {
  if (switched_) (void)cudaSetDevice(previous_);
}

void check_launch(cudaError_t err, const char* what) {
  cudaError_t last = cudaGetLastError();
  if (err == cudaSuccess) err = last;
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": CUDA error " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

}  // namespace sage_core
