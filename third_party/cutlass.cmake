# Locate the CUTLASS / CuTe headers (header-only use; nothing is built from CUTLASS).
#
# Order of precedence:
#   1. SAGE_CUTLASS_DIR (CMake cache variable, or environment variable of the same name):
#      a directory that contains cutlass/cutlass.h and cute/tensor.hpp (CUTLASS's `include/`),
#      or a CUTLASS checkout / source tree whose `include/` holds them.
#   2. The pinned `nvidia-cutlass` wheel in the Python that drives the build:
#      python -c "import cutlass_library; print(cutlass_library.source_path)"  ->  <path>/include
#
# Pin: nvidia-cutlass==4.2.0.0 (install with --no-deps: only its headers are used).
#
# Result: an INTERFACE target `sage::cutlass` carrying the include directory, and the cache
# variable SAGE_CUTLASS_INCLUDE_DIR.

set(SAGE_CUTLASS_PIN "4.2.0.0")

if(NOT DEFINED SAGE_CUTLASS_DIR AND DEFINED ENV{SAGE_CUTLASS_DIR})
  set(SAGE_CUTLASS_DIR "$ENV{SAGE_CUTLASS_DIR}")
endif()
set(SAGE_CUTLASS_DIR "${SAGE_CUTLASS_DIR}" CACHE PATH
    "CUTLASS include directory (or source tree); empty = take it from the nvidia-cutlass wheel")

function(_sage_cutlass_check_include dir out_var)
  if(EXISTS "${dir}/cutlass/cutlass.h" AND EXISTS "${dir}/cute/tensor.hpp")
    set(${out_var} "${dir}" PARENT_SCOPE)
  elseif(EXISTS "${dir}/include/cutlass/cutlass.h" AND EXISTS "${dir}/include/cute/tensor.hpp")
    set(${out_var} "${dir}/include" PARENT_SCOPE)
  else()
    set(${out_var} "" PARENT_SCOPE)
  endif()
endfunction()

set(_sage_cutlass_inc "")
set(_sage_cutlass_origin "")
if(SAGE_CUTLASS_DIR)
  _sage_cutlass_check_include("${SAGE_CUTLASS_DIR}" _sage_cutlass_inc)
  if(NOT _sage_cutlass_inc)
    message(FATAL_ERROR
      "SAGE_CUTLASS_DIR='${SAGE_CUTLASS_DIR}' holds neither cutlass/cutlass.h + cute/tensor.hpp "
      "nor include/cutlass/cutlass.h + include/cute/tensor.hpp. Point it at CUTLASS's include/ "
      "directory, or unset it to use the nvidia-cutlass==${SAGE_CUTLASS_PIN} wheel.")
  endif()
  set(_sage_cutlass_origin "SAGE_CUTLASS_DIR")
else()
  if(NOT Python_EXECUTABLE)
    find_package(Python COMPONENTS Interpreter REQUIRED)
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import cutlass_library, sys; sys.stdout.write(str(cutlass_library.source_path))"
    OUTPUT_VARIABLE _sage_cutlass_src
    ERROR_VARIABLE _sage_cutlass_err
    RESULT_VARIABLE _sage_cutlass_rc)
  if(_sage_cutlass_rc EQUAL 0)
    _sage_cutlass_check_include("${_sage_cutlass_src}" _sage_cutlass_inc)
  endif()
  if(NOT _sage_cutlass_inc)
    message(FATAL_ERROR
      "CUTLASS/CuTe headers not found.\n"
      "  Tried: ${Python_EXECUTABLE} -c 'import cutlass_library; print(cutlass_library.source_path)'"
      " -> rc=${_sage_cutlass_rc} '${_sage_cutlass_src}' ${_sage_cutlass_err}\n"
      "  Fix one of:\n"
      "    pip install --no-deps nvidia-cutlass==${SAGE_CUTLASS_PIN}   (into the Python that builds; "
      "with build isolation add it to the build requirements or use --no-build-isolation)\n"
      "    export SAGE_CUTLASS_DIR=/path/to/cutlass/include\n"
      "  Or build without kernels: SAGE_CUDA_ARCHS=none")
  endif()
  set(_sage_cutlass_origin "nvidia-cutlass wheel")
endif()

# Read the version from the headers, to report it and to warn when it is not the pin.
set(_sage_cutlass_version "unknown")
if(EXISTS "${_sage_cutlass_inc}/cutlass/version.h")
  file(STRINGS "${_sage_cutlass_inc}/cutlass/version.h" _v
       REGEX "^#define CUTLASS_(MAJOR|MINOR|PATCH) [0-9]+")
  string(REGEX REPLACE ".*CUTLASS_MAJOR ([0-9]+).*" "\\1" _maj "${_v}")
  string(REGEX REPLACE ".*CUTLASS_MINOR ([0-9]+).*" "\\1" _min "${_v}")
  string(REGEX REPLACE ".*CUTLASS_PATCH ([0-9]+).*" "\\1" _pat "${_v}")
  set(_sage_cutlass_version "${_maj}.${_min}.${_pat}")
endif()
string(REGEX REPLACE "^([0-9]+\\.[0-9]+\\.[0-9]+).*" "\\1" _pin3 "${SAGE_CUTLASS_PIN}")
if(NOT _sage_cutlass_version STREQUAL _pin3)
  message(WARNING "CUTLASS ${_sage_cutlass_version} found at ${_sage_cutlass_inc}; "
                  "sage is tested with ${_pin3} (nvidia-cutlass==${SAGE_CUTLASS_PIN}).")
endif()

# CUTLASS's license text, which binary wheels must carry (third_party/LICENSES.md): from the
# wheel's .dist-info, or LICENSE.txt at the top of a CUTLASS checkout given as SAGE_CUTLASS_DIR.
if(NOT SAGE_CUTLASS_LICENSE_FILE)
  set(_sage_cutlass_lic "")
  if(_sage_cutlass_origin STREQUAL "SAGE_CUTLASS_DIR")
    foreach(_cand "${_sage_cutlass_inc}/../LICENSE.txt" "${_sage_cutlass_inc}/LICENSE.txt")
      if(NOT _sage_cutlass_lic AND EXISTS "${_cand}")
        get_filename_component(_sage_cutlass_lic "${_cand}" ABSOLUTE)
      endif()
    endforeach()
  else()
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
        "import importlib.metadata as m, sys; fs = [f for f in (m.files('nvidia-cutlass') or []) if f.name.upper().startswith('LICENSE')]; sys.stdout.write(str(fs[0].locate()) if fs else '')"
      OUTPUT_VARIABLE _sage_cutlass_lic ERROR_QUIET)
  endif()
  set(SAGE_CUTLASS_LICENSE_FILE "${_sage_cutlass_lic}" CACHE FILEPATH "CUTLASS's LICENSE.txt (copied into wheels)")
endif()

set(SAGE_CUTLASS_INCLUDE_DIR "${_sage_cutlass_inc}" CACHE INTERNAL "CUTLASS/CuTe include dir")
set(SAGE_CUTLASS_VERSION "${_sage_cutlass_version}" CACHE INTERNAL "CUTLASS version")
message(STATUS "sage: CUTLASS ${_sage_cutlass_version} headers from ${_sage_cutlass_origin}: "
               "${_sage_cutlass_inc}")

if(NOT TARGET sage::cutlass)
  add_library(sage_cutlass INTERFACE)
  # SYSTEM: CUTLASS's own warnings are not ours to fix.
  target_include_directories(sage_cutlass SYSTEM INTERFACE "${_sage_cutlass_inc}")
  add_library(sage::cutlass ALIAS sage_cutlass)
endif()
