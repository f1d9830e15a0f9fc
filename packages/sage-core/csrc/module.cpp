// sage_core._C: build/runtime information plus the functions of every kernel family in the build.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "sage_build_config.hpp"
#include "sage_core/bindings.hpp"

namespace nb = nanobind;

namespace sage_core {

nb::dict runtime_info();  // runtime_info.cpp

namespace {

const std::vector<std::string>& built_kernels() {
  static const std::vector<std::string> names = SAGE_BUILD_KERNELS_LIST;
  return names;
}

nb::object str_or_none(const char* s) {
  if (s == nullptr || s[0] == '\0') return nb::none();
  return nb::str(s);
}

nb::dict build_info() {
  nb::dict d;
  d["cuda_archs"] = std::vector<std::string>(SAGE_BUILD_CUDA_ARCHS_LIST);
  d["cuda_archs_setting"] = std::string(SAGE_BUILD_CUDA_ARCHS_SETTING);
  d["families"] = std::vector<std::string>(SAGE_BUILD_FAMILIES_LIST);
  d["kernels"] = built_kernels();
  d["cuda_version"] = str_or_none(SAGE_BUILD_CUDA_VERSION);
  d["cutlass_version"] = str_or_none(SAGE_BUILD_CUTLASS_VERSION);
  d["nanobind_version"] = str_or_none(SAGE_BUILD_NANOBIND_VERSION);
  d["build_type"] = str_or_none(SAGE_BUILD_TYPE);
  d["compiler"] = str_or_none(SAGE_BUILD_CXX_COMPILER);
#if defined(Py_LIMITED_API)
  d["stable_abi"] = true;
#else
  d["stable_abi"] = false;
#endif
#if defined(SAGE_HAVE_CUDART)
  d["cudart"] = "static";
#else
  d["cudart"] = nb::none();
#endif
  return d;
}

bool has_kernel(const std::string& name) {
  for (const auto& k : built_kernels())
    if (k == name) return true;
  return false;
}

}  // namespace

void bind_info(nb::module_& m) {
  m.def("build_info", &build_info,
        "What this build holds: dict with cuda_archs (list[str]), cuda_archs_setting (str), "
        "families (list[str]), kernels (list[str]), cuda_version (str | None, the toolkit built "
        "with), cutlass_version, nanobind_version, build_type, compiler, stable_abi (bool), "
        "cudart ('static' | None).");
  m.def("runtime_info", &runtime_info,
        "What this machine offers; never raises. dict with cuda_runtime_version (str | None), "
        "driver_version (str | None: None without a driver), device_count (int), "
        "error (str | None: why there is no device), devices (list of dict: index, name, "
        "capability (major, minor), sm (int, e.g. 90), total_memory (bytes), "
        "multiprocessor_count).");
  m.def("has_kernel", &has_kernel, nb::arg("name"),
        "True if the kernel instantiation `name` (see build_info()['kernels']) is compiled in.");
}

}  // namespace sage_core

NB_MODULE(_C, m) {
  m.doc() = "sage_core: compiled kernels of sage (quantized attention); knows no PyTorch.";
  sage_core::bind_info(m);
#if defined(SAGE_WITH_QUANT)
  sage_core::bind_quant(m);
#endif
#if defined(SAGE_WITH_DECODE)
  sage_core::bind_decode(m);
#endif
#if defined(SAGE_WITH_SM80)
  sage_core::bind_attn_sm80(m);
#endif
#if defined(SAGE_WITH_SM90)
  sage_core::bind_attn_sm90(m);
#endif
#if defined(SAGE_WITH_SM100)
  sage_core::bind_attn_sm100(m);
#endif
#if defined(SAGE_WITH_SM120)
  sage_core::bind_attn_sm120(m);
#endif
#if defined(SAGE_WITH_SM120_TWIN)
  sage_core::bind_attn_sm120_twin(m);
#endif
}
