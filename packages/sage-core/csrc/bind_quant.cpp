// Bindings of the quantization kernels (family `quant`, every arch). Formats:
// docs/design/quant-formats.md; kernel ABI: kernels/include/sage/quant/quant_params.hpp.
// Inputs are LOGICAL (b, h, s, d) arrays with any strides and a contiguous last dim (pass
// x.transpose(1, 2) for a bshd tensor); every output is preallocated and contiguous.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>

#include <sage/quant/quant_params.hpp>

#include "sage_core/bindings.hpp"
#include "sage_core/checks.hpp"
#include "sage_core/launch.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace sage_core {
namespace {

namespace q = sage::quant;

constexpr int64_t kMaxGridYZ = 65535;   // h and b are grid dims y and z
constexpr int64_t kChunk = 8;           // kernels read 8-element chunks (16 bytes)
constexpr int64_t kMaxVHeadDim = 12288; // V kernels keep one fp32 per channel in shared memory
constexpr size_t kOutAlign = 16;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Validates a logical (b, h, s, d) fp16/bf16 CUDA input and describes it for the kernels.
q::InputBHSD input_bhsd(const Array& x, const char* fn, const char* what) {
  std::string name = std::string(fn) + ": " + what;
  check_dtype(x, name.c_str(), {kF16, kBF16});
  if (x.ndim() != 4)
    fail_value(name + ": expected a 4-D logical (b, h, s, d) tensor (pass x.transpose(1, 2) for "
               "bshd), got shape " + shape_str(x));
  check_last_dim_contiguous(x, name.c_str());
  const int64_t b = dim(x, 0), h = dim(x, 1), s = dim(x, 2), d = dim(x, 3);
  if (b < 1 || h < 1 || s < 1 || d < 1)
    fail_value(name + ": every dimension must be >= 1, got shape " + shape_str(x));
  if (d % kChunk != 0)
    fail_value(name + ": head dim d must be a multiple of 8, got d=" + std::to_string(d));
  if (b > kMaxGridYZ || h > kMaxGridYZ)
    fail_value(name + ": b and h must be <= 65535, got shape " + shape_str(x));
  if (s > INT32_MAX || d > INT32_MAX) fail_value(name + ": s and d must fit in int32");
  q::InputBHSD in;
  in.ptr = x.data();
  in.dtype = same_dtype(x.dtype(), kF16) ? q::InDType::kF16 : q::InDType::kBF16;
  in.stride_b = stride(x, 0);
  in.stride_h = stride(x, 1);
  in.stride_s = stride(x, 2);
  in.b = static_cast<int32_t>(b);
  in.h = static_cast<int32_t>(h);
  in.s = static_cast<int32_t>(s);
  in.d = static_cast<int32_t>(d);
  return in;
}

// A contiguous CUDA output of exact shape and dtype on x's device.
void check_output(const Array& out, const Array& x, const char* fn, const char* what, DType dtype,
                  const std::vector<int64_t>& shape, size_t align) {
  (void)x;
  std::string name = std::string(fn) + ": " + what;
  check_dtype(out, name.c_str(), {dtype});
  check_shape(out, name.c_str(), shape);
  check_contiguous(out, name.c_str());
  check_aligned(out, name.c_str(), align);
}

void run(const char* fn, int device, cudaError_t (*launch)(const void*, cudaStream_t), const void* params,
         uintptr_t stream) {
  DeviceGuard guard(device);
  cudaError_t err;
  {
    nb::gil_scoped_release release;
    err = launch(params, as_stream(stream));
  }
  check_launch(err, fn);
}

template <typename P, cudaError_t (*L)(const P&, cudaStream_t)>
cudaError_t erase(const void* p, cudaStream_t s) {
  return L(*static_cast<const P*>(p), s);
}

// ---- means ------------------------------------------------------------------------------------
void block_mean(const Array& x, const Array& out, int64_t block, uintptr_t stream) {
  const char* fn = "block_mean";
  q::MeanParams p;
  p.x = input_bhsd(x, fn, "x");
  if (block < 1 || block > INT32_MAX)
    fail_value(std::string(fn) + ": block must be a positive int32, got " + std::to_string(block));
  check_output(out, x, fn, "out", kF32, {p.x.b, p.x.h, cdiv(p.x.s, block), p.x.d}, alignof(float));
  check_cuda_same_device(fn, {{"x", &x}, {"out", &out}});
  p.out = static_cast<float*>(out.data());
  p.block = static_cast<int32_t>(block);
  run(fn, x.device_id(), &erase<q::MeanParams, q::launch_block_mean>, &p, stream);
}

void token_mean(const Array& x, const Array& out, uintptr_t stream) {
  const char* fn = "token_mean";
  q::MeanParams p;
  p.x = input_bhsd(x, fn, "x");
  check_output(out, x, fn, "out", kF32, {p.x.b, p.x.h, p.x.d}, alignof(float));
  check_cuda_same_device(fn, {{"x", &x}, {"out", &out}});
  p.out = static_cast<float*>(out.data());
  p.block = p.x.s;  // one block over every token
  run(fn, x.device_id(), &erase<q::MeanParams, q::launch_block_mean>, &p, stream);
}

// ---- INT8 / INT4 ------------------------------------------------------------------------------
q::Granularity parse_granularity(const std::string& g, const std::string& role) {
  if (role != "q" && role != "k") fail_value("quant_int: role must be 'q' or 'k', got '" + role + "'");
  if (g == "per_tensor") return q::Granularity::kPerTensor;
  if (g == "per_block") return q::Granularity::kPerBlock;
  if (g == "per_warp") {
    if (role != "q") fail_value("quant_int: granularity 'per_warp' is defined for role 'q' only");
    return q::Granularity::kPerWarp;
  }
  if (g == "per_thread") return role == "q" ? q::Granularity::kPerThreadQ : q::Granularity::kPerThreadK;
  if (g == "per_token") return q::Granularity::kPerToken;
  fail_value("quant_int: granularity must be one of per_tensor, per_block, per_warp, per_thread, "
             "per_token; got '" + g + "'");
}

int64_t num_groups(q::Granularity g, int64_t s, int64_t block) {
  switch (g) {
    case q::Granularity::kPerTensor: return 1;
    case q::Granularity::kPerBlock: return cdiv(s, block);
    case q::Granularity::kPerWarp: return cdiv(s, block);
    case q::Granularity::kPerThreadQ: return cdiv(s, 16) * 8;
    case q::Granularity::kPerThreadK: return cdiv(s, block) * 4;
    case q::Granularity::kPerToken: return s;
  }
  return 0;
}

void quant_int(const Array& x, const Array& values, const Array& scale, std::optional<Array> mean, int bits,
               const std::string& granularity, const std::string& role, int64_t block, int64_t warp_rows,
               int64_t mean_block, uintptr_t stream) {
  const char* fn = "quant_int";
  if (bits != 8 && bits != 4) fail_value("quant_int: bits must be 8 or 4, got " + std::to_string(bits));
  q::QuantIntParams p;
  p.x = input_bhsd(x, fn, "x");
  p.granularity = parse_granularity(granularity, role);
  int64_t blk = 0;
  if (p.granularity == q::Granularity::kPerBlock || p.granularity == q::Granularity::kPerThreadK) {
    if (block < 1 || block > INT32_MAX)
      fail_value("quant_int: block must be a positive int32 for " + granularity + ", got " + std::to_string(block));
    if (p.granularity == q::Granularity::kPerThreadK && block % 8 != 0)
      fail_value("quant_int: per_thread K needs block % 8 == 0, got " + std::to_string(block));
    blk = block;
  } else if (p.granularity == q::Granularity::kPerWarp) {
    if (warp_rows < 1 || warp_rows > INT32_MAX)
      fail_value("quant_int: warp_rows must be a positive int32, got " + std::to_string(warp_rows));
    blk = warp_rows;
  }
  p.block = static_cast<int32_t>(blk);
  const int64_t groups = num_groups(p.granularity, p.x.s, blk);
  if (groups > INT32_MAX) fail_value("quant_int: too many scale groups");
  p.num_groups = static_cast<int32_t>(groups);
  const int64_t vd = bits == 8 ? p.x.d : p.x.d / 2;
  check_output(values, x, fn, "values", bits == 8 ? kI8 : kU8, {p.x.b, p.x.h, p.x.s, vd}, kOutAlign);
  check_output(scale, x, fn, "scale", kF32, {p.x.b, p.x.h, groups}, alignof(float));
  p.q = values.data();
  p.scale = static_cast<float*>(scale.data());
  if (mean.has_value()) {
    const Array& m = *mean;
    check_dtype(m, "quant_int: mean", {kF32});
    check_last_dim_contiguous(m, "quant_int: mean");
    if (m.ndim() == 3) {
      check_shape(m, "quant_int: mean", {p.x.b, p.x.h, p.x.d});
      p.mean_stride_blk = 0;
      p.mean_block = 1;
    } else if (m.ndim() == 4) {
      if (mean_block < 1 || mean_block > INT32_MAX)
        fail_value("quant_int: mean_block must be a positive int32 for a 4-D mean, got " + std::to_string(mean_block));
      check_shape(m, "quant_int: mean (b, h, ceil(s/mean_block), d)", {p.x.b, p.x.h, cdiv(p.x.s, mean_block), p.x.d});
      p.mean_stride_blk = stride(m, 2);
      p.mean_block = static_cast<int32_t>(mean_block);
    } else {
      fail_value("quant_int: mean must be (b, h, d) or (b, h, ceil(s/mean_block), d), got shape " + shape_str(m));
    }
    p.mean = static_cast<const float*>(m.data());
    p.mean_stride_b = stride(m, 0);
    p.mean_stride_h = stride(m, 1);
  }
  check_cuda_same_device(fn, {{"x", &x}, {"values", &values}, {"scale", &scale},
                              {"mean", mean.has_value() ? &*mean : nullptr}});
  if (bits == 8)
    run(fn, x.device_id(), &erase<q::QuantIntParams, q::launch_quant_int8>, &p, stream);
  else
    run(fn, x.device_id(), &erase<q::QuantIntParams, q::launch_quant_int4>, &p, stream);
}

// ---- V ------------------------------------------------------------------------------------------
q::QuantVParams v_params(const Array& v, const char* fn) {
  q::QuantVParams p;
  p.v = input_bhsd(v, fn, "v");
  if (p.v.d > kMaxVHeadDim)
    fail_value(std::string(fn) + ": head dim must be <= " + std::to_string(kMaxVHeadDim) + ", got " +
               std::to_string(p.v.d));
  return p;
}

void quant_v_e4m3_t(const Array& v, const Array& values, const Array& scale, std::optional<Array> mean,
                    uintptr_t stream, double v_max) {
  const char* fn = "quant_v_e4m3_t";
  q::QuantVParams p = v_params(v, fn);
  if (!(v_max > 0.0 && v_max <= 448.0))
    fail_value(std::string("quant_v_e4m3_t: v_max must be in (0, 448], got ") + std::to_string(v_max));
  p.e4m3_max = static_cast<float>(v_max);
  if (mean.has_value()) {
    const Array& m = *mean;
    check_dtype(m, "quant_v_e4m3_t: mean", {kF32});
    check_shape(m, "quant_v_e4m3_t: mean (b, h, d)", {p.v.b, p.v.h, p.v.d});
    check_last_dim_contiguous(m, "quant_v_e4m3_t: mean");
    p.mean = static_cast<const float*>(m.data());
    p.mean_stride_b = stride(m, 0);
    p.mean_stride_h = stride(m, 1);
  }
  const int64_t s_pad = cdiv(p.v.s, q::kVTokenPad) * q::kVTokenPad;
  if (s_pad > INT32_MAX) fail_value("quant_v_e4m3_t: s too large");
  check_output(values, v, fn, "values (b, h, d, s_pad)", kU8, {p.v.b, p.v.h, p.v.d, s_pad}, kOutAlign);
  check_output(scale, v, fn, "scale", kF32, {p.v.b, p.v.h, p.v.d}, alignof(float));
  check_cuda_same_device(fn, {{"v", &v}, {"values", &values}, {"scale", &scale},
                              {"mean", mean.has_value() ? &*mean : nullptr}});
  p.out = values.data();
  p.scale = static_cast<float*>(scale.data());
  p.s_pad = static_cast<int32_t>(s_pad);
  run(fn, v.device_id(), &erase<q::QuantVParams, q::launch_quant_v_e4m3_t>, &p, stream);
}

void quant_v_s8(const Array& v, const Array& values, const Array& scale, uintptr_t stream) {
  const char* fn = "quant_v_s8";
  q::QuantVParams p = v_params(v, fn);
  check_output(values, v, fn, "values", kI8, {p.v.b, p.v.h, p.v.s, p.v.d}, kOutAlign);
  check_output(scale, v, fn, "scale", kF32, {p.v.b, p.v.h, p.v.d}, alignof(float));
  check_cuda_same_device(fn, {{"v", &v}, {"values", &values}, {"scale", &scale}});
  p.out = values.data();
  p.scale = static_cast<float*>(scale.data());
  run(fn, v.device_id(), &erase<q::QuantVParams, q::launch_quant_v_s8>, &p, stream);
}

// ---- FP4 ----------------------------------------------------------------------------------------
void quant_fp4(const Array& x, const Array& packed, const Array& scale, const Array& tensor_scale,
               const std::string& fmt, bool swizzled, uintptr_t stream, const std::optional<Array>& mean,
               int64_t mean_block, int64_t n_pad) {
  const char* fn = "quant_fp4";
  check_dtype(x, "quant_fp4: x", {kF16, kBF16});
  if (x.ndim() < 1 || x.ndim() > 4)
    fail_value("quant_fp4: x must have 1 to 4 dimensions, got shape " + shape_str(x));
  q::QuantFp4Params p;
  int64_t group;
  if (fmt == "nvfp4") {
    p.format = q::Fp4Format::kNvfp4;
    group = q::kNvfp4Group;
  } else if (fmt == "mxfp4") {
    p.format = q::Fp4Format::kMxfp4;
    group = q::kMxfp4Group;
  } else {
    fail_value("quant_fp4: fmt must be 'nvfp4' or 'mxfp4', got '" + fmt + "'");
  }
  const size_t nd = x.ndim();
  const int64_t n_in = dim(x, nd - 1);
  // n_pad > 0: quantize n_pad elements per row, those past x's n_in being zeros (V^T of s tokens).
  if (n_pad != 0 && (n_pad < n_in || n_pad % group != 0))
    fail_value("quant_fp4: n_pad must be 0 or a multiple of " + std::to_string(group) + " >= the last dim (" +
               std::to_string(n_in) + "), got " + std::to_string(n_pad));
  const int64_t n = n_pad != 0 ? n_pad : n_in;
  if (n_in < 1 || n % group != 0)
    fail_value("quant_fp4: " + fmt + " quantizes groups of " + std::to_string(group) +
               " along the last dim; n=" + std::to_string(n_in) + " is not a positive multiple (pass n_pad)");
  // Left-pad to 4-D (d0, d1, d2, n).
  int64_t rows = 1;
  for (size_t k = 0; k < 4; ++k) {
    const size_t src = k + nd;  // position in x when >= 4
    if (src >= 4) {
      p.shape[k] = dim(x, src - 4);
      p.stride[k] = stride(x, src - 4);
    } else {
      p.shape[k] = 1;
      p.stride[k] = 0;
    }
  }
  p.shape[3] = n;
  p.n_valid = n_in;
  for (size_t k = 0; k + 1 < nd; ++k) rows *= dim(x, k);
  if (rows < 1) fail_value("quant_fp4: x has no rows, shape " + shape_str(x));
  std::vector<int64_t> packed_shape, scale_shape, tensor_scale_shape;
  for (size_t k = 0; k + 1 < nd; ++k) packed_shape.push_back(dim(x, k));
  for (size_t k = 0; k + 2 < nd; ++k) tensor_scale_shape.push_back(dim(x, k));  // x.shape[:-2]
  scale_shape = packed_shape;
  packed_shape.push_back(n / 2);
  check_output(packed, x, fn, "packed", kU8, packed_shape, kOutAlign);
  const int64_t ngroups = n / group;
  if (swizzled) {
    const int64_t bytes = cdiv(rows, 128) * 128 * cdiv(ngroups, 4) * 4;
    check_output(scale, x, fn, "scale (swizzled, 1-D)", kU8, {bytes}, 1);
  } else {
    scale_shape.push_back(ngroups);
    check_output(scale, x, fn, "scale", kU8, scale_shape, 1);
  }
  check_output(tensor_scale, x, fn, "tensor_scale", kF32, tensor_scale_shape, alignof(float));
  if (mean) {
    // Smoothing mean over token blocks of the (b, h, s, d) x: (b, h, d) or (b, h, ceil(s/mean_block), d).
    if (nd != 4) fail_value("quant_fp4: mean needs a 4-D (b, h, s, d) x, got shape " + shape_str(x));
    if (n_pad != 0) fail_value("quant_fp4: mean and n_pad cannot be combined");
    check_dtype(*mean, "quant_fp4: mean", {kF32});
    check_last_dim_contiguous(*mean, "quant_fp4: mean");
    const int64_t b = dim(x, 0), h = dim(x, 1), s = dim(x, 2);
    if (mean->ndim() == 3) {
      check_shape(*mean, "quant_fp4: mean (b, h, d)", {b, h, n});
      p.mean_stride[2] = 0;
      p.mean_block = 1;
    } else {
      if (mean_block < 1) fail_value("quant_fp4: mean_block must be >= 1 for a 4-D mean, got " + std::to_string(mean_block));
      check_shape(*mean, "quant_fp4: mean (b, h, ceil(s/mean_block), d)", {b, h, cdiv(s, mean_block), n});
      p.mean_stride[2] = stride(*mean, 2);
      p.mean_block = mean_block;
    }
    p.mean = static_cast<const float*>(mean->data());
    p.mean_stride[0] = stride(*mean, 0);
    p.mean_stride[1] = stride(*mean, 1);
  }
  check_cuda_same_device(fn, {{"x", &x}, {"packed", &packed}, {"scale", &scale}, {"tensor_scale", &tensor_scale}});
  if (mean) check_cuda_same_device(fn, {{"x", &x}, {"mean", &*mean}});
  p.x = x.data();
  p.dtype = same_dtype(x.dtype(), kF16) ? q::InDType::kF16 : q::InDType::kBF16;
  p.swizzled = swizzled;
  p.packed = static_cast<uint8_t*>(packed.data());
  p.scale = static_cast<uint8_t*>(scale.data());
  p.tensor_scale = static_cast<float*>(tensor_scale.data());
  run(fn, x.device_id(), &erase<q::QuantFp4Params, q::launch_quant_fp4>, &p, stream);
}

}  // namespace

void bind_quant(nb::module_& m) {
  m.def("token_mean", &token_mean, "x"_a, "out"_a, "stream"_a,
        "Mean over all tokens. x: logical (b, h, s, d) fp16/bf16 CUDA (any strides, last dim "
        "contiguous, d % 8 == 0); out: (b, h, d) float32 contiguous. fp32 summation order differs "
        "from the PyTorch reference.");
  m.def("block_mean", &block_mean, "x"_a, "out"_a, "block"_a, "stream"_a,
        "Mean over each block of `block` tokens (last block: valid tokens only). out: (b, h, "
        "ceil(s/block), d) float32 contiguous.");
  m.def("quant_int", &quant_int, "x"_a, "values"_a, "scale"_a, "mean"_a.none(), nb::kw_only(), "bits"_a,
        "granularity"_a, "role"_a, "block"_a, "warp_rows"_a, "mean_block"_a, "stream"_a,
        "INT8/INT4 quantization of Q or K (quant-formats.md). x: logical (b, h, s, d) fp16/bf16; "
        "values: int8 (b, h, s, d) for bits=8, uint8 (b, h, s, d/2) for bits=4; scale: float32 "
        "(b, h, G); mean: None, (b, h, d) or (b, h, ceil(s/mean_block), d) float32. granularity: "
        "per_tensor | per_block | per_warp (q) | per_thread | per_token; role: 'q' | 'k'. "
        "`block` is used by per_block and per_thread K, `warp_rows` by per_warp, `mean_block` by a "
        "4-D mean.");
  m.def("quant_v_e4m3_t", &quant_v_e4m3_t, "v"_a, "values"_a, "scale"_a, "mean"_a.none(), "stream"_a,
        nb::kw_only(), "v_max"_a = 448.0,
        "V per-channel FP8 E4M3, transposed. v: logical (b, h, s, d) fp16/bf16; values: uint8 "
        "(b, h, d, ceil(s/128)*128) (E4M3 bits, padding 0); scale: float32 (b, h, d) = amax/v_max; "
        "mean: None or the (b, h, d) float32 V smoothing mean (V' = fp32(V) - mean is quantized); "
        "v_max: in (0, 448], the code each channel's amax maps to (2.25 for FP16-accumulated PV).");
  m.def("quant_v_s8", &quant_v_s8, "v"_a, "values"_a, "scale"_a, "stream"_a,
        "V per-channel INT8. v: logical (b, h, s, d) fp16/bf16; values: int8 (b, h, s, d); "
        "scale: float32 (b, h, d) = amax/127.");
  m.def("quant_fp4", &quant_fp4, "x"_a, "packed"_a, "scale"_a, "tensor_scale"_a, "fmt"_a, "swizzled"_a,
        "stream"_a, nb::kw_only(), "mean"_a = nb::none(), "mean_block"_a = 0, "n_pad"_a = 0,
        "NVFP4 / MXFP4 along the last dim of x (1-4 dims, fp16/bf16, any strides). packed: uint8 "
        "(..., n/2); scale: uint8 (..., n/G) linear, or 1-D ceil(rows/128)*128*ceil(n/G/4)*4 bytes "
        "swizzled (rows = prod(...)); tensor_scale: float32 x.shape[:-2], NVFP4's FP32 second level "
        "per matrix of the last two dims (finite amax / 2688), 1 for MXFP4. mean: None or a float32 "
        "smoothing mean of a 4-D x, (b, h, d) or (b, h, ceil(s/mean_block), d): fp32(x) - mean is "
        "quantized. n_pad: 0, or the quantized row length (a multiple of G >= n), zeros past n.");
}

}  // namespace sage_core
