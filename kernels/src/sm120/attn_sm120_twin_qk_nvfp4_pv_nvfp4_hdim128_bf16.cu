// One configuration of the sm120 FP4 attention, twin policy (sm_90a: the block-scaled MMA in
// FP16 mma.sync, for testing on Hopper): family sm120twin in packages/sage-core/cmake/instantiations.cmake.
#include "sage/sm120/sm120_attn_fwd_kernel_mma_sync.cuh"

SAGE_SM120_ATTN_FWD_INSTANTIATE(kTwin, 128, kBf16)
