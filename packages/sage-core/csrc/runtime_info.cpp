// runtime_info(): never raises, works with no driver and no GPU (static cudart loads libcuda
// lazily and reports an error code instead).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#if defined(SAGE_HAVE_CUDART)
#include <cuda_runtime_api.h>
#endif

namespace nb = nanobind;

namespace sage_core {

namespace {
#if defined(SAGE_HAVE_CUDART)
std::string cuda_version_str(int v) {  // 13000 -> "13.0"
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}
#endif
}  // namespace

nb::dict runtime_info() {
  nb::dict d;
  nb::list devices;
#if defined(SAGE_HAVE_CUDART)
  int runtime = 0, driver = 0, count = 0;
  if (cudaRuntimeGetVersion(&runtime) == cudaSuccess && runtime > 0)
    d["cuda_runtime_version"] = cuda_version_str(runtime);
  else
    d["cuda_runtime_version"] = nb::none();
  // 0 means "no driver installed".
  if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0)
    d["driver_version"] = cuda_version_str(driver);
  else
    d["driver_version"] = nb::none();
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    d["error"] = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    count = 0;
    (void)cudaGetLastError();
  } else {
    d["error"] = nb::none();
    for (int i = 0; i < count; ++i) {
      cudaDeviceProp prop{};
      if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
        (void)cudaGetLastError();
        continue;
      }
      nb::dict dev;
      dev["index"] = i;
      dev["name"] = std::string(prop.name);
      dev["capability"] = nb::make_tuple(prop.major, prop.minor);
      dev["sm"] = prop.major * 10 + prop.minor;
      dev["total_memory"] = static_cast<size_t>(prop.totalGlobalMem);
      dev["multiprocessor_count"] = prop.multiProcessorCount;
      devices.append(dev);
    }
  }
  d["device_count"] = count;
#else
  d["cuda_runtime_version"] = nb::none();
  d["driver_version"] = nb::none();
  d["device_count"] = 0;
  d["error"] = "sage_core was built without the CUDA runtime (SAGE_CUDA_ARCHS=none, no toolkit)";
#endif
  d["devices"] = devices;
  return d;
}

}  // namespace sage_core
