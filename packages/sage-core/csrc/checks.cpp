#include "sage_core/checks.hpp"


namespace sage_core {

std::string dtype_name(DType t) {
  using C = nb::dlpack::dtype_code;
  std::string base;
  switch (static_cast<C>(t.code)) {
    case C::Int: base = "int"; break;
    case C::UInt: base = "uint"; break;
    case C::Float: base = "float"; break;
    case C::Bfloat: base = "bfloat"; break;
    case C::Complex: base = "complex"; break;
    case C::Bool: return "bool";
    case C::Float8_E4M3FN: return "float8_e4m3fn";
    case C::Float8_E5M2: return "float8_e5m2";
    case C::Float8_E8M0FNU: return "float8_e8m0fnu";
    case C::Float4_E2M1FN: return "float4_e2m1fn";
    default: base = "dlpack_code" + std::to_string(t.code) + "_"; break;
  }
  std::string s = base + std::to_string(t.bits);
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

// Error messages are built with std::to_string, never iostreams: on the GPU machine (GCC 13,
// nvcc-compiled TUs in the same module, hidden visibility) `ostream << long` resolved to a copy
// of libstdc++'s num_put whose locale facet id was never registered, and segfaulted.
std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += shape[i] < 0 ? std::string("*") : std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

std::string shape_str(const Array& a) {
  std::vector<int64_t> s(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) s[i] = dim(a, i);
  return shape_str(s);
}

std::string strides_str(const Array& a) {
  std::vector<int64_t> s(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) s[i] = stride(a, i);
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

std::string device_str(const Array& a) {
  int t = a.device_type();
  std::string name;
  if (t == nb::device::cpu::value) return "cpu";
  if (t == nb::device::cuda::value) name = "cuda";
  else if (t == nb::device::cuda_host::value) name = "cuda_host";
  else if (t == nb::device::cuda_managed::value) name = "cuda_managed";
  else if (t == nb::device::rocm::value) name = "rocm";
  else if (t == nb::device::metal::value) name = "mps";
  else name = "dlpack_device" + std::to_string(t);
  return name + ":" + std::to_string(a.device_id());
}

void fail_value(const std::string& msg) { throw nb::value_error(msg.c_str()); }

void fail_dim_index(const Array& a, size_t i) {
  // shape_str/strides_str only read indices < ndim, so this cannot recurse.
  fail_value("expected a tensor with more than " + std::to_string(i) + " dimensions, got " +
             std::to_string(a.ndim()) + "-D with shape " + shape_str(a));
}
void fail_type(const std::string& msg) { throw nb::type_error(msg.c_str()); }

void check_cuda(const Array& a, const char* what) {
  if (a.device_type() != nb::device::cuda::value)
    fail_value(std::string(what) + ": expected a CUDA tensor (device cuda:N), got one on " +
               device_str(a));
}

void check_dtype(const Array& a, const char* what, std::initializer_list<DType> accepted) {
  for (DType t : accepted)
    if (same_dtype(a.dtype(), t)) return;
  std::string acc;
  for (DType t : accepted) acc += (acc.empty() ? "" : ", ") + dtype_name(t);
  fail_type(std::string(what) + ": dtype " + dtype_name(a.dtype()) + " is not accepted; accepted: " +
            acc);
}

void check_ndim(const Array& a, const char* what, size_t ndim) {
  if (a.ndim() != ndim)
    fail_value(std::string(what) + ": expected " + std::to_string(ndim) + " dimensions, got " +
               std::to_string(a.ndim()) + " with shape " + shape_str(a));
}

void check_shape(const Array& a, const char* what, const std::vector<int64_t>& expected) {
  bool ok = a.ndim() == expected.size();
  for (size_t i = 0; ok && i < expected.size(); ++i)
    ok = expected[i] < 0 || dim(a, i) == expected[i];
  if (!ok)
    fail_value(std::string(what) + ": expected shape " + shape_str(expected) + ", got " +
               shape_str(a));
}

void check_contiguous(const Array& a, const char* what) {
  int64_t expect = 1;
  for (size_t k = a.ndim(); k-- > 0;) {
    if (dim(a, k) != 1 && stride(a, k) != expect)
      fail_value(std::string(what) + ": expected a contiguous (row-major) tensor, got shape " +
                 shape_str(a) + " with strides " + strides_str(a) +
                 " (elements); pass a .contiguous() tensor");
    expect *= dim(a, k);
  }
}

void check_last_dim_contiguous(const Array& a, const char* what) {
  if (a.ndim() == 0) return;
  size_t k = a.ndim() - 1;
  if (dim(a, k) > 1 && stride(a, k) != 1)
    fail_value(std::string(what) + ": the last dimension must be contiguous (stride 1), got "
               "shape " + shape_str(a) + " with strides " + strides_str(a) + " (elements)");
}

void check_aligned(const Array& a, const char* what, size_t bytes) {
  if (!is_aligned(a.data(), bytes))
    fail_value(std::string(what) + ": data pointer must be " + std::to_string(bytes) +
               "-byte aligned (a fresh allocation is); got an offset view");
}

void check_same_device(const Array& a, const char* what_a, const Array& b, const char* what_b) {
  if (a.device_type() != b.device_type() || a.device_id() != b.device_id())
    fail_value(std::string(what_b) + " is on " + device_str(b) + " but " + what_a + " is on " +
               device_str(a) + "; all tensors must be on the same device");
}

void check_cuda_same_device(const std::string& fn, std::initializer_list<NamedArray> arrays) {
  const Array* first = nullptr;
  const char* first_name = nullptr;
  for (const auto& [name, a] : arrays) {
    if (a == nullptr) continue;
    check_cuda(*a, (fn + ": " + name).c_str());
    if (first == nullptr) {
      first = a;
      first_name = name;
    } else {
      check_same_device(*first, first_name, *a, name);
    }
  }
}

}  // namespace sage_core
