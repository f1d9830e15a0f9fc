// One configuration of the sm80 mma.sync attention family (list: SAGE_SM80_ATTN_FWD_CONFIGS in
// kernels/include/sage/sm80/sm80_attn_fwd_launch.hpp and packages/sage-core/cmake/instantiations.cmake).
#include "sage/sm80/sm80_attn_fwd_kernel_mma_sync.cuh"

SAGE_SM80_ATTN_FWD_INSTANTIATE(kQkS8PvF16AccF16, 64, kF16)
