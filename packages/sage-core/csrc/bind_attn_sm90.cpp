// Bindings of the sm90 family (Hopper wgmma + TMA, warp-specialized): owner H4.
//   attn_fwd_sm90_qk_s8_pv_e4m3(...)  attention forward over pre-quantized tensors
//   quant_qkv_sm90_fused(...)         the fused Q/K/V quantization that produces them
//   attn_fwd_sm90_train_s8(...)       the train_s8 (SageBwd) forward over per-block INT8 tensors
//   attn_bwd_sm90_train_s8(...)       its backward (dK/dV and dQ kernels)
// Every argument is validated before anything is launched; errors name the argument, what was
// given and what is accepted. Outputs, LSE and workspace are preallocated by the caller.
// Head dims: the kernels are instantiated for D = 64, 128. The functions that read fp16/bf16 q, k, v
// also take an input head dim d_in that is a multiple of 8 below 128: they run the D = 64 (d_in <= 64)
// or D = 128 instantiation, the quantizer zero-fills channels [d_in, D) as it loads (no copy), the
// quantized tensors, statistics and workspaces have D, o has d_in (the epilogue stores d_in columns).
// The module attribute SM90_HEAD_DIM_ZERO_FILL = True announces this.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <sage/sm90/sm90_attn_fwd_qk_s8_pv_e4m3_params.hpp>
#include <sage/sm90/sm90_attn_bwd_train_s8_params.hpp>
#include <sage/sm90/sm90_attn_fwd_train_s8_params.hpp>

#include "sage_core/bindings.hpp"
#include "sage_core/checks.hpp"
#include "sage_core/launch.hpp"

namespace nb = nanobind;

namespace sage_core {
namespace {

using sage::sm90::AttnFwdQkS8PvE4m3Args;
using sage::sm90::QuantQkvSm90Args;

void check_head_dim(int64_t d, const char* fn) {
  if (d != 64 && d != 128) {
    fail_value(std::string(fn) + ": head dim d=" + std::to_string(d) + " is not supported; accepted: 64, 128");
  }
}

// Input head dim of fp16/bf16 q, k, v: a multiple of 8 in [8, 128]; returns the kernel's D.
int64_t check_head_dim_in(int64_t d_in, const char* fn) {
  if (d_in < 8 || d_in > 128 || d_in % 8 != 0) {
    fail_value(std::string(fn) + ": head dim d=" + std::to_string(d_in) +
               " is not supported; accepted: multiples of 8 from 8 to 128 (64 and 128 natively, others "
               "zero-filled to the next of them inside the quantizer)");
  }
  return d_in <= 64 ? 64 : 128;
}

// The kernel head dim a size query for head dim d means: multiples of 8 below 128 run zero-filled at
// 64 / 128, any other d is taken as given (the launch validates it).
int64_t kernel_head_dim_of(int64_t d) { return d % 8 == 0 && d >= 8 && d <= 128 ? (d <= 64 ? 64 : 128) : d; }

void check_heads(int64_t h_q, int64_t h_kv, const char* fn) {
  if (h_kv <= 0 || h_q % h_kv != 0) {
    fail_value(std::string(fn) + ": q heads (" + std::to_string(h_q) + ") must be a positive multiple of kv heads (" +
               std::to_string(h_kv) + ")");
  }
}

void check_positive(int64_t v, const char* what, const char* fn) {
  if (v <= 0) fail_value(std::string(fn) + ": " + what + " must be >= 1, got " + std::to_string(v));
}


// The output/LSE/shape fields shared by the attention args of every sm90 recipe (out and lse
// validated by the caller).
template <class Args>
void fill_out_args(Args& a, const Array& out, const std::optional<Array>& lse, int64_t b, int64_t h_q,
                   int64_t h_kv, int64_t s_q, int64_t s_kv, int64_t d, float sm_scale, bool is_causal) {
  a.o = out.data();
  a.o_stride_b = stride(out, 0);
  a.o_stride_h = stride(out, 1);
  a.o_stride_s = stride(out, 2);
  if (lse) {
    a.lse = static_cast<float*>(lse->data());
    a.lse_stride_b = stride(*lse, 0);
    a.lse_stride_h = stride(*lse, 1);
  }
  a.batch = int(b);
  a.heads_q = int(h_q);
  a.heads_kv = int(h_kv);
  a.seq_q = int(s_q);
  a.seq_kv = int(s_kv);
  a.head_dim = int(d);
  a.sm_scale = sm_scale;
  a.mask = is_causal ? sage::sm90::MaskKind::kCausal : sage::sm90::MaskKind::kNone;
}

void fill_attn_args(AttnFwdQkS8PvE4m3Args& a, const Array& out, const std::optional<Array>& lse, int64_t b,
                    int64_t h_q, int64_t h_kv, int64_t s_q, int64_t s_kv, int64_t d, int64_t d_out,
                    float sm_scale, bool is_causal) {
  fill_out_args(a, out, lse, b, h_q, h_kv, s_q, s_kv, d, sm_scale, is_causal);
  a.head_dim_out = int(d_out);
}

// pv_accum option -> instantiation family (checked before any launch).
bool parse_one_level(const std::string& pv_accum, const char* fn) {
  if (pv_accum == "two_level") return false;
  if (pv_accum == "one_level") return true;
  fail_value(std::string(fn) + ": pv_accum must be 'two_level' or 'one_level', got '" + pv_accum + "'");
  return false;
}

// The instantiation for (head dim, output dtype, accumulation); called without the GIL.
cudaError_t launch_attn(const AttnFwdQkS8PvE4m3Args& a, bool bf16, bool one_level, cudaStream_t s) {
  namespace k = sage::sm90;
  if (one_level) {
    if (a.head_dim == 64) {
      return bf16 ? k::attn_fwd_sm90_qk_s8_pv_e4m3_one_level_hdim64_bf16(a, s)
                  : k::attn_fwd_sm90_qk_s8_pv_e4m3_one_level_hdim64_f16(a, s);
    }
    return bf16 ? k::attn_fwd_sm90_qk_s8_pv_e4m3_one_level_hdim128_bf16(a, s)
                : k::attn_fwd_sm90_qk_s8_pv_e4m3_one_level_hdim128_f16(a, s);
  }
  if (a.head_dim == 64) {
    return bf16 ? k::attn_fwd_sm90_qk_s8_pv_e4m3_hdim64_bf16(a, s) : k::attn_fwd_sm90_qk_s8_pv_e4m3_hdim64_f16(a, s);
  }
  return bf16 ? k::attn_fwd_sm90_qk_s8_pv_e4m3_hdim128_bf16(a, s) : k::attn_fwd_sm90_qk_s8_pv_e4m3_hdim128_f16(a, s);
}

void check_attn_launch(cudaError_t err, const char* fn) {
  if (err == cudaErrorNotSupported) {
    throw std::runtime_error(std::string(fn) +
                             ": the CUDA driver does not provide cuTensorMapEncodeTiled (no driver, or older than 12.0)");
  }
  check_launch(err, fn);
}

// out (fp16/bf16 logical (b, h_q, s_q, d), d = the columns stored) and lse (None or f32 (b, h_q, s_q)).
void check_attn_out(const Array& out, const std::optional<Array>& lse, const Array& ref, int64_t b, int64_t h_q,
                    int64_t s_q, int64_t d, const char* fn) {
  check_cuda(out, "out");
  check_same_device(ref, "q", out, "out");
  check_dtype(out, "out", {kF16, kBF16});
  check_shape(out, "out", {b, h_q, s_q, d});
  check_last_dim_contiguous(out, "out");
  // The epilogue stores two elements (4 bytes) at a time.
  check_aligned(out, "out", 4);
  for (size_t i = 0; i < 3; ++i) {
    if (stride(out, i) % 2 != 0) {
      fail_value(std::string(fn) + ": out strides must be even (4-byte aligned rows), got strides " +
                 strides_str(out));
    }
  }
  if (lse) {
    check_cuda(*lse, "lse");
    check_same_device(ref, "q", *lse, "lse");
    check_dtype(*lse, "lse", {kF32});
    check_shape(*lse, "lse", {b, h_q, s_q});
    check_last_dim_contiguous(*lse, "lse");
  }
}

// The INT8 q (b, h_q, s_q, d) and k (b, h_kv, seq_kv, d) of an attention kernel over
// pre-quantized tensors: CUDA, contiguous, d 64 or 128, GQA heads; returns the sizes.
struct QkS8Dims {
  int64_t b, h_q, s_q, d, h_kv;
};
QkS8Dims check_qk_s8(const Array& q, const Array& k, int64_t seq_kv, const char* fn) {
  check_cuda(q, "q");
  check_dtype(q, "q", {kI8});
  check_ndim(q, "q", 4);
  check_contiguous(q, "q");
  const int64_t b = dim(q, 0), h_q = dim(q, 1), s_q = dim(q, 2), d = dim(q, 3);
  check_positive(b, "batch", fn);
  check_positive(h_q, "q heads", fn);
  check_positive(s_q, "q length", fn);
  check_head_dim(d, fn);
  check_positive(seq_kv, "seq_kv", fn);
  check_cuda(k, "k");
  check_same_device(q, "q", k, "k");
  check_dtype(k, "k", {kI8});
  check_ndim(k, "k", 4);
  const int64_t h_kv = dim(k, 1);
  check_heads(h_q, h_kv, fn);
  check_shape(k, "k", {b, h_kv, seq_kv, d});
  check_contiguous(k, "k");
  return QkS8Dims{b, h_q, s_q, d, h_kv};
}

void check_sm_scale(float sm_scale, const char* fn) {
  if (!(sm_scale > 0.f) || !std::isfinite(sm_scale)) {
    fail_value(std::string(fn) + ": sm_scale must be a finite positive float, got " + std::to_string(sm_scale));
  }
}

// What both recipes' attention launchers need of their quantized operands and sizes: TMA's 16-byte
// aligned global bases, the softmax scale, the grid limits (batch, q heads in grid y/z) and lengths.
void check_tma_operands(const Array& q, const Array& k, const Array& v_t, float sm_scale, int64_t b, int64_t h_q,
                        int64_t s_q, int64_t seq_kv, const char* fn) {
  check_aligned(q, "q", 16);
  check_aligned(k, "k", 16);
  check_aligned(v_t, "v_t", 16);
  check_sm_scale(sm_scale, fn);
  if (b > 65535 || h_q > 65535) {
    fail_value(std::string(fn) + ": batch and q heads must be <= 65535 (grid limits), got batch=" +
               std::to_string(b) + ", heads=" + std::to_string(h_q));
  }
  if (s_q > (int64_t(1) << 30) || seq_kv > (int64_t(1) << 30)) {
    fail_value(std::string(fn) + ": sequence lengths must be < 2^30");
  }
}

// ------------------------------------------------------------------------------------------------
void attn_fwd_sm90_qk_s8_pv_e4m3(Array q, Array k, Array v_t, Array q_scale, Array k_scale, Array v_scale,
                                 Array out, std::optional<Array> lse, int64_t seq_kv, float sm_scale,
                                 bool is_causal, uintptr_t stream, std::optional<Array> v_mean,
                                 const std::string& pv_accum) {
  constexpr const char* fn = "attn_fwd_sm90_qk_s8_pv_e4m3";
  const bool one_level = parse_one_level(pv_accum, fn);
  const QkS8Dims dims = check_qk_s8(q, k, seq_kv, fn);
  const int64_t b = dims.b, h_q = dims.h_q, s_q = dims.s_q, d = dims.d, h_kv = dims.h_kv;

  const int64_t s_pad = sage::sm90::sm90_v_pad(seq_kv);
  check_cuda(v_t, "v_t");
  check_same_device(q, "q", v_t, "v_t");
  check_dtype(v_t, "v_t", {kU8});
  check_shape(v_t, "v_t", {b, h_kv, d, s_pad});
  check_contiguous(v_t, "v_t");

  check_cuda(q_scale, "q_scale");
  check_same_device(q, "q", q_scale, "q_scale");
  check_dtype(q_scale, "q_scale", {kF32});
  check_shape(q_scale, "q_scale", {b, h_q, sage::sm90::sm90_q_scale_groups(s_q)});
  check_contiguous(q_scale, "q_scale");
  check_cuda(k_scale, "k_scale");
  check_same_device(q, "q", k_scale, "k_scale");
  check_dtype(k_scale, "k_scale", {kF32});
  check_shape(k_scale, "k_scale", {b, h_kv, sage::sm90::sm90_k_scale_groups(seq_kv)});
  check_contiguous(k_scale, "k_scale");
  check_cuda(v_scale, "v_scale");
  check_same_device(q, "q", v_scale, "v_scale");
  check_dtype(v_scale, "v_scale", {kF32});
  check_shape(v_scale, "v_scale", {b, h_kv, d});
  check_contiguous(v_scale, "v_scale");
  check_aligned(v_scale, "v_scale", 8);  // read as float2 in the epilogue (d even: every head's row too)
  if (v_mean) {
    check_cuda(*v_mean, "v_mean");
    check_same_device(q, "q", *v_mean, "v_mean");
    check_dtype(*v_mean, "v_mean", {kF32});
    check_shape(*v_mean, "v_mean", {b, h_kv, d});
    check_contiguous(*v_mean, "v_mean");
    check_aligned(*v_mean, "v_mean", 8);  // read as float2
  }

  // out's head dim d_out: d, or a multiple of 8 below it (o of a head dim zero-padded to d: only the
  // first d_out columns are stored).
  check_ndim(out, "out", 4);
  const int64_t d_out = dim(out, 3);
  if (!(d_out == d || (d_out >= 8 && d_out < d && d_out % 8 == 0))) {
    fail_value(std::string(fn) + ": out's head dim " + std::to_string(d_out) + " does not fit q's d=" +
               std::to_string(d) + "; accepted: d, or a multiple of 8 below it (the first columns of o)");
  }
  check_attn_out(out, lse, q, b, h_q, s_q, d_out, fn);
  check_tma_operands(q, k, v_t, sm_scale, b, h_q, s_q, seq_kv, fn);

  AttnFwdQkS8PvE4m3Args a;
  a.q = static_cast<const int8_t*>(q.data());
  a.k = static_cast<const int8_t*>(k.data());
  a.v_t = static_cast<const uint8_t*>(v_t.data());
  a.q_scale = static_cast<const float*>(q_scale.data());
  a.k_scale = static_cast<const float*>(k_scale.data());
  a.v_scale = static_cast<const float*>(v_scale.data());
  a.v_mean = v_mean ? static_cast<const float*>(v_mean->data()) : nullptr;
  fill_attn_args(a, out, lse, b, h_q, h_kv, s_q, seq_kv, d, d_out, sm_scale, is_causal);
  const bool bf16 = same_dtype(out.dtype(), kBF16);

  DeviceGuard guard(q.device_id());
  cudaError_t err;
  {
    nb::gil_scoped_release release;
    err = launch_attn(a, bf16, one_level, as_stream(stream));
  }
  check_attn_launch(err, fn);
}

// ------------------------------------------------------------------------------------------------
void check_input_bhsd(const Array& x, const char* what, const Array& ref) {
  check_cuda(x, what);
  check_same_device(ref, "q", x, what);
  check_dtype(x, what, {kF16, kBF16});
  if (!same_dtype(x.dtype(), ref.dtype())) {
    fail_type(std::string("quant_qkv_sm90_fused: q, k and v must have the same dtype; q is ") + dtype_name(ref.dtype()) +
              ", " + what + " is " + dtype_name(x.dtype()));
  }
  check_ndim(x, what, 4);
  check_last_dim_contiguous(x, what);
  check_aligned(x, what, 16);
  for (size_t i = 0; i < 3; ++i) {
    if (stride(x, i) % 8 != 0) {
      fail_value(std::string("quant_qkv_sm90_fused: ") + what +
                 " needs 16-byte aligned rows (strides multiple of 8 elements), got strides " + strides_str(x) +
                 "; pass a contiguous tensor");
    }
  }
}

struct QkvShape {
  int64_t b, h_q, s_q, d, h_kv, s_kv;
  int64_t d_in;  // the inputs' head dim; d = the kernel's (64 / 128), d_in <= d
};

// fp16/bf16 q, k, v, logical (b, h, s, d_in), as the fused quantizer reads them; the grid limits.
QkvShape check_qkv_inputs(const Array& q, const Array& k, const Array& v, const char* fn) {
  check_cuda(q, "q");
  check_input_bhsd(q, "q", q);
  check_input_bhsd(k, "k", q);
  check_input_bhsd(v, "v", q);
  const int64_t d_in = dim(q, 3);
  const QkvShape sh{dim(q, 0), dim(q, 1), dim(q, 2), check_head_dim_in(d_in, fn), dim(k, 1), dim(k, 2), d_in};
  check_positive(sh.b, "batch", fn);
  check_positive(sh.h_q, "q heads", fn);
  check_positive(sh.s_q, "q length", fn);
  check_positive(sh.s_kv, "kv length", fn);
  check_heads(sh.h_q, sh.h_kv, fn);
  check_shape(k, "k", {sh.b, sh.h_kv, sh.s_kv, sh.d_in});
  check_shape(v, "v", {sh.b, sh.h_kv, sh.s_kv, sh.d_in});
  if (sh.b * sh.h_kv > 65535) {
    fail_value(std::string(fn) + ": batch * kv heads must be <= 65535, got " + std::to_string(sh.b * sh.h_kv));
  }
  if (sh.b > 65535 || sh.h_q > 65535) {
    fail_value(std::string(fn) + ": batch and q heads must be <= 65535 (grid limits), got batch=" +
               std::to_string(sh.b) + ", heads=" + std::to_string(sh.h_q));
  }
  if (sh.s_q > (int64_t(1) << 30) || sh.s_kv > (int64_t(1) << 30)) {
    fail_value(std::string(fn) + ": sequence lengths must be < 2^30");
  }
  return sh;
}

void fill_quant_inputs(QuantQkvSm90Args& a, const Array& q, const Array& k, const Array& v, const QkvShape& sh) {
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.q_stride_b = stride(q, 0), a.q_stride_h = stride(q, 1), a.q_stride_s = stride(q, 2);
  a.k_stride_b = stride(k, 0), a.k_stride_h = stride(k, 1), a.k_stride_s = stride(k, 2);
  a.v_stride_b = stride(v, 0), a.v_stride_h = stride(v, 1), a.v_stride_s = stride(v, 2);
  a.batch = int(sh.b), a.heads_q = int(sh.h_q), a.heads_kv = int(sh.h_kv);
  a.seq_q = int(sh.s_q), a.seq_kv = int(sh.s_kv), a.head_dim = int(sh.d), a.head_dim_in = int(sh.d_in);
  a.in_bf16 = same_dtype(q.dtype(), kBF16);
}

void check_out(const Array& x, const char* what, const Array& ref, DType dt, const std::vector<int64_t>& shape) {
  check_cuda(x, what);
  check_same_device(ref, "q", x, what);
  check_dtype(x, what, {dt});
  check_shape(x, what, shape);
  check_contiguous(x, what);
  check_aligned(x, what, 16);
}

void quant_qkv_sm90_fused(Array q, Array k, Array v, Array q_out, Array q_scale, Array k_out, Array k_scale,
                          Array v_out, Array v_scale, Array k_mean, bool k_mean_given, Array workspace,
                          uintptr_t stream, std::optional<Array> v_mean, bool v_mean_given) {
  constexpr const char* fn = "quant_qkv_sm90_fused";
  const QkvShape sh = check_qkv_inputs(q, k, v, fn);
  const int64_t b = sh.b, h_q = sh.h_q, s_q = sh.s_q, d = sh.d, h_kv = sh.h_kv, s_kv = sh.s_kv;
  check_out(q_out, "q_out", q, kI8, {b, h_q, s_q, d});
  check_out(q_scale, "q_scale", q, kF32, {b, h_q, sage::sm90::sm90_q_scale_groups(s_q)});
  check_out(k_out, "k_out", q, kI8, {b, h_kv, s_kv, d});
  check_out(k_scale, "k_scale", q, kF32, {b, h_kv, sage::sm90::sm90_k_scale_groups(s_kv)});
  check_out(v_out, "v_out", q, kU8, {b, h_kv, d, sage::sm90::sm90_v_pad(s_kv)});
  check_out(v_scale, "v_scale", q, kF32, {b, h_kv, d});
  check_out(k_mean, "k_mean", q, kF32, {b, h_kv, d});
  if (v_mean) {
    check_out(*v_mean, "v_mean", q, kF32, {b, h_kv, d});
  } else if (v_mean_given) {
    fail_value(std::string(fn) + ": v_mean_given=True needs a v_mean tensor, got None");
  }
  check_cuda(workspace, "workspace");
  check_same_device(q, "q", workspace, "workspace");
  check_dtype(workspace, "workspace", {kF32});
  check_contiguous(workspace, "workspace");
  const int64_t ws = sage::sm90::quant_qkv_sm90_workspace_floats(b, h_kv, s_kv, d);
  int64_t ws_size = 1;
  for (size_t i = 0; i < workspace.ndim(); ++i) ws_size *= dim(workspace, i);
  if (ws_size < ws) {
    fail_value(std::string(fn) + ": workspace needs >= " + std::to_string(ws) + " float32 elements, got " +
               std::to_string(ws_size));
  }

  QuantQkvSm90Args a;
  fill_quant_inputs(a, q, k, v, sh);
  a.q_out = static_cast<int8_t*>(q_out.data());
  a.q_scale = static_cast<float*>(q_scale.data());
  a.k_out = static_cast<int8_t*>(k_out.data());
  a.k_scale = static_cast<float*>(k_scale.data());
  a.v_out = static_cast<uint8_t*>(v_out.data());
  a.v_scale = static_cast<float*>(v_scale.data());
  a.k_mean = static_cast<float*>(k_mean.data());
  a.k_mean_given = k_mean_given;
  a.v_mean = v_mean ? static_cast<float*>(v_mean->data()) : nullptr;
  a.v_mean_given = v_mean_given;
  a.workspace = static_cast<float*>(workspace.data());

  DeviceGuard guard(q.device_id());
  cudaError_t err;
  {
    nb::gil_scoped_release release;
    err = sage::sm90::quant_qkv_sm90_fused(a, as_stream(stream));
  }
  check_launch(err, fn);
}

// ------------------------------------------------------------------------------------------------
// One call = the whole host path of an attention call: quantization (3 launches, 2 for s_kv <= 2048) and attention
// (1 launch) over one caller-allocated workspace, no Python between them.
void quant_attn_fwd_sm90_qk_s8_pv_e4m3(Array q, Array k, Array v, Array out, std::optional<Array> lse,
                                       Array workspace, float sm_scale, bool is_causal, bool smooth_k,
                                       bool smooth_v, uintptr_t stream, const std::string& pv_accum) {
  constexpr const char* fn = "quant_attn_fwd_sm90_qk_s8_pv_e4m3";
  const bool one_level = parse_one_level(pv_accum, fn);
  const QkvShape sh = check_qkv_inputs(q, k, v, fn);
  check_attn_out(out, lse, q, sh.b, sh.h_q, sh.s_q, sh.d_in, fn);  // o has the inputs' head dim
  check_sm_scale(sm_scale, fn);
  const sage::sm90::QuantAttnSm90Workspace w =
      sage::sm90::quant_attn_sm90_workspace(sh.b, sh.h_q, sh.s_q, sh.h_kv, sh.s_kv, sh.d);
  check_cuda(workspace, "workspace");
  check_same_device(q, "q", workspace, "workspace");
  check_dtype(workspace, "workspace", {kU8});
  check_contiguous(workspace, "workspace");
  check_aligned(workspace, "workspace", 16);
  int64_t ws_bytes = 1;
  for (size_t i = 0; i < workspace.ndim(); ++i) ws_bytes *= dim(workspace, i);
  if (ws_bytes < w.total) {
    fail_value(std::string(fn) + ": workspace needs >= " + std::to_string(w.total) + " bytes, got " +
               std::to_string(ws_bytes));
  }
  uint8_t* base = static_cast<uint8_t*>(workspace.data());
  auto at = [base](int64_t off) { return base + off; };

  QuantQkvSm90Args qa;
  fill_quant_inputs(qa, q, k, v, sh);
  qa.q_out = reinterpret_cast<int8_t*>(at(w.q));
  qa.q_scale = reinterpret_cast<float*>(at(w.q_scale));
  qa.k_out = reinterpret_cast<int8_t*>(at(w.k));
  qa.k_scale = reinterpret_cast<float*>(at(w.k_scale));
  qa.v_out = at(w.v_t);
  qa.v_scale = reinterpret_cast<float*>(at(w.v_scale));
  qa.k_mean = reinterpret_cast<float*>(at(w.k_mean));
  qa.k_mean_given = !smooth_k;  // no K smoothing: a zero mean, written below
  qa.v_mean = smooth_v ? reinterpret_cast<float*>(at(w.v_mean)) : nullptr;
  qa.v_mean_given = false;
  qa.workspace = reinterpret_cast<float*>(at(w.stats));

  AttnFwdQkS8PvE4m3Args aa;
  aa.q = qa.q_out;
  aa.k = qa.k_out;
  aa.v_t = qa.v_out;
  aa.q_scale = qa.q_scale;
  aa.k_scale = qa.k_scale;
  aa.v_scale = qa.v_scale;
  aa.v_mean = qa.v_mean;
  fill_attn_args(aa, out, lse, sh.b, sh.h_q, sh.h_kv, sh.s_q, sh.s_kv, sh.d, sh.d_in, sm_scale, is_causal);
  const bool bf16 = same_dtype(out.dtype(), kBF16);

  DeviceGuard guard(q.device_id());
  cudaError_t err = cudaSuccess;
  {
    nb::gil_scoped_release release;
    cudaStream_t s = as_stream(stream);
    if (!smooth_k) err = cudaMemsetAsync(qa.k_mean, 0, size_t(4 * sh.b * sh.h_kv * sh.d), s);
    if (err == cudaSuccess) err = sage::sm90::quant_qkv_sm90_fused(qa, s);
    if (err == cudaSuccess) err = launch_attn(aa, bf16, one_level, s);
  }
  check_attn_launch(err, fn);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// train_s8 forward (SageBwd) over per-block INT8 tensors (sm90_attn_fwd_train_s8_params.hpp).
void attn_fwd_sm90_train_s8(Array q, Array k, Array v_t, Array q_scale, Array k_scale, Array v_scale, Array out,
                            std::optional<Array> lse, int64_t seq_kv, float sm_scale, bool is_causal,
                            uintptr_t stream) {
  constexpr const char* fn = "attn_fwd_sm90_train_s8";
  namespace k8 = sage::sm90;
  const QkS8Dims dims = check_qk_s8(q, k, seq_kv, fn);
  const int64_t b = dims.b, h_q = dims.h_q, s_q = dims.s_q, d = dims.d, h_kv = dims.h_kv;
  check_cuda(v_t, "v_t");
  check_same_device(q, "q", v_t, "v_t");
  check_dtype(v_t, "v_t", {kI8});
  check_shape(v_t, "v_t", {b, h_kv, d, k8::sm90_train_v_pad(seq_kv)});
  check_contiguous(v_t, "v_t");
  const int64_t q_blocks = k8::sm90_train_q_blocks(s_q), kv_blocks = k8::sm90_train_kv_blocks(seq_kv);
  for (auto [t, name, shape] : {std::tuple<const Array*, const char*, std::vector<int64_t>>{&q_scale, "q_scale", {b, h_q, q_blocks}},
                                {&k_scale, "k_scale", {b, h_kv, kv_blocks}},
                                {&v_scale, "v_scale", {b, h_kv, kv_blocks}}}) {
    check_cuda(*t, name);
    check_same_device(q, "q", *t, name);
    check_dtype(*t, name, {kF32});
    check_shape(*t, name, shape);
    check_contiguous(*t, name);
  }
  check_attn_out(out, lse, q, b, h_q, s_q, d, fn);
  check_tma_operands(q, k, v_t, sm_scale, b, h_q, s_q, seq_kv, fn);
  k8::AttnFwdTrainS8Args a;
  a.q = static_cast<const int8_t*>(q.data());
  a.k = static_cast<const int8_t*>(k.data());
  a.v_t = static_cast<const int8_t*>(v_t.data());
  a.q_scale = static_cast<const float*>(q_scale.data());
  a.k_scale = static_cast<const float*>(k_scale.data());
  a.v_scale = static_cast<const float*>(v_scale.data());
  fill_out_args(a, out, lse, b, h_q, h_kv, s_q, seq_kv, d, sm_scale, is_causal);
  const bool bf16 = same_dtype(out.dtype(), kBF16);
  DeviceGuard guard(q.device_id());
  cudaError_t err;
  {
    nb::gil_scoped_release release;
    const cudaStream_t st = as_stream(stream);
    if (d == 64) {
      err = bf16 ? k8::attn_fwd_sm90_train_s8_hdim64_bf16(a, st) : k8::attn_fwd_sm90_train_s8_hdim64_f16(a, st);
    } else {
      err = bf16 ? k8::attn_fwd_sm90_train_s8_hdim128_bf16(a, st) : k8::attn_fwd_sm90_train_s8_hdim128_f16(a, st);
    }
  }
  check_attn_launch(err, fn);
}

// ------------------------------------------------------------------------------------------------
// train_s8 backward (sm90_attn_bwd_train_s8_params.hpp): dq, dk, dv from the per-block INT8 and
// 16-bit operands the caller prepared.
void attn_bwd_sm90_train_s8(Array q, Array q_t, Array k, Array k_t, Array v, Array dout, Array do_t, Array q_scale,
                            Array k_scale, Array do_scale, Array lse2, Array delta, Array dq, Array dk, Array dv,
                            float sm_scale, bool is_causal, uintptr_t stream, std::optional<Array> do_bad_last) {
  constexpr const char* fn = "attn_bwd_sm90_train_s8";
  namespace k8 = sage::sm90;
  const int64_t seq_kv = k.ndim() == 4 ? dim(k, 2) : 0;
  const QkS8Dims dims = check_qk_s8(q, k, seq_kv, fn);
  const int64_t b = dims.b, h_q = dims.h_q, s_q = dims.s_q, d = dims.d, h_kv = dims.h_kv;
  const int64_t q_pad = k8::sm90_train_q_pad(s_q), kv_pad = k8::sm90_train_v_pad(seq_kv);
  const int64_t q_blocks = k8::sm90_train_q_blocks(s_q), kv_blocks = k8::sm90_train_kv_blocks(seq_kv);
  using Spec = std::tuple<const Array*, const char*, std::vector<int64_t>, DType>;
  for (auto [t, name, shape, dtype] : {Spec{&q_t, "q_t", {b, h_q, d, q_pad}, kI8}, Spec{&k_t, "k_t", {b, h_kv, d, kv_pad}, kI8},
                                       Spec{&do_t, "do_t", {b, h_q, d, q_pad}, kI8},
                                       Spec{&q_scale, "q_scale", {b, h_q, q_blocks}, kF32},
                                       Spec{&k_scale, "k_scale", {b, h_kv, kv_blocks}, kF32},
                                       Spec{&do_scale, "do_scale", {b, h_q, q_blocks}, kF32},
                                       Spec{&lse2, "lse2", {b, h_q, q_pad}, kF32},
                                       Spec{&delta, "delta", {b, h_q, q_pad}, kF32}}) {
    check_cuda(*t, name);
    check_same_device(q, "q", *t, name);
    check_dtype(*t, name, {dtype});
    check_shape(*t, name, shape);
    check_contiguous(*t, name);
    check_aligned(*t, name, 16);
  }
  for (auto [t, name, shape] : {std::tuple<const Array*, const char*, std::vector<int64_t>>{&v, "v", {b, h_kv, seq_kv, d}},
                                {&dout, "dout", {b, h_q, s_q, d}}}) {
    check_cuda(*t, name);
    check_same_device(q, "q", *t, name);
    check_dtype(*t, name, {kF16, kBF16});
    check_shape(*t, name, shape);
    check_contiguous(*t, name);
    check_aligned(*t, name, 16);
  }
  if (!same_dtype(v.dtype(), dout.dtype())) fail_value(std::string(fn) + ": v and dout must have the same dtype");
  if (do_bad_last) {
    check_cuda(*do_bad_last, "do_bad_last");
    check_same_device(q, "q", *do_bad_last, "do_bad_last");
    check_dtype(*do_bad_last, "do_bad_last", {kI32});
    check_shape(*do_bad_last, "do_bad_last", {b, h_q, d});
    check_contiguous(*do_bad_last, "do_bad_last");
  }
  for (auto [t, name, shape] : {std::tuple<const Array*, const char*, std::vector<int64_t>>{&dq, "dq", {b, h_q, s_q, d}},
                                {&dk, "dk", {b, h_kv, seq_kv, d}}, {&dv, "dv", {b, h_kv, seq_kv, d}}}) {
    check_cuda(*t, name);
    check_same_device(q, "q", *t, name);
    check_dtype(*t, name, {kF16, kBF16});
    if (!same_dtype(t->dtype(), v.dtype())) fail_value(std::string(fn) + ": " + name + " must have v's dtype");
    check_shape(*t, name, shape);
    check_last_dim_contiguous(*t, name);
    check_aligned(*t, name, 4);
    for (size_t i = 0; i < 3; ++i) {
      if (stride(*t, i) % 2 != 0) {
        fail_value(std::string(fn) + ": " + name + " strides must be even (4-byte aligned rows), got strides " +
                   strides_str(*t));
      }
    }
  }
  check_tma_operands(q, k, k_t, sm_scale, b, h_q, s_q, seq_kv, fn);
  k8::AttnBwdTrainS8Args a;
  a.q = static_cast<const int8_t*>(q.data());
  a.q_t = static_cast<const int8_t*>(q_t.data());
  a.k = static_cast<const int8_t*>(k.data());
  a.k_t = static_cast<const int8_t*>(k_t.data());
  a.v = v.data();
  a.dout = dout.data();
  a.do_t = static_cast<const int8_t*>(do_t.data());
  a.q_scale = static_cast<const float*>(q_scale.data());
  a.k_scale = static_cast<const float*>(k_scale.data());
  a.do_scale = static_cast<const float*>(do_scale.data());
  a.do_bad_last = do_bad_last ? static_cast<const int*>(do_bad_last->data()) : nullptr;
  a.lse2 = static_cast<const float*>(lse2.data());
  a.delta = static_cast<const float*>(delta.data());
  a.dq = dq.data();
  a.dq_stride_b = stride(dq, 0);
  a.dq_stride_h = stride(dq, 1);
  a.dq_stride_s = stride(dq, 2);
  a.dk = dk.data();
  a.dk_stride_b = stride(dk, 0);
  a.dk_stride_h = stride(dk, 1);
  a.dk_stride_s = stride(dk, 2);
  a.dv = dv.data();
  a.dv_stride_b = stride(dv, 0);
  a.dv_stride_h = stride(dv, 1);
  a.dv_stride_s = stride(dv, 2);
  a.batch = int(b);
  a.heads_q = int(h_q);
  a.heads_kv = int(h_kv);
  a.seq_q = int(s_q);
  a.seq_kv = int(seq_kv);
  a.head_dim = int(d);
  a.sm_scale = sm_scale;
  a.mask = is_causal ? k8::MaskKind::kCausal : k8::MaskKind::kNone;
  const bool bf16 = same_dtype(v.dtype(), kBF16);
  DeviceGuard guard(q.device_id());
  cudaError_t err;
  {
    nb::gil_scoped_release release;
    const cudaStream_t st = as_stream(stream);
    if (d == 64) {
      err = bf16 ? k8::attn_bwd_sm90_train_s8_hdim64_bf16(a, st) : k8::attn_bwd_sm90_train_s8_hdim64_f16(a, st);
    } else {
      err = bf16 ? k8::attn_bwd_sm90_train_s8_hdim128_bf16(a, st) : k8::attn_bwd_sm90_train_s8_hdim128_f16(a, st);
    }
  }
  check_attn_launch(err, fn);
}

void bind_attn_sm90(nb::module_& m) {
  m.def("attn_fwd_sm90_qk_s8_pv_e4m3", &attn_fwd_sm90_qk_s8_pv_e4m3, nb::arg("q"), nb::arg("k"), nb::arg("v_t"),
        nb::arg("q_scale"), nb::arg("k_scale"), nb::arg("v_scale"), nb::arg("out"), nb::arg("lse").none(),
        nb::arg("seq_kv"), nb::arg("sm_scale"), nb::arg("is_causal"), nb::arg("stream"),
        nb::kw_only(), nb::arg("v_mean").none() = nb::none(), nb::arg("pv_accum") = "two_level",
        "Hopper (sm_90a) attention forward, recipe qk_s8_pv_e4m3, over tensors from quant_qkv_sm90_fused.\n\n"
        "q int8 (b, h_q, s_q, d) contiguous; k int8 (b, h_kv, seq_kv, d) contiguous (smoothed);\n"
        "v_t uint8 E4M3 (b, h_kv, d, ceil(seq_kv/128)*128), transposed and permuted per 32 tokens\n"
        "(quant-formats.md 'v_e4m3_t_perm32'); q_scale f32 (b, h_q, ceil(s_q/16)*8);\n"
        "k_scale f32 (b, h_kv, ceil(seq_kv/128)*4); v_scale f32 (b, h_kv, d).\n"
        "out fp16/bf16 logical (b, h_q, s_q, d), any even strides with the last dim contiguous\n"
        "(pass out.transpose(1, 2) of a (b, s, h, d) tensor for bshd). lse: None or f32 (b, h_q, s_q),\n"
        "natural log of the (smoothed) scores; fully masked rows give 0 output and -inf.\n"
        "d in {64, 128}; out's last dim d (all columns) or a multiple of 8 below d (only the first\n"
        "out.shape[-1] columns of o are stored: a head dim zero-padded to d by quant_qkv_sm90_fused).\n"
        "h_q a multiple of h_kv (GQA); is_causal = bottom-right aligned.\n"
        "stream: raw cudaStream_t as int. v_mean (keyword): None or f32 (b, h_kv, d) contiguous, the\n"
        "V smoothing mean added to every output channel after 1/l and v_scale (rows with l == 0 stay 0).\n"
        "pv_accum (keyword): 'two_level' (each KV tile's P~V in a fresh FP22 accumulator, folded into\n"
        "an fp32 O) or 'one_level' (P~V accumulated straight into O, rescaled per tile).");
  m.def("quant_qkv_sm90_fused", &quant_qkv_sm90_fused, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("q_out"),
        nb::arg("q_scale"), nb::arg("k_out"), nb::arg("k_scale"), nb::arg("v_out"), nb::arg("v_scale"),
        nb::arg("k_mean"), nb::arg("k_mean_given"), nb::arg("workspace"), nb::arg("stream"), nb::kw_only(),
        nb::arg("v_mean").none() = nb::none(), nb::arg("v_mean_given") = false,
        "Fused quantization for attn_fwd_sm90_qk_s8_pv_e4m3 (3 launches, 2 for s_kv <= 2048; no host sync).\n\n"
        "q, k, v: fp16 or bf16 (same dtype), logical (b, h, s, d_in) with the last dim contiguous and\n"
        "strides multiple of 8 elements (pass x.transpose(1, 2) for bshd). d_in: 64, 128, or another\n"
        "multiple of 8 below 128, zero-filled as it is read to d = 64 (d_in <= 64) or 128: every output\n"
        "below has d and is bit for bit that of the inputs zero-padded to d. Outputs (contiguous):\n"
        "q_out int8 (b, h_q, s_q, d), q_scale f32 (b, h_q, ceil(s_q/16)*8) per-thread;\n"
        "k_out int8 (b, h_kv, s_kv, d) of K - k_mean, k_scale f32 (b, h_kv, ceil(s_kv/128)*4);\n"
        "v_out uint8 E4M3 (b, h_kv, d, ceil(s_kv/128)*128) transposed + permuted, v_scale f32 (b, h_kv, d).\n"
        "k_mean f32 (b, h_kv, d): read if k_mean_given, else written (token mean of K).\n"
        "v_mean (keyword): None = no V smoothing; else f32 (b, h_kv, d) contiguous, read if v_mean_given,\n"
        "else written (token mean of V); v_out then holds E4M3((V - v_mean) / v_scale) and the attention\n"
        "kernel must add v_mean back (its v_mean argument).\n"
        "workspace f32 with >= quant_qkv_sm90_workspace_size(b, h_kv, s_kv, d_in) elements\n"
        "(= 4*b*h_kv*ceil(s_kv/512)*d: per-chunk K sums, V sums, V max, V min).");
  m.def("quant_attn_fwd_sm90_qk_s8_pv_e4m3", &quant_attn_fwd_sm90_qk_s8_pv_e4m3, nb::arg("q"), nb::arg("k"),
        nb::arg("v"), nb::arg("out"), nb::arg("lse").none(), nb::arg("workspace"), nb::arg("sm_scale"),
        nb::arg("is_causal"), nb::arg("smooth_k"), nb::arg("smooth_v"), nb::arg("stream"), nb::kw_only(),
        nb::arg("pv_accum") = "two_level",
        "Whole Hopper attention call, recipe qk_s8_pv_e4m3: the fused quantization (2-3 launches) and the\n"
        "attention forward (1 launch) in one binding call, over one workspace.\n\n"
        "q, k, v: fp16/bf16 logical (b, h, s, d_in) as for quant_qkv_sm90_fused (d_in a multiple of 8\n"
        "up to 128: zero-filled to the kernel head dim d = 64 / 128 inside the quantizer); out\n"
        "(b, h_q, s_q, d_in) and lse as for attn_fwd_sm90_qk_s8_pv_e4m3 (the LSE is of the smoothed\n"
        "scores: add q.k_mean[..., :d_in]*scale, k_mean being the f32 (b, h_kv, d) tensor at the\n"
        "workspace's start). workspace: uint8, contiguous, >= quant_attn_fwd_sm90_workspace_size(b, h_q,\n"
        "s_q, h_kv, s_kv, d_in) bytes, 16-byte aligned.\n"
        "pv_accum (keyword): 'two_level' or 'one_level', as for attn_fwd_sm90_qk_s8_pv_e4m3.");
  m.def(
      "quant_attn_fwd_sm90_workspace_size",
      [](int64_t b, int64_t h_q, int64_t s_q, int64_t h_kv, int64_t s_kv, int64_t d) {
        if (b <= 0 || h_q <= 0 || s_q <= 0 || h_kv <= 0 || s_kv <= 0 || d <= 0) {
          throw nb::value_error("quant_attn_fwd_sm90_workspace_size: every size must be positive");
        }
        return sage::sm90::quant_attn_sm90_workspace(b, h_q, s_q, h_kv, s_kv, kernel_head_dim_of(d)).total;
      },
      nb::arg("b"), nb::arg("h_q"), nb::arg("s_q"), nb::arg("h_kv"), nb::arg("s_kv"), nb::arg("d"),
      "bytes of the workspace quant_attn_fwd_sm90_qk_s8_pv_e4m3 needs for inputs of head dim d (k_mean\n"
      "f32 (b, h_kv, D) first, D the kernel head dim: 64 for d <= 64, 128 for other multiples of 8 up to 128).");
  m.def(
      "quant_qkv_sm90_workspace_size",
      [](int64_t b, int64_t h_kv, int64_t s_kv, int64_t d) {
        if (b <= 0 || h_kv <= 0 || s_kv <= 0 || d <= 0) {
          throw nb::value_error(("quant_qkv_sm90_workspace_size: b, h_kv, s_kv, d must be positive, got " +
                                 std::to_string(b) + ", " + std::to_string(h_kv) + ", " + std::to_string(s_kv) +
                                 ", " + std::to_string(d)).c_str());
        }
        return sage::sm90::quant_qkv_sm90_workspace_floats(b, h_kv, s_kv, kernel_head_dim_of(d));
      },
      nb::arg("b"), nb::arg("h_kv"), nb::arg("s_kv"), nb::arg("d"),
      "float32 elements of the workspace quant_qkv_sm90_fused needs for inputs of head dim d (sized for\n"
      "the kernel head dim: 64 for d <= 64, 128 for other multiples of 8 up to 128).");
  m.def("attn_fwd_sm90_train_s8", &attn_fwd_sm90_train_s8, nb::arg("q"), nb::arg("k"), nb::arg("v_t"),
        nb::arg("q_scale"), nb::arg("k_scale"), nb::arg("v_scale"), nb::arg("out"), nb::arg("lse").none(),
        nb::arg("seq_kv"), nb::arg("sm_scale"), nb::arg("is_causal"), nb::arg("stream"),
        "Hopper train_s8 forward (SageBwd), per-block INT8 throughout (NUMERICS.md train_s8).\n\n"
        "q int8 (b, h_q, s_q, d) contiguous, q_scale f32 (b, h_q, ceil(s_q/128)); k int8 (b, h_kv, s_kv, d)\n"
        "of K - k_mean, k_scale f32 (b, h_kv, ceil(s_kv/64)); v_t int8 (b, h_kv, d, ceil(s_kv/64)*64): V\n"
        "transposed with the tokens permuted inside every 32-token chunk as v_e4m3_t_perm32 (padding 0),\n"
        "v_scale f32 (b, h_kv, ceil(s_kv/64)); d 64 or 128. out fp16/bf16 logical (b, h_q, s_q, d) (last\n"
        "dim contiguous, even strides); lse None or f32 (b, h_q, s_q): natural log of the smoothed scores\n"
        "(-inf for a row that sees no key). is_causal: bottom-right aligned.");
  m.def("attn_bwd_sm90_train_s8", &attn_bwd_sm90_train_s8, nb::arg("q"), nb::arg("q_t"), nb::arg("k"),
        nb::arg("k_t"), nb::arg("v"), nb::arg("dout"), nb::arg("do_t"), nb::arg("q_scale"), nb::arg("k_scale"),
        nb::arg("do_scale"), nb::arg("lse2"), nb::arg("delta"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"),
        nb::arg("sm_scale"), nb::arg("is_causal"), nb::arg("stream"), nb::kw_only(),
        nb::arg("do_bad_last").none() = nb::none(),
        "Hopper train_s8 backward (SageBwd): dq, dk, dv (two deterministic kernels, no atomics).\n\n"
        "q int8 (b, h_q, s_q, d), q_scale f32 (b, h_q, ceil(s_q/128)) as the forward's; q_t int8\n"
        "(b, h_q, d, ceil(s_q/128)*128): q transposed, tokens permuted per 32 as v_e4m3_t_perm32, padding 0;\n"
        "k int8 (b, h_kv, s_kv, d) of K - k_mean, k_scale f32 (b, h_kv, ceil(s_kv/64)); k_t int8\n"
        "(b, h_kv, d, ceil(s_kv/64)*64) transposed + permuted likewise; v, dout fp16/bf16 (b, h_kv, s_kv, d) /\n"
        "(b, h_q, s_q, d) contiguous (same dtype); do_t int8 (b, h_q, d, ceil(s_q/128)*128) of dO quantized\n"
        "per 128 tokens, transposed + permuted, do_scale f32 (b, h_q, ceil(s_q/128)); lse2 f32\n"
        "(b, h_q, ceil(s_q/128)*128): the forward's smoothed LSE times log2(e), -inf and padding 0; delta f32\n"
        "(same shape): rowsum(dO * O). dq, dk, dv: v's dtype, logical (b, h, s, d), last dim contiguous, even\n"
        "strides; dk, dv summed over each GQA group. is_causal: bottom-right aligned.\n"
        "Non-finite dO: pass dout / do_t with those values zeroed, delta from the original dO, and\n"
        "do_bad_last (keyword) int32 (b, h_q, d): the last row with a non-finite dO in each channel, -1 if\n"
        "none; dq / dk rows and dv (key, channel) entries it reaches are NaN (the emulation's rule).");
  // Capability: the functions above that read fp16/bf16 q, k, v take head dims that are multiples of
  // 8 below 128 (zero-filled inside the quantizer, no copies), o of the inputs' head dim.
  m.attr("SM90_HEAD_DIM_ZERO_FILL") = true;
}

}  // namespace sage_core
