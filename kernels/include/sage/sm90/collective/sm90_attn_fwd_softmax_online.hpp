// Online softmax of the Hopper forward over integer scores, and the register map of a wgmma
// accumulator that it, the masks and the epilogue share.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace sage::sm90 {

inline constexpr float kFp8E4m3Max = 448.f;
inline constexpr float kLog2Fp8E4m3Max = 8.80735492205760410f;  // log2(448)
inline constexpr float kLog2e = 1.44269504088896340f;
inline constexpr float kLn2 = 0.69314718055994531f;

#if defined(__CUDACC__)

// Who holds what in an m64nN wgmma C fragment (CuTe's SM90 GMMA C layout): thread t of the
// warpgroup holds rows row0 = 16*(t/32) + (t%32)/4 and row0 + 8, and in every 8-column group j
// the columns 8j + 2*(t%4) + {0, 1}, at fragment index 4j + 2*half + e (half 1 = row0 + 8).
struct WgmmaAccumMap {
  int row0;
  int col0;
  __device__ explicit WgmmaAccumMap(int tid) : row0(16 * (tid / 32) + (tid % 32) / 4), col0(2 * (tid % 4)) {}
  static constexpr int index(int j, int half, int e) { return 4 * j + 2 * half + e; }
};

namespace detail {

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// The four threads of a quad hold the same two rows.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace detail

// Online softmax for one thread's two rows over s32 score tiles of kBlockKV keys.
// One scale per thread and tile, c = q_scale * k_scale * sm_scale * log2e > 0 (the Q and K
// per-thread or per-block groups make it so), hence the row max is taken on the raw integers and
// scaled once (exact: the conversion and the scaling are monotonic), and each P~ is one FFMA + one
// EX2: P~ = exp2(raw * c - (m - bias)). kE4m3Bias: bias = log2 448, so the row max maps to E4M3's
// 448 (qk_s8_pv_e4m3); else bias 0, P~ <= 1 (train_s8, whose P is quantized per row afterwards).
template <int kBlockKV, bool kE4m3Bias = true>
struct OnlineSoftmaxS32Sm90 {
  static constexpr float kPLog2Bias = kE4m3Bias ? kLog2Fp8E4m3Max : 0.f;
  static constexpr int kScores = kBlockKV / 2;  // per thread and tile: 2 rows x kBlockKV/4 keys
  float m[2] = {-INFINITY, -INFINITY};           // running row max (log2 domain, incl. sm_scale)
  float l[2] = {0.f, 0.f};                       // thread-partial row sums of fp32 P~

  // Tile of raw scores tSrS -> fp32 P~ in sf (accumulator order); updates m, l and returns the
  // rescale factors exp2(m_old - m_new) of the tile's O contribution so far. `masked`
  // (warpgroup-uniform) = the tile crosses s_kv or the causal diagonal: keys above a row's
  // limit (key_lim[half], inclusive) get -inf and MUFU gives exactly 0 for them.
  template <class FragS>
  __device__ __forceinline__ void step(const FragS& tSrS, float c, bool masked, int key_base,
                                       const int (&key_lim)[2], float (&sf)[kScores], float (&alpha)[2]) {
    float mx[2];  // raw row maxima of this thread's columns
    if (masked) {
#pragma unroll
      for (int i = 0; i < kScores; ++i) sf[i] = static_cast<float>(tSrS(i));
#pragma unroll
      for (int j = 0; j < kBlockKV / 8; ++j) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (key_base + 8 * j + e > key_lim[half]) sf[WgmmaAccumMap::index(j, half, e)] = -INFINITY;
          }
        }
      }
      float r0 = fmaxf(sf[0], sf[1]);
      float r1 = fmaxf(sf[2], sf[3]);
#pragma unroll
      for (int j = 1; j < kBlockKV / 8; ++j) {
        r0 = fmaxf(r0, fmaxf(sf[4 * j], sf[4 * j + 1]));
        r1 = fmaxf(r1, fmaxf(sf[4 * j + 2], sf[4 * j + 3]));
      }
      mx[0] = r0;
      mx[1] = r1;
    } else {
      // 3-input integer max (sm_90 DPX VIMNMX3): half the instructions of pairwise FMNMX.
      // Exact: |raw| <= 127*127*d < 2^24 converts to float exactly and monotonically.
      // Both rows' chains in one loop and the conversions after them: ptxas then interleaves the
      // conversions with the chains' latency (written row by row, it did not: -5 % at d=128).
      int r0 = max(tSrS(0), tSrS(1));
      int r1 = max(tSrS(2), tSrS(3));
#pragma unroll
      for (int j = 1; j < kBlockKV / 8; ++j) {
        r0 = __vimax3_s32(r0, tSrS(4 * j), tSrS(4 * j + 1));
        r1 = __vimax3_s32(r1, tSrS(4 * j + 2), tSrS(4 * j + 3));
      }
#pragma unroll
      for (int i = 0; i < kScores; ++i) sf[i] = static_cast<float>(tSrS(i));
      mx[0] = static_cast<float>(r0);
      mx[1] = static_cast<float>(r1);
    }
    float neg_off[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // c differs between the threads of a quad (each owns another K scale group): scale first,
      // so all four share one running max.
      const float m_new = fmaxf(m[half], detail::quad_max(mx[half] * c));
      // A row with no visible key so far keeps m = -inf; use 0 so no (-inf) - (-inf) appears.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[half] = detail::ex2_approx(m[half] - m_use);
      m[half] = m_new;
      neg_off[half] = kPLog2Bias - m_use;
    }
    float ps[2];
#pragma unroll
    for (int j = 0; j < kBlockKV / 8; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = WgmmaAccumMap::index(j, half, 0);
        sf[i] = detail::ex2_approx(fmaf(sf[i], c, neg_off[half]));
        sf[i + 1] = detail::ex2_approx(fmaf(sf[i + 1], c, neg_off[half]));
        const float pair = sf[i] + sf[i + 1];
        ps[half] = j == 0 ? pair : ps[half] + pair;
      }
    }
    l[0] = fmaf(l[0], alpha[0], ps[0]);
    l[1] = fmaf(l[1], alpha[1], ps[1]);
  }

  // Whole-row sum of P~ (all four threads of the quad return it).
  __device__ __forceinline__ float row_sum(int half) const { return detail::quad_sum(l[half]); }

  // Natural-log LSE of the scaled scores from the whole-row sum: sum_j 2^{s_j} = l * 2^m / 2^bias.
  __device__ __forceinline__ float lse(int half, float row_l) const {
    return row_l == 0.f ? -INFINITY : kLn2 * (m[half] + __log2f(row_l) - kPLog2Bias);
  }
};

#endif  // __CUDACC__

}  // namespace sage::sm90
