// Hooks through which each kernel family adds its functions to sage_core._C.
// Each bind_* is defined in its own csrc/bind_*.cpp, compiled only when that family is in the
// build (cmake/instantiations.cmake), and called from module.cpp under its SAGE_WITH_* macro.
#pragma once

#include <nanobind/nanobind.h>

namespace sage_core {

void bind_quant(nanobind::module_& m);      // csrc/bind_quant.cpp      (SAGE_WITH_QUANT)
void bind_decode(nanobind::module_& m);     // csrc/bind_decode.cpp     (SAGE_WITH_DECODE)
void bind_attn_sm80(nanobind::module_& m);  // csrc/bind_attn_sm80.cpp  (SAGE_WITH_SM80)
void bind_attn_sm90(nanobind::module_& m);  // csrc/bind_attn_sm90.cpp  (SAGE_WITH_SM90)
void bind_attn_sm100(nanobind::module_& m); // csrc/bind_attn_sm100.cpp (SAGE_WITH_SM100)
void bind_attn_sm120(nanobind::module_& m); // csrc/bind_attn_sm120.cpp (SAGE_WITH_SM120)
void bind_attn_sm120_twin(nanobind::module_& m); // csrc/bind_attn_sm120_twin.cpp (SAGE_WITH_SM120_TWIN)

// module.cpp: build_info/runtime_info/has_kernel.
void bind_info(nanobind::module_& m);

}  // namespace sage_core
