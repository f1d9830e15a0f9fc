// Hopper (sm_90a) attention forward, recipe `qk_s8_pv_e4m3` (SageAttention2 8-bit):
//   S  = (Q_s8 K_s8^T) * q_scale[thread] * k_scale[thread]          wgmma s8*s8 -> s32, SS
//   P~ = exp2(S*sm_scale*log2e - m + log2(448)) -> E4M3 (RN, satfinite); l sums the fp32 P~
//   buf = P~ V_e4m3 (fresh fp32 accumulator per KV tile)              wgmma e4m3*e4m3 -> f32, RS
//   O  = O * exp2(m_old - m_new) + buf                                (two-level accumulation)
//   out = O * v_scale[channel] / l (+ v_mean[channel] if given, rows with l > 0),
//   LSE = ln2 * (m + log2(l) - log2(448))
//
// Structure (one CTA = 128 query rows of one (batch, head)):
//   warpgroup 0   producer: one thread issues TMA loads (Q once, then K and V^T tiles into a
//                 kStages-deep (3) ring guarded by full/empty mbarriers); setmaxnreg.dec to 24.
//   warpgroups 1,2 consumers: 64 query rows each (one wgmma m64 tile), setmaxnreg.inc to 240.
//
// P from registers needs no shuffles: the s32/f32 accumulator gives thread t (= lane % 4) the key
// columns {2t, 2t+1, 8+2t, 9+2t, 16+2t, 17+2t, 24+2t, 25+2t} of every 32-key chunk, the 8-bit
// A operand of a k32 wgmma wants logical k {4t..4t+3, 16+4t..19+4t}. The fused quantizer stores
// V^T with its tokens permuted inside each 32-token chunk (quant-formats.md, v_e4m3_t_perm32) so
// that logical k = 4t+i (i<4) holds token 2t + 8*(i/2) + i%2 (and +16 for the upper half): the
// thread's own P values are exactly its A fragment, in register order.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

// Before any CUTLASS header: cutlass/cuda_host_adapter.hpp includes <cudaTypedefs.h> inside
// namespace cutlass, which would hide the global PFN_* typedefs that driver_api.hpp needs.
#include "sage/common/arch.hpp"
#include "sage/common/cvt_e4m3.cuh"
#include "sage/sm90/sm90_attn_fwd_qk_s8_pv_e4m3_params.hpp"
#include "sage/sm90/sm90_tma_desc.hpp"

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#ifndef SAGE_SM90_ATTN_OVERLAP
#define SAGE_SM90_ATTN_OVERLAP 1
#endif
#ifndef SAGE_SM90_ATTN_PINGPONG
#define SAGE_SM90_ATTN_PINGPONG 1
#endif
// Step 3 (H11): how many of the 16 four-score groups of a tile row pair take exp2 on the FMA pipe
// (polynomial) instead of MUFU.EX2 in unmasked tiles (0 = all MUFU), and that polynomial's degree
// (5: rel. error 2.1e-7, like ex2.approx; 4: 2.7e-6, one FFMA less).
#ifndef SAGE_SM90_ATTN_EXP2_POLY_GROUPS
#define SAGE_SM90_ATTN_EXP2_POLY_GROUPS 0  // measured slower on H200 (docs/perf), kept for study
#endif
// Step 3 (H11): int32 -> float of the scores by the magic-number add (IADD on the ALU pipe)
// instead of I2FP in unmasked tiles; see Traits::kMagicI2F for the rounding consequence.
#ifndef SAGE_SM90_ATTN_MAGIC_I2F
#define SAGE_SM90_ATTN_MAGIC_I2F 0  // +2% only, and one emulation test failed: off
#endif
#ifndef SAGE_SM90_ATTN_EXP2_POLY_DEGREE
#define SAGE_SM90_ATTN_EXP2_POLY_DEGREE 5
#endif
// Step 4 (H12): independent partial accumulators per row for the softmax row max (MAX_CHAINS)
// and row sum (SUM_CHAINS); 1 = one serial chain per row, as in steps 1-3. Breaks the 16-deep
// VIMNMX3 / FMNMX and 16-deep FADD dependency chains; only the fp32 summation order of l changes.
#ifndef SAGE_SM90_ATTN_MAX_CHAINS
#define SAGE_SM90_ATTN_MAX_CHAINS 1  // 4 measured slower on H200 (step 4 A/B)
#endif
#ifndef SAGE_SM90_ATTN_SUM_CHAINS
#define SAGE_SM90_ATTN_SUM_CHAINS 1  // 4 and 8 measured slower on H200
#endif
// Step 4 (H12): load the per-tile K scale of tile n+1 during tile n (1) instead of at the top of
// tile n (0), so its global-load latency is never on the softmax's critical path.
#ifndef SAGE_SM90_ATTN_PREFETCH_KSCALE
#define SAGE_SM90_ATTN_PREFETCH_KSCALE 0  // no gain measured
#endif
// Step 4 (H12): how the softmax is kept before wgmma.wait_group<0> (see pin_before_wgmma_wait):
// 0 = one STS of l_run per thread per tile (steps 2-4 default);
// 1 = empty volatile asm on l_run (no instruction): ptxas then hoists the wait above all the
//     EX2s (checked in SASS, step 4): no overlap at all. Kept only to document that.
// (Tried in step 4: storing this tile's row sums instead of l_run, so the alpha EX2 is not an
// input of the store: no gain, in-order issue stalls on the l update FFMA anyway, and 8 B spill.)
// Diagnostics only: -DSAGE_SM90_ATTN_TRACE=1 prints clock64 stamps (cycles since kernel entry) of
// the phases of a few CTAs (blockIdx.y == 3, blockIdx.z == 2 % gridDim.z, 4 values of blockIdx.x)
// with device printf, to see where the per-CTA fixed cost goes. Never on in a release build.
#ifndef SAGE_SM90_ATTN_TRACE
#define SAGE_SM90_ATTN_TRACE 0
#endif
#ifndef SAGE_SM90_ATTN_PIN_KIND
#define SAGE_SM90_ATTN_PIN_KIND 0
#endif

namespace sage::sm90 {

inline constexpr float kFp8E4m3Max = 448.f;
inline constexpr float kLog2Fp8E4m3Max = 8.80735492205760410f;  // log2(448)
inline constexpr float kLog2e = 1.44269504088896340f;
inline constexpr float kLn2 = 0.69314718055994531f;
// Named barrier ids of the consumer ping-pong (one per consumer warpgroup); 0 = __syncthreads,
// low ids are left to CUTLASS conventions.
inline constexpr int kPingPongBarrierBase = 8;

// ---- output dtype tags -------------------------------------------------------------------------
struct OutF16 {
  using T = __half;
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
struct OutBF16 {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// ---- compile-time configuration ------------------------------------------------------------------
template <int kHeadDim_, class OutTag_>
struct AttnFwdSm90QkS8PvE4m3Traits {
  static_assert(kHeadDim_ == 64 || kHeadDim_ == 128, "head dim 64 or 128");
  static constexpr int kHeadDim = kHeadDim_;
  using OutTag = OutTag_;
  static constexpr int kBlockQ = kSm90BlockQ;    // 2 consumer warpgroups x 64 rows
  static constexpr int kBlockKV = kSm90BlockKV;  // also the per-thread K scale block
  static constexpr int kRowsPerWG = 64;          // one wgmma m64 tile
  static constexpr int kNumConsumerWG = kBlockQ / kRowsPerWG;
  static constexpr int kStages = 3;  // K and V^T ring depth (1 CTA/SM: smem is plentiful)
  static constexpr int kThreads = 128 * (1 + kNumConsumerWG);
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;  // 24*128 + 240*256 = 64512 <= 65536
  static constexpr int kConsumerThreads = 128 * kNumConsumerWG;
  // Main-loop schedule (step 2): kOverlap = QK(n) and PV(n-1) in flight together, softmax(n)
  // between wait<1> and wait<0>; kPingPong = the consumer warpgroups take turns issuing GEMMs
  // (named barriers). kOverlap = false is the step-1 schedule (kept as the known-good fallback).
  // Override for A/B runs: -DSAGE_SM90_ATTN_OVERLAP=0 / -DSAGE_SM90_ATTN_PINGPONG=0.
  static constexpr bool kOverlap = SAGE_SM90_ATTN_OVERLAP != 0;
  static constexpr bool kPingPong = kOverlap && SAGE_SM90_ATTN_PINGPONG != 0;
  // MUFU.EX2 (16/clk/SM) and instruction issue are co-bottlenecks of the softmax: groups of 4
  // scores (out of 16 per tile and thread) evaluated with exp2_poly() cost ~10 issue slots each
  // instead of 1 issue slot + 8 MUFU clocks. Spread evenly over the tile; masked tiles use MUFU
  // only (exp2(-inf) must be exactly 0 there). Tune with -DSAGE_SM90_ATTN_EXP2_POLY_GROUPS=k.
  static constexpr int kExp2PolyGroups = SAGE_SM90_ATTN_EXP2_POLY_GROUPS;
  static constexpr int kExp2PolyDegree = SAGE_SM90_ATTN_EXP2_POLY_DEGREE;
  static_assert(kExp2PolyGroups >= 0 && kExp2PolyGroups <= 16, "0..16 groups");
  static_assert(kExp2PolyDegree == 4 || kExp2PolyDegree == 5, "degree 4 or 5");
  // Magic-number conversion: for |S| < 2^22, bits(S + 0x4B400000) is the float 1.5*2^23 + S
  // exactly; the exp argument becomes fma(M + S, c, off - M*c). The row max stays exact (integer
  // VIMNMX3). The one rounding of off - M*c (per row and tile) shifts that row segment's exp
  // argument by <= 0.75*c, i.e. less than one unit of the integer score: P~ changes by a common
  // factor (1 +- 0.52*c) for the thread's 32 keys of that row (c ~ 1e-4 for randn inputs).
  // |S| <= 127*127*128 = 2064512 < 2^22 holds for d <= 128.
  static constexpr bool kMagicI2F = SAGE_SM90_ATTN_MAGIC_I2F != 0;
  static_assert(127 * 127 * kHeadDim_ < (1 << 22), "magic-number conversion range");
  // Group j (of 16) takes the polynomial: Bresenham spread so MUFU and FMA work interleave.
  // Step 4: partial accumulators per row for the row max / row sum (divides the 16 groups).
  static constexpr int kMaxChains = SAGE_SM90_ATTN_MAX_CHAINS;
  static constexpr int kSumChains = SAGE_SM90_ATTN_SUM_CHAINS;
  static_assert(kMaxChains == 1 || kMaxChains == 2 || kMaxChains == 4 || kMaxChains == 8, "1, 2, 4 or 8 chains");
  static_assert(kSumChains == 1 || kSumChains == 2 || kSumChains == 4 || kSumChains == 8, "1, 2, 4 or 8 chains");
  static constexpr bool kPrefetchKScale = SAGE_SM90_ATTN_PREFETCH_KSCALE != 0;
  static constexpr int kPinKind = SAGE_SM90_ATTN_PIN_KIND;
  static_assert(kPinKind == 0 || kPinKind == 1, "pin kind 0 (STS of l) or 1 (asm, breaks overlap)");
  static constexpr bool exp2_group_is_poly(int j) {
    return (j + 1) * kExp2PolyGroups / 16 > j * kExp2PolyGroups / 16;
  }

  // Q/K rows are d bytes: 128 B rows take the 128-byte swizzle, 64 B rows the 64-byte one (the
  // TMA box's inner extent must not exceed the swizzle span). V^T rows are 128 tokens = 128 B.
  using SmemAtomQK = std::conditional_t<kHeadDim == 128, cute::GMMA::Layout_K_SW128_Atom<int8_t>,
                                        cute::GMMA::Layout_K_SW64_Atom<int8_t>>;
  static constexpr CUtensorMapSwizzle kSwizzleQK =
      kHeadDim == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  static constexpr CUtensorMapSwizzle kSwizzleV = CU_TENSOR_MAP_SWIZZLE_128B;

  using SmemLayoutQWG = decltype(cute::tile_to_shape(
      SmemAtomQK{}, cute::Shape<cute::Int<kRowsPerWG>, cute::Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      SmemAtomQK{}, cute::Shape<cute::Int<kBlockKV>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  using SmemLayoutVt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<cutlass::float_e4m3_t>{},
      cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockKV>, cute::Int<kStages>>{}));

  using TiledMmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<int8_t, int8_t, int32_t,
                                 cute::Shape<cute::Int<kRowsPerWG>, cute::Int<kBlockKV>, cute::Int<kHeadDim>>>()));
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<cutlass::float_e4m3_t, cutlass::float_e4m3_t, float,
                                 cute::Shape<cute::Int<kRowsPerWG>, cute::Int<kHeadDim>, cute::Int<kBlockKV>>>()));

  static constexpr uint32_t kQTileBytes = kBlockQ * kHeadDim;
  static constexpr uint32_t kKTileBytes = kBlockKV * kHeadDim;
  static constexpr uint32_t kVTileBytes = kHeadDim * kBlockKV;

  struct SharedStorage {
    alignas(1024) int8_t q[kQTileBytes];
    alignas(1024) int8_t k[kStages * kKTileBytes];
    alignas(1024) uint8_t v[kStages * kVTileBytes];
    alignas(8) uint64_t bar_q;
    uint64_t bar_k_full[kStages];
    uint64_t bar_k_empty[kStages];
    uint64_t bar_v_full[kStages];
    uint64_t bar_v_empty[kStages];
    float pin[kConsumerThreads];  // write-only slots of detail::pin_before_wgmma_wait
  };
  // + 1024: the dynamic smem base is only guaranteed 16-byte aligned; swizzled TMA/GMMA tiles
  // need 1024-byte alignment, so the kernel rounds the base up.
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;
};

struct AttnFwdSm90KernelParams {
  CUtensorMap tma_q;  // {d, s_q, b*h_q} bytes, box {d, 128}
  CUtensorMap tma_k;  // {d, s_kv, b*h_kv} bytes, box {d, 128}
  CUtensorMap tma_v;  // {s_kv_pad, d, b*h_kv} bytes, box {128, d}
  AttnFwdQkS8PvE4m3Args a;
  float scale_log2;   // sm_scale * log2(e)
  int num_m_blocks;
  int num_n_blocks;
  int q_scale_groups;  // ceil(s_q/16)*8
  int k_scale_groups;  // ceil(s_kv/128)*4
};

namespace detail {

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// exp2 on the FMA pipe (Cody-Waite): x = j + f, j = round(x), f in [-1/2, 1/2];
// 2^x = p(f) * 2^j with p a relative-error minimax polynomial of 2^f (fitted in float64 with
// Lawson iterations, checked in float32 Horner: max rel. error 2.1e-7 at degree 5, 2.7e-6 at
// degree 4, vs ex2.approx's ~2^-22). 2^j goes in by an integer add on the exponent field:
// t = x + 1.5*2^23 holds j in its low mantissa bits, so (bits(t) << 23) == j << 23 (mod 2^32).
// x is clamped to -125 so the exponent never wraps (2^-125 instead of ~0: only for scores
// >125 binades below the row max, it rounds to E4M3 0 and adds < 1e-37 to l; callers use MUFU
// where x may be -inf, i.e. masked tiles, so rows without visible keys keep l == 0 exactly).
// Cost: FMNMX + 3 FADD + deg FFMA + 1 LEA/IMAD, all off the MUFU pipe.
inline constexpr float kExp2PolyMinArg = -125.f;
inline constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23: x + M rounds x to an integer
inline constexpr int kRoundMagicBits = 0x4B400000;  // bits of kRoundMagic

template <int kDegree>
__device__ __forceinline__ float exp2_poly(float x) {
  x = fmaxf(x, kExp2PolyMinArg);
  const float t = x + kRoundMagic;
  const float f = x - (t - kRoundMagic);  // exact (Sterbenz)
  float p;
  if constexpr (kDegree == 5) {
    p = fmaf(0x1.5c08e6p-10f, f, 0x1.3d0c54p-7f);
    p = fmaf(p, f, 0x1.c6b6e4p-5f);
    p = fmaf(p, f, 0x1.ebf918p-3f);
    p = fmaf(p, f, 0x1.62e428p-1f);
    p = fmaf(p, f, 0x1.000002p+0f);
  } else {
    p = fmaf(0x1.3997d6p-7f, f, 0x1.ca1442p-5f);
    p = fmaf(p, f, 0x1.ec06dap-3f);
    p = fmaf(p, f, 0x1.62e0dcp-1f);
    p = fmaf(p, f, 0x1.ffffe8p-1f);
  }
  return __uint_as_float(__float_as_uint(p) + (__float_as_uint(t) << 23));
}

using ::sage::pack_e4m3x4;  // sage/common/cvt_e4m3.cuh

// ptxas hoists wgmma.wait_group above independent ALU work (it did so for the whole softmax,
// which then no longer overlapped the PV wgmma). A shared-memory store is not moved across the
// wait; storing a value that depends on every EX2 of the tile (the row sums) pins the softmax
// before it. One STS per thread per tile; the slot is never read.
__device__ __forceinline__ void pin_before_wgmma_wait(float* slot, float v) {
  asm volatile("st.shared.f32 [%0], %1;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(slot))), "f"(v)
               : "memory");
}

// Named barriers over a subset of the CTA's warps (id 0 is __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace detail

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attn_fwd_sm90_qk_s8_pv_e4m3_kernel(const __grid_constant__ AttnFwdSm90KernelParams p) {
#if SAGE_DEVICE_SM90A
  using namespace cute;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  using SharedStorage = typename Traits::SharedStorage;
  constexpr int D = Traits::kHeadDim;
  constexpr int kBlockQ = Traits::kBlockQ;
  constexpr int kBlockKV = Traits::kBlockKV;
  constexpr int kStages = Traits::kStages;
  constexpr uint64_t kCacheHint = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);

#if SAGE_SM90_ATTN_TRACE
  const long long t_entry = clock64();
  const bool trace = blockIdx.y == 3 && blockIdx.z == 2 % gridDim.z && blockIdx.x % max(1u, gridDim.x / 4) == 0;
  long long t_mark[6] = {0, 0, 0, 0, 0, 0};
#define SAGE_TRACE_MARK(i) (t_mark[i] = clock64() - t_entry)
#else
#define SAGE_TRACE_MARK(i) ((void)0)
#endif
  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const AttnFwdQkS8PvE4m3Args& a = p.a;
  const int wg = threadIdx.x / 128;
  const int m_block = p.num_m_blocks - 1 - int(blockIdx.x);  // causal: longest rows first
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int head_kv = head / (a.heads_q / a.heads_kv);
  const int bh_q = batch * a.heads_q + head;
  const int bh_kv = batch * a.heads_kv + head_kv;
  const bool causal = a.mask == MaskKind::kCausal;
  // Bottom-right causal: row i sees keys <= i + (s_kv - s_q).
  const int causal_offset = a.seq_kv - a.seq_q;

  int n_end = p.num_n_blocks;
  if (causal) {
    const int last_row = min(m_block * kBlockQ + kBlockQ - 1, a.seq_q - 1);
    const int last_key = last_row + causal_offset;
    n_end = last_key < 0 ? 0 : min(n_end, last_key / kBlockKV + 1);
  }

  if (threadIdx.x == 0) {
    Barrier::init(&ss.bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&ss.bar_k_full[s], 1);
      Barrier::init(&ss.bar_v_full[s], 1);
      // every consumer thread arrives once it no longer reads the stage
      Barrier::init(&ss.bar_k_empty[s], Traits::kConsumerThreads);
      Barrier::init(&ss.bar_v_empty[s], Traits::kConsumerThreads);
    }
    cute::prefetch_tma_descriptor(&p.tma_q);
    cute::prefetch_tma_descriptor(&p.tma_k);
    cute::prefetch_tma_descriptor(&p.tma_v);
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();
  SAGE_TRACE_MARK(0);

  if (wg == 0) {
    // ------------------------------------------------------------------ producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 0 && n_end > 0) {
      TxBarrier::arrive_and_expect_tx(&ss.bar_q, Traits::kQTileBytes);
      SM90_TMA_LOAD_3D::copy(&p.tma_q, &ss.bar_q, kCacheHint, ss.q, 0, m_block * kBlockQ, bh_q);
      for (int n = 0; n < n_end; ++n) {
        const int stage = n % kStages;
        const uint32_t phase = (n / kStages) & 1;
        Barrier::wait(&ss.bar_k_empty[stage], phase ^ 1);
        TxBarrier::arrive_and_expect_tx(&ss.bar_k_full[stage], Traits::kKTileBytes);
        SM90_TMA_LOAD_3D::copy(&p.tma_k, &ss.bar_k_full[stage], kCacheHint,
                               ss.k + stage * Traits::kKTileBytes, 0, n * kBlockKV, bh_kv);
        Barrier::wait(&ss.bar_v_empty[stage], phase ^ 1);
        TxBarrier::arrive_and_expect_tx(&ss.bar_v_full[stage], Traits::kVTileBytes);
        SM90_TMA_LOAD_3D::copy(&p.tma_v, &ss.bar_v_full[stage], kCacheHint,
                               ss.v + stage * Traits::kVTileBytes, n * kBlockKV, 0, bh_kv);
      }
    }
    return;
  }

  // -------------------------------------------------------------------- consumer warpgroups
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int cw = wg - 1;                 // consumer warpgroup 0/1 -> rows [64*cw, 64*cw + 64)
  const int tid = threadIdx.x % 128;     // thread in the warpgroup
  const int lane_t = tid % 4;            // owns key/channel columns 8j + 2*lane_t + {0,1}
  const int row0 = 16 * (tid / 32) + (tid % 32) / 4;  // rows row0 and row0 + 8 of the WG tile
  const int wg_row_begin = m_block * kBlockQ + cw * Traits::kRowsPerWG;
  const int grow0 = wg_row_begin + row0;  // global query rows of this thread
  const int grow1 = grow0 + 8;

  typename Traits::TiledMmaQK mma_qk;
  typename Traits::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);

  Tensor sQ = make_tensor(make_smem_ptr(ss.q + cw * Traits::kRowsPerWG * D),
                          typename Traits::SmemLayoutQWG{});               // (64, D)
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutK{});  // (128, D, stages)
  Tensor sVt = make_tensor(make_smem_ptr(reinterpret_cast<cutlass::float_e4m3_t*>(ss.v)),
                           typename Traits::SmemLayoutVt{});               // (D, 128, stages)

  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // (MMA, 1, D/32) descriptors
  Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, 1, D/32, stages) descriptors
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, 1, 4, stages) descriptors
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<Traits::kRowsPerWG>, Int<kBlockKV>>{});  // s32 ((2,2,16),1,1)
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<Traits::kRowsPerWG>, Int<D>>{});         // f32 ((2,2,D/8),1,1)
  Tensor tOrBuf = partition_fragment_C(mma_pv, Shape<Int<Traits::kRowsPerWG>, Int<D>>{});       // f32, per KV tile
  Tensor tOrP = make_tensor<cutlass::float_e4m3_t>(
      partition_shape_A(mma_pv, Shape<Int<Traits::kRowsPerWG>, Int<kBlockKV>>{}));  // ((4,2,2),1,4)
  Tensor tOrP32 = recast<uint32_t>(tOrP);  // 16 words: word 4c + {0,1,2,3} = a0..a3 of k-chunk c
  static_assert(size(tSrS) == 64 && size(tOrP32) == 16, "fragment shapes");
  static_assert(size(tOrO) == D / 2, "fragment shapes");

  // Per-thread scales: rows grow0 and grow1 = grow0 + 8 share one Q scale group.
  float q_scale = 0.f;
  if (grow0 / 16 * 8 < p.q_scale_groups) {
    q_scale = a.q_scale[int64_t(bh_q) * p.q_scale_groups + (grow0 / 16) * 8 + grow0 % 8];
  }
  const float qk_scale_log2 = q_scale * p.scale_log2;
  const float* k_scale_head = a.k_scale + int64_t(bh_kv) * p.k_scale_groups + lane_t;

  CUTE_UNROLL
  for (int i = 0; i < size(tOrO); ++i) tOrO(i) = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running row max, log2 domain incl. sm_scale
  float l_run[2] = {0.f, 0.f};              // thread-partial row sums of fp32 P~

  // Last key each of my rows may see (inclusive).
  const int key_lim0 = causal ? min(a.seq_kv - 1, grow0 + causal_offset) : a.seq_kv - 1;
  const int key_lim1 = causal ? min(a.seq_kv - 1, grow1 + causal_offset) : a.seq_kv - 1;
  // The warpgroup's smallest key limit decides whether a tile needs the element mask.
  const int wg_key_lim = causal ? min(a.seq_kv - 1, wg_row_begin + causal_offset) : a.seq_kv - 1;

  // ---- the pieces of one KV tile ----
  // S = Q K^T (s32) into tSrS; issued and committed as one wgmma batch, not waited for.
  auto issue_qk = [&](int stage) {
    warpgroup_fence_operand(tSrS);
    warpgroup_arrive();
    mma_qk.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      cute::gemm(mma_qk, tSrQ(_, _, kb), tSrK(_, _, kb, stage), tSrS);
      mma_qk.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
  // buf = P~ V (fresh f32 accumulator) from the E4M3 registers tOrP; committed, not waited for.
  auto issue_pv = [&](int stage) {
    warpgroup_fence_operand(tOrBuf);
    warpgroup_arrive();
    mma_pv.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tOrP); ++kb) {
      cute::gemm(mma_pv, tOrP(_, _, kb), tOrV(_, _, kb, stage), tOrBuf);
      mma_pv.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
  // Online softmax of tile n on the finished tSrS: sf = fp32 P~ (in accumulator order), updates
  // m_run / l_run and returns the O rescale factors exp2(m_old - m_new) of both rows.
  // One scale per thread per tile: c = q_scale * k_scale * sm_scale * log2e. c > 0, so the
  // max of the raw scores times c is the max of the scaled scores (rounding is monotonic),
  // and each P~ is one FFMA + one EX2: exp2(raw * c - (m - log2 448)).
  auto softmax_tile = [&](int n, float c, float (&sf)[64], float& alpha0, float& alpha1) {
    constexpr int kChains = Traits::kMaxChains;
    constexpr int kSChains = Traits::kSumChains;
    float mx0, mx1;  // raw (unscaled) row maxima of this thread's columns
    const bool masked = n * kBlockKV + kBlockKV - 1 > wg_key_lim;  // crosses s_kv or the diagonal
    if (masked) {
      CUTE_UNROLL
      for (int i = 0; i < 64; ++i) sf[i] = static_cast<float>(tSrS(i));
      const int key_base = n * kBlockKV + 2 * lane_t;
      CUTE_UNROLL
      for (int j = 0; j < kBlockKV / 8; ++j) {
        CUTE_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int key = key_base + 8 * j + e;
          if (key > key_lim0) sf[4 * j + e] = -INFINITY;
          if (key > key_lim1) sf[4 * j + 2 + e] = -INFINITY;
        }
      }
      // kChainsM independent partial maxima per row (exact in any order), combined as a tree.
      constexpr int kChainsM = kChains < 2 ? kChains : 2;
      float pm0[kChainsM], pm1[kChainsM];
      CUTE_UNROLL
      for (int j = 0; j < kBlockKV / 8; ++j) {
        const float a0 = fmaxf(sf[4 * j], sf[4 * j + 1]);
        const float a1 = fmaxf(sf[4 * j + 2], sf[4 * j + 3]);
        pm0[j % kChainsM] = j < kChainsM ? a0 : fmaxf(pm0[j % kChainsM], a0);
        pm1[j % kChainsM] = j < kChainsM ? a1 : fmaxf(pm1[j % kChainsM], a1);
      }
      CUTE_UNROLL
      for (int w = kChainsM / 2; w >= 1; w /= 2) {
        CUTE_UNROLL
        for (int i = 0; i < w; ++i) {
          pm0[i] = fmaxf(pm0[i], pm0[i + w]);
          pm1[i] = fmaxf(pm1[i], pm1[i + w]);
        }
      }
      mx0 = pm0[0];
      mx1 = pm1[0];
    } else {
      // Unmasked tile: the max on the s32 accumulator with the 3-input VIMNMX3 (sm_90 DPX), half
      // the instructions of pairwise FMNMX. Exact: |raw| <= 127*127*d < 2^24 converts exactly
      // and monotonically, so float(max raw) == max float(raw).
      // kChains independent partial maxima per row, then a tree (3-input max where possible).
      int pm0[kChains], pm1[kChains];
      CUTE_UNROLL
      for (int j = 0; j < kBlockKV / 8; ++j) {
        const int q = j % kChains;
        pm0[q] = j < kChains ? max(tSrS(4 * j), tSrS(4 * j + 1)) : __vimax3_s32(pm0[q], tSrS(4 * j), tSrS(4 * j + 1));
        pm1[q] = j < kChains ? max(tSrS(4 * j + 2), tSrS(4 * j + 3)) : __vimax3_s32(pm1[q], tSrS(4 * j + 2), tSrS(4 * j + 3));
      }
      int imx0, imx1;
      if constexpr (kChains == 1) {
        imx0 = pm0[0];
        imx1 = pm1[0];
      } else if constexpr (kChains == 2) {
        imx0 = max(pm0[0], pm0[1]);
        imx1 = max(pm1[0], pm1[1]);
      } else if constexpr (kChains == 4) {
        imx0 = __vimax3_s32(pm0[0], pm0[1], max(pm0[2], pm0[3]));
        imx1 = __vimax3_s32(pm1[0], pm1[1], max(pm1[2], pm1[3]));
      } else {
        imx0 = __vimax3_s32(__vimax3_s32(pm0[0], pm0[1], pm0[2]), __vimax3_s32(pm0[3], pm0[4], pm0[5]),
                            max(pm0[6], pm0[7]));
        imx1 = __vimax3_s32(__vimax3_s32(pm1[0], pm1[1], pm1[2]), __vimax3_s32(pm1[3], pm1[4], pm1[5]),
                            max(pm1[6], pm1[7]));
      }
      if constexpr (Traits::kMagicI2F) {
        CUTE_UNROLL
        for (int i = 0; i < 64; ++i) sf[i] = __int_as_float(tSrS(i) + detail::kRoundMagicBits);  // M + S
      } else {
        CUTE_UNROLL
        for (int i = 0; i < 64; ++i) sf[i] = static_cast<float>(tSrS(i));
      }
      mx0 = static_cast<float>(imx0);
      mx1 = static_cast<float>(imx1);
    }
    // c differs between the 4 threads of a quad (each owns another K scale group), so scale
    // before the quad reduction: all 4 must share one running max m.
    mx0 = detail::quad_max(mx0 * c);
    mx1 = detail::quad_max(mx1 * c);
    const float m_new0 = fmaxf(m_run[0], mx0);
    const float m_new1 = fmaxf(m_run[1], mx1);
    // A row with no visible key so far keeps m = -inf; use 0 so no (-inf) - (-inf) appears.
    const float m_use0 = m_new0 == -INFINITY ? 0.f : m_new0;
    const float m_use1 = m_new1 == -INFINITY ? 0.f : m_new1;
    alpha0 = detail::ex2_approx(m_run[0] - m_use0);
    alpha1 = detail::ex2_approx(m_run[1] - m_use1);
    m_run[0] = m_new0;
    m_run[1] = m_new1;
    // P~ max maps to 448. With the magic conversion sf holds M + S: subtract M*c here.
    // (Without the magic conversion the offset is a plain subtraction: fmaf(-0, c, x) is not
    // folded by the compiler, it cost one FFMA per row.)
    float neg_off0 = kLog2Fp8E4m3Max - m_use0;
    float neg_off1 = kLog2Fp8E4m3Max - m_use1;
    if (Traits::kMagicI2F && !masked) {
      neg_off0 = fmaf(-detail::kRoundMagic, c, neg_off0);
      neg_off1 = fmaf(-detail::kRoundMagic, c, neg_off1);
    }
    // kChains independent partial row sums (the first pair initializes each: no 0 + x FADD).
    float ps0[kSChains], ps1[kSChains];
    // kPoly = false: every exp2 on MUFU (masked tiles: -inf must give exactly 0).
    auto exp_tile = [&](auto use_poly) {
      CUTE_UNROLL
      for (int j = 0; j < kBlockKV / 8; ++j) {
        if (decltype(use_poly)::value && Traits::exp2_group_is_poly(j)) {
          constexpr int kDeg = Traits::kExp2PolyDegree;
          sf[4 * j + 0] = detail::exp2_poly<kDeg>(fmaf(sf[4 * j + 0], c, neg_off0));
          sf[4 * j + 1] = detail::exp2_poly<kDeg>(fmaf(sf[4 * j + 1], c, neg_off0));
          sf[4 * j + 2] = detail::exp2_poly<kDeg>(fmaf(sf[4 * j + 2], c, neg_off1));
          sf[4 * j + 3] = detail::exp2_poly<kDeg>(fmaf(sf[4 * j + 3], c, neg_off1));
        } else {
          sf[4 * j + 0] = detail::ex2_approx(fmaf(sf[4 * j + 0], c, neg_off0));
          sf[4 * j + 1] = detail::ex2_approx(fmaf(sf[4 * j + 1], c, neg_off0));
          sf[4 * j + 2] = detail::ex2_approx(fmaf(sf[4 * j + 2], c, neg_off1));
          sf[4 * j + 3] = detail::ex2_approx(fmaf(sf[4 * j + 3], c, neg_off1));
        }
        const float a0 = sf[4 * j + 0] + sf[4 * j + 1];
        const float a1 = sf[4 * j + 2] + sf[4 * j + 3];
        ps0[j % kSChains] = j < kSChains ? a0 : ps0[j % kSChains] + a0;
        ps1[j % kSChains] = j < kSChains ? a1 : ps1[j % kSChains] + a1;
      }
    };
    if (masked || Traits::kExp2PolyGroups == 0) {
      exp_tile(std::false_type{});
    } else {
      exp_tile(std::true_type{});
    }
    CUTE_UNROLL
    for (int w = kSChains / 2; w >= 1; w /= 2) {
      CUTE_UNROLL
      for (int i = 0; i < w; ++i) {
        ps0[i] += ps0[i + w];
        ps1[i] += ps1[i + w];
      }
    }
    l_run[0] = fmaf(l_run[0], alpha0, ps0[0]);
    l_run[1] = fmaf(l_run[1], alpha1, ps1[0]);
  };
  // P~ -> E4M3 A fragment of the PV wgmma (see the file comment for why no shuffle is needed).
  auto pack_p = [&](const float (&sf)[64]) {
    CUTE_UNROLL
    for (int cch = 0; cch < kBlockKV / 32; ++cch) {
      const int j0 = 4 * cch;  // accumulator column groups 4c .. 4c+3 = keys 32c .. 32c+31
      tOrP32(4 * cch + 0) = detail::pack_e4m3x4(sf[4 * j0 + 0], sf[4 * j0 + 1], sf[4 * j0 + 4], sf[4 * j0 + 5]);
      tOrP32(4 * cch + 1) = detail::pack_e4m3x4(sf[4 * j0 + 2], sf[4 * j0 + 3], sf[4 * j0 + 6], sf[4 * j0 + 7]);
      tOrP32(4 * cch + 2) = detail::pack_e4m3x4(sf[4 * j0 + 8], sf[4 * j0 + 9], sf[4 * j0 + 12], sf[4 * j0 + 13]);
      tOrP32(4 * cch + 3) = detail::pack_e4m3x4(sf[4 * j0 + 10], sf[4 * j0 + 11], sf[4 * j0 + 14], sf[4 * j0 + 15]);
    }
  };
  // Two-level accumulation on CUDA cores: O = O * alpha + buf.
  auto accumulate_o = [&](float alpha0, float alpha1) {
    CUTE_UNROLL
    for (int j = 0; j < D / 8; ++j) {
      tOrO(4 * j + 0) = fmaf(tOrO(4 * j + 0), alpha0, tOrBuf(4 * j + 0));
      tOrO(4 * j + 1) = fmaf(tOrO(4 * j + 1), alpha0, tOrBuf(4 * j + 1));
      tOrO(4 * j + 2) = fmaf(tOrO(4 * j + 2), alpha1, tOrBuf(4 * j + 2));
      tOrO(4 * j + 3) = fmaf(tOrO(4 * j + 3), alpha1, tOrBuf(4 * j + 3));
    }
  };
  auto tile_scale = [&](int n) { return qk_scale_log2 * k_scale_head[n * 4]; };

  if (n_end > 0) TxBarrier::wait(&ss.bar_q, 0);
  SAGE_TRACE_MARK(1);

  if constexpr (!Traits::kOverlap) {
    // Step 1 schedule: QK, wait, softmax, PV, wait, accumulate (the two consumer warpgroups
    // overlap only by chance).
    for (int n = 0; n < n_end; ++n) {
      const int stage = n % kStages;
      const uint32_t phase = (n / kStages) & 1;
      const float c = tile_scale(n);
      TxBarrier::wait(&ss.bar_k_full[stage], phase);
      issue_qk(stage);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      Barrier::arrive(&ss.bar_k_empty[stage]);
      float sf[64], alpha0, alpha1;
      softmax_tile(n, c, sf, alpha0, alpha1);
      pack_p(sf);
      TxBarrier::wait(&ss.bar_v_full[stage], phase);
      issue_pv(stage);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrBuf);
      Barrier::arrive(&ss.bar_v_empty[stage]);
      accumulate_o(alpha0, alpha1);
    }
  } else if (n_end > 0) {
    // Step 2 schedule (FA3-style):
    //  * intra-warpgroup overlap: QK(n) and PV(n-1) are issued back to back; softmax(n) runs
    //    while PV(n-1) is on the tensor cores (wait<1> = QK(n) done, PV(n-1) may still run).
    //  * ping-pong: a warpgroup issues its GEMMs only after the other one has issued its own
    //    (named barriers), so one warpgroup's softmax overlaps the other's GEMMs.
    // P(n) is packed only after PV(n-1) has finished reading the P registers.
    const int pp_own = kPingPongBarrierBase + cw;
    const int pp_other = kPingPongBarrierBase + (cw ^ 1);
    float sf[64];
    float alpha_prev0, alpha_prev1;  // O rescale that goes with buf = PV(n-1)
    // Consumer warpgroup 0 issues first: warpgroup 1 pre-arrives on its barrier.
    if constexpr (Traits::kPingPong) {
      if (cw == 1) detail::named_barrier_arrive(kPingPongBarrierBase, Traits::kConsumerThreads);
    }
    // Step 4: with kPrefetchKScale the raw K scale of tile n+1 is loaded at the top of tile n
    // (index clamped to the last tile: no branch, never out of bounds).
    float k_scale_next = k_scale_head[0];
    {
      const float c = Traits::kPrefetchKScale ? qk_scale_log2 * k_scale_next : tile_scale(0);
      if constexpr (Traits::kPrefetchKScale) k_scale_next = k_scale_head[min(1, n_end - 1) * 4];
      if constexpr (Traits::kPingPong) detail::named_barrier_sync(pp_own, Traits::kConsumerThreads);
      TxBarrier::wait(&ss.bar_k_full[0], 0);
      issue_qk(0);
      if constexpr (Traits::kPingPong) detail::named_barrier_arrive(pp_other, Traits::kConsumerThreads);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      SAGE_TRACE_MARK(2);
      Barrier::arrive(&ss.bar_k_empty[0]);
      softmax_tile(0, c, sf, alpha_prev0, alpha_prev1);
      pack_p(sf);
      SAGE_TRACE_MARK(3);
    }
    for (int n = 1; n < n_end; ++n) {
      const int stage = n % kStages;
      const uint32_t phase = (n / kStages) & 1;
      const int stage_prev = (n - 1) % kStages;
      const uint32_t phase_prev = ((n - 1) / kStages) & 1;
      const float c = Traits::kPrefetchKScale ? qk_scale_log2 * k_scale_next : tile_scale(n);
      if constexpr (Traits::kPrefetchKScale) k_scale_next = k_scale_head[min(n + 1, n_end - 1) * 4];
      if constexpr (Traits::kPingPong) detail::named_barrier_sync(pp_own, Traits::kConsumerThreads);
      TxBarrier::wait(&ss.bar_k_full[stage], phase);
      issue_qk(stage);
      TxBarrier::wait(&ss.bar_v_full[stage_prev], phase_prev);
      issue_pv(stage_prev);
      if constexpr (Traits::kPingPong) detail::named_barrier_arrive(pp_other, Traits::kConsumerThreads);
      warpgroup_wait<1>();  // QK(n) done
      warpgroup_fence_operand(tSrS);
      Barrier::arrive(&ss.bar_k_empty[stage]);
      float alpha0, alpha1;
      softmax_tile(n, c, sf, alpha0, alpha1);
      // Pin the softmax before the wait: otherwise the compiler sinks the EX2s below it and
      // nothing overlaps PV(n-1).
      if constexpr (Traits::kPinKind == 0) {
        detail::pin_before_wgmma_wait(&ss.pin[threadIdx.x - 128], l_run[0] + l_run[1]);
      } else {
        asm volatile("" : "+f"(l_run[0]), "+f"(l_run[1])::"memory");
      }
      warpgroup_wait<0>();  // PV(n-1) done: buf valid, P registers free
      warpgroup_fence_operand(tOrBuf);
      Barrier::arrive(&ss.bar_v_empty[stage_prev]);
      accumulate_o(alpha_prev0, alpha_prev1);
      pack_p(sf);
      alpha_prev0 = alpha0;
      alpha_prev1 = alpha1;
    }
    {
      const int stage_last = (n_end - 1) % kStages;
      const uint32_t phase_last = ((n_end - 1) / kStages) & 1;
      TxBarrier::wait(&ss.bar_v_full[stage_last], phase_last);
      issue_pv(stage_last);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrBuf);
      Barrier::arrive(&ss.bar_v_empty[stage_last]);
      accumulate_o(alpha_prev0, alpha_prev1);
    }
    // Balance the barriers: warpgroup 1 arrived once more on warpgroup 0's than it synced.
    if constexpr (Traits::kPingPong) {
      if (cw == 0) detail::named_barrier_sync(pp_own, Traits::kConsumerThreads);
    }
  }

  SAGE_TRACE_MARK(4);
  // ---- epilogue: 1/l, V channel scale, store by strides; LSE ----
  // All V scale / mean loads are issued before the first store: interleaved with the stores they
  // were serialized (the compiler may not move a load above a store that could alias it), one L2
  // round trip per 8 channels, ~17k cycles per CTA on an H100 (SAGE_SM90_ATTN_TRACE) = 7 KV tiles.
  const float* vs = a.v_scale + int64_t(bh_kv) * D + 2 * lane_t;
  // V smoothing: the mean is added after normalization; a fully masked row (l == 0) stays 0.
  const float* vm = a.v_mean != nullptr ? a.v_mean + int64_t(bh_kv) * D + 2 * lane_t : nullptr;
  float2 v2[D / 8], m2[D / 8];
  CUTE_UNROLL
  for (int j = 0; j < D / 8; ++j) v2[j] = __ldg(reinterpret_cast<const float2*>(vs + 8 * j));
  CUTE_UNROLL
  for (int j = 0; j < D / 8; ++j) {
    m2[j] = vm != nullptr ? __ldg(reinterpret_cast<const float2*>(vm + 8 * j)) : make_float2(0.f, 0.f);
  }
  const float l0 = detail::quad_sum(l_run[0]);
  const float l1 = detail::quad_sum(l_run[1]);
  // Fully masked row: l == 0 -> output 0 (NaN in l stays NaN).
  const float inv_l0 = l0 == 0.f ? 0.f : 1.f / l0;
  const float inv_l1 = l1 == 0.f ? 0.f : 1.f / l1;
  const float has_l0 = l0 == 0.f ? 0.f : 1.f;
  const float has_l1 = l1 == 0.f ? 0.f : 1.f;
  using OutT = typename Traits::OutTag::T;
  OutT* o_head = static_cast<OutT*>(a.o) + int64_t(batch) * a.o_stride_b + int64_t(head) * a.o_stride_h;
  OutT* o_row0 = o_head + int64_t(grow0) * a.o_stride_s + 2 * lane_t;
  OutT* o_row1 = o_head + int64_t(grow1) * a.o_stride_s + 2 * lane_t;
  const bool write0 = grow0 < a.seq_q;
  const bool write1 = grow1 < a.seq_q;
  CUTE_UNROLL
  for (int j = 0; j < D / 8; ++j) {
    if (write0) {
      *reinterpret_cast<uint32_t*>(o_row0 + 8 * j) =
          Traits::OutTag::pack2(fmaf(m2[j].x, has_l0, tOrO(4 * j + 0) * inv_l0 * v2[j].x),
                                fmaf(m2[j].y, has_l0, tOrO(4 * j + 1) * inv_l0 * v2[j].y));
    }
    if (write1) {
      *reinterpret_cast<uint32_t*>(o_row1 + 8 * j) =
          Traits::OutTag::pack2(fmaf(m2[j].x, has_l1, tOrO(4 * j + 2) * inv_l1 * v2[j].x),
                                fmaf(m2[j].y, has_l1, tOrO(4 * j + 3) * inv_l1 * v2[j].y));
    }
  }
  if (a.lse != nullptr && lane_t == 0) {
    float* lse_head = a.lse + int64_t(batch) * a.lse_stride_b + int64_t(head) * a.lse_stride_h;
    // sum_j 2^{s_j} = l * 2^m / 448  ->  ln(.) = ln2 * (m + log2 l - log2 448)
    if (write0) lse_head[grow0] = l0 == 0.f ? -INFINITY : kLn2 * (m_run[0] + __log2f(l0) - kLog2Fp8E4m3Max);
    if (write1) lse_head[grow1] = l1 == 0.f ? -INFINITY : kLn2 * (m_run[1] + __log2f(l1) - kLog2Fp8E4m3Max);
  }
#if SAGE_SM90_ATTN_TRACE
  SAGE_TRACE_MARK(5);
  if (trace && tid == 0) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    printf("trace blk %d,%d,%d sm %u wg %d n_end %d | init %lld q %lld qk0 %lld sm0 %lld loop %lld end %lld\n",
           blockIdx.x, blockIdx.y, blockIdx.z, smid, cw, n_end, t_mark[0], t_mark[1], t_mark[2], t_mark[3],
           t_mark[4], t_mark[5]);
  }
#endif
#undef SAGE_TRACE_MARK
#else
  SAGE_DEVICE_TRAP_WRONG_ARCH();
#endif
}

// ---- host launcher ---------------------------------------------------------------------------------
template <class Traits>
cudaError_t launch_attn_fwd_sm90_qk_s8_pv_e4m3(const AttnFwdQkS8PvE4m3Args& a, cudaStream_t stream) {
  constexpr int D = Traits::kHeadDim;
  if (a.head_dim != D || a.batch <= 0 || a.heads_q <= 0 || a.heads_kv <= 0 || a.seq_q <= 0 ||
      a.seq_kv <= 0 || a.heads_q % a.heads_kv != 0 || a.heads_q > 65535 || a.batch > 65535 ||
      !(a.sm_scale > 0.f) || a.q == nullptr || a.k == nullptr || a.v_t == nullptr ||
      a.q_scale == nullptr || a.k_scale == nullptr || a.v_scale == nullptr || a.o == nullptr) {
    return cudaErrorInvalidValue;
  }
  AttnFwdSm90KernelParams p{};
  p.a = a;
  p.scale_log2 = a.sm_scale * kLog2e;
  p.num_m_blocks = (a.seq_q + Traits::kBlockQ - 1) / Traits::kBlockQ;
  p.num_n_blocks = (a.seq_kv + Traits::kBlockKV - 1) / Traits::kBlockKV;
  p.q_scale_groups = int(sm90_q_scale_groups(a.seq_q));
  p.k_scale_groups = int(sm90_k_scale_groups(a.seq_kv));
  const uint64_t s_pad = uint64_t(sm90_v_pad(a.seq_kv));
  const uint64_t bh_q = uint64_t(a.batch) * a.heads_q;
  const uint64_t bh_kv = uint64_t(a.batch) * a.heads_kv;
  cudaError_t err;
  err = encode_tma_3d_u8(&p.tma_q, a.q, D, a.seq_q, bh_q, D, uint64_t(a.seq_q) * D, D,
                         Traits::kBlockQ, Traits::kSwizzleQK);
  if (err != cudaSuccess) return err;
  err = encode_tma_3d_u8(&p.tma_k, a.k, D, a.seq_kv, bh_kv, D, uint64_t(a.seq_kv) * D, D,
                         Traits::kBlockKV, Traits::kSwizzleQK);
  if (err != cudaSuccess) return err;
  err = encode_tma_3d_u8(&p.tma_v, a.v_t, s_pad, D, bh_kv, s_pad, s_pad * D, Traits::kBlockKV, D,
                         Traits::kSwizzleV);
  if (err != cudaSuccess) return err;

  auto kernel = attn_fwd_sm90_qk_s8_pv_e4m3_kernel<Traits>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  dim3 grid(p.num_m_blocks, a.heads_q, a.batch);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sage::sm90
