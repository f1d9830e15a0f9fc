// Argument validation for sage_core bindings: every check runs BEFORE any launch and raises a
// Python exception that says what was given and what is accepted:
//   TypeError  : wrong dtype
//   ValueError : wrong device, ndim, shape, strides/contiguity, alignment, value of an option
// Arrays are untyped nb::ndarray<> (DLPack; torch tensors pass directly) so that the messages
// are ours, not nanobind's generic "incompatible function arguments".
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace sage_core {

namespace nb = nanobind;
using Array = nb::ndarray<>;
using DType = nb::dlpack::dtype;

// ---- dtypes -----------------------------------------------------------------------------------
constexpr DType make_dtype(nb::dlpack::dtype_code code, int bits) {
  return DType{static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1};
}
inline constexpr DType kF16 = make_dtype(nb::dlpack::dtype_code::Float, 16);
inline constexpr DType kBF16 = make_dtype(nb::dlpack::dtype_code::Bfloat, 16);
inline constexpr DType kF32 = make_dtype(nb::dlpack::dtype_code::Float, 32);
inline constexpr DType kI8 = make_dtype(nb::dlpack::dtype_code::Int, 8);
inline constexpr DType kU8 = make_dtype(nb::dlpack::dtype_code::UInt, 8);
inline constexpr DType kI32 = make_dtype(nb::dlpack::dtype_code::Int, 32);
inline constexpr DType kI64 = make_dtype(nb::dlpack::dtype_code::Int, 64);

inline bool same_dtype(DType a, DType b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}

std::string dtype_name(DType t);                 // "float16", "bfloat16", "uint8", ...
std::string shape_str(const Array& a);           // "(2, 8, 1024, 128)"
std::string strides_str(const Array& a);         // "(...)" in elements
std::string device_str(const Array& a);          // "cuda:0", "cpu", ...
std::string shape_str(const std::vector<int64_t>& shape);

// ---- checks (throw nb::type_error / nb::value_error) -------------------------------------------
// `what` names the argument in messages, e.g. "q" or "k_scale".
void check_cuda(const Array& a, const char* what);
void check_dtype(const Array& a, const char* what, std::initializer_list<DType> accepted);
void check_ndim(const Array& a, const char* what, size_t ndim);
// -1 in `expected` accepts any extent in that dimension.
void check_shape(const Array& a, const char* what, const std::vector<int64_t>& expected);
void check_contiguous(const Array& a, const char* what);          // C order (size-1 dims free)
void check_last_dim_contiguous(const Array& a, const char* what); // stride(-1) == 1
void check_aligned(const Array& a, const char* what, size_t bytes);
void check_same_device(const Array& a, const char* what_a, const Array& b, const char* what_b);
// Every array is a CUDA array and all are on the same device. Call it LAST, after the dtype /
// shape / stride checks, so that those are exercised (and tested) on machines without a GPU.
using NamedArray = std::pair<const char*, const Array*>;
void check_cuda_same_device(const std::string& fn, std::initializer_list<NamedArray> arrays);
// A value error for an option: "quant_int: bits=5 is not supported; accepted: 4, 8"
[[noreturn]] void fail_value(const std::string& msg);
[[noreturn]] void fail_type(const std::string& msg);

// Bounds-checked: nb::ndarray::shape(i)/stride(i) read past the DLPack arrays for i >= ndim
// (undefined behaviour, possibly a crash far from the call). A binding that asks for a dimension
// before checking ndim gets a ValueError instead.
[[noreturn]] void fail_dim_index(const Array& a, size_t i);
inline int64_t dim(const Array& a, size_t i) {
  if (i >= a.ndim()) fail_dim_index(a, i);
  return static_cast<int64_t>(a.shape(i));
}
inline int64_t stride(const Array& a, size_t i) {   // in elements
  if (i >= a.ndim()) fail_dim_index(a, i);
  return a.stride(i);
}
inline bool is_aligned(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

}  // namespace sage_core
