// Arch feature guards for kernel bodies (device code).
//
// Each generation's kernels live in their own object library compiled for their own archs
// (cmake/instantiations.cmake), but a header may still be seen by other device passes, and CuTe
// wgmma code compiled for plain sm_90 (no 'a') builds and then traps at run time. So every
// arch-specific kernel body is wrapped:
//
//   __global__ void attn_sm90_kernel(Params p) {
//   #if SAGE_DEVICE_SM90A
//     ... wgmma / TMA / setmaxnreg ...
//   #else
//     SAGE_DEVICE_TRAP_WRONG_ARCH();   // compiled for a target without the instructions
//   #endif
//   }
#pragma once

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SAGE_DEVICE_SM90A 1
#else
#define SAGE_DEVICE_SM90A 0
#endif

#if defined(__CUDA_ARCH__) && (defined(__CUDA_ARCH_FEAT_SM100_ALL) || defined(__CUDA_ARCH_FEAT_SM103_ALL) || \
                               defined(__CUDA_ARCH_FAMILY_SPECIFIC__) && (__CUDA_ARCH_FAMILY_SPECIFIC__ == 1000))
#define SAGE_DEVICE_SM100A 1
#else
#define SAGE_DEVICE_SM100A 0
#endif

#if defined(__CUDA_ARCH__) && (defined(__CUDA_ARCH_FEAT_SM120_ALL) || defined(__CUDA_ARCH_FEAT_SM121_ALL) || \
                               defined(__CUDA_ARCH_FAMILY_SPECIFIC__) && (__CUDA_ARCH_FAMILY_SPECIFIC__ == 1200))
#define SAGE_DEVICE_SM120A 1
#else
#define SAGE_DEVICE_SM120A 0
#endif

// mma.sync INT8/INT4/FP16 (sm_80+). Every later target keeps mma.sync, the Blackwell 'a' targets
// included (__CUDA_ARCH__ 1000/1030/1200/1210), so the sm80 family builds for them unchanged.
// Native in SASS (docs/perf/sm80_family_blackwell.md): INT8 and FP16 everywhere; FP8 on sm_89 and
// sm_120/121 (emulated through HMMA on sm_90a and sm_100a/103a); INT4 on sm_80-89 only.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
#define SAGE_DEVICE_SM80_PLUS 1
#else
#define SAGE_DEVICE_SM80_PLUS 0
#endif

#if defined(__CUDA_ARCH__)
#define SAGE_DEVICE_TRAP_WRONG_ARCH() __trap()
#else
#define SAGE_DEVICE_TRAP_WRONG_ARCH() ((void)0)
#endif
