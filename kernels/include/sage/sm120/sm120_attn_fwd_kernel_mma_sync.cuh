// Block-scaled FP4 attention forward (recipe qk_nvfp4_pv_nvfp4, SageAttention3's NVFP4 attention)
// on mma.sync: ONE mainloop templated on its MMA policy (sm120_attn_fwd_mma_policies.cuh):
//   MmaNativeSm120 (sm_120a/121a): mma.sync kind::mxf4nvf4 block_scale scale_vec::4X m16n8k64;
//   MmaTwinSm90    (sm_90a): the same product from the same registers with FP16 mma.sync, so the
//                  loads, fragments, scale indexing, masking, softmax and P quantization run and
//                  are tested on Hopper (tests/gpu/test_nvfp4_twin.py).
//
// CTA = 4 warps x 16 query rows (kBlockM = 64); KV tiles of kBlockN = 128 keys (= the recipe's
// kv_block: P's per-row FP32 scale is per tile), 2-stage cp.async pipeline of K, V^T and their
// E4M3 scales. Operands are byte rows in shared memory, 16-byte chunks XOR-swizzled for
// ldmatrix (the sm80 family's helpers). At the byte level an m16n8k64 FP4 fragment is the
// m16n8k32 INT8 one, so the sm80 ldmatrix.x4 pattern loads Q, K and V^T.
//
// Fragment conventions (sm120_attn_fwd_fragments.hpp): K rows sit in shared memory in the order
// sm120_key_of_s_row, so S n-tile j, column c is key sm120_key_of_s_row(8j + c) and thread t's
// accumulator holds keys 8t..8t+7 and 32+8t..32+8t+7 of each 64-key chunk: the P.V A operand
// with slot = key, no shuffles, P's 16-key groups = the MMA's scale blocks, V^T in token order.
//
// Numerics (= sage_quant's emulation, recipes.py qk_nvfp4_pv_nvfp4):
//   S = (Q^ K^T)_blockscaled * g_q g_k (+ dS = q_mean . K^ g_k) * scale * log2 e;
//   per tile and row: b = tile row max, m = running max, P~ = exp2(S - b + log2 2688) (the
//   emulation's p / row_scale with row_scale = exp2(b - m) / 2688), l += row_scale * sum P~
//   (FP32, before P is rounded); P^ = E2M1 with E4M3 scale E4M3(amax16 / 6) per 16 keys;
//   O = O * exp2(m_old - m) + row_scale * (P^ V^)_tile (a fresh FP32 buffer per tile);
//   epilogue O / l * g_v, LSE = (m + log2 l) ln 2 (smoothed scores; the caller adds q.k_mean).
// Approximations (kernel vs emulation; within NUMERICS.md's 2e-3): exp2 = ex2.approx, and a
// group's codes use P~ * RN(1/s) instead of the IEEE quotient (a code differs only when P~/s lies
// within one ulp of an E2M1 rounding midpoint).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sage/common/arch.hpp"
#include "sage/common/div_rn.cuh"
#include "sage/sm120/sm120_attn_fwd_fragments.hpp"
#include "sage/sm120/sm120_attn_fwd_launch.hpp"
#include "sage/sm120/sm120_attn_fwd_mma_policies.cuh"
#include "sage/sm80/sm80_attn_fwd_kernel_mma_sync.cuh"  // smem swizzle, cp.async, ldmatrix helpers

namespace sage::sm120 {
namespace detail {

using sage::sm80::detail::copy_tile_async;
using sage::sm80::detail::ex2_approx;
using sage::sm80::detail::ldsm_x4;
using sage::sm80::detail::SmemTileSwizzle;
using sage::sm80::detail::store_pair;
using sage::sm80::detail::swizzled_addr;

inline constexpr int kBlockM = kSm120BlockM;
inline constexpr int kBlockN = kSm120BlockN;
inline constexpr int kNumWarps = 4;
inline constexpr int kNumThreads = kNumWarps * 32;
inline constexpr int kWarpRows = 16;
inline constexpr int kChunkBytes = 16;
inline constexpr int kPvChunks = kBlockN / kMmaK;  // 64-key P.V MMA steps per tile
inline constexpr int kVRowBytes = kBlockN / 2;      // V^T: one tile row = 128 tokens of one channel
inline constexpr int kVSfRowBytes = kBlockN / kFp4Group;
inline constexpr float kFp4Max = 6.f;
inline constexpr float kPScaleMax = 448.f * kFp4Max;  // a tile row's max P~: 2688
inline constexpr float kLog2PScaleMax = 11.392317422778761f;  // log2(2688)
inline constexpr float kInvPScaleMax = 1.f / kPScaleMax;
inline constexpr float kLn2 = 0.69314718055994531f;
inline constexpr float kNegInf = -__builtin_huge_valf();

static_assert(kBlockM == kNumWarps * kWarpRows, "one m16 row tile per warp");
static_assert(kBlockN == kNumThreads, "one thread per key row for the K scale / dS loads");
static_assert(sage::sm80::detail::kNumThreads == kNumThreads, "copy_tile_async's CTA size");

// UE4M3 byte -> float (exact).
__device__ __forceinline__ float e4m3_to_float(uint32_t byte) {
  const unsigned short pair = static_cast<unsigned short>(byte);
  uint32_t h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(pair));
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h & 0xffffu)));
}

// E2M1 code (0..15) -> float: the code's bits as an fp32 (exponent E, one mantissa bit) times
// 2^126 re-biases 2^(E-127)(1 + m/2) to 2^(E-1)(1 + m/2); E = 0 lands on m * 0.5.
__device__ __forceinline__ float e2m1_to_float(uint32_t code) {
  return __uint_as_float(((code & 7u) << 22) | ((code & 8u) << 28)) * 0x1p126f;
}

template <class Mma_, int kHeadDim_, class OutT_>
struct Sm120AttnFwdMainloop {
  using Mma = Mma_;
  using OutT = OutT_;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128");

  static constexpr int kQkRowBytes = kHeadDim / 2;        // FP4 codes of one Q/K row
  static constexpr int kQkKSteps = kHeadDim / kMmaK;      // m16n8k64 steps of Q.K
  static constexpr int kSfRowBytes = kHeadDim / kFp4Group;  // E4M3 scales of one Q/K row
  static constexpr int kSTiles = kBlockN / 8;
  static constexpr int kOTiles = kHeadDim / 8;
  using SwQk = SmemTileSwizzle<kQkRowBytes>;
  using SwV = SmemTileSwizzle<kVRowBytes>;

  static constexpr int kSmemQ = kBlockM * kQkRowBytes;
  static constexpr int kSmemK = kBlockN * kQkRowBytes;
  static constexpr int kSmemV = kHeadDim * kVRowBytes;
  static constexpr int kSmemKSf = kBlockN * kSfRowBytes;
  static constexpr int kSmemVSf = kHeadDim * kVSfRowBytes;
  static constexpr int kSmemDeltaS = kBlockN * int(sizeof(float));
  static constexpr int kOffK = kSmemQ;
  static constexpr int kOffV = kOffK + 2 * kSmemK;
  static constexpr int kOffKSf = kOffV + 2 * kSmemV;
  static constexpr int kOffVSf = kOffKSf + 2 * kSmemKSf;
  static constexpr int kOffDeltaS = kOffVSf + 2 * kSmemVSf;
  static constexpr int kOffQMean = kOffDeltaS + 2 * kSmemDeltaS;
  static constexpr int kSmemBytes = kOffQMean + kHeadDim * int(sizeof(float));

  CUTE_DEVICE static void run(const Sm120AttnFwdParams& p, uint8_t* smem) {
    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);  // longest (causal) rows first
    const int h = blockIdx.y, b = blockIdx.z;
    const int h_kv = h / (p.heads_q / p.heads_kv);
    const int s_q = p.seqlen_q, s_kv = p.seqlen_kv;
    const int q0 = m_block * kBlockM;
    const int q_valid = min(kBlockM, s_q - q0);
    const int causal_off = s_kv - s_q;  // bottom-right: row i sees keys j <= i + causal_off
    const bool smooth_q = p.q_mean != nullptr;

    int n_tiles = (s_kv + kBlockN - 1) / kBlockN;
    if (p.is_causal) {
      const int last_key = q0 + q_valid - 1 + causal_off;
      n_tiles = last_key < 0 ? 0 : min(n_tiles, last_key / kBlockN + 1);
    }

    uint8_t* sQ = smem;
    uint8_t* sK = smem + kOffK;
    uint8_t* sKSf = smem + kOffKSf;
    uint8_t* sVSf = smem + kOffVSf;
    float* sDeltaS = reinterpret_cast<float*>(smem + kOffDeltaS);
    float* sQMean = reinterpret_cast<float*>(smem + kOffQMean);
    uint8_t* sV = smem + kOffV;

    const uint8_t* gK = p.k + b * p.k_stride_b + h_kv * p.k_stride_h;
    const uint8_t* gKSf = p.k_sf + b * p.k_sf_stride_b + h_kv * p.k_sf_stride_h;
    const uint8_t* gV = p.v + b * p.v_stride_b + h_kv * p.v_stride_h;
    const uint8_t* gVSf = p.v_sf + b * p.v_sf_stride_b + h_kv * p.v_sf_stride_h;
    const float g_q = p.q_gs[b * p.q_gs_stride_b + h];
    const float g_k = p.k_gs[b * p.k_gs_stride_b + h_kv];

    auto load_kv_tile = [&](int n, int stage) {
      const int kv0 = n * kBlockN;
      // K: smem row r <- key kv0 + sm120_key_of_s_row(r); rows past s_kv zero-filled.
      constexpr int kKChunksPerRow = kQkRowBytes / kChunkBytes;
      uint8_t* sKs = sK + stage * kSmemK;
#pragma unroll
      for (int i = 0; i < kBlockN * kKChunksPerRow / kNumThreads; ++i) {
        const int c = tid + i * kNumThreads;
        const int row = c / kKChunksPerRow;
        const int byte = (c % kKChunksPerRow) * kChunkBytes;
        const int key = kv0 + sm120_key_of_s_row(row);
        const bool ok = key < s_kv;
        const uint8_t* src = gK + int64_t(ok ? key : 0) * p.k_stride_s + byte;
        cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
            *reinterpret_cast<const cute::uint128_t*>(src),
            *reinterpret_cast<cute::uint128_t*>(sKs + SwQk::offset(row, byte)), ok);
      }
      {  // K scales: thread tid <- the row of smem row tid
        const int key = kv0 + sm120_key_of_s_row(tid);
        const bool ok = key < s_kv;
        const uint8_t* src = gKSf + int64_t(ok ? key : 0) * p.k_sf_stride_s;
        uint8_t* dst = sKSf + stage * kSmemKSf + tid * kSfRowBytes;
        if constexpr (kSfRowBytes == 8) {
          cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint64_t>::copy(*reinterpret_cast<const uint64_t*>(src),
                                                                *reinterpret_cast<uint64_t*>(dst), ok);
        } else {
          cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(*reinterpret_cast<const uint32_t*>(src),
                                                                *reinterpret_cast<uint32_t*>(dst), ok);
        }
      }
      // V^T: d rows of 64 bytes; tokens past s_kv are the format's zero padding (s_pad >= tiles).
      copy_tile_async<kHeadDim, kVRowBytes>(sV + stage * kSmemV, gV + kv0 / 2, p.v_stride_c, kHeadDim, tid);
      if (tid < kHeadDim) {
        cute::SM80_CP_ASYNC_CACHEALWAYS<uint64_t>::copy(
            *reinterpret_cast<const uint64_t*>(gVSf + tid * p.v_sf_stride_c + kv0 / kFp4Group),
            *reinterpret_cast<uint64_t*>(sVSf + stage * kSmemVSf + tid * kVSfRowBytes));
      }
    };

    // ---- prologue: Q tile, its scales, Q block mean, KV tile 0 ------------------------------
    copy_tile_async<kBlockM, kQkRowBytes>(sQ, p.q + b * p.q_stride_b + h * p.q_stride_h + int64_t(q0) * p.q_stride_s,
                                          p.q_stride_s, q_valid, tid);
    if (smooth_q) {
      const float* gQMean = p.q_mean + b * p.q_mean_stride_b + h * p.q_mean_stride_h +
                            int64_t(q0 / p.q_mean_block) * p.q_mean_stride_blk;
      for (int c = tid; c < kHeadDim; c += kNumThreads) sQMean[c] = gQMean[c];
    }
    if (n_tiles > 0) load_kv_tile(0, 0);
    cute::cp_async_fence();

    // This thread's rows g, g+8; the scale word of row sm120_sfa_row(lane) per k-step (rows past
    // s_q: scales 0 on zero codes, never written).
    const int row0 = q0 + warp * kWarpRows + g;  // rows row0 and row0 + 8
    uint32_t tSrQSf[kQkKSteps];
    {
      const int sf_row = q0 + warp * kWarpRows + sm120_sfa_row(lane);
      const uint8_t* gQSf = p.q_sf + b * p.q_sf_stride_b + h * p.q_sf_stride_h + int64_t(sf_row) * p.q_sf_stride_s;
#pragma unroll
      for (int ks = 0; ks < kQkKSteps; ++ks)
        tSrQSf[ks] = sf_row < s_q ? *reinterpret_cast<const uint32_t*>(gQSf + 4 * ks) : 0u;
    }
    const float qk_scale_log2 = g_q * g_k * p.softmax_scale_log2;

    cute::cp_async_wait<0>();
    __syncthreads();

    uint32_t tSrQ[kQkKSteps][4];  // A of Q.K per k-step (rows g, g+8; PTX m16n8k64 layout)
#pragma unroll
    for (int ks = 0; ks < kQkKSteps; ++ks)
      ldsm_x4(sQ + SwQk::offset(warp * kWarpRows + lane % 16, ks * kMmaKBytes + (lane / 16) * 16), tSrQ[ks]);

    float tOrO[kOTiles][4];  // O, FP32: rows {g, g+8} x channels {8j + 2t, 8j + 2t + 1}
#pragma unroll
    for (int j = 0; j < kOTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) tOrO[j][e] = 0.f;
    float row_max[2] = {kNegInf, kNegInf};  // running max of S (log2 domain)
    float row_sum[2] = {0.f, 0.f};          // this thread's partial of l

    const uint32_t smem_u32 = cute::cast_smem_ptr_to_uint(smem);
    // ldmatrix lanes for K and V^T: matrices (rows +0/+8, bytes +0/+16) = lanes 0-7, 8-15 (bytes
    // +16), 16-23 (rows +8), 24-31 -> b0, b1 of n-tile j, then of j+1.
    const int k_lane_swz = SwQk::offset((lane / 16) * 8 + lane % 8, ((lane / 8) % 2) * 16);
    const int v_lane_swz = SwV::offset((lane / 16) * 8 + lane % 8, ((lane / 8) % 2) * 16);

    for (int n = 0; n < n_tiles; ++n) {
      const int stage = n & 1;
      if (n + 1 < n_tiles) load_kv_tile(n + 1, stage ^ 1);
      cute::cp_async_fence();
      cute::cp_async_wait<1>();
      __syncthreads();

      const int k_lane_off = stage * kSmemK + k_lane_swz;
      const int v_lane_off = stage * kSmemV + v_lane_swz;
      const uint8_t* sKSfS = sKSf + stage * kSmemKSf;
      const uint8_t* sVSfS = sVSf + stage * kSmemVSf;
      float* sDeltaSS = sDeltaS + stage * kBlockN;

      if (smooth_q) {
        // dS[row] = q_mean . dequant(K[row]) * g_k (GEMV on the smem tile), log2 domain.
        const uint8_t* sKs = sK + stage * kSmemK;
        float acc = 0.f;
#pragma unroll
        for (int grp = 0; grp < kSfRowBytes; ++grp) {
          const uint2 w = *reinterpret_cast<const uint2*>(sKs + SwQk::offset(tid, grp * 8));
          const uint32_t words[2] = {w.x, w.y};
          float part = 0.f;
#pragma unroll
          for (int wi = 0; wi < 2; ++wi)
#pragma unroll
            for (int nib = 0; nib < 8; ++nib)
              part = fmaf(sQMean[grp * kFp4Group + wi * 8 + nib], e2m1_to_float(words[wi] >> (4 * nib)), part);
          acc = fmaf(part, e4m3_to_float(sKSfS[tid * kSfRowBytes + grp]), acc);
        }
        sDeltaSS[tid] = acc * g_k * p.softmax_scale_log2;
        __syncthreads();
      }

      // ---- S = Q K^T (block-scaled FP4, FP32 accumulators) -------------------------------------
      float s[kSTiles][4];
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kQkKSteps; ++ks) {
#pragma unroll
        for (int j = 0; j < kSTiles; j += 2) {
          uint32_t bk[4];
          ldsm_x4(swizzled_addr<kQkRowBytes>(smem_u32 + kOffK, k_lane_off, j * 8, ks * kMmaKBytes), bk);
          const uint32_t sfb0 = *reinterpret_cast<const uint32_t*>(sKSfS + (j * 8 + sm120_sfb_col(lane)) * kSfRowBytes + 4 * ks);
          const uint32_t sfb1 =
              *reinterpret_cast<const uint32_t*>(sKSfS + ((j + 1) * 8 + sm120_sfb_col(lane)) * kSfRowBytes + 4 * ks);
          Mma::mma(s[j], tSrQ[ks], bk[0], bk[1], tSrQSf[ks], sfb0);
          Mma::mma(s[j + 1], tSrQ[ks], bk[2], bk[3], tSrQSf[ks], sfb1);
        }
      }

      // ---- dequantize into the log2 domain, mask ----------------------------------------------
#pragma unroll
      for (int j = 0; j < kSTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[j][e] *= qk_scale_log2;
          if (smooth_q) s[j][e] += sDeltaSS[j * 8 + 2 * t4 + (e & 1)];
        }
      const int kv0 = n * kBlockN;
      const bool need_mask = kv0 + kBlockN > s_kv || (p.is_causal && kv0 + kBlockN - 1 > q0 + causal_off);
      if (need_mask) {
        // key = kv0 + 8 t + const(j, e): compare the constant with per-lane limits (a per-element
        // key array would be hoisted out of the loop: 64 registers on sm_90a).
        const int lane_key0 = kv0 + 8 * t4;
        const int lim_len = s_kv - lane_key0;  // const >= lim_len: past s_kv
        int lim_causal[2];                     // const > lim_causal[r]: above the diagonal
#pragma unroll
        for (int r = 0; r < 2; ++r) lim_causal[r] = p.is_causal ? row0 + 8 * r + causal_off - lane_key0 : INT32_MAX;
#pragma unroll
        for (int j = 0; j < kSTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = sm120_key_of_s_acc_const(j, e);
            if (c >= lim_len || c > lim_causal[e >> 1]) s[j][e] = kNegInf;
          }
      }

      // ---- online softmax; s becomes P~ = exp2(S - tile max + log2 2688) ----------------------
      float alpha[2], p_row_scale[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = kNegInf;
#pragma unroll
        for (int j = 0; j < kSTiles; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
        const float m_new = fmaxf(row_max[r], mx);
        const float m_base = m_new == kNegInf ? 0.f : m_new;  // fully masked so far: no NaN
        const float t_base = mx == kNegInf ? 0.f : mx;        // row masked in this tile: P~ = 0
        alpha[r] = ex2_approx(row_max[r] - m_base);
        row_max[r] = m_new;
        // the emulation's row_scale = max p / 2688 with p = exp2(S - m)
        p_row_scale[r] = ex2_approx(t_base - m_base) * kInvPScaleMax;
        const float bias = kLog2PScaleMax - t_base;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kSTiles; ++j)
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            s[j][e] = ex2_approx(s[j][e] + bias);
            sum += s[j][e];
          }
        row_sum[r] = row_sum[r] * alpha[r] + sum * p_row_scale[r];
      }

      // ---- P^: E2M1 codes with an E4M3 scale per 16 keys (A of P.V) ----------------------------
      uint32_t tOrP[kPvChunks][4];
      uint32_t tOrPSf[kPvChunks];
#pragma unroll
      for (int kk = 0; kk < kPvChunks; ++kk) {
        uint32_t sf_bytes[2][2];  // [row r][register half hh]: this thread's group scales
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
          const int r = reg % 2, hh = reg / 2;
          float v[8];
          float amax = 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            v[i] = s[sm120_p_tile(kk, reg, i)][sm120_p_elem(reg, i)];
            amax = fmaxf(amax, v[i]);
          }
          amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, 1));  // the group's other 8 keys
          // E4M3(amax / 6): RN quotient (div_rn_fast, divisor 6), cvt RN satfinite
          const float q = sage::div_rn_fast(amax, kFp4Max, 1.f / kFp4Max);
          uint16_t sc2;
          asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(sc2) : "f"(0.f), "f"(q));
          const uint32_t sc = sc2 & 0xffu;
          const float sdec = e4m3_to_float(sc);
          const float rs = sdec == 0.f ? 0.f : __frcp_rn(sdec);
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] *= rs;
          tOrP[kk][reg] = Mma::pack_e2m1x8(v);
          sf_bytes[r][hh] = sc;
        }
        // Scale word of row sm120_sfa_row(lane): groups 0..3 = (hh, t/2); this thread holds t/2,
        // its partner lane ^ 2 (same parity, same row) the other.
        const bool odd = lane % 2 != 0;  // selects without indexing registers by a lane value
        const uint32_t mine = odd ? sf_bytes[1][0] | (sf_bytes[1][1] << 8) : sf_bytes[0][0] | (sf_bytes[0][1] << 8);
        const uint32_t other = __shfl_xor_sync(kFullMask, mine, 2);
        tOrPSf[kk] = __byte_perm(mine, other, sm120_sfa_prmt(t4));
      }

      // ---- O = O * alpha + row_scale * (P^ V^) ------------------------------------------------
#pragma unroll
      for (int j = 0; j < kOTiles; j += 2) {
        float buf[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) buf[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kPvChunks; ++kk) {
          uint32_t bv[4];  // V^T rows = channels 8j.., 8(j+1)..; 64 tokens of chunk kk
          ldsm_x4(swizzled_addr<kVRowBytes>(smem_u32 + kOffV, v_lane_off, j * 8, kk * kMmaKBytes), bv);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const uint32_t sfb =
                *reinterpret_cast<const uint32_t*>(sVSfS + ((j + i) * 8 + sm120_sfb_col(lane)) * kVSfRowBytes + 4 * kk);
            Mma::mma(buf[i], tOrP[kk], bv[2 * i], bv[2 * i + 1], tOrPSf[kk], sfb);
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            tOrO[j + i][e] = fmaf(buf[i][e], p_row_scale[e >> 1], tOrO[j + i][e] * alpha[e >> 1]);
      }
      __syncthreads();  // every warp is done with this stage before it is refilled
    }

    // ---- epilogue: O / l * g_v, LSE ------------------------------------------------------------
    OutT* gO = static_cast<OutT*>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
    const float g_v = p.v_gs[b * p.v_gs_stride_b + h_kv];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[r];
      l += __shfl_xor_sync(kFullMask, l, 1);
      l += __shfl_xor_sync(kFullMask, l, 2);
      const int row = row0 + 8 * r;
      if (row >= s_q) continue;
      const float f = l == 0.f ? 0.f : g_v / l;  // fully masked row -> 0; a NaN l stays NaN
      OutT* gOrow = gO + int64_t(row) * p.o_stride_s;
#pragma unroll
      for (int j = 0; j < kOTiles; ++j)
        store_pair(gOrow + j * 8 + 2 * t4, tOrO[j][2 * r] * f, tOrO[j][2 * r + 1] * f);
      if (p.lse != nullptr && t4 == 0)
        p.lse[b * p.lse_stride_b + h * p.lse_stride_h + row] = l == 0.f ? kNegInf : (row_max[r] + log2f(l)) * kLn2;
    }
  }
};

template <class Mainloop>
__global__ void __launch_bounds__(kNumThreads) sm120_attn_fwd_kernel(const Sm120AttnFwdParams p) {
#if defined(__CUDA_ARCH__)
  // The native policy only on sm_120a/121a (block-scaled mma.sync); the twin on sm_90a.
  constexpr bool kNative = Mainloop::Mma::kNative;
  if constexpr (kNative ? bool(SAGE_DEVICE_SM120A) : bool(SAGE_DEVICE_SM90A)) {
    extern __shared__ __align__(128) uint8_t sage_sm120_smem[];
    Mainloop::run(p, sage_sm120_smem);
  } else {
    SAGE_DEVICE_TRAP_WRONG_ARCH();
  }
#endif
}

template <Sm120Mma M>
using MmaOf = std::conditional_t<M == Sm120Mma::kNative, MmaNativeSm120, MmaTwinSm90>;

}  // namespace detail

template <Sm120Mma M, int kHeadDim, Sm120IoDtype kIo>
cudaError_t sm120_attn_fwd_run(const Sm120AttnFwdParams& p, cudaStream_t stream) {
  using OutT = std::conditional_t<kIo == Sm120IoDtype::kF16, __half, __nv_bfloat16>;
  using Mainloop = detail::Sm120AttnFwdMainloop<detail::MmaOf<M>, kHeadDim, OutT>;
  auto kernel = &detail::sm120_attn_fwd_kernel<Mainloop>;
  constexpr int kSmem = Mainloop::kSmemBytes;
  constexpr int kDefaultSmemLimit = 48 * 1024;
  if constexpr (kSmem > kDefaultSmemLimit) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((p.seqlen_q + detail::kBlockM - 1) / detail::kBlockM, p.heads_q, p.batch);
  kernel<<<grid, detail::kNumThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <Sm120Mma M, int kHeadDim, Sm120IoDtype kIo>
int sm120_attn_fwd_smem_bytes() {
  using OutT = std::conditional_t<kIo == Sm120IoDtype::kF16, __half, __nv_bfloat16>;
  return detail::Sm120AttnFwdMainloop<detail::MmaOf<M>, kHeadDim, OutT>::kSmemBytes;
}

}  // namespace sage::sm120

// One configuration per translation unit (kernels/src/sm120/*.cu):
#define SAGE_SM120_ATTN_FWD_INSTANTIATE(MMA, HDIM, IO)                                               \
  template cudaError_t sage::sm120::sm120_attn_fwd_run<sage::sm120::Sm120Mma::MMA, HDIM,               \
                                                       sage::sm120::Sm120IoDtype::IO>(                 \
      const sage::sm120::Sm120AttnFwdParams&, cudaStream_t);                                           \
  template int sage::sm120::sm120_attn_fwd_smem_bytes<sage::sm120::Sm120Mma::MMA, HDIM,                \
                                                      sage::sm120::Sm120IoDtype::IO>();
