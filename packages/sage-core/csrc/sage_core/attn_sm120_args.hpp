// Argument checks and the Params assembly shared by the two sm120 FP4 attention bindings:
// bind_attn_sm120.cpp (native policy, family sm120, sm_120a) and bind_attn_sm120_twin.cpp (the
// twin policy, family sm120twin, sm_90a). Every check runs before the launch and raises
// TypeError/ValueError naming the argument; the device checks come last so that the shape and
// dtype checks are exercised on machines without a GPU.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <string>

#include "sage/sm120/sm120_attn_fwd_launch.hpp"
#include "sage_core/checks.hpp"
#include "sage_core/launch.hpp"

namespace sage_core::sm120_args {

using sage::sm120::Sm120AttnFwdParams;
using sage::sm120::Sm120IoDtype;

inline constexpr int64_t kRowAlignBytes = 16;  // cp.async 16-byte chunks (codes), O pair stores
inline constexpr int64_t kMaxGridYZ = 65535;
inline constexpr int64_t kGroup = 16;          // NVFP4 elements per E4M3 scale

struct Operands {
  const Array *q, *q_sf, *q_gs, *k, *k_sf, *k_gs, *v_t, *v_sf, *v_gs, *o;
  std::optional<Array> lse, q_mean;
  int64_t q_mean_block;
  double softmax_scale;
  bool is_causal;
};

// Every stride of the first `nrows` dims of `a` a multiple of `align` bytes, and the base aligned.
inline void check_rows(const std::string& fn, const Array& a, const char* what, int64_t elem_bytes, int64_t align) {
  const std::string w = fn + ": " + what;
  check_last_dim_contiguous(a, w.c_str());
  check_aligned(a, w.c_str(), static_cast<size_t>(align));
  for (size_t i = 0; i + 1 < a.ndim(); ++i)
    if (dim(a, i) > 1 && (stride(a, i) * elem_bytes) % align != 0)
      fail_value(w + ": every stride must be a multiple of " + std::to_string(align) + " bytes; got strides " +
                 strides_str(a) + " (elements) for shape " + shape_str(a) + "; pass a .contiguous() tensor");
}

inline void check_array(const std::string& fn, const Array& a, const char* what, DType dtype,
                        const std::vector<int64_t>& shape) {
  const std::string w = fn + ": " + what;
  check_dtype(a, w.c_str(), {dtype});
  check_ndim(a, w.c_str(), shape.size());
  check_shape(a, w.c_str(), shape);
}

// Validates everything and fills `p`; returns the io dtype and head dim for the dispatch.
inline void build_params(const std::string& fn, const Operands& x, Sm120AttnFwdParams& p, Sm120IoDtype& io,
                         int& head_dim) {
  const Array& o = *x.o;
  check_dtype(o, (fn + ": o").c_str(), {kF16, kBF16});
  check_ndim(o, (fn + ": o (b, h_q, s_q, d)").c_str(), 4);
  io = same_dtype(o.dtype(), kF16) ? Sm120IoDtype::kF16 : Sm120IoDtype::kBf16;
  const int64_t b = dim(o, 0), h_q = dim(o, 1), s_q = dim(o, 2), d = dim(o, 3);
  if (d != 64 && d != 128) fail_value(fn + ": head dim " + std::to_string(d) + " is not supported; accepted: 64, 128");
  if (b < 1 || h_q < 1 || s_q < 1) fail_value(fn + ": o must have b, h_q, s_q >= 1, got shape " + shape_str(o));
  check_rows(fn, o, "o", 2, kRowAlignBytes);
  const int64_t sf_row = d / kGroup;  // E4M3 scales per Q/K row: 4 or 8 bytes

  check_array(fn, *x.q, "q (codes, b, h_q, s_q, d/2)", kU8, {b, h_q, s_q, d / 2});
  check_rows(fn, *x.q, "q", 1, kRowAlignBytes);
  check_array(fn, *x.q_sf, "q_sf (b, h_q, s_q, d/16)", kU8, {b, h_q, s_q, sf_row});
  check_rows(fn, *x.q_sf, "q_sf", 1, 4);
  check_dtype(*x.k, (fn + ": k").c_str(), {kU8});
  check_ndim(*x.k, (fn + ": k").c_str(), 4);
  check_shape(*x.k, (fn + ": k (codes, b, h_kv, s_kv, d/2)").c_str(), {b, -1, -1, d / 2});
  const int64_t h_kv = dim(*x.k, 1), s_kv = dim(*x.k, 2);
  if (h_kv < 1 || s_kv < 1) fail_value(fn + ": k must have h_kv, s_kv >= 1, got shape " + shape_str(*x.k));
  if (h_q % h_kv != 0)
    fail_value(fn + ": q heads (" + std::to_string(h_q) + ") must be a multiple of kv heads (" + std::to_string(h_kv) + ")");
  if (h_q > kMaxGridYZ || b > kMaxGridYZ)
    fail_value(fn + ": batch and heads must be <= 65535, got b=" + std::to_string(b) + ", h_q=" + std::to_string(h_q));
  if (s_q > INT32_MAX / 2 || s_kv > INT32_MAX / 2) fail_value(fn + ": sequence lengths must be < 2^30");
  check_rows(fn, *x.k, "k", 1, kRowAlignBytes);
  check_array(fn, *x.k_sf, "k_sf (b, h_kv, s_kv, d/16)", kU8, {b, h_kv, s_kv, sf_row});
  check_rows(fn, *x.k_sf, "k_sf", 1, sf_row);

  check_dtype(*x.v_t, (fn + ": v_t").c_str(), {kU8});
  check_ndim(*x.v_t, (fn + ": v_t").c_str(), 4);
  check_shape(*x.v_t, (fn + ": v_t (codes, b, h_kv, d, s_pad/2)").c_str(), {b, h_kv, d, -1});
  const int64_t s_pad = 2 * dim(*x.v_t, 3);
  const int64_t s_pad_min = (s_kv + sage::sm120::kSm120VTokenPad - 1) / sage::sm120::kSm120VTokenPad *
                            sage::sm120::kSm120VTokenPad;
  if (s_pad < s_pad_min || s_pad % sage::sm120::kSm120VTokenPad != 0)
    fail_value(fn + ": v_t holds " + std::to_string(s_pad) + " tokens per channel; it must be a multiple of 128 >= " +
               "ceil(s_kv/128)*128 = " + std::to_string(s_pad_min) + " (zero padded)");
  check_rows(fn, *x.v_t, "v_t", 1, kRowAlignBytes);
  check_array(fn, *x.v_sf, "v_sf (b, h_kv, d, s_pad/16)", kU8, {b, h_kv, d, s_pad / kGroup});
  check_rows(fn, *x.v_sf, "v_sf", 1, 8);

  check_array(fn, *x.q_gs, "q_gs (b, h_q)", kF32, {b, h_q});
  check_array(fn, *x.k_gs, "k_gs (b, h_kv)", kF32, {b, h_kv});
  check_array(fn, *x.v_gs, "v_gs (b, h_kv)", kF32, {b, h_kv});
  for (const Array* g : {x.q_gs, x.k_gs, x.v_gs}) check_rows(fn, *g, "tensor scale", 4, 4);
  if (x.lse) {
    check_array(fn, *x.lse, "lse (b, h_q, s_q)", kF32, {b, h_q, s_q});
    check_rows(fn, *x.lse, "lse", 4, 4);
  }
  if (x.q_mean) {
    if (x.q_mean_block < 1 || x.q_mean_block % sage::sm120::kSm120BlockM != 0 || x.q_mean_block > INT32_MAX)
      fail_value(fn + ": q_mean_block must be a positive multiple of 64 (the CTA's query rows), got " +
                 std::to_string(x.q_mean_block));
    check_array(fn, *x.q_mean, "q_mean (b, h_q, ceil(s_q/q_mean_block), d)", kF32,
                {b, h_q, (s_q + x.q_mean_block - 1) / x.q_mean_block, d});
    check_rows(fn, *x.q_mean, "q_mean", 4, 4);
  }
  if (!(x.softmax_scale > 0.0) || x.softmax_scale > 1e30)
    fail_value(fn + ": softmax_scale must be a positive finite float, got " + std::to_string(x.softmax_scale));

  check_cuda_same_device(fn, {{"o", x.o}, {"q", x.q}, {"q_sf", x.q_sf}, {"q_gs", x.q_gs}, {"k", x.k},
                              {"k_sf", x.k_sf}, {"k_gs", x.k_gs}, {"v_t", x.v_t}, {"v_sf", x.v_sf}, {"v_gs", x.v_gs}});
  if (x.lse) check_cuda_same_device(fn, {{"o", x.o}, {"lse", &*x.lse}});
  if (x.q_mean) check_cuda_same_device(fn, {{"o", x.o}, {"q_mean", &*x.q_mean}});

  auto u8 = [](const Array* a) { return static_cast<const uint8_t*>(a->data()); };
  p.q = u8(x.q);
  p.q_stride_b = stride(*x.q, 0); p.q_stride_h = stride(*x.q, 1); p.q_stride_s = stride(*x.q, 2);
  p.q_sf = u8(x.q_sf);
  p.q_sf_stride_b = stride(*x.q_sf, 0); p.q_sf_stride_h = stride(*x.q_sf, 1); p.q_sf_stride_s = stride(*x.q_sf, 2);
  p.k = u8(x.k);
  p.k_stride_b = stride(*x.k, 0); p.k_stride_h = stride(*x.k, 1); p.k_stride_s = stride(*x.k, 2);
  p.k_sf = u8(x.k_sf);
  p.k_sf_stride_b = stride(*x.k_sf, 0); p.k_sf_stride_h = stride(*x.k_sf, 1); p.k_sf_stride_s = stride(*x.k_sf, 2);
  p.v = u8(x.v_t);
  p.v_stride_b = stride(*x.v_t, 0); p.v_stride_h = stride(*x.v_t, 1); p.v_stride_c = stride(*x.v_t, 2);
  p.v_sf = u8(x.v_sf);
  p.v_sf_stride_b = stride(*x.v_sf, 0); p.v_sf_stride_h = stride(*x.v_sf, 1); p.v_sf_stride_c = stride(*x.v_sf, 2);
  p.q_gs = static_cast<const float*>(x.q_gs->data()); p.q_gs_stride_b = stride(*x.q_gs, 0);
  p.k_gs = static_cast<const float*>(x.k_gs->data()); p.k_gs_stride_b = stride(*x.k_gs, 0);
  p.v_gs = static_cast<const float*>(x.v_gs->data()); p.v_gs_stride_b = stride(*x.v_gs, 0);
  if (x.q_mean) {
    p.q_mean = static_cast<const float*>(x.q_mean->data());
    p.q_mean_stride_b = stride(*x.q_mean, 0); p.q_mean_stride_h = stride(*x.q_mean, 1);
    p.q_mean_stride_blk = stride(*x.q_mean, 2);
    p.q_mean_block = static_cast<int32_t>(x.q_mean_block);
  }
  p.o = o.data();
  p.o_stride_b = stride(o, 0); p.o_stride_h = stride(o, 1); p.o_stride_s = stride(o, 2);
  if (x.lse) {
    p.lse = static_cast<float*>(x.lse->data());
    p.lse_stride_b = stride(*x.lse, 0); p.lse_stride_h = stride(*x.lse, 1);
  }
  p.batch = static_cast<int32_t>(b);
  p.heads_q = static_cast<int32_t>(h_q);
  p.heads_kv = static_cast<int32_t>(h_kv);
  p.seqlen_q = static_cast<int32_t>(s_q);
  p.seqlen_kv = static_cast<int32_t>(s_kv);
  constexpr double kLog2e = 1.4426950408889634;
  p.softmax_scale_log2 = static_cast<float>(x.softmax_scale * kLog2e);
  p.is_causal = x.is_causal ? 1 : 0;
  head_dim = static_cast<int>(d);
}

// Compute capability major*10+minor of `device` (-1 if unknown).
inline int device_cc(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return major * 10 + minor;
}

inline constexpr const char* kDoc = R"(
Recipe qk_nvfp4_pv_nvfp4 (SageAttention3's NVFP4 attention; emulation: sage_quant, recipes.py).
Operands as sage_quant.kernels.quant_fp4 writes them (uint8 codes two per byte, uint8 E4M3 scales
per 16, float32 tensor scales): q, q_sf (b, h_q, s_q, d/2 | d/16) of Q - q_mean; k, k_sf
(b, h_kv, s_kv, d/2 | d/16) of K - k_mean; v_t, v_sf (b, h_kv, d, s_pad/2 | s_pad/16) of V^T with
s_pad a multiple of 128 >= s_kv (zero padded); q_gs (b, h_q), k_gs, v_gs (b, h_kv). o: fp16/bf16
(b, h_q, s_q, d), written; lse: None or float32 (b, h_q, s_q), natural log of the smoothed scores
(the caller adds q.k_mean*scale); q_mean: None (no Q smoothing) or float32 (b, h_q,
ceil(s_q/q_mean_block), d), q_mean_block a multiple of 64. Strides: any with the last dim
contiguous and aligned rows (codes, o: 16 bytes). softmax_scale: the attention scale. is_causal:
bottom-right. stream: a cudaStream_t as int. P's per-row scale is per 128-key tile (kv_block 128).
Raises TypeError/ValueError before any launch.)";

}  // namespace sage_core::sm120_args
