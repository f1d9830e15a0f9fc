// Bindings of the sm120 attention family (block-scaled FP4 mma.sync, sm_120a/121a); owner: the
// Blackwell NVFP4 kernel (issue 13). Compiled only when the family is in the build
// (SAGE_WITH_SM120; cmake/instantiations.cmake).
//
//   sage_core.attn_fwd_sm120_qk_nvfp4_pv_nvfp4(q, q_sf, q_gs, k, k_sf, k_gs, v_t, v_sf, v_gs, o, lse,
//                                              q_mean, *, q_mean_block, softmax_scale, is_causal, stream)
//
// The twin of the same kernel for sm_90a has its own binding (bind_attn_sm120_twin.cpp); both
// share the checks of sage_core/attn_sm120_args.hpp.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <string>

#include "sage_core/attn_sm120_args.hpp"
#include "sage_core/bindings.hpp"

namespace nb = nanobind;

namespace sage_core {
namespace {

using sage::sm120::Sm120AttnFwdParams;
using sage::sm120::Sm120IoDtype;
using sage::sm120::Sm120Mma;

cudaError_t dispatch(int d, Sm120IoDtype io, const Sm120AttnFwdParams& p, cudaStream_t s) {
#define SAGE_SM120_DISPATCH(HDIM, IO, IONAME) \
  if (d == HDIM && io == Sm120IoDtype::IO) return sage::sm120::sm120_attn_fwd_run<Sm120Mma::kNative, HDIM, Sm120IoDtype::IO>(p, s);
  SAGE_SM120_ATTN_FWD_CONFIGS(SAGE_SM120_DISPATCH)
#undef SAGE_SM120_DISPATCH
  return cudaErrorInvalidConfiguration;
}

}  // namespace

void bind_attn_sm120(nb::module_& m) {
  m.def(
      "attn_fwd_sm120_qk_nvfp4_pv_nvfp4",
      [](const Array& q, const Array& q_sf, const Array& q_gs, const Array& k, const Array& k_sf, const Array& k_gs,
         const Array& v_t, const Array& v_sf, const Array& v_gs, const Array& o, std::optional<Array> lse,
         std::optional<Array> q_mean, int64_t q_mean_block, double softmax_scale, bool is_causal, uintptr_t stream) {
        const std::string fn = "attn_fwd_sm120_qk_nvfp4_pv_nvfp4";
        Sm120AttnFwdParams p;
        Sm120IoDtype io;
        int d = 0;
        sm120_args::build_params(fn, {&q, &q_sf, &q_gs, &k, &k_sf, &k_gs, &v_t, &v_sf, &v_gs, &o, lse, q_mean,
                                      q_mean_block, softmax_scale, is_causal},
                                 p, io, d);
        // Block-scaled mma.sync exists on sm_120a/121a only (an 'a' cubin loads on its own capability;
        // sage_torch checks that the build holds the device's target).
        const int cc = sm120_args::device_cc(o.device_id());
        if (cc >= 0 && cc != 120 && cc != 121)
          fail_value(fn + ": this kernel is built for sm_120a/121a (block-scaled mma.sync) and runs on compute "
                     "capability 12.0/12.1 only; the device has " + std::to_string(cc / 10) + "." + std::to_string(cc % 10) +
                     " (on sm_90 the twin attn_fwd_sm120_twin_qk_nvfp4_pv_nvfp4 runs the same kernel for testing)");
        DeviceGuard guard(o.device_id());
        cudaError_t err;
        {
          nb::gil_scoped_release release;
          err = dispatch(d, io, p, as_stream(stream));
        }
        check_launch(err, fn.c_str());
      },
      nb::arg("q"), nb::arg("q_sf"), nb::arg("q_gs"), nb::arg("k"), nb::arg("k_sf"), nb::arg("k_gs"), nb::arg("v_t"),
      nb::arg("v_sf"), nb::arg("v_gs"), nb::arg("o"), nb::arg("lse").none(), nb::arg("q_mean").none(), nb::kw_only(),
      nb::arg("q_mean_block"), nb::arg("softmax_scale"), nb::arg("is_causal"), nb::arg("stream"),
      (std::string("NVFP4 attention on sm_120a: block-scaled mma.sync kind::mxf4nvf4 (E2M1 x E2M1, UE4M3 scales "
                   "per 16), FP32 accumulation.") + sm120_args::kDoc).c_str());
}

}  // namespace sage_core
