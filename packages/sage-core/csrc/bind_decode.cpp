// Bindings of the decode attention over an INT8 KV cache (family `decode`, every arch).
// Recipe: kernels/include/sage/decode/decode_s8_params.hpp; oracle: sage_quant.emulation.kvcache.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include <sage/decode/decode_s8_params.hpp>

#include "sage_core/bindings.hpp"
#include "sage_core/checks.hpp"
#include "sage_core/launch.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace sage_core {
namespace {

namespace dc = sage::decode;

int64_t splits_for(int64_t length, int64_t split_tokens) { return (length + split_tokens - 1) / split_tokens; }

void check_split_tokens(const char* fn, int64_t length, int64_t split_tokens) {
  if (split_tokens < dc::kTileTokens || split_tokens % dc::kTileTokens != 0 || split_tokens > INT32_MAX)
    fail_value(std::string(fn) + ": split_tokens must be a positive multiple of " +
               std::to_string(dc::kTileTokens) + ", got " + std::to_string(split_tokens));
  if (splits_for(length, split_tokens) > 65535)
    fail_value(std::string(fn) + ": length / split_tokens gives more than 65535 splits; use larger splits");
}

// Floats of workspace a call needs (0: none).
int64_t decode_s8_workspace_floats(int64_t b, int64_t h_q, int64_t s_q, int64_t head_dim, int64_t length,
                                   int64_t split_tokens) {
  const char* fn = "decode_s8_workspace_floats";
  if (b < 1 || h_q < 1 || s_q < 1 || length < 1) fail_value(std::string(fn) + ": sizes must be >= 1");
  check_split_tokens(fn, length, split_tokens);
  const int64_t splits = splits_for(length, split_tokens);
  return splits <= 1 ? 0 : splits * b * h_q * s_q * (head_dim + 2);
}

void decode_s8(const Array& q, const Array& k, const Array& v, const Array& k_scale, const Array& v_scale,
               std::optional<Array> v_mean, std::optional<Array> k_chan, std::optional<Array> v_chan, const Array& o, std::optional<Array> workspace, int64_t length,
               bool causal, float scale_log2, int64_t split_tokens, uintptr_t stream) {
  const char* fn = "decode_s8";
  auto name = [&](const char* what) { return std::string(fn) + ": " + what; };
  check_dtype(q, name("q").c_str(), {kF16, kBF16});
  check_ndim(q, name("q (logical b, h_q, s_q, d)").c_str(), 4);
  check_last_dim_contiguous(q, name("q").c_str());
  const int64_t b = dim(q, 0), h_q = dim(q, 1), s_q = dim(q, 2), d = dim(q, 3);
  if (d != 64 && d != 128) fail_value(name("head dim must be 64 or 128, got ") + std::to_string(d));
  if (b < 1 || h_q < 1 || s_q < 1) fail_value(name("q: every dimension must be >= 1, got ") + shape_str(q));
  check_dtype(k, name("k").c_str(), {kI8});
  check_ndim(k, name("k (b, h_kv, capacity, d)").c_str(), 4);
  const int64_t h_kv = dim(k, 1), cap = dim(k, 2);
  if (h_kv < 1 || h_q % h_kv != 0)
    fail_value(name("q heads must be a multiple of the cache's kv heads, got h_q=") + std::to_string(h_q) +
               ", h_kv=" + std::to_string(h_kv));
  if (cap % dc::kTileTokens != 0 || cap > INT32_MAX)
    fail_value(name("cache capacity must be a multiple of ") + std::to_string(dc::kTileTokens) + ", got " +
               std::to_string(cap));
  for (auto [a, what] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_dtype(*a, name(what).c_str(), {kI8});
    check_shape(*a, name(what).c_str(), {b, h_kv, cap, d});
    check_contiguous(*a, name(what).c_str());
    check_aligned(*a, name(what).c_str(), 16);
  }
  for (auto [a, what] : {std::pair{&k_scale, "k_scale"}, std::pair{&v_scale, "v_scale"}}) {
    check_dtype(*a, name(what).c_str(), {kF32});
    check_shape(*a, name(what).c_str(), {b, h_kv, cap});
    check_contiguous(*a, name(what).c_str());
    check_aligned(*a, name(what).c_str(), 16);
  }
  for (auto [a, what] : {std::pair{&v_mean, "v_mean"}, std::pair{&k_chan, "k_chan"}, std::pair{&v_chan, "v_chan"}}) {
    if (!*a) continue;
    check_dtype(**a, name(what).c_str(), {kF32});
    check_shape(**a, name(what).c_str(), {b, h_kv, d});
    check_contiguous(**a, name(what).c_str());
    check_same_device(q, "q", **a, what);
  }
  check_dtype(o, name("o").c_str(), {same_dtype(q.dtype(), kF16) ? kF16 : kBF16});
  check_shape(o, name("o").c_str(), {b, h_q, s_q, d});
  check_last_dim_contiguous(o, name("o").c_str());
  if (length < 1 || length > cap)
    fail_value(name("length must be in [1, capacity=") + std::to_string(cap) + "], got " + std::to_string(length));
  if (!(scale_log2 > 0.f) || !std::isfinite(scale_log2))
    fail_value(name("scale_log2 must be a positive finite float"));
  check_split_tokens(fn, length, split_tokens);
  if ((h_q / h_kv) * s_q > int64_t(dc::kMaxRowsPerCta) * 65535) fail_value(name("too many query rows per kv head"));
  if (b * h_kv > INT32_MAX) fail_value(name("b * h_kv must fit in int32"));

  dc::DecodeS8Params p;
  p.q = q.data();
  p.q_sb = stride(q, 0); p.q_sh = stride(q, 1); p.q_ss = stride(q, 2);
  p.o = o.data();
  p.o_sb = stride(o, 0); p.o_sh = stride(o, 1); p.o_ss = stride(o, 2);
  p.dtype = same_dtype(q.dtype(), kF16) ? dc::InDType::kF16 : dc::InDType::kBF16;
  p.k = static_cast<const int8_t*>(k.data());
  p.v = static_cast<const int8_t*>(v.data());
  p.k_scale = static_cast<const float*>(k_scale.data());
  p.v_scale = static_cast<const float*>(v_scale.data());
  p.v_mean = v_mean ? static_cast<const float*>(v_mean->data()) : nullptr;
  p.k_chan = k_chan ? static_cast<const float*>(k_chan->data()) : nullptr;
  p.v_chan = v_chan ? static_cast<const float*>(v_chan->data()) : nullptr;
  p.capacity = int32_t(cap);
  p.len = int32_t(length);
  p.b = int32_t(b); p.h_q = int32_t(h_q); p.h_kv = int32_t(h_kv); p.s_q = int32_t(s_q); p.head_dim = int32_t(d);
  p.causal = causal ? 1 : 0;
  p.scale_log2 = scale_log2;
  p.split_tokens = int32_t(split_tokens);
  p.splits = int32_t(splits_for(length, split_tokens));
  const int64_t ws_floats = dc::decode_s8_workspace_floats(p);
  if (ws_floats > 0) {
    if (!workspace) fail_value(name("this call needs a workspace of ") + std::to_string(ws_floats) + " floats");
    check_dtype(*workspace, name("workspace").c_str(), {kF32});
    check_ndim(*workspace, name("workspace").c_str(), 1);
    check_contiguous(*workspace, name("workspace").c_str());
    if (dim(*workspace, 0) < ws_floats)
      fail_value(name("workspace holds ") + std::to_string(dim(*workspace, 0)) + " floats, the call needs " +
                 std::to_string(ws_floats));
    float* ws = static_cast<float*>(workspace->data());
    const int64_t rows = int64_t(p.splits) * b * h_q * s_q;
    p.ws_o = ws;
    p.ws_ml = ws + rows * d;
  }
  check_cuda_same_device(fn, {{"q", &q}, {"k", &k}, {"v", &v}, {"k_scale", &k_scale}, {"v_scale", &v_scale},
                              {"o", &o}});
  if (workspace && ws_floats > 0) check_same_device(q, "q", *workspace, "workspace");
  DeviceGuard guard(q.device_id());
  cudaError_t err;
  {
    nb::gil_scoped_release release;
    err = d == 64 ? dc::launch_decode_s8_hdim64(p, as_stream(stream)) : dc::launch_decode_s8_hdim128(p, as_stream(stream));
  }
  check_launch(err, fn);
}

int decode_s8_ctas_per_sm(int64_t head_dim, const std::string& dtype, int64_t rows_per_kv_head, int device) {
  const char* fn = "decode_s8_ctas_per_sm";
  if (head_dim != 64 && head_dim != 128) fail_value(std::string(fn) + ": head dim must be 64 or 128");
  if (dtype != "float16" && dtype != "bfloat16") fail_value(std::string(fn) + ": dtype must be 'float16' or 'bfloat16'");
  if (rows_per_kv_head < 1 || rows_per_kv_head > INT32_MAX) fail_value(std::string(fn) + ": rows_per_kv_head must be >= 1");
  DeviceGuard guard(device);
  const dc::InDType t = dtype == "float16" ? dc::InDType::kF16 : dc::InDType::kBF16;
  const int n = head_dim == 64 ? dc::decode_s8_ctas_per_sm_hdim64(t, int(rows_per_kv_head))
                               : dc::decode_s8_ctas_per_sm_hdim128(t, int(rows_per_kv_head));
  if (n < 1) check_launch(cudaGetLastError(), fn);
  return n;
}

void kv_append_s8(const Array& k, const Array& v, const Array& k_mean, const Array& k_chan, const Array& v_mean,
                  const Array& v_chan, const Array& k_cache, const Array& v_cache, const Array& k_scale,
                  const Array& v_scale, int64_t start, uintptr_t stream) {
  const char* fn = "kv_append_s8";
  auto name = [&](const char* what) { return std::string(fn) + ": " + what; };
  check_dtype(k_cache, name("k_cache").c_str(), {kI8});
  check_ndim(k_cache, name("k_cache (b, h_kv, capacity, d)").c_str(), 4);
  const int64_t b = dim(k_cache, 0), h = dim(k_cache, 1), cap = dim(k_cache, 2), d = dim(k_cache, 3);
  if (d != 64 && d != 128) fail_value(name("head dim must be 64 or 128, got ") + std::to_string(d));
  if (b * h > INT32_MAX || cap > INT32_MAX) fail_value(name("cache too large"));
  for (auto [a, what] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_dtype(*a, name(what).c_str(), {kI8});
    check_shape(*a, name(what).c_str(), {b, h, cap, d});
    check_contiguous(*a, name(what).c_str());
  }
  for (auto [a, what] : {std::pair{&k_scale, "k_scale"}, std::pair{&v_scale, "v_scale"}}) {
    check_dtype(*a, name(what).c_str(), {kF32});
    check_shape(*a, name(what).c_str(), {b, h, cap});
    check_contiguous(*a, name(what).c_str());
  }
  for (auto [a, what] : {std::pair{&k_mean, "k_mean"}, std::pair{&k_chan, "k_chan"}, std::pair{&v_mean, "v_mean"},
                         std::pair{&v_chan, "v_chan"}}) {
    check_dtype(*a, name(what).c_str(), {kF32});
    check_shape(*a, name(what).c_str(), {b, h, d});
    check_contiguous(*a, name(what).c_str());
  }
  check_dtype(k, name("k").c_str(), {kF16, kBF16});
  check_ndim(k, name("k (logical b, h_kv, n, d)").c_str(), 4);
  const int64_t n = dim(k, 2);
  for (auto [a, what] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_dtype(*a, name(what).c_str(), {same_dtype(k.dtype(), kF16) ? kF16 : kBF16});
    check_shape(*a, name(what).c_str(), {b, h, n, d});
    check_last_dim_contiguous(*a, name(what).c_str());
  }
  if (n < 1 || start < 0 || start + n > cap)
    fail_value(name("tokens [start, start + n) = [") + std::to_string(start) + ", " + std::to_string(start + n) +
               ") must lie in the capacity " + std::to_string(cap));
  if ((2 * b * h * n + 7) / 8 > INT32_MAX) fail_value(name("too many tokens in one append"));
  check_cuda_same_device(fn, {{"k", &k}, {"v", &v}, {"k_mean", &k_mean}, {"k_chan", &k_chan}, {"v_mean", &v_mean},
                              {"v_chan", &v_chan}, {"k_cache", &k_cache}, {"v_cache", &v_cache},
                              {"k_scale", &k_scale}, {"v_scale", &v_scale}});
  dc::KvAppendS8Params p;
  p.k = k.data(); p.v = v.data();
  p.k_sb = stride(k, 0); p.k_sh = stride(k, 1); p.k_ss = stride(k, 2);
  p.v_sb = stride(v, 0); p.v_sh = stride(v, 1); p.v_ss = stride(v, 2);
  p.dtype = same_dtype(k.dtype(), kF16) ? dc::InDType::kF16 : dc::InDType::kBF16;
  p.k_mean = static_cast<const float*>(k_mean.data()); p.k_chan = static_cast<const float*>(k_chan.data());
  p.v_mean = static_cast<const float*>(v_mean.data()); p.v_chan = static_cast<const float*>(v_chan.data());
  p.k_out = static_cast<int8_t*>(k_cache.data()); p.v_out = static_cast<int8_t*>(v_cache.data());
  p.k_scale = static_cast<float*>(k_scale.data()); p.v_scale = static_cast<float*>(v_scale.data());
  p.b = int32_t(b); p.h_kv = int32_t(h); p.n = int32_t(n); p.head_dim = int32_t(d);
  p.capacity = int32_t(cap); p.start = int32_t(start);
  DeviceGuard guard(k.device_id());
  cudaError_t err;
  {
    nb::gil_scoped_release release;
    err = dc::launch_kv_append_s8(p, as_stream(stream));
  }
  check_launch(err, fn);
}

}  // namespace

void bind_decode(nb::module_& m) {
  m.def("kv_append_s8", &kv_append_s8, "k"_a, "v"_a, "k_mean"_a, "k_chan"_a, "v_mean"_a, "v_chan"_a, "k_cache"_a,
        "v_cache"_a, "k_scale"_a, "v_scale"_a, nb::kw_only(), "start"_a, "stream"_a,
        "Quantize n tokens of k, v (logical (b, h_kv, n, d) fp16/bf16) into the INT8 cache slots "
        "[start, start + n): sage_quant.emulation.kvcache.quantize_kv_tokens bit for bit.");
  m.def("decode_s8_ctas_per_sm", &decode_s8_ctas_per_sm, "head_dim"_a, "dtype"_a, "rows_per_kv_head"_a, "device"_a,
        "CTAs of the decode kernel one SM of `device` holds (occupancy), for sizing split-KV grids.");
  m.def("decode_s8_workspace_floats", &decode_s8_workspace_floats, "b"_a, "h_q"_a, "s_q"_a, "head_dim"_a,
        "length"_a, "split_tokens"_a,
        "float32 elements of workspace decode_s8 needs for this call (0: none).");
  m.def("decode_s8", &decode_s8, "q"_a, "k"_a, "v"_a, "k_scale"_a, "v_scale"_a, "v_mean"_a.none(),
        "k_chan"_a.none(), "v_chan"_a.none(), "o"_a,
        "workspace"_a.none(), nb::kw_only(), "length"_a, "causal"_a, "scale_log2"_a, "split_tokens"_a, "stream"_a,
        "Decode attention over an INT8 KV cache (sage_quant.emulation.kvcache). q, o: logical (b, h_q, s_q, d) "
        "fp16/bf16, last dim contiguous; k, v: int8 (b, h_kv, capacity, d) contiguous, capacity a multiple "
        "of 64; k_scale, v_scale: float32 (b, h_kv, capacity); v_mean, k_chan, v_chan: float32 (b, h_kv, d) or None; "
        "the first `length` cache tokens are attended (causal: bottom-right); scale_log2 = softmax scale "
        "* log2(e); split_tokens: keys per split-KV CTA (multiple of 64); workspace: float32 of "
        "decode_s8_workspace_floats(...) elements when that is > 0.");
}

}  // namespace sage_core
