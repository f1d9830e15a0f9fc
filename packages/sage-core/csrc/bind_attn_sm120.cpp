// Bindings of the sm120 attention family; owner: (unassigned: Blackwell family).
// Compiled only when the family is in the build (SAGE_WITH_SM120; see cmake/instantiations.cmake and
// packages/sage-core/HOOKS.md). Placeholder: define the family's functions here.
#include <nanobind/nanobind.h>

#include "sage_core/bindings.hpp"
#include "sage_core/checks.hpp"
#include "sage_core/launch.hpp"

namespace nb = nanobind;

namespace sage_core {

void bind_attn_sm120(nb::module_& m) { (void)m; }

}  // namespace sage_core
