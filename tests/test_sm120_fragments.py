"""The sm120 FP4 attention kernel's fragment and scale conventions against the PTX ISA's tables
of ``mma.m16n8k64 ... kind::mxf4nvf4.block_scale.scale_vec::4X`` (and ``mma.m16n8k16 .f16`` for the
twin), on the CPU.

The kernel's index functions are the constexpr functions of
``kernels/include/sage/sm120/sm120_attn_fwd_fragments.hpp``: a small host program compiled here
with the system C++ compiler prints them (skipped without one). The test then places random
E2M1 codes and UE4M3 scales in shared-memory tiles the way the kernel does (K rows in the
``sm120_key_of_s_row`` order, V^T in token order), fills every lane's registers the way the
kernel's ``ldmatrix.x4`` addresses and scale loads do, multiplies with the ISA's definition of the
instruction (which lane/nibble holds which A/B element, which lane/byte holds which scale) and
checks that S and O come out as the plain block-scaled products of the emulation
(``sage_quant`` groups: 16 consecutive d for Q/K, 16 consecutive keys for P and V).
The twin's FP16 slot map is checked the same way against the m16n8k16 FP16 tables.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADER = ROOT / "kernels" / "include" / "sage" / "sm120" / "sm120_attn_fwd_fragments.hpp"
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])

DUMP = r"""
#include <cstdio>
#include "sage/sm120/sm120_attn_fwd_fragments.hpp"
using namespace sage::sm120;
int main() {
  std::printf("{\"key_of_s_row\": [");
  for (int r = 0; r < 128; ++r) std::printf("%s%d", r ? "," : "", sm120_key_of_s_row(r));
  std::printf("], \"s_row_of_key\": [");
  for (int r = 0; r < 128; ++r) std::printf("%s%d", r ? "," : "", sm120_s_row_of_key(r));
  std::printf("], \"key_of_s_acc\": [");
  for (int j = 0; j < 16; ++j) for (int t = 0; t < 4; ++t) for (int e = 0; e < 4; ++e)
    std::printf("%s%d", (j | t | e) ? "," : "", sm120_key_of_s_acc(j, t, e));
  std::printf("], \"p_tile\": [");
  for (int kk = 0; kk < 2; ++kk) for (int r = 0; r < 4; ++r) for (int i = 0; i < 8; ++i)
    std::printf("%s%d", (kk | r | i) ? "," : "", sm120_p_tile(kk, r, i));
  std::printf("], \"p_elem\": [");
  for (int r = 0; r < 4; ++r) for (int i = 0; i < 8; ++i) std::printf("%s%d", (r | i) ? "," : "", sm120_p_elem(r, i));
  std::printf("], \"a_group\": [");
  for (int r = 0; r < 4; ++r) for (int t = 0; t < 4; ++t) std::printf("%s%d", (r | t) ? "," : "", sm120_a_group(r, t));
  std::printf("], \"sfa_row\": [");
  for (int l = 0; l < 32; ++l) std::printf("%s%d", l ? "," : "", sm120_sfa_row(l));
  std::printf("], \"sfb_col\": [");
  for (int l = 0; l < 32; ++l) std::printf("%s%d", l ? "," : "", sm120_sfb_col(l));
  std::printf("], \"sfa_prmt\": [%u, %u, %u, %u", sm120_sfa_prmt(0), sm120_sfa_prmt(1), sm120_sfa_prmt(2),
              sm120_sfa_prmt(3));
  std::printf("], \"twin_k\": [");
  for (int u = 0; u < 4; ++u) for (int t = 0; t < 4; ++t) for (int e = 0; e < 4; ++e)
    std::printf("%s%d", (u | t | e) ? "," : "", sm120_twin_k(u, t, e));
  std::printf("]}\n");
}
"""


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler to evaluate sm120_attn_fwd_fragments.hpp")
    d = tmp_path_factory.mktemp("sm120_frag")
    (d / "dump.cpp").write_text(DUMP)
    exe = d / "dump"
    subprocess.run([cxx, "-std=c++17", "-I", str(ROOT / "kernels" / "include"), str(d / "dump.cpp"), "-o", str(exe)],
                   check=True, capture_output=True)
    t = json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    t["key_of_s_acc"] = np.array(t["key_of_s_acc"]).reshape(16, 4, 4)
    t["p_tile"] = np.array(t["p_tile"]).reshape(2, 4, 8)
    t["p_elem"] = np.array(t["p_elem"]).reshape(4, 8)
    t["a_group"] = np.array(t["a_group"]).reshape(4, 4)
    t["twin_k"] = np.array(t["twin_k"]).reshape(4, 4, 4)
    return t


# --- the PTX ISA's tables (9.7.14.5: m16n8k64 .e2m1; m16n8k16 .f16; block scaling 9.7.14.3) ----------
def isa_a(lane, r, i):
    """A (16 x 64) element held by nibble i of register a_r: (row, k)."""
    g, t = lane // 4, lane % 4
    return g + 8 * (r % 2), 8 * t + (i % 8) + 32 * (r // 2)


def isa_b(lane, r, i):
    """B (64 x 8) element held by nibble i of b_r: (k, col)."""
    g, t = lane // 4, lane % 4
    return 8 * t + i + 32 * r, g


def isa_c(lane, e):
    g, t = lane // 4, lane % 4
    return g + 8 * (e // 2), 2 * t + e % 2


def isa_scale_a_lane(row):
    """With thread-id-a = 0 the scale_A row m comes from lane 4*(m%8) + m//8, bytes = k groups."""
    return 4 * (row % 8) + row // 8


def isa_scale_b_lane(col):
    return 4 * col


def isa_mma(a_regs, b_regs, sfa, sfb, a_val, b_val):
    """D = (A . scale_A)(B . scale_B) per the ISA from the warp's registers. a_regs[lane][r] etc.
    hold opaque element ids, a_val/b_val decode an id; sfa/sfb[lane] are 4-byte lists of scale values."""
    A = np.zeros((16, 64))
    B = np.zeros((64, 8))
    for lane in range(32):
        for r in range(4):
            for i in range(8):
                A[isa_a(lane, r, i)] = a_val(a_regs[lane][r][i])
        for r in range(2):
            for i in range(8):
                B[isa_b(lane, r, i)] = b_val(b_regs[lane][r][i])
    SA = np.array([sfa[isa_scale_a_lane(m)] for m in range(16)])  # (16, 4)
    SB = np.array([sfb[isa_scale_b_lane(n)] for n in range(8)])   # (8, 4)
    A = A * np.repeat(SA, 16, axis=1)
    B = B * np.repeat(SB, 16, axis=1).T
    D = A @ B
    return [[D[isa_c(lane, e)] for e in range(4)] for lane in range(32)]


def ldsm_x4(addr):
    """ldmatrix.x4 (b16): lane L's register m = the 4 bytes at addr(8m + L/4) + 4*(L%4).
    addr(lane) -> (row, byte); returns regs[lane][m] = (row, byte0)."""
    return [[(addr(8 * m + L // 4)[0], addr(8 * m + L // 4)[1] + 4 * (L % 4)) for m in range(4)] for L in range(32)]


def nibbles(row, byte0):
    """The 8 elements of a 4-byte register at (row, byte0): element 2b (low nibble) and 2b + 1."""
    return [(row, 2 * byte0 + i) for i in range(8)]


rng = np.random.default_rng(13)
E4M3_SAMPLE = np.array([2.0 ** -9 * 3, 0.125, 0.75, 1.0, 1.75, 3.0, 13.0, 448.0])


def prmt(x, y, selector):
    """PTX prmt (CUDA __byte_perm), default mode, on byte lists: byte n of the result is byte
    (selector >> 4n) & 7 of the 8 bytes x[0..3], y[0..3]."""
    pool = list(x) + list(y)
    return [pool[(selector >> (4 * n)) & 7] for n in range(4)]


def rand_codes(*shape):
    return rng.integers(0, 16, size=shape)


def rand_scales(*shape):
    return rng.choice(E4M3_SAMPLE, size=shape)


def test_key_order_is_a_permutation(tables):
    perm = tables["key_of_s_row"]
    assert sorted(perm) == list(range(128))
    assert [tables["s_row_of_key"][k] for k in perm] == list(range(128))
    for j in range(16):
        for t in range(4):
            for e in range(4):
                assert tables["key_of_s_acc"][j, t, e] == perm[8 * j + 2 * t + e % 2]


@pytest.mark.parametrize("ks", [0, 1])
def test_qk_fragments_give_the_block_scaled_scores(tables, ks):
    """One warp's 16 Q rows x the 128 keys of a tile, k-step ks (d = 128): S[row, key] per
    the kernel's reading of the accumulators equals sum_d Q[row,d] sq[row,d/16] K[key,d] sk[key,d/16]."""
    d = 128
    q, sq = rand_codes(16, d), rand_scales(16, d // 16)
    k, sk = rand_codes(128, d), rand_scales(128, d // 16)
    perm = tables["key_of_s_row"]
    sm_k, sm_ksf = k[perm], sk[perm]  # smem row r holds key perm[r]
    # Q: kernel's ldmatrix lanes: row lane%16, byte ks*32 + (lane/16)*16
    q_regs = ldsm_x4(lambda L: (L % 16, ks * 32 + (L // 16) * 16))
    a_regs = [[nibbles(*q_regs[L][m]) for m in range(4)] for L in range(32)]
    sfa = [list(sq[tables["sfa_row"][L], 4 * ks:4 * ks + 4]) for L in range(32)]
    S = np.zeros((16, 128))
    for j in range(0, 16, 2):
        k_regs = ldsm_x4(lambda L: (8 * j + (L // 16) * 8 + L % 8, ks * 32 + ((L // 8) % 2) * 16))
        for jj, (r0, r1) in ((j, (0, 1)), (j + 1, (2, 3))):
            b_regs = [[nibbles(*k_regs[L][r0]), nibbles(*k_regs[L][r1])] for L in range(32)]
            sfb = [list(sm_ksf[8 * jj + tables["sfb_col"][L], 4 * ks:4 * ks + 4]) for L in range(32)]
            D = isa_mma(a_regs, b_regs, sfa, sfb, lambda e: E2M1[q[e]], lambda e: E2M1[sm_k[e]])
            for L in range(32):
                for e in range(4):
                    row = L // 4 + 8 * (e // 2)
                    key = tables["key_of_s_acc"][jj, L % 4, e]
                    S[row, key] = D[L][e]
    cols = slice(64 * ks, 64 * ks + 64)
    ref = (E2M1[q[:, cols]] * np.repeat(sq[:, 4 * ks:4 * ks + 4], 16, axis=1)) @ \
          (E2M1[k[:, cols]] * np.repeat(sk[:, 4 * ks:4 * ks + 4], 16, axis=1)).T
    np.testing.assert_array_equal(S, ref)


def test_pv_fragments_use_the_emulations_groups(tables):
    """P from the S accumulator layout, packed as the kernel packs it, with the kernel's group
    scales (16 consecutive keys) and its scale-word assembly; V^T in token order. O equals
    sum_key P[row,key] sp[row,key/16] V[key,c] sv[c,key/16] for every channel tile."""
    d = 128
    p_codes = rng.integers(0, 8, size=(16, 128))  # P >= 0
    p_sc = rand_scales(16, 8)                      # per (row, 16-key group) of the tile
    v, sv = rand_codes(d, 128), rand_scales(d, 8)  # V^T: channel rows, token columns
    # lane L's accumulator element (j, e) = P[row, key]
    def s_elem(L, j, e):
        return (L // 4 + 8 * (e // 2), tables["key_of_s_acc"][j, L % 4, e])
    O = np.zeros((16, d))
    for kk in range(2):
        a_regs, sfa = [], []
        for L in range(32):
            t = L % 4
            regs = []
            sc_bytes = {}
            for r in range(4):
                elems = [s_elem(L, tables["p_tile"][kk, r, i], tables["p_elem"][r, i]) for i in range(8)]
                regs.append(elems)
                rows = {rw for rw, _ in elems}
                assert len(rows) == 1
                grp = {ky // 16 for _, ky in elems}
                assert len(grp) == 1 and grp.pop() == 4 * kk + tables["a_group"][r, t]  # this lane's group
                sc_bytes[(r % 2, r // 2)] = (rows.pop(), 4 * kk + tables["a_group"][r, t])
            a_regs.append(regs)
            # the kernel: lane parity selects the row; bytes q = 2*hh + t/2 from itself (t/2) and lane ^ 2
            row_par = L % 2
            mine = [sc_bytes[(row_par, 0)], sc_bytes[(row_par, 1)]]
            partner = L ^ 2
            tp = partner % 4
            other = [(mine[0][0], 4 * kk + tables["a_group"][0, tp]), (mine[0][0], 4 * kk + tables["a_group"][2, tp])]
            word = prmt(mine + [None, None], other + [None, None], tables["sfa_prmt"][t])
            assert [g for _, g in word] == [4 * kk + q for q in range(4)]
            assert all(rw == tables["sfa_row"][L] for rw, _ in word)
            sfa.append([p_sc[rw, g] for rw, g in word])
        for j in range(0, d // 8, 2):
            v_regs = ldsm_x4(lambda L: (8 * j + (L // 16) * 8 + L % 8, kk * 32 + ((L // 8) % 2) * 16))
            for jj, (r0, r1) in ((j, (0, 1)), (j + 1, (2, 3))):
                b_regs = [[nibbles(*v_regs[L][r0]), nibbles(*v_regs[L][r1])] for L in range(32)]
                sfb = [list(sv[8 * jj + tables["sfb_col"][L], 4 * kk:4 * kk + 4]) for L in range(32)]
                D = isa_mma(a_regs, b_regs, sfa, sfb, lambda e: E2M1[p_codes[e]], lambda e: E2M1[v[e]])
                for L in range(32):
                    for e in range(4):
                        row, col = isa_c(L, e)
                        O[row, 8 * jj + col] += D[L][e]
    P = E2M1[p_codes] * np.repeat(p_sc, 16, axis=1)
    V = (E2M1[v] * np.repeat(sv, 16, axis=1)).T  # (keys, d)
    np.testing.assert_array_equal(O, P @ V)


def test_twin_slot_map_equals_the_block_scaled_mma(tables):
    """The twin (four FP16 m16n8k16, PTX .f16 fragment tables) on the same registers = the ISA's
    m16n8k64 block-scaled product."""
    a_codes, b_codes = rand_codes(32, 4, 8), rand_codes(32, 2, 8)  # per lane, register, nibble
    sfa = rand_scales(32, 4)
    sfb = rand_scales(32, 4)
    # the ISA's product from these registers
    a_regs = [[[(L, r, i) for i in range(8)] for r in range(4)] for L in range(32)]
    b_regs = [[[(L, r, i) for i in range(8)] for r in range(2)] for L in range(32)]
    D = np.array(isa_mma(a_regs, b_regs, [list(s) for s in sfa], [list(s) for s in sfb],
                         lambda e: E2M1[a_codes[e]], lambda e: E2M1[b_codes[e]]))
    # the twin: lane (g, t) supplies FP16 slots {2t, 2t+1, 2t+8, 2t+9} of MMA u with its own
    # k = twin_k(u, t, e) elements, scaled by the scale words of lanes 4g (row g), 4g+1 (row g+8), 4g (col g)
    def a_elem(L, row_hi, k):  # lane L's A element of row g (+8 if row_hi) at k, dequantized
        r = (k // 32) * 2 + row_hi
        i = k % 8
        assert 8 * (L % 4) <= k % 32 < 8 * (L % 4) + 8
        q = k // 16
        s = sfa[(L & ~3) + row_hi][q]
        return E2M1[a_codes[L, r, i]] * s

    def b_elem(L, k):
        r, i, q = k // 32, k % 8, k // 16
        return E2M1[b_codes[L, r, i]] * sfb[L & ~3][q]

    Dt = np.zeros((32, 4))
    for u in range(4):
        A = np.zeros((16, 16))
        B = np.zeros((16, 8))
        for L in range(32):
            g, t = L // 4, L % 4
            for e in range(4):
                slot = 2 * t + (e % 2) + 8 * (e // 2)  # PTX m16n8k16 .f16: a0/a1 cols 2t,2t+1; a2/a3 +8
                k = tables["twin_k"][u, t, e]
                A[g, slot] = a_elem(L, 0, k)
                A[g + 8, slot] = a_elem(L, 1, k)
                B[slot, g] = b_elem(L, k)
        C = A @ B
        for L in range(32):
            for e in range(4):
                Dt[L, e] += C[isa_c(L, e)]
    np.testing.assert_array_equal(Dt, D)
