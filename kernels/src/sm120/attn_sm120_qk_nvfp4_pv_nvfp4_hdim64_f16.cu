// One configuration of the sm120 FP4 attention, native policy (sm_120a): list in
// SAGE_SM120_ATTN_FWD_CONFIGS (kernels/include/sage/sm120/sm120_attn_fwd_launch.hpp) and
// packages/sage-core/cmake/instantiations.cmake (family sm120).
#include "sage/sm120/sm120_attn_fwd_kernel_mma_sync.cuh"

SAGE_SM120_ATTN_FWD_INSTANTIATE(kNative, 64, kF16)
