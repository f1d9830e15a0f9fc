// Bindings of the sm80 mma.sync attention family (Ampere/Ada, also built for sm_90a); owner: H5.
// Compiled only when the family is in the build (SAGE_WITH_SM80; cmake/instantiations.cmake).
//
//   sage_core.attn_fwd_sm80_qk_s8_pv_f16(q, k, v, o, lse, q_scale, k_scale, *, ..., pv_accum)
//   sage_core.attn_fwd_sm80_qk_s8_pv_s8(q, k, v_t, o, lse, q_scale, k_scale, v_scale, *, ..., pv_accum)
//   sage_core.attn_fwd_sm80_qk_s8_pv_e4m3(q, k, v_t, o, lse, q_scale, k_scale, v_scale, *, ..., pv_accum)
//   sage_core.attn_fwd_sm80_qk_s4_pv_e4m3(q, k, v_t, o, lse, q_scale, k_scale, v_scale, q_mean, *, ...)
//
// All tensors are preallocated by the caller (logical (b, h, s, d) views; any strides with the
// last dim contiguous and 16-byte aligned rows); every check runs before the launch.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <string>

#include "sage/sm80/sm80_attn_fwd_launch.hpp"
#include "sage_core/bindings.hpp"
#include "sage_core/checks.hpp"
#include "sage_core/launch.hpp"

namespace nb = nanobind;

namespace sage_core {
namespace {

using sage::sm80::Sm80AttnFwdParams;
using sage::sm80::Sm80IoDtype;
using sage::sm80::Sm80Recipe;
using sage::sm80::Sm80ScaleGranularity;

constexpr int64_t kRowAlignBytes = 16;  // cp.async 16-byte chunks
constexpr int64_t kMaxGridYZ = 65535;   // heads and batch go to grid.y / grid.z
constexpr int kMmaRowTile = 16;

// The recipe a Python function is named after (the *AccF16 variants are its pv_accum option).
const char* recipe_name(Sm80Recipe r) {
  switch (r) {
    case Sm80Recipe::kQkS8PvF16:
    case Sm80Recipe::kQkS8PvF16AccF16: return "qk_s8_pv_f16";
    case Sm80Recipe::kQkS8PvS8: return "qk_s8_pv_s8";
    case Sm80Recipe::kQkS8PvE4m3:
    case Sm80Recipe::kQkS8PvE4m3AccF16: return "qk_s8_pv_e4m3";
    default: return "qk_s4_pv_e4m3";
  }
}

// pv_accum option -> kernel variant: `base_accum` (the default) or, where the recipe has an
// FP16-accumulate kernel, "f16_buffer".
Sm80Recipe parse_pv_accum(Sm80Recipe base, const char* base_accum,
                          std::optional<Sm80Recipe> f16_variant, const std::string& pv_accum) {
  if (pv_accum == base_accum) return base;
  if (pv_accum == "f16_buffer" && f16_variant) return *f16_variant;
  fail_value(std::string("attn_fwd_sm80_") + recipe_name(base) + ": pv_accum='" + pv_accum +
             "' is not supported; accepted: " + base_accum + (f16_variant ? ", f16_buffer" : ""));
}

Sm80ScaleGranularity parse_granularity(const std::string& fn, const char* what,
                                       const std::string& g, bool is_q) {
  if (g == "per_tensor") return Sm80ScaleGranularity::kPerTensor;
  if (g == "per_block") return Sm80ScaleGranularity::kPerBlock;
  if (g == "per_warp" && is_q) return Sm80ScaleGranularity::kPerWarp;
  if (g == "per_thread") return Sm80ScaleGranularity::kPerThread;
  if (g == "per_token") return Sm80ScaleGranularity::kPerToken;
  fail_value(fn + ": " + what + "='" + g + "' is not supported; accepted: per_tensor, per_block, " +
             (is_q ? "per_warp, " : "") + "per_thread, per_token");
}

// Scale groups per (b, h) for s tokens (docs/design/quant-formats.md).
int64_t num_groups(Sm80ScaleGranularity g, int64_t s, int64_t block, bool is_q) {
  switch (g) {
    case Sm80ScaleGranularity::kPerTensor: return 1;
    case Sm80ScaleGranularity::kPerBlock: return (s + block - 1) / block;
    case Sm80ScaleGranularity::kPerWarp: return (s + kMmaRowTile - 1) / kMmaRowTile;
    case Sm80ScaleGranularity::kPerThread:
      return is_q ? (s + kMmaRowTile - 1) / kMmaRowTile * 8 : (s + block - 1) / block * 4;
    default: return s;
  }
}

void check_row_strides(const std::string& fn, const Array& a, const char* what, int64_t elem_bytes,
                       int ndim_rows) {
  check_last_dim_contiguous(a, (fn + ": " + what).c_str());
  check_aligned(a, (fn + ": " + what).c_str(), kRowAlignBytes);
  for (int i = 0; i < ndim_rows; ++i) {
    if (dim(a, i) > 1 && (stride(a, i) * elem_bytes) % kRowAlignBytes != 0)
      fail_value(fn + ": " + what + ": every stride must be a multiple of 16 bytes (cp.async rows); got strides " +
                 strides_str(a) + " (elements) for shape " + shape_str(a) + "; pass a .contiguous() tensor");
  }
}

void check_f32_last_contig(const std::string& fn, const Array& a, const char* what,
                           const std::vector<int64_t>& shape) {
  const std::string w = fn + ": " + what;
  check_cuda(a, w.c_str());
  check_dtype(a, w.c_str(), {kF32});
  check_shape(a, w.c_str(), shape);
  check_last_dim_contiguous(a, w.c_str());
  check_aligned(a, w.c_str(), 4);
}

int device_cc(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return major * 10 + minor;
}

template <Sm80Recipe R, int D, Sm80IoDtype T>
cudaError_t launch_one(const Sm80AttnFwdParams& p, cudaStream_t s) {
  return sage::sm80::sm80_attn_fwd_run<R, D, T>(p, s);
}

cudaError_t dispatch(Sm80Recipe r, int d, Sm80IoDtype io, const Sm80AttnFwdParams& p, cudaStream_t s) {
#define SAGE_SM80_DISPATCH(RECIPE, NAME, HDIM, IO, IONAME)                                      \
  if (r == Sm80Recipe::RECIPE && d == HDIM && io == Sm80IoDtype::IO)                           \
    return launch_one<Sm80Recipe::RECIPE, HDIM, Sm80IoDtype::IO>(p, s);
  SAGE_SM80_ATTN_FWD_CONFIGS(SAGE_SM80_DISPATCH)
#undef SAGE_SM80_DISPATCH
  return cudaErrorInvalidConfiguration;
}

struct Options {
  std::string q_granularity, k_granularity;
  int64_t q_block, k_block, q_mean_block;
  double softmax_scale;
  bool is_causal;
  uintptr_t stream;
};

void attn_fwd_sm80(Sm80Recipe recipe, const Array& q, const Array& k, const Array& v, const Array& o,
                   const std::optional<Array>& lse, const Array& q_scale, const Array& k_scale,
                   const std::optional<Array>& v_scale, const std::optional<Array>& q_mean,
                   const Options& opt) {
  const std::string fn = std::string("attn_fwd_sm80_") + recipe_name(recipe);
  const bool v_is_f16 = recipe == Sm80Recipe::kQkS8PvF16 || recipe == Sm80Recipe::kQkS8PvF16AccF16;
  if (recipe == Sm80Recipe::kQkS8PvE4m3AccF16 && !sage::sm80::kSm80Fp8F16AccCompiled)
    fail_value(fn + ": pv_accum='f16_buffer' needs FP8 mma.sync with an FP16 accumulator (CUDA >= 12.8); "
               "this sage_core was built with an older toolkit");
  const bool qk_s4 = recipe == Sm80Recipe::kQkS4PvE4m3;

  // ---- O decides dtype, device, shape -------------------------------------------------------
  check_cuda(o, (fn + ": o").c_str());
  check_dtype(o, (fn + ": o").c_str(), {kF16, kBF16});
  check_ndim(o, (fn + ": o (b, h_q, s_q, d)").c_str(), 4);
  const Sm80IoDtype io = same_dtype(o.dtype(), kF16) ? Sm80IoDtype::kF16 : Sm80IoDtype::kBf16;
  const int64_t b = dim(o, 0), h_q = dim(o, 1), s_q = dim(o, 2), d = dim(o, 3);
  if (d != 64 && d != 128) fail_value(fn + ": head dim " + std::to_string(d) + " is not supported; accepted: 64, 128");
  if (b < 1 || h_q < 1 || s_q < 1) fail_value(fn + ": o must have b, h_q, s_q >= 1, got shape " + shape_str(o));
  check_row_strides(fn, o, "o", 2, 3);

  // ---- Q, K ----------------------------------------------------------------------------------
  const int64_t qk_cols = qk_s4 ? d / 2 : d;
  for (const Array* t : {&q, &k}) {
    const char* what = t == &q ? "q" : "k";
    check_cuda(*t, (fn + ": " + what).c_str());
    check_same_device(o, "o", *t, what);
    check_dtype(*t, (fn + ": " + what).c_str(), {qk_s4 ? kU8 : kI8});
    check_ndim(*t, (fn + ": " + what).c_str(), 4);
  }
  check_shape(q, (fn + ": q").c_str(), {b, h_q, s_q, qk_cols});
  check_shape(k, (fn + ": k").c_str(), {b, -1, -1, qk_cols});
  const int64_t h_kv = dim(k, 1), s_kv = dim(k, 2);
  if (h_kv < 1 || s_kv < 1) fail_value(fn + ": k must have h_kv, s_kv >= 1, got shape " + shape_str(k));
  if (h_q % h_kv != 0)
    fail_value(fn + ": q heads (" + std::to_string(h_q) + ") must be a multiple of kv heads (" +
               std::to_string(h_kv) + ")");
  if (h_q > kMaxGridYZ || b > kMaxGridYZ)
    fail_value(fn + ": batch and heads must be <= 65535, got b=" + std::to_string(b) + ", h_q=" + std::to_string(h_q));
  if (s_q > INT32_MAX / 2 || s_kv > INT32_MAX / 2) fail_value(fn + ": sequence lengths must be < 2^30");
  check_row_strides(fn, q, "q", 1, 3);
  check_row_strides(fn, k, "k", 1, 3);

  // ---- V ---------------------------------------------------------------------------------------
  check_cuda(v, (fn + ": v").c_str());
  check_same_device(o, "o", v, "v");
  check_ndim(v, (fn + ": v").c_str(), 4);
  const int64_t s_pad_min = (s_kv + sage::sm80::kSm80BlockN - 1) / sage::sm80::kSm80BlockN * sage::sm80::kSm80BlockN;
  if (v_is_f16) {
    if (!same_dtype(v.dtype(), o.dtype()))
      fail_type(fn + ": v dtype " + dtype_name(v.dtype()) + " must equal o's (" + dtype_name(o.dtype()) + ")");
    check_shape(v, (fn + ": v (b, h_kv, s_kv, d)").c_str(), {b, h_kv, s_kv, d});
    check_row_strides(fn, v, "v", 2, 3);
  } else {
    const DType vt = recipe == Sm80Recipe::kQkS8PvS8 ? kI8 : kU8;
    check_dtype(v, (fn + ": v_t").c_str(), {vt});
    check_shape(v, (fn + ": v_t (b, h_kv, d, s_pad)").c_str(), {b, h_kv, d, -1});
    if (dim(v, 3) < s_pad_min)
      fail_value(fn + ": v_t token dim (" + std::to_string(dim(v, 3)) + ") must be >= ceil(s_kv/64)*64 = " +
                 std::to_string(s_pad_min) + " (zero padded)");
    check_row_strides(fn, v, "v_t", 1, 3);
    if (!v_scale) fail_value(fn + ": v_scale is required");
    check_f32_last_contig(fn, *v_scale, "v_scale", {b, h_kv, d});
    check_same_device(o, "o", *v_scale, "v_scale");
  }

  // ---- scales ------------------------------------------------------------------------------------
  const Sm80ScaleGranularity qg = parse_granularity(fn, "q_granularity", opt.q_granularity, true);
  const Sm80ScaleGranularity kg = parse_granularity(fn, "k_granularity", opt.k_granularity, false);
  if (opt.q_block < 1 || opt.q_block > INT32_MAX) fail_value(fn + ": q_block must be a positive int32, got " + std::to_string(opt.q_block));
  if (opt.k_block < 1 || opt.k_block > INT32_MAX) fail_value(fn + ": k_block must be a positive int32, got " + std::to_string(opt.k_block));
  if (kg == Sm80ScaleGranularity::kPerThread && opt.k_block % 8 != 0)
    fail_value(fn + ": per_thread K needs k_block % 8 == 0, got " + std::to_string(opt.k_block));
  check_f32_last_contig(fn, q_scale, "q_scale", {b, h_q, num_groups(qg, s_q, opt.q_block, true)});
  check_f32_last_contig(fn, k_scale, "k_scale", {b, h_kv, num_groups(kg, s_kv, opt.k_block, false)});
  check_same_device(o, "o", q_scale, "q_scale");
  check_same_device(o, "o", k_scale, "k_scale");
  if (lse) {
    check_f32_last_contig(fn, *lse, "lse", {b, h_q, s_q});
    check_same_device(o, "o", *lse, "lse");
  }
  if (qk_s4) {
    if (!q_mean) fail_value(fn + ": q_mean is required (Q smoothing)");
    if (opt.q_mean_block < 1 || opt.q_mean_block % sage::sm80::kSm80BlockM != 0 || opt.q_mean_block > INT32_MAX)
      fail_value(fn + ": q_mean_block must be a positive multiple of 64 (the CTA's query rows), got " +
                 std::to_string(opt.q_mean_block));
    check_f32_last_contig(fn, *q_mean, "q_mean",
                          {b, h_q, (s_q + opt.q_mean_block - 1) / opt.q_mean_block, d});
    check_same_device(o, "o", *q_mean, "q_mean");
  }
  if (!(opt.softmax_scale > 0.0) || opt.softmax_scale > 1e30)
    fail_value(fn + ": softmax_scale must be a positive finite float, got " + std::to_string(opt.softmax_scale));

  // ---- device ------------------------------------------------------------------------------------
  const int cc = device_cc(o.device_id());
  const int min_cc = sage::sm80::sm80_recipe_min_cc(recipe);
  if (cc >= 0 && cc < min_cc)
    fail_value(fn + ": needs compute capability >= " + std::to_string(min_cc / 10) + "." +
               std::to_string(min_cc % 10) + " (FP8 mma.sync for e4m3), the device has " +
               std::to_string(cc / 10) + "." + std::to_string(cc % 10));

  Sm80AttnFwdParams p;
  p.q = q.data();
  p.q_stride_b = stride(q, 0); p.q_stride_h = stride(q, 1); p.q_stride_s = stride(q, 2);
  p.k = k.data();
  p.k_stride_b = stride(k, 0); p.k_stride_h = stride(k, 1); p.k_stride_s = stride(k, 2);
  p.v = v.data();
  p.v_stride_b = stride(v, 0); p.v_stride_h = stride(v, 1); p.v_stride_row = stride(v, 2);
  p.o = o.data();
  p.o_stride_b = stride(o, 0); p.o_stride_h = stride(o, 1); p.o_stride_s = stride(o, 2);
  if (lse) {
    p.lse = static_cast<float*>(lse->data());
    p.lse_stride_b = stride(*lse, 0); p.lse_stride_h = stride(*lse, 1);
  }
  p.q_scale = static_cast<const float*>(q_scale.data());
  p.q_scale_stride_b = stride(q_scale, 0); p.q_scale_stride_h = stride(q_scale, 1);
  p.k_scale = static_cast<const float*>(k_scale.data());
  p.k_scale_stride_b = stride(k_scale, 0); p.k_scale_stride_h = stride(k_scale, 1);
  if (v_scale && !v_is_f16) {
    p.v_scale = static_cast<const float*>(v_scale->data());
    p.v_scale_stride_b = stride(*v_scale, 0); p.v_scale_stride_h = stride(*v_scale, 1);
  }
  p.q_granularity = static_cast<int32_t>(qg);
  p.q_block = static_cast<int32_t>(opt.q_block);
  p.k_granularity = static_cast<int32_t>(kg);
  p.k_block = static_cast<int32_t>(opt.k_block);
  if (qk_s4) {
    p.q_mean = static_cast<const float*>(q_mean->data());
    p.q_mean_stride_b = stride(*q_mean, 0); p.q_mean_stride_h = stride(*q_mean, 1);
    p.q_mean_stride_blk = stride(*q_mean, 2);
    p.q_mean_block = static_cast<int32_t>(opt.q_mean_block);
  }
  p.batch = static_cast<int32_t>(b);
  p.heads_q = static_cast<int32_t>(h_q);
  p.heads_kv = static_cast<int32_t>(h_kv);
  p.seqlen_q = static_cast<int32_t>(s_q);
  p.seqlen_kv = static_cast<int32_t>(s_kv);
  constexpr double kLog2e = 1.4426950408889634;
  p.softmax_scale_log2 = static_cast<float>(opt.softmax_scale * kLog2e);
  p.is_causal = opt.is_causal ? 1 : 0;

  DeviceGuard guard(o.device_id());
  cudaStream_t s = as_stream(opt.stream);
  cudaError_t err;
  {
    nb::gil_scoped_release release;
    err = dispatch(recipe, static_cast<int>(d), io, p, s);
  }
  check_launch(err, fn.c_str());
}

constexpr const char* kDocCommon = R"(
q, k: int8 (b, h_q|h_kv, s, d) (INT4 recipes: uint8 packed (.., d/2)); scales float32
(b, h, G) per docs/design/quant-formats.md with the given granularity/block; o: fp16/bf16
(b, h_q, s_q, d), written; lse: None or float32 (b, h_q, s_q), natural log of the smoothed
scores (the caller adds q.k_mean*scale). Strides: any, last dim contiguous, 16-byte rows.
softmax_scale: the attention scale (log2 e is folded in here). is_causal: bottom-right.
stream: a cudaStream_t as int. Raises TypeError/ValueError before any launch.)";

}  // namespace

void bind_attn_sm80(nb::module_& m) {
  m.def(
      "attn_fwd_sm80_qk_s8_pv_f16",
      [](const Array& q, const Array& k, const Array& v, const Array& o, std::optional<Array> lse,
         const Array& q_scale, const Array& k_scale, std::string q_granularity, int64_t q_block,
         std::string k_granularity, int64_t k_block, double softmax_scale, bool is_causal,
         uintptr_t stream, std::string pv_accum) {
        const Sm80Recipe r = parse_pv_accum(Sm80Recipe::kQkS8PvF16, "fp32",
                                            Sm80Recipe::kQkS8PvF16AccF16, pv_accum);
        attn_fwd_sm80(r, q, k, v, o, lse, q_scale, k_scale, std::nullopt, std::nullopt,
                      Options{q_granularity, k_granularity, q_block, k_block, 128, softmax_scale,
                              is_causal, stream});
      },
      nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("o"), nb::arg("lse").none(),
      nb::arg("q_scale"), nb::arg("k_scale"), nb::kw_only(), nb::arg("q_granularity"),
      nb::arg("q_block"), nb::arg("k_granularity"), nb::arg("k_block"), nb::arg("softmax_scale"),
      nb::arg("is_causal"), nb::arg("stream"), nb::arg("pv_accum") = "fp32",
      (std::string("SageAttention (sm80 mma.sync): INT8 Q.K, FP16 P and V (bf16 V converted to "
                   "fp16 in shared memory). v: fp16/bf16 (b, h_kv, s_kv, d), o's dtype. "
                   "pv_accum: 'fp32' (FP32 MMA accumulation) or 'f16_buffer' (each 64-key tile's "
                   "P.V in an FP16 MMA accumulator added into FP32 O; a tile that overflows FP16 "
                   "is recomputed in FP32).") + kDocCommon).c_str());

  // The 8-bit-V recipes: `base_accum` names the FP32/INT32 two-level buffer; f16_variant, when
  // given, is the pv_accum="f16_buffer" kernel.
  auto def_8bit_pv = [&](const char* name, Sm80Recipe base, const char* base_accum,
                         std::optional<Sm80Recipe> f16_variant, const std::string& doc) {
    m.def(
        name,
        [base, base_accum, f16_variant](
            const Array& q, const Array& k, const Array& v_t, const Array& o,
            std::optional<Array> lse, const Array& q_scale, const Array& k_scale,
            const Array& v_scale, std::string q_granularity, int64_t q_block,
            std::string k_granularity, int64_t k_block, double softmax_scale, bool is_causal,
            uintptr_t stream, std::string pv_accum) {
          const Sm80Recipe r = parse_pv_accum(base, base_accum, f16_variant, pv_accum);
          attn_fwd_sm80(r, q, k, v_t, o, lse, q_scale, k_scale, v_scale, std::nullopt,
                        Options{q_granularity, k_granularity, q_block, k_block, 128, softmax_scale,
                                is_causal, stream});
        },
        nb::arg("q"), nb::arg("k"), nb::arg("v_t"), nb::arg("o"), nb::arg("lse").none(),
        nb::arg("q_scale"), nb::arg("k_scale"), nb::arg("v_scale"), nb::kw_only(),
        nb::arg("q_granularity"), nb::arg("q_block"), nb::arg("k_granularity"), nb::arg("k_block"),
        nb::arg("softmax_scale"), nb::arg("is_causal"), nb::arg("stream"),
        nb::arg("pv_accum") = base_accum, (doc + kDocCommon).c_str());
  };
  def_8bit_pv("attn_fwd_sm80_qk_s8_pv_s8", Sm80Recipe::kQkS8PvS8, "int32", std::nullopt,
              "INT-FlashAttention (sm80 mma.sync): INT8 Q.K, P = rint(127 exp2(S-m)) INT8, V INT8 "
              "per channel, INT32 accumulation per 64-key tile (pv_accum 'int32', the only choice). "
              "v_t: int8 (b, h_kv, d, s_pad) 'v_s8_t_p32' (tokens permuted in 32-chunks), v_scale "
              "float32 (b, h_kv, d) = amax/127.");
  def_8bit_pv("attn_fwd_sm80_qk_s8_pv_e4m3", Sm80Recipe::kQkS8PvE4m3, "two_level",
              Sm80Recipe::kQkS8PvE4m3AccF16,
              "SageAttention2 8-bit (sm89+ mma.sync): INT8 Q.K, P~ and V E4M3. v_t: uint8 E4M3 bits "
              "(b, h_kv, d, s_pad) 'v_e4m3_t_p32', v_scale = amax/v_max. pv_accum: 'two_level' "
              "(each 64-key tile's P~V in an FP32 MMA buffer added into FP32 O; v_max 448) or "
              "'f16_buffer' (the buffer in FP16; V must be quantized with v_max 2.25 so a tile "
              "cannot overflow, else the overflowing tile is recomputed in FP32; needs CUDA >= 12.8).");

  m.def(
      "attn_fwd_sm80_qk_s4_pv_e4m3",
      [](const Array& q, const Array& k, const Array& v_t, const Array& o, std::optional<Array> lse,
         const Array& q_scale, const Array& k_scale, const Array& v_scale, const Array& q_mean,
         std::string q_granularity, int64_t q_block, std::string k_granularity, int64_t k_block,
         int64_t q_mean_block, double softmax_scale, bool is_causal, uintptr_t stream) {
        attn_fwd_sm80(Sm80Recipe::kQkS4PvE4m3, q, k, v_t, o, lse, q_scale, k_scale, v_scale, q_mean,
                      Options{q_granularity, k_granularity, q_block, k_block, q_mean_block,
                              softmax_scale, is_causal, stream});
      },
      nb::arg("q"), nb::arg("k"), nb::arg("v_t"), nb::arg("o"), nb::arg("lse").none(),
      nb::arg("q_scale"), nb::arg("k_scale"), nb::arg("v_scale"), nb::arg("q_mean"), nb::kw_only(),
      nb::arg("q_granularity"), nb::arg("q_block"), nb::arg("k_granularity"), nb::arg("k_block"),
      nb::arg("q_mean_block"), nb::arg("softmax_scale"), nb::arg("is_causal"), nb::arg("stream"),
      (std::string("SageAttention2 4-bit (sm89+ mma.sync): INT4 Q.K with Q smoothing (q_mean float32 "
                   "(b, h_q, ceil(s_q/q_mean_block), d); dS = q_mean . dequant(K) added in-kernel), "
                   "E4M3 PV as qk_s8_pv_e4m3.") + kDocCommon).c_str());
}

}  // namespace sage_core
