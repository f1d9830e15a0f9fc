// Hidden definitions of the three libstdc++ symbols that GCC >= 11 headers make a module need at
// versions newer than manylinux_2_28's libstdc++ (GCC 8: CXXABI_1.3.11, GLIBCXX_3.4.24). Linked as
// a static archive with --exclude-libs (compat/manylinux.cmake), so they stay local to _C.
// gcc-toolset's libstdc++_nonshared.a does the same job in a manylinux image.
// Weak: a toolchain that links libstdc++ statically (the GPU machine's GCC 13) brings its own
// strong definitions from libstdc++.a, which then win instead of clashing ("multiple definition").
#include <exception>
#include <new>

// exception_ptr's copy constructor and destructor, exported since CXXABI_1.3.3 (GCC 4.4). GCC 11
// headers inline them as calls to _M_addref / _M_release, which are exported only at CXXABI_1.3.13.
extern "C" void sage_compat_exception_ptr_copy(void* dst, const void* src) noexcept
    __asm__("_ZNSt15__exception_ptr13exception_ptrC1ERKS0_");
extern "C" void sage_compat_exception_ptr_destroy(void* self) noexcept
    __asm__("_ZNSt15__exception_ptr13exception_ptrD1Ev");

namespace std {
namespace __exception_ptr {

// One more reference: a copy that is never destroyed.
__attribute__((weak)) void exception_ptr::_M_addref() noexcept {
  alignas(exception_ptr) unsigned char extra_reference[sizeof(exception_ptr)];
  sage_compat_exception_ptr_copy(extra_reference, this);
}

// One reference less (frees the exception with the last one).
__attribute__((weak)) void exception_ptr::_M_release() noexcept { sage_compat_exception_ptr_destroy(this); }

}  // namespace __exception_ptr

// GLIBCXX_3.4.29 (GCC 11); emitted by array new-expressions. bad_array_new_length: CXXABI_1.3.8.
__attribute__((weak)) void __throw_bad_array_new_length() { throw bad_array_new_length(); }

}  // namespace std
