"""Pins the documented extent of a NaN input per recipe (docs/accuracy.md, "Non-finite inputs"),
on the emulation (the oracle every kernel is tested against), causal so that "rows that see the
key" differs from "every row". One NaN at q[r, c], k[j, c] or v[j, c]; b = h = 1, s = 300, d = 64."""

import pytest
import torch

import sage_quant

S, D, R_Q, J_K, C = 300, 64, 37, 150, 5
RECIPES = ["qk_s8_pv_f16", "qk_s8_pv_e4m3", "qk_s4_pv_e4m3", "qk_s8_pv_s8", "qk_nvfp4_pv_nvfp4"]


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, S, D, generator=g).to(torch.bfloat16) for _ in range(3)]


def _nan_rows(o):
    return set(torch.isnan(o[0, 0]).any(dim=-1).nonzero().flatten().tolist())


def _nan_cells(o):
    return torch.isnan(o[0, 0])


def _sees(j):
    """Causal (bottom-right, s_q == s_kv): rows i >= j see key j."""
    return set(range(j, S))


Q_EXTENT = {  # rows made NaN by a NaN in query row R_Q
    "qk_s8_pv_f16": {R_Q, R_Q ^ 8},        # per-thread INT8 group: rows r, r^8 of its 16-row tile
    "qk_s8_pv_e4m3": {R_Q, R_Q ^ 8},
    "qk_s8_pv_s8": {R_Q},                  # per-token
    "qk_s4_pv_e4m3": set(range(0, 128)),   # Q smoothing: the mean of the 128-row block is NaN
    "qk_nvfp4_pv_nvfp4": set(range(0, 128)),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_nan_in_a_query_row(recipe, seed):
    q, k, v = _inputs(seed)
    q[0, 0, R_Q, C] = float("nan")
    o = sage_quant.emulate(q, k, v, recipe, is_causal=True)
    assert _nan_rows(o) == Q_EXTENT[recipe], f"{recipe} seed={seed}"
    assert torch.isnan(o[0, 0, sorted(Q_EXTENT[recipe])]).all(), "every affected row is NaN throughout"


@pytest.mark.parametrize("recipe", RECIPES)
def test_nan_in_a_key_row_with_k_smoothing_poisons_every_row(recipe, seed):
    """K smoothing subtracts the per-channel mean over ALL keys: one NaN key makes every K' NaN in
    that channel, so every row is NaN, also rows that never see the key (SDPA: only rows >= j)."""
    q, k, v = _inputs(seed)
    k[0, 0, J_K, C] = float("nan")
    o = sage_quant.emulate(q, k, v, recipe, is_causal=True)
    assert _nan_rows(o) == set(range(S)), f"{recipe} seed={seed}"


def _per_thread_k_first(j, block):
    """Per-thread K groups: keys t of one ``block``-key block with the same (t % 8) // 2."""
    return (j // block) * block + ((j % 8) // 2) * 2


K_GROUP_FIRST_KEY = {  # without K smoothing: the first key of J_K's K scale group
    "qk_s8_pv_f16": _per_thread_k_first(J_K, 64),    # k_block 64
    "qk_s8_pv_e4m3": _per_thread_k_first(J_K, 128),  # k_block = kv_block = 128
    "qk_s4_pv_e4m3": _per_thread_k_first(J_K, 128),
    "qk_s8_pv_s8": J_K,                              # per-token K
}


@pytest.mark.parametrize("recipe", sorted(K_GROUP_FIRST_KEY))
def test_nan_in_a_key_row_without_k_smoothing(recipe, seed):
    """smooth_k=False: the NaN reaches the keys of its K scale group, hence the rows that see the
    group's first key (a subset of all rows; SDPA: rows that see key j itself)."""
    q, k, v = _inputs(seed)
    k[0, 0, J_K, C] = float("nan")
    o = sage_quant.emulate(q, k, v, recipe, is_causal=True, smooth_k=False)
    assert _nan_rows(o) == _sees(K_GROUP_FIRST_KEY[recipe]), f"{recipe} seed={seed}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_nan_in_a_value(recipe, seed):
    """Channel C of every row and nothing else: a per-channel V scale / V mean is NaN (e4m3, s8,
    nvfp4), and in the emulation masked keys still multiply (P = 0 times NaN is NaN) for
    qk_s8_pv_f16 too. A kernel that skips fully masked KV tiles may leave earlier rows finite."""
    q, k, v = _inputs(seed)
    v[0, 0, J_K, C] = float("nan")
    o = sage_quant.emulate(q, k, v, recipe, is_causal=True)
    cells = _nan_cells(o)
    assert not cells[:, [c for c in range(D) if c != C]].any(), f"only channel {C}: {recipe} seed={seed}"
    rows = set(cells[:, C].nonzero().flatten().tolist())
    assert rows == set(range(S)), f"{recipe} seed={seed}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_finite_inputs_give_finite_rows(recipe, seed):
    q, k, v = _inputs(seed)
    o = sage_quant.emulate(q, k, v, recipe, is_causal=True)
    assert torch.isfinite(o).all(), f"{recipe} seed={seed}"
