// INT8 / INT4 quantization of Q or K with fused mean subtraction, every scale granularity of
// docs/design/quant-formats.md.
//
// One CTA quantizes a tile of tokens whose scale groups lie entirely inside the tile:
//   pass 1: per-row amax of |x - mean| (lanes of a row reduce by shuffles), shared atomic max
//           into the tile's groups;
//   scales: amax / qmax (amax == 0 -> 1), written for every group < num_groups (groups with no
//           valid token, e.g. per-thread groups past s, get 1.0 like the zero-padded reference);
//   pass 2: re-read the tile (L1/L2-resident), divide by the group's scale, round, clamp, pack.
#pragma once

#include "sage/quant/quant_common.cuh"

namespace sage::quant {

inline constexpr int kQuantThreads = 256;
inline constexpr int kMaxGroupsPerTile = 64;
inline constexpr int kTokenTile = 64;       // per_token / per_thread Q / per_warp tiles
inline constexpr int kMmaRows = 16;         // per-thread Q: 16-row MMA tile, 8 groups
inline constexpr int kQThreadGroups = 8;
inline constexpr int kKThreadGroups = 4;    // per-thread K: 4 groups per key tile

struct IntTiling {
  int tile_tokens;
  int groups_per_tile;
  int num_tiles;
};

// Tile of tokens such that every group of the tile is inside it (the group maps are periodic).
inline IntTiling int_tiling(const QuantIntParams& p) {
  const int s = p.x.s;
  IntTiling t{};
  switch (p.granularity) {
    case Granularity::kPerTensor: t.tile_tokens = s > 0 ? s : 1; t.groups_per_tile = 1; break;
    case Granularity::kPerBlock: t.tile_tokens = p.block; t.groups_per_tile = 1; break;
    case Granularity::kPerWarp: {
      const int k = p.block >= kTokenTile ? 1 : kTokenTile / p.block;
      t.tile_tokens = p.block * k;
      t.groups_per_tile = k;
      break;
    }
    case Granularity::kPerThreadQ:
      t.tile_tokens = kTokenTile;
      t.groups_per_tile = kTokenTile / kMmaRows * kQThreadGroups;
      break;
    case Granularity::kPerThreadK: t.tile_tokens = p.block; t.groups_per_tile = kKThreadGroups; break;
    case Granularity::kPerToken: t.tile_tokens = kTokenTile; t.groups_per_tile = kTokenTile; break;
  }
  // int64: s + tile - 1 overflows int32 for s near 2^31 and a large user block. -1 = invalid
  // (no tile count that fits a grid dimension; the launcher refuses it).
  if (t.tile_tokens <= 0) {
    t.num_tiles = -1;
    return t;
  }
  const int64_t tiles = (static_cast<int64_t>(s) + t.tile_tokens - 1) / t.tile_tokens;
  t.num_tiles = tiles > INT32_MAX ? -1 : static_cast<int>(tiles);
  return t;
}

__device__ __forceinline__ int int_group(Granularity g, int t, int block) {
  switch (g) {
    case Granularity::kPerTensor: return 0;
    case Granularity::kPerBlock: return t / block;
    case Granularity::kPerWarp: return t / block;
    case Granularity::kPerThreadQ: return (t / kMmaRows) * kQThreadGroups + t % kQThreadGroups;
    case Granularity::kPerThreadK: return (t / block) * kKThreadGroups + (t % 8) / 2;
    case Granularity::kPerToken: return t;
  }
  return 0;
}

// x' = x - mean for 8 channels starting at c of token t.
template <typename T>
__device__ __forceinline__ void load_smoothed(const QuantIntParams& p, int i, int j, int t, int c,
                                              bool vec16, bool mean_vec16, float (&v)[kVec]) {
  load8_f32(row_ptr<T>(p.x, i, j, t) + c, vec16, v);
  if (p.mean != nullptr) {
    const float* m = p.mean + static_cast<int64_t>(i) * p.mean_stride_b +
                     static_cast<int64_t>(j) * p.mean_stride_h +
                     static_cast<int64_t>(t / p.mean_block) * p.mean_stride_blk + c;
    float mv[kVec];
    load8_f32(m, mean_vec16, mv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = __fsub_rn(v[k], mv[k]);
  }
}

template <typename T, int kBits>
__global__ void __launch_bounds__(kQuantThreads)
    quant_int_kernel(QuantIntParams p, IntTiling tiling, int lanes, bool vec16, bool mean_vec16) {
  constexpr int kQmax = kBits == 8 ? 127 : 7;
  constexpr float kQmaxF = kBits == 8 ? kInt8Max : kInt4Max;
  __shared__ unsigned int s_amax_bits[kMaxGroupsPerTile];
  __shared__ float s_scale[kMaxGroupsPerTile];

  const int tid = threadIdx.x;
  const int rows = kQuantThreads / lanes;
  const int row = tid / lanes, lane = tid % lanes;
  const int tile = blockIdx.x, j = blockIdx.y, i = blockIdx.z;
  const int t0 = tile * tiling.tile_tokens;
  const int t1 = static_cast<int>(min(static_cast<int64_t>(t0) + tiling.tile_tokens, static_cast<int64_t>(p.x.s)));
  const int g0 = tile * tiling.groups_per_tile;
  const int d = p.x.d;

  for (int g = tid; g < tiling.groups_per_tile; g += kQuantThreads) s_amax_bits[g] = 0u;
  __syncthreads();

  // Pass 1: amax per group. The row loop is warp-uniform (shuffles need every lane).
  for (int tt = t0; tt < t1; tt += rows) {
    const int t = tt + row;
    float m = 0.f;
    if (t < t1) {
      for (int c = lane * kVec; c < d; c += lanes * kVec) {
        float v[kVec];
        load_smoothed<T>(p, i, j, t, c, vec16, mean_vec16, v);
#pragma unroll
        for (int k = 0; k < kVec; ++k) m = max_nan(m, fabsf(v[k]));
      }
    }
    m = row_amax(m, lanes);
    if (t < t1 && lane == 0)
      atomic_max_nonneg(reinterpret_cast<float*>(&s_amax_bits[int_group(p.granularity, t, p.block) - g0]), m);
  }
  __syncthreads();

  float* scale_out = p.scale + (static_cast<int64_t>(i) * p.x.h + j) * p.num_groups;
  for (int g = tid; g < tiling.groups_per_tile; g += kQuantThreads) {
    const float sc = int_scale(__uint_as_float(s_amax_bits[g]), kQmaxF);
    s_scale[g] = sc;
    if (g0 + g < p.num_groups) scale_out[g0 + g] = sc;
  }
  __syncthreads();

  // Pass 2: quantize and store (outputs contiguous (b, h, s, d) / (b, h, s, d/2)).
  const int64_t bh_row0 = (static_cast<int64_t>(i) * p.x.h + j) * p.x.s;
  for (int t = t0 + row; t < t1; t += rows) {
    const float sc = s_scale[int_group(p.granularity, t, p.block) - g0];
    for (int c = lane * kVec; c < d; c += lanes * kVec) {
      float v[kVec];
      load_smoothed<T>(p, i, j, t, c, vec16, mean_vec16, v);
      int q[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) q[k] = quant_int_value(v[k], sc, kQmax);
      if constexpr (kBits == 8) {
        uint2 packed;
        packed.x = (q[0] & 0xFF) | ((q[1] & 0xFF) << 8) | ((q[2] & 0xFF) << 16) | (static_cast<unsigned>(q[3] & 0xFF) << 24);
        packed.y = (q[4] & 0xFF) | ((q[5] & 0xFF) << 8) | ((q[6] & 0xFF) << 16) | (static_cast<unsigned>(q[7] & 0xFF) << 24);
        auto* out = static_cast<int8_t*>(p.q) + (bh_row0 + t) * d + c;
        *reinterpret_cast<uint2*>(out) = packed;
      } else {
        unsigned packed = 0;
#pragma unroll
        for (int k = 0; k < kVec; ++k) packed |= static_cast<unsigned>(q[k] & 0xF) << (4 * k);
        auto* out = static_cast<uint8_t*>(p.q) + (bh_row0 + t) * (d / 2) + c / 2;
        *reinterpret_cast<unsigned*>(out) = packed;
      }
    }
  }
}

template <typename T, int kBits>
cudaError_t launch_quant_int_t(const QuantIntParams& p, cudaStream_t stream) {
  const IntTiling tiling = int_tiling(p);
  if (tiling.groups_per_tile > kMaxGroupsPerTile || tiling.num_tiles <= 0)
    return cudaErrorInvalidValue;
  const bool mean_vec16 =
      p.mean != nullptr && reinterpret_cast<uintptr_t>(p.mean) % 16 == 0 && p.mean_stride_b % 4 == 0 &&
      p.mean_stride_h % 4 == 0 && p.mean_stride_blk % 4 == 0;
  dim3 grid(tiling.num_tiles, p.x.h, p.x.b);
  quant_int_kernel<T, kBits><<<grid, kQuantThreads, 0, stream>>>(
      p, tiling, lanes_per_row(p.x.d), all_strides_vec_ok(p.x), mean_vec16);
  return cudaGetLastError();
}

// Shared by the int8/int4 launchers: the checks that guard memory safety.
inline bool quant_int_params_ok(const QuantIntParams& p, int bits) {
  if (!p.x.ptr || !p.q || !p.scale) return false;
  if (p.x.b <= 0 || p.x.h <= 0 || p.x.s <= 0 || p.x.d <= 0 || p.x.d % kVec != 0) return false;
  if (p.x.h > 65535 || p.x.b > 65535) return false;
  if (reinterpret_cast<uintptr_t>(p.q) % (bits == 8 ? 8 : 4) != 0) return false;
  if (p.mean != nullptr && p.mean_block <= 0) return false;
  const bool needs_block = p.granularity == Granularity::kPerBlock || p.granularity == Granularity::kPerWarp ||
                           p.granularity == Granularity::kPerThreadK;
  if (needs_block && p.block <= 0) return false;
  if (p.granularity == Granularity::kPerThreadK && p.block % 8 != 0) return false;
  return true;
}

}  // namespace sage::quant
