// Fused quantization of Q, K, V for the Hopper `qk_s8_pv_e4m3` attention
// (sm90_attn_fwd_qk_s8_pv_e4m3_kernel.cuh). Plain CUDA (no wgmma); built with the sm90 family.
//
// Three launches, two when s_kv <= 2048 (F folded into B); no host synchronization, deterministic
// (fixed reduction orders):
//   A. stats_and_q      : grid [n_stats stats CTAs | q_jobs Q-tile CTAs]. Q needs no statistics, so
//                         its tiles are quantized in the same launch as the K/V statistics and the
//                         two overlap (the Q traffic hides under the stats pass, not after it).
//                         Stats CTA = (b, kv head, 512-token chunk): fp32 sum of K (not even read
//                         when k_mean is given), sum / max / min of V per channel -> workspace.
//                         Q tile CTA = 128 tokens of one (b, q head): int8 per-thread groups
//                         (t//16)*8 + t%8.
//   F. kv_stats_finalize: grid (b*h_kv). k_mean = (sum of the chunk sums, in chunk order) / s_kv
//                         (skipped when the caller gives k_mean); V smoothing (v_mean != nullptr):
//                         v_mean likewise (unless given), else v_mean = 0;
//                         v_scale = max(vmax - v_mean, v_mean - vmin) / 448 (1 if 0).
//                         That is exactly amax_t |fl(V - v_mean)|: fp32 subtraction of a constant
//                         is monotonic, so the extremes of fl(v - m) are fl(vmax - m), fl(vmin - m),
//                         and negation is exact. Without smoothing it is amax|V| as before.
//                         s_kv <= 2048 (<= 4 chunks): not launched; every B CTA does this for its
//                         (b, kv head) into shared memory (same function, bit-identical), V tile 0
//                         also writes k_mean / v_mean / v_scale for the attention kernel. It saves
//                         a launch where the call is launch-bound; the partials are only 4 rows.
//   B. kv_tiles         : one CTA per 128-token tile of V or of K:
//                         K int8 per-thread groups (t//128)*4 + (t%8)//2 of K - k_mean,
//                         V E4M3 per channel of V - v_mean, transposed to (d, s_pad) and permuted
//                         inside every 32-token chunk (v_e4m3_t_perm32 in quant-formats.md), padding 0.
// Bytes per element: Q 2 read + 1 written; K and V 2 + 2 read (stats, tiles) + 1 written.
//
// Input head dim d_in < D (QuantQkvSm90Args::head_dim_in, a multiple of 8): the lanes of channels
// c8 * 8 >= d_in do not load, they take zeros exactly as tokens past the end do, so every output
// (codes, scales, k_mean, v_mean, v_scale) is bit for bit that of the input zero-padded to D: a
// zero channel sums to 0 (k_mean 0, v_mean 0), its max / min are 0 (v_scale 1), its codes are 0,
// and it adds 0 to every amax. 2 * d_in instead of 2 * D bytes are read per row, nothing is copied.
//
// Bandwidth: every input access is a 16-byte ld.global.nc (no L1 allocation), a warp reads whole
// 128-byte lines; V^T leaves through a conflict-free swizzled smem transpose as 16-byte stores;
// Q/K as 8-byte stores (a warp writes 256 contiguous bytes). Tiles keep their input packed
// (fp16/bf16) in registers and convert it twice (amax pass, quantize pass): fewer registers,
// more CTAs per SM, more bytes in flight.
//
// Arithmetic is exactly the contract (docs/design/quant-formats.md): fp32 from the exact input,
// one fp32 subtraction for smoothing, IEEE division, round-half-even, clamp to 127;
// E4M3 by cvt.rn.satfinite. Max is NaN-propagating so a non-finite group gets a non-finite scale.
// Division without __fdiv_rn's per-element cost: a scale s is shared by a whole group, so each
// thread takes y = rcp.rn(s) once and per element q0 = x*y and two corrections
// q <- fma(fma(-s, q, x), y, q). With y = RN(1/s) and q faithful, the last correction returns
// RN(x / s) (Markstein's theorem): bit for bit the IEEE quotient. Used only for s in [2^-64, 2^64]
// (no intermediate under/overflow where a quotient can reach a nonzero code; quotients below 2^-30
// give code 0 either way; E4M3 takes the sign of x, as IEEE division does for +-0). Any other s
// (tiny, huge, inf, NaN) takes __fdiv_rn. Checked on the CPU with fmaf against x / s: 0 mismatches
// over 4.6e8 quotients, several binades exhaustively (the helper's check program, see the perf doc).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sage/sm90/sm90_attn_fwd_qk_s8_pv_e4m3_params.hpp"
#include "sage/common/cvt_e4m3.cuh"
#include "sage/common/div_rn.cuh"

namespace sage::sm90 {
namespace quant_detail {

inline constexpr int kThreads = 256;
inline constexpr int kTile = 128;          // tokens per quantization tile (= attention KV tile)
inline constexpr float kInt8Max = 127.f;
inline constexpr float kE4m3Max = 448.f;
inline constexpr int kStatsArrays = 4;     // workspace planes: K sum, V sum, V max, V min
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kStatsUnroll = 4;     // tokens per thread in flight in the stats loop (x2 for K+V)
// Up to this many statistics chunks, pass B finalizes the statistics itself (no pass F launch).
inline constexpr int kFusedFinalizeMaxChunks = 4;
static_assert(kFusedFinalizeMaxChunks * kSm90StatsChunk == 2048, "the file comment says s_kv <= 2048");
// Scales inside [kDivRnFastMin, kDivRnFastMax] use the reciprocal + 2 corrections division
// (sage/common/div_rn.cuh).
using ::sage::div_rn_fast;
using ::sage::kRoundMagic;
using ::sage::pack_low_bytes;

struct InF16 {
  using T = __half;
  static __device__ __forceinline__ float2 to_f2(uint32_t w) {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
};
struct InBF16 {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float2 to_f2(uint32_t w) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
  }
};

__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float min_nan(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// 16 bytes of read-once input: non-coherent path, no L1 allocation (nothing is re-read by the CTA).
__device__ __forceinline__ uint4 ldg_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// 8 packed fp16/bf16 (one 16-byte vector) -> fp32, exact.
template <class InTag>
__device__ __forceinline__ void cvt8(const uint4& w, float (&x)[8]) {
  float2 f;
  f = InTag::to_f2(w.x); x[0] = f.x; x[1] = f.y;
  f = InTag::to_f2(w.y); x[2] = f.x; x[3] = f.y;
  f = InTag::to_f2(w.z); x[4] = f.x; x[5] = f.y;
  f = InTag::to_f2(w.w); x[6] = f.x; x[7] = f.y;
}

__device__ __forceinline__ float int8_scale(float amax) { return amax == 0.f ? 1.f : __fdiv_rn(amax, kInt8Max); }

// The contract's int8 code through __fdiv_rn (slow path: scales outside the fast-division range).
__device__ __forceinline__ int quant_s8(float x, float s) {
  const float y = __fdiv_rn(x, s);
  if (y != y) return 0;  // NaN: the reference picks 0 (values of a non-finite group are unspecified)
  const int q = __float2int_rn(y);
  return q > 127 ? 127 : (q < -127 ? -127 : q);
}

__device__ __forceinline__ bool fast_div_ok(float s) { return ::sage::div_rn_fast_ok(s); }

// Eight int8 codes of x / s (s > 0 or non-finite) as 8 bytes.
__device__ __forceinline__ uint2 quant8_s8(const float (&x)[8], float s, float y, bool fast) {
  uint32_t c[8];
  if (fast) {
    // |x / s| <= 127 * (1 + 2^-23) here (|x| <= amax of the group, s = RN(amax / 127)): no clamp
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = __float_as_uint(__fadd_rn(div_rn_fast(x[i], s, y), kRoundMagic));
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = uint32_t(quant_s8(x[i], s));
  }
  return make_uint2(pack_low_bytes(c[0], c[1], c[2], c[3]), pack_low_bytes(c[4], c[5], c[6], c[7]));
}

using ::sage::pack_e4m3x4;  // sage/common/cvt_e4m3.cuh

// Per-thread token layout of the stats and Q/K passes: kThreadsPerToken adjacent lanes read one
// token (16 bytes each), a warp covers whole tokens.
template <int D>
struct Layout {
  static constexpr int kThreadsPerToken = D / 8;                       // 16 B of input each
  static constexpr int kTokensPerPass = kThreads / kThreadsPerToken;   // 16 (d=128) / 32 (d=64)
  static constexpr int kPasses = kTile / kTokensPerPass;               // 8 / 4
  static constexpr int kTokensPerWarp = 32 / kThreadsPerToken;         // 2 / 4
};

// Shared memory of the fused kernels (one role per CTA, so the roles share one buffer).
template <int D>
struct SmemStats {
  float red[kStatsArrays][kWarps][D];  // per-warp partials, reduced in warp order (deterministic)
};
struct SmemQK {
  float tok_amax[kTile];
  float grp_amax[4];
};
template <int D>
struct SmemV {
  // Transposed E4M3 tile: D channel rows of 32 words (128 tokens in permuted order). Word w of
  // channel c sits at column w ^ (4 * ((c / 8) % 8)): conflict-free 4-byte stores by the
  // (channel, quad) layout of v_tile and conflict-free 16-byte loads by rows (the XOR moves whole
  // 16-byte blocks, so a block's words stay in order).
  uint32_t v_tr[D][32];
};
template <int D>
union SmemA {
  SmemStats<D> stats;
  SmemQK qk;
};
template <int D>
union SmemB {
  SmemV<D> v;
  SmemQK qk;
};
// Finalized statistics of one (b, kv head) in the fused kv_tiles path. Outside SmemB: some threads
// still read them while others already write the tile's buffer.
template <int D>
struct SmemKvStats {
  float k_mean[D];
  float v_mean[D];
  float v_scale[D];
};

// ---- stats (pass A, stats CTAs) ----------------------------------------------------------------
template <class InTag, int D>
__device__ __forceinline__ void kv_stats_chunk(const QuantQkvSm90Args& a, int n_chunks, int job, SmemStats<D>& sm) {
  using L = Layout<D>;
  const int chunk = job % n_chunks;
  const int bh = job / n_chunks;
  const int b = bh / a.heads_kv, h = bh % a.heads_kv;
  const int c8 = threadIdx.x % L::kThreadsPerToken;
  const int r = threadIdx.x / L::kThreadsPerToken;
  const bool want_k = !a.k_mean_given;  // a given k_mean: K is not read at all
  const bool ch_in = c8 * 8 < a.head_dim_in;  // channels past the input head dim read as zeros
  const char* kp = static_cast<const char*>(a.k) +
                   (int64_t(b) * a.k_stride_b + int64_t(h) * a.k_stride_h + c8 * 8) * 2;
  const char* vp = static_cast<const char*>(a.v) +
                   (int64_t(b) * a.v_stride_b + int64_t(h) * a.v_stride_h + c8 * 8) * 2;
  float ksum[8], vsum[8], vmax[8], vmin[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) ksum[i] = 0.f, vsum[i] = 0.f, vmax[i] = -INFINITY, vmin[i] = INFINITY;
  const int t_end = min(a.seq_kv, (chunk + 1) * kSm90StatsChunk);
  // kStatsUnroll tokens per thread per step, all loads issued before any use.
  for (int t = chunk * kSm90StatsChunk + r; t < t_end; t += kStatsUnroll * L::kTokensPerPass) {
    uint4 wk[kStatsUnroll], wv[kStatsUnroll];
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      const int tt = t + u * L::kTokensPerPass;
      if (tt < t_end) {
        if (want_k) wk[u] = ch_in ? ldg_stream16(kp + int64_t(tt) * a.k_stride_s * 2) : make_uint4(0u, 0u, 0u, 0u);
        wv[u] = ch_in ? ldg_stream16(vp + int64_t(tt) * a.v_stride_s * 2) : make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      if (t + u * L::kTokensPerPass < t_end) {
        float xv[8];
        cvt8<InTag>(wv[u], xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          vsum[i] += xv[i];
          vmax[i] = max_nan(vmax[i], xv[i]);
          vmin[i] = min_nan(vmin[i], xv[i]);
        }
        if (want_k) {
          float xk[8];
          cvt8<InTag>(wk[u], xk);
#pragma unroll
          for (int i = 0; i < 8; ++i) ksum[i] += xk[i];
        }
      }
    }
  }
  // Reduce the token rows of a warp (lanes differing in the bits above c8), fixed order.
#pragma unroll
  for (int off = L::kThreadsPerToken; off < 32; off *= 2) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      ksum[i] += __shfl_xor_sync(0xffffffffu, ksum[i], off);
      vsum[i] += __shfl_xor_sync(0xffffffffu, vsum[i], off);
      vmax[i] = max_nan(vmax[i], __shfl_xor_sync(0xffffffffu, vmax[i], off));
      vmin[i] = min_nan(vmin[i], __shfl_xor_sync(0xffffffffu, vmin[i], off));
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane < L::kThreadsPerToken) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      sm.red[0][warp][c8 * 8 + i] = ksum[i];
      sm.red[1][warp][c8 * 8 + i] = vsum[i];
      sm.red[2][warp][c8 * 8 + i] = vmax[i];
      sm.red[3][warp][c8 * 8 + i] = vmin[i];
    }
  }
  __syncthreads();
  if (threadIdx.x < D) {
    // Rows without a token in a short chunk hold the neutral values (0, 0, -inf, +inf).
    const int c = threadIdx.x;
    float ks = 0.f, vs = 0.f, mx = -INFINITY, mn = INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      ks += sm.red[0][w][c];
      vs += sm.red[1][w][c];
      mx = max_nan(mx, sm.red[2][w][c]);
      mn = min_nan(mn, sm.red[3][w][c]);
    }
    const int64_t n_part = int64_t(a.batch) * a.heads_kv * n_chunks * D;
    const int64_t idx = (int64_t(bh) * n_chunks + chunk) * D + c;
    a.workspace[idx] = ks;
    a.workspace[n_part + idx] = vs;
    a.workspace[2 * n_part + idx] = mx;
    a.workspace[3 * n_part + idx] = mn;
  }
}

// ---- finalized statistics (pass F, or folded into pass B) ---------------------------------------
// Pass F's arithmetic for channel c of (b, kv head) bh, from the n_chunks workspace partials in
// chunk order. want_k: k_mean; want_v: v_mean (0 without smoothing, read when given) and v_scale.
// kMaxChunks > 0 promises n_chunks <= kMaxChunks: all loads are issued before the first sum
// (one L2 round trip, not n_chunks); 0: any n_chunks. The order of the sums is the same.
template <int D, int kMaxChunks>
__device__ __forceinline__ void kv_stats_finalize_channel(const QuantQkvSm90Args& a, int n_chunks, int bh, int c,
                                                          bool want_k, bool want_v, float& k_mean, float& v_mean,
                                                          float& v_scale) {
  constexpr int kStep = kMaxChunks > 0 ? kMaxChunks : 1;
  const int ch_end = kMaxChunks > 0 ? kMaxChunks : n_chunks;  // a constant bound: one pass, unrolled
  const int64_t n_part = int64_t(a.batch) * a.heads_kv * n_chunks * D;
  float ks = 0.f, vs = 0.f, mx = -INFINITY, mn = INFINITY;
  for (int ch0 = 0; ch0 < ch_end; ch0 += kStep) {
    float pk[kStep], pv[kStep], px[kStep], pn[kStep];
#pragma unroll
    for (int u = 0; u < kStep; ++u) {
      const int64_t idx = (int64_t(bh) * n_chunks + ch0 + u) * D + c;
      if (ch0 + u < n_chunks) {
        if (want_k) pk[u] = a.workspace[idx];
        if (want_v) {
          pv[u] = a.workspace[n_part + idx];
          px[u] = a.workspace[2 * n_part + idx];
          pn[u] = a.workspace[3 * n_part + idx];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kStep; ++u) {
      if (ch0 + u < n_chunks) {
        if (want_k) ks += pk[u];
        if (want_v) {
          vs += pv[u];
          mx = max_nan(mx, px[u]);
          mn = min_nan(mn, pn[u]);
        }
      }
    }
  }
  const int64_t o = int64_t(bh) * D + c;
  k_mean = __fdiv_rn(ks, float(a.seq_kv));
  float vm = 0.f;  // no V smoothing: amax = max(vmax, -vmin) = amax|V|
  if (want_v && a.v_mean != nullptr) vm = a.v_mean_given ? a.v_mean[o] : __fdiv_rn(vs, float(a.seq_kv));
  v_mean = vm;
  // amax_t |fl(v - vm)| (see the file comment); every channel has >= 1 token, so mx, mn are finite
  // or NaN here, never the +-inf initial values.
  const float amax = max_nan(__fsub_rn(mx, vm), __fsub_rn(vm, mn));
  v_scale = amax == 0.f ? 1.f : __fdiv_rn(amax, kE4m3Max);
}

// Where pass B finds a (b, kv head)'s statistics: rows of D floats (v_mean only with smoothing).
// fetch() runs after a tile issued its input loads, so its latency hides under theirs.
// Three-launch path: pass F wrote them to global.
template <int D>
struct KvStatsGlobal {
  __device__ __forceinline__ void fetch(const QuantQkvSm90Args&, int, bool, bool) const {}
  __device__ __forceinline__ const float* k_mean(const QuantQkvSm90Args& a, int bh) const {
    return a.k_mean + int64_t(bh) * D;
  }
  __device__ __forceinline__ const float* v_mean(const QuantQkvSm90Args& a, int bh) const {
    return a.v_mean + int64_t(bh) * D;
  }
  __device__ __forceinline__ const float* v_scale(const QuantQkvSm90Args& a, int bh) const {
    return a.v_scale + int64_t(bh) * D;
  }
};

// Two-launch path (n_chunks <= kFusedFinalizeMaxChunks): every CTA finalizes its own (b, kv head)
// into shared memory (a K tile needs k_mean, a V tile v_mean and v_scale), the owner (V tile 0)
// also writes them to global for the attention kernel. No CTA of this launch reads them from
// global, so there is no ordering between CTAs.
template <int D>
struct KvStatsFused {
  SmemKvStats<D>* sm;
  int n_chunks;
  __device__ __forceinline__ void fetch(const QuantQkvSm90Args& a, int bh, bool is_v, bool owner) const {
    if (threadIdx.x < D) {
      const int c = threadIdx.x;
      const int64_t o = int64_t(bh) * D + c;
      const bool want_k = !a.k_mean_given && (!is_v || owner);
      float km, vm, vsc;
      kv_stats_finalize_channel<D, kFusedFinalizeMaxChunks>(a, n_chunks, bh, c, want_k, is_v, km, vm, vsc);
      if (!is_v) {
        sm->k_mean[c] = a.k_mean_given ? a.k_mean[o] : km;
      } else {
        sm->v_mean[c] = vm;
        sm->v_scale[c] = vsc;
        if (owner) {
          if (want_k) a.k_mean[o] = km;
          if (a.v_mean != nullptr && !a.v_mean_given) a.v_mean[o] = vm;
          a.v_scale[o] = vsc;
        }
      }
    }
    __syncthreads();
  }
  __device__ __forceinline__ const float* k_mean(const QuantQkvSm90Args&, int) const { return sm->k_mean; }
  __device__ __forceinline__ const float* v_mean(const QuantQkvSm90Args&, int) const { return sm->v_mean; }
  __device__ __forceinline__ const float* v_scale(const QuantQkvSm90Args&, int) const { return sm->v_scale; }
};

// ---- Q / K tiles (pass A: Q, pass B: K) --------------------------------------------------------
// Per-token amax of |x| over the D channels (the kThreadsPerToken lanes of a token are adjacent).
template <int D>
__device__ __forceinline__ float token_amax(const float (&x)[8]) {
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = max_nan(m, fabsf(x[i]));
#pragma unroll
  for (int off = Layout<D>::kThreadsPerToken / 2; off > 0; off /= 2) {
    m = max_nan(m, __shfl_xor_sync(0xffffffffu, m, off));
  }
  return m;
}

// kIsK: K (subtract k_mean, groups over the 128-token tile); else Q (16-row MMA-tile groups).
template <class InTag, int D, bool kIsK, class Stats = KvStatsGlobal<D>>
__device__ __forceinline__ void qk_tile(const QuantQkvSm90Args& a, int job, SmemQK& sm, const Stats& stats = {}) {
  using L = Layout<D>;
  const int c8 = threadIdx.x % L::kThreadsPerToken;
  const int r = threadIdx.x / L::kThreadsPerToken;
  const int heads = kIsK ? a.heads_kv : a.heads_q;
  const int seq = kIsK ? a.seq_kv : a.seq_q;
  const int n_tiles = (seq + kTile - 1) / kTile;
  const int tile = job % n_tiles;
  const int bh = job / n_tiles;
  const int b = bh / heads, h = bh % heads;
  const int t0 = tile * kTile;
  const void* src = kIsK ? a.k : a.q;
  const int64_t sb = kIsK ? a.k_stride_b : a.q_stride_b;
  const int64_t sh = kIsK ? a.k_stride_h : a.q_stride_h;
  const int64_t st = kIsK ? a.k_stride_s : a.q_stride_s;
  const char* base = static_cast<const char*>(src) + (int64_t(b) * sb + int64_t(h) * sh + c8 * 8) * 2;

  // All loads first (kPasses x 16 bytes per thread in flight), kept packed. Tokens past the end
  // and channels past the input head dim read as zeros.
  const bool ch_in = c8 * 8 < a.head_dim_in;
  uint4 w[L::kPasses];
#pragma unroll
  for (int p = 0; p < L::kPasses; ++p) {
    const int t = t0 + p * L::kTokensPerPass + r;
    w[p] = t < seq && ch_in ? ldg_stream16(base + int64_t(t) * st * 2) : make_uint4(0u, 0u, 0u, 0u);
  }
  float mean[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) mean[i] = 0.f;
  if (kIsK) {
    stats.fetch(a, bh, false, false);
    const float4* mp = reinterpret_cast<const float4*>(stats.k_mean(a, bh) + c8 * 8);
    const float4 m0 = mp[0], m1 = mp[1];
    mean[0] = m0.x, mean[1] = m0.y, mean[2] = m0.z, mean[3] = m0.w;
    mean[4] = m1.x, mean[5] = m1.y, mean[6] = m1.z, mean[7] = m1.w;
  }
  auto load_x = [&](int p, float (&x)[8]) {
    cvt8<InTag>(w[p], x);
    if (kIsK) {
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = __fsub_rn(x[i], mean[i]);
    }
  };

#pragma unroll
  for (int p = 0; p < L::kPasses; ++p) {
    float x[8];
    load_x(p, x);
    float m = token_amax<D>(x);
    if (t0 + p * L::kTokensPerPass + r >= seq) m = 0.f;  // padding tokens never change an amax
    if (c8 == 0) sm.tok_amax[p * L::kTokensPerPass + r] = m;
  }
  __syncthreads();
  if (kIsK) {
    if (threadIdx.x < 4) {
      // K group j of this tile: tokens 8i + 2j + e, i < 16, e < 2
      const int j = threadIdx.x;
      float m = 0.f;
      for (int i = 0; i < kTile / 8; ++i) {
        m = max_nan(m, max_nan(sm.tok_amax[8 * i + 2 * j], sm.tok_amax[8 * i + 2 * j + 1]));
      }
      sm.grp_amax[j] = m;
      a.k_scale[int64_t(bh) * sm90_k_scale_groups(a.seq_kv) + tile * 4 + j] = int8_scale(m);
    }
    __syncthreads();
  }

  // Hide the packed input from the optimizer so it converts again here instead of keeping all
  // kPasses x 8 fp32 values of the amax pass alive across the barrier (that costs 2x the registers).
#pragma unroll
  for (int p = 0; p < L::kPasses; ++p) {
    asm volatile("" : "+r"(w[p].x), "+r"(w[p].y), "+r"(w[p].z), "+r"(w[p].w));
  }
  int8_t* out = (kIsK ? a.k_out : a.q_out) + (int64_t(bh) * seq + t0) * D + c8 * 8;
  // K: a thread's tokens are all r (mod 8), i.e. one group: one scale, one reciprocal.
  float s = 0.f, y = 0.f;
  bool fast = false;
  if (kIsK) {
    s = int8_scale(sm.grp_amax[(r % 8) / 2]);
    fast = fast_div_ok(s);
    y = __frcp_rn(s);
  }
  const int64_t q_groups = sm90_q_scale_groups(a.seq_q);
#pragma unroll
  for (int p = 0; p < L::kPasses; ++p) {
    const int tt = p * L::kTokensPerPass + r;
    if (!kIsK) {
      // Q group of token tt: rows tt and tt ^ 8 of its 16-row block
      s = int8_scale(max_nan(sm.tok_amax[tt], sm.tok_amax[tt ^ 8]));
      fast = fast_div_ok(s);
      y = __frcp_rn(s);
      const int64_t g = int64_t(t0 + tt) / 16 * 8 + tt % 8;
      if (c8 == 0 && (tt & 8) == 0 && g < q_groups) a.q_scale[int64_t(bh) * q_groups + g] = s;
    }
    if (t0 + tt < seq) {
      float x[8];
      load_x(p, x);
      *reinterpret_cast<uint2*>(out + int64_t(tt) * D) = quant8_s8(x, s, y, fast);
    }
  }
}

// ---- V tile (pass B) ---------------------------------------------------------------------------
// Thread layout: a "quad" q (0..31) is the 4 tokens {T, T+1, T+8, T+9}, T = 16(q/4) + 2(q%4), that
// v_e4m3_t_perm32 stores at positions 4q..4q+3 (pi(4q + e) = T + {0, 1, 8, 9}[e]): one 32-bit word
// per channel. A thread owns kQuads quads x 8 channels (c8); a warp covers 8 c8 (a 128-byte half
// row at d=128) x 4 quads, so each 16-byte load instruction of a warp reads 4 whole 128-byte lines.
template <class InTag, int D, class Stats>
__device__ __forceinline__ void v_tile(const QuantQkvSm90Args& a, int job, SmemV<D>& sm, const Stats& stats) {
  constexpr int kHalves = D / 64;                   // c8 groups of 8 (128-byte half rows)
  constexpr int kQuadStride = 32 / kHalves;         // quads covered by all warps of one half
  constexpr int kQuads = kHalves;                   // quads per thread
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c8 = 8 * (warp % kHalves) + (lane & 7);
  const int quad0 = 4 * (warp / kHalves) + (lane >> 3);

  const int n_tiles = (a.seq_kv + kTile - 1) / kTile;
  const int tile = job % n_tiles;
  const int bh = job / n_tiles;
  const int b = bh / a.heads_kv, h = bh % a.heads_kv;
  const int t0 = tile * kTile;
  const char* base = static_cast<const char*>(a.v) +
                     (int64_t(b) * a.v_stride_b + int64_t(h) * a.v_stride_h + c8 * 8) * 2;

  const bool ch_in = c8 * 8 < a.head_dim_in;  // channels past the input head dim read as zeros
  uint4 w[kQuads][4];
#pragma unroll
  for (int j = 0; j < kQuads; ++j) {
    const int q = quad0 + j * kQuadStride;
    const int tq = 16 * (q >> 2) + 2 * (q & 3);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = t0 + tq + (e & 1) + 8 * (e >> 1);
      w[j][e] = t < a.seq_kv && ch_in ? ldg_stream16(base + int64_t(t) * a.v_stride_s * 2)
                                      : make_uint4(0u, 0u, 0u, 0u);
    }
  }
  // Per-channel constants: v_mean (0 without smoothing: x - 0 == x exactly, also -0 and NaN),
  // v_scale and its reciprocal.
  float mean[8], sc[8], rc[8];
  bool fast = true;
  {
    stats.fetch(a, bh, true, tile == 0);
    const float4* sp = reinterpret_cast<const float4*>(stats.v_scale(a, bh) + c8 * 8);
    const float4 s0 = sp[0], s1 = sp[1];
    sc[0] = s0.x, sc[1] = s0.y, sc[2] = s0.z, sc[3] = s0.w;
    sc[4] = s1.x, sc[5] = s1.y, sc[6] = s1.z, sc[7] = s1.w;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      fast = fast && fast_div_ok(sc[i]);
      rc[i] = __frcp_rn(sc[i]);
      mean[i] = 0.f;
    }
    if (a.v_mean != nullptr) {
      const float4* mp = reinterpret_cast<const float4*>(stats.v_mean(a, bh) + c8 * 8);
      const float4 m0 = mp[0], m1 = mp[1];
      mean[0] = m0.x, mean[1] = m0.y, mean[2] = m0.z, mean[3] = m0.w;
      mean[4] = m1.x, mean[5] = m1.y, mean[6] = m1.z, mean[7] = m1.w;
    }
  }

#pragma unroll
  for (int j = 0; j < kQuads; ++j) {
    const int q = quad0 + j * kQuadStride;
    const int tq = t0 + 16 * (q >> 2) + 2 * (q & 3);
    // padding tokens are code 0 even if a scale is non-finite
    uint32_t keep = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) keep |= (tq + (e & 1) + 8 * (e >> 1) < a.seq_kv ? 0xffu : 0u) << (8 * e);
    const int col = q ^ (4 * (c8 & 7));
    // Channel pair by channel pair: only 4 tokens x 2 channels live in fp32 (registers: the packed
    // input, the per-channel constants and little else).
#pragma unroll
    for (int i2 = 0; i2 < 4; ++i2) {
      float x[4][2];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t wv = i2 == 0 ? w[j][e].x : (i2 == 1 ? w[j][e].y : (i2 == 2 ? w[j][e].z : w[j][e].w));
        const float2 f = InTag::to_f2(wv);
        x[e][0] = f.x;
        x[e][1] = f.y;
      }
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int i = 2 * i2 + k;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float d = __fsub_rn(x[e][k], mean[i]);
          if (fast) {
            // IEEE division gives +-0 the sign of d; the corrections may turn -0 into +0
            const float qv = div_rn_fast(d, sc[i], rc[i]);
            x[e][k] = __uint_as_float((__float_as_uint(qv) & 0x7fffffffu) | (__float_as_uint(d) & 0x80000000u));
          } else {
            x[e][k] = __fdiv_rn(d, sc[i]);
          }
        }
        sm.v_tr[c8 * 8 + i][col] = pack_e4m3x4(x[0][k], x[1][k], x[2][k], x[3][k]) & keep;
      }
    }
  }
  __syncthreads();
  // 16-byte stores: 8 threads per 128-byte channel row of the tile.
  const int64_t s_pad = sm90_v_pad(a.seq_kv);
  uint8_t* out = a.v_out + int64_t(bh) * D * s_pad + t0;
#pragma unroll
  for (int pass = 0; pass < D / (kThreads / 8); ++pass) {
    const int c = pass * (kThreads / 8) + threadIdx.x / 8;
    const int m = threadIdx.x % 8;
    const uint4 v = *reinterpret_cast<const uint4*>(&sm.v_tr[c][4 * (m ^ ((c / 8) & 7))]);
    *reinterpret_cast<uint4*>(out + int64_t(c) * s_pad + 16 * m) = v;
  }
}

// ---- kernels -----------------------------------------------------------------------------------
// Pass A: [n_stats K/V statistics CTAs | Q tiles]. Stats CTAs (larger) come first.
template <class InTag, int D>
__global__ void __launch_bounds__(kThreads, 3)
    stats_and_q_kernel(const QuantQkvSm90Args a, int n_chunks, int n_stats) {
  __shared__ __align__(16) SmemA<D> sm;
  const int job = blockIdx.x;
  if (job < n_stats) {
    kv_stats_chunk<InTag, D>(a, n_chunks, job, sm.stats);
  } else {
    qk_tile<InTag, D, false>(a, job - n_stats, sm.qk);
  }
}

// Pass F (only when n_chunks > kFusedFinalizeMaxChunks).
template <int D>
__global__ void __launch_bounds__(D) kv_stats_finalize_kernel(const QuantQkvSm90Args a, int n_chunks) {
  const int bh = blockIdx.x;
  const int c = threadIdx.x;
  float km, vm, vsc;
  kv_stats_finalize_channel<D, 0>(a, n_chunks, bh, c, true, true, km, vm, vsc);
  const int64_t o = int64_t(bh) * D + c;
  if (!a.k_mean_given) a.k_mean[o] = km;
  if (a.v_mean != nullptr && !a.v_mean_given) a.v_mean[o] = vm;
  a.v_scale[o] = vsc;
}

// Pass B: [V tiles | K tiles]. kFused: the statistics are finalized here (no pass F).
template <class InTag, int D, bool kFused>
__global__ void __launch_bounds__(kThreads, 3) kv_tiles_kernel(const QuantQkvSm90Args a, int kv_jobs, int n_chunks) {
  __shared__ __align__(16) SmemB<D> sm;
  const int job = blockIdx.x;
  if constexpr (kFused) {
    __shared__ __align__(16) SmemKvStats<D> st;
    const KvStatsFused<D> stats{&st, n_chunks};
    if (job < kv_jobs) {
      v_tile<InTag, D>(a, job, sm.v, stats);
    } else {
      qk_tile<InTag, D, true>(a, job - kv_jobs, sm.qk, stats);
    }
  } else {
    if (job < kv_jobs) {
      v_tile<InTag, D>(a, job, sm.v, KvStatsGlobal<D>{});
    } else {
      qk_tile<InTag, D, true>(a, job - kv_jobs, sm.qk);
    }
  }
}

template <class InTag, int D>
cudaError_t launch_quant_qkv_sm90(const QuantQkvSm90Args& a, cudaStream_t stream) {
  const int64_t n_chunks = sm90_stats_chunks(a.seq_kv);
  const int64_t bh_kv = int64_t(a.batch) * a.heads_kv;
  const int64_t n_stats = n_chunks * bh_kv;
  const int64_t q_jobs = int64_t(a.batch) * a.heads_q * ((a.seq_q + kTile - 1) / kTile);
  const int64_t kv_jobs = bh_kv * ((a.seq_kv + kTile - 1) / kTile);
  if (n_stats + q_jobs > 0x7fffffff || 2 * kv_jobs > 0x7fffffff) return cudaErrorInvalidValue;
  stats_and_q_kernel<InTag, D><<<unsigned(n_stats + q_jobs), kThreads, 0, stream>>>(a, int(n_chunks), int(n_stats));
  if (n_chunks <= kFusedFinalizeMaxChunks) {
    kv_tiles_kernel<InTag, D, true><<<unsigned(2 * kv_jobs), kThreads, 0, stream>>>(a, int(kv_jobs), int(n_chunks));
  } else {
    kv_stats_finalize_kernel<D><<<unsigned(bh_kv), D, 0, stream>>>(a, int(n_chunks));
    kv_tiles_kernel<InTag, D, false><<<unsigned(2 * kv_jobs), kThreads, 0, stream>>>(a, int(kv_jobs), int(n_chunks));
  }
  return cudaGetLastError();
}

}  // namespace quant_detail

// Validates what the kernels rely on (the binding raises readable errors first) and dispatches.
inline cudaError_t quant_qkv_sm90_fused_impl(const QuantQkvSm90Args& a, cudaStream_t stream) {
  auto row_ok = [](const void* p, int64_t sb, int64_t sh, int64_t ss) {
    // 16-byte vector loads of 8 fp16/bf16: base and every row start 16-byte aligned (a row of d_in
    // channels, d_in a multiple of 8, is whole vectors; the strides need not cover head_dim)
    return p != nullptr && (reinterpret_cast<uintptr_t>(p) % 16) == 0 && sb % 8 == 0 && sh % 8 == 0 &&
           ss % 8 == 0;
  };
  auto aligned16 = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) % 16) == 0; };
  if (a.batch <= 0 || a.heads_q <= 0 || a.heads_kv <= 0 || a.seq_q <= 0 || a.seq_kv <= 0 ||
      a.heads_q % a.heads_kv != 0 || !(a.head_dim == 64 || a.head_dim == 128) ||
      // input head dim: 0 / head_dim (all), or a multiple of 8 below (whole 16-byte vectors)
      !(a.head_dim_in == 0 || a.head_dim_in == a.head_dim ||
        (a.head_dim_in >= 8 && a.head_dim_in < a.head_dim && a.head_dim_in % 8 == 0)) ||
      !row_ok(a.q, a.q_stride_b, a.q_stride_h, a.q_stride_s) ||
      !row_ok(a.k, a.k_stride_b, a.k_stride_h, a.k_stride_s) ||
      !row_ok(a.v, a.v_stride_b, a.v_stride_h, a.v_stride_s) || a.q_out == nullptr ||
      a.q_scale == nullptr || a.k_out == nullptr || a.k_scale == nullptr || a.v_out == nullptr ||
      a.v_scale == nullptr || a.k_mean == nullptr || a.workspace == nullptr ||
      (a.v_mean_given && a.v_mean == nullptr) ||
      // float4 reads of k_mean / v_mean / v_scale rows, 8-byte Q/K stores, 16-byte V^T stores
      !aligned16(a.k_mean) || !aligned16(a.v_scale) || (a.v_mean != nullptr && !aligned16(a.v_mean)) ||
      !aligned16(a.q_out) || !aligned16(a.k_out) || !aligned16(a.v_out)) {
    return cudaErrorInvalidValue;
  }
  using namespace quant_detail;
  QuantQkvSm90Args n = a;  // the kernels read head_dim_in as is: 0 means head_dim
  if (n.head_dim_in == 0) n.head_dim_in = n.head_dim;
  if (n.head_dim == 128) {
    return n.in_bf16 ? launch_quant_qkv_sm90<InBF16, 128>(n, stream) : launch_quant_qkv_sm90<InF16, 128>(n, stream);
  }
  return n.in_bf16 ? launch_quant_qkv_sm90<InBF16, 64>(n, stream) : launch_quant_qkv_sm90<InF16, 64>(n, stream);
}

}  // namespace sage::sm90
