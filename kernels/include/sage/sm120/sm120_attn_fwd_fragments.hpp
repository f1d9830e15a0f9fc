// Index conventions of the sm120 FP4 attention fragments, host and device constexpr, so that the
// kernel and a CPU test (tests/test_sm120_fragments.py, against the PTX ISA tables of
// mma.m16n8k64 with block scaling) read the same definitions. g = lane/4, t = lane%4.
//
// PTX ISA (mma.m16n8k64, .e2m1; block_scale scale_vec::4X, ue4m3):
//   A a_r (r = 0..3), nibble i: row g + 8*(r%2), k = 8t + i + 32*(r/2)
//   B b_r (r = 0..1), nibble i: col g, k = 8t + i + 32*r
//   C/D c_e: row g + 8*(e/2), col 2t + e%2
//   scale_A (16 x 4 ue4m3 per MMA, byte q = k group q of 16): read from lane 4g (row g) and
//   4g+1 (row g+8) with thread-id-a 0; scale_B (4 x 8): lane 4g (col g) with thread-id-b 0.
// The kernel fills every lane of the same parity with the same row's scale word (and every lane
// of a quad with the column's), so both thread-id selectors would read the same values.
#pragma once

#if defined(__CUDACC__)
#define SAGE_SM120_HD __host__ __device__
#else
#define SAGE_SM120_HD
#endif

namespace sage::sm120 {

inline constexpr int kFp4Group = 16;      // NVFP4: elements per E4M3 scale
inline constexpr int kMmaK = 64;          // contraction of one m16n8k64 MMA
inline constexpr int kMmaKBytes = kMmaK / 2;

// --- Q.K: S n-tile j (of the 128-key tile), column c -> key offset in the tile ---------------
// Chosen so that the S accumulator of thread t holds keys 8t..8t+7 and 32+8t..32+8t+7 of every
// 64-key chunk: exactly the A-operand slots of the P.V MMA with slot = key, so P needs no
// shuffles, P's 16-key quantization groups are the MMA's 16-slot scale blocks, and V^T keeps its
// natural token order. K rows are stored in shared memory in this order (smem row r holds key
// sm120_key_of_s_row(r)), so the ldmatrix of K is the plain one.
SAGE_SM120_HD constexpr int sm120_key_of_s_row(int r) {
  return 64 * (r / 64) + 32 * ((r / 32) % 2) + 8 * ((r % 8) / 2) + 2 * ((r / 8) % 4) + (r % 2);
}
// The same for thread t's accumulator element e (column 2t + e%2) of n-tile j, split into the
// lane part 8t and a part known at compile time (so masks compare constants with a lane limit).
SAGE_SM120_HD constexpr int sm120_key_of_s_acc_const(int j, int e) {
  return 64 * (j / 8) + 32 * ((j % 8) / 4) + 2 * (j % 4) + (e % 2);
}
SAGE_SM120_HD constexpr int sm120_key_of_s_acc(int j, int t, int e) { return 8 * t + sm120_key_of_s_acc_const(j, e); }
// Inverse: the smem / S row of key offset `key`.
SAGE_SM120_HD constexpr int sm120_s_row_of_key(int key) {
  return 64 * (key / 64) + 32 * ((key / 32) % 2) + 8 * ((key / 2) % 4) + 2 * ((key % 32) / 8) + (key % 2);
}

// --- P.V: A register r (0..3) of chunk kk, nibble i of thread t --------------------------------
// holds S n-tile sm120_p_tile(kk, r, i), accumulator element sm120_p_elem(r, i): row g + 8*(r%2),
// key 64kk + 8t + i + 32*(r/2) (slot = key).
SAGE_SM120_HD constexpr int sm120_p_tile(int kk, int r, int i) { return 8 * kk + 4 * (r / 2) + i / 2; }
SAGE_SM120_HD constexpr int sm120_p_elem(int r, int i) { return 2 * (r % 2) + i % 2; }
// The 16-slot scale block of A register r's nibbles for thread t.
SAGE_SM120_HD constexpr int sm120_a_group(int r, int t) { return 2 * (r / 2) + t / 2; }

// --- scale registers --------------------------------------------------------------------------
SAGE_SM120_HD constexpr int sm120_sfa_row(int lane) { return lane / 4 + 8 * (lane % 2); }
SAGE_SM120_HD constexpr int sm120_sfb_col(int lane) { return lane / 4; }

// P's scale word (the kernel builds it in registers): lane t holds the scale bytes of groups
// sm120_a_group(0, t) and sm120_a_group(2, t) of row sm120_sfa_row(lane) as `mine` = b0 | b1 << 8;
// lane t ^ 2 has the other two as `other`; the word is prmt(mine, other, selector) with
SAGE_SM120_HD constexpr unsigned sm120_sfa_prmt(int t) { return t / 2 == 0 ? 0x5140u : 0x1504u; }

// --- the twin: FP16 m16n8k16 MMA u (0..3) of one m16n8k64 -------------------------------------
// Thread t supplies the contraction slots {2t, 2t+1, 2t+8, 2t+9} of each FP16 MMA (PTX
// m16n8k16 .f16: A a0/a1 = slots 2t, 2t+1 of rows g / g+8, a2/a3 = slots 2t+8, 2t+9; B b0 = slots
// 2t, 2t+1, b1 = 2t+8, 2t+9 of col g). Both A and B of slot (u, t, e) take the FP4 element with
// k = sm120_twin_k(u, t, e) (e = 0..3 over {2t, 2t+1, 2t+8, 2t+9}), which thread t holds for A
// and for B alike: no data moves between lanes, only the scale words do.
SAGE_SM120_HD constexpr int sm120_twin_k(int u, int t, int e) { return 8 * t + 32 * (u / 2) + 4 * (u % 2) + e; }

}  // namespace sage::sm120
