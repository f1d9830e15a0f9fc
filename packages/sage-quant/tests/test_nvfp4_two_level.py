"""qk_nvfp4_pv_nvfp4 with two-level NVFP4 (E2M1, E4M3 per 16 elements, FP32 per (b, head)):
tensors far from unit scale neither flush to zero nor saturate, heads of different magnitude are
each scaled on their own, and an Inf/NaN in V comes out NaN, never finite.

One level of E4M3 group scales spans about 2**-9 .. 448, so before the FP32 level V × 1e-3 gave an
output of exactly 0 and V × 1e4 saturated (rel-L1 ~ 0.8); both are pinned here against float64
attention of the same inputs (docs/design/NUMERICS.md, docs/support.md)."""

import pytest
import torch

import sage_quant as sq
from sage_quant.testing import assert_rows_close

RECIPE = "qk_nvfp4_pv_nvfp4"
# Outlier inputs at this shape: rel-L1 ~0.06, worst row ~0.35 over seeds; about 2x margin.
REL_L1, ROW_MAX = 0.12, 0.6
SCALED_TOL = 0.1  # rel-L1 of a scaled case within 10% of the unscaled one


def _qkv(seed, **kw):
    shape = dict(b=1, h_q=4, h_kv=2, s_q=200, s_kv=264, d=64, dtype=torch.bfloat16)
    shape.update(kw)
    return sq.make_qkv("outlier", seed=seed, **shape)


def _scaled(x, factor):
    return (x.float() * factor).to(x.dtype)


def _check(q, k, v, msg, **opts):
    ref = sq.reference_attention(q, k, v, is_causal=True)
    out = sq.emulate(q, k, v, RECIPE, is_causal=True, **opts)
    return assert_rows_close(out, ref, rel_l1=REL_L1, row_rel_l1_max=ROW_MAX, msg=msg)["rel_l1"]


@pytest.mark.parametrize("factor", [1e-6, 1e-3, 1e4])
def test_scaled_v_keeps_its_accuracy(seed, factor):
    q, k, v = _qkv(seed)
    base = _check(q, k, v, f"seed={seed}")
    got = _check(q, k, _scaled(v, factor), f"V x {factor:g} seed={seed}")
    assert abs(got - base) <= SCALED_TOL * base, (factor, got, base, seed)


@pytest.mark.parametrize("fq", [1e4, 1e-3])
def test_scaled_q_and_k_keep_their_accuracy(seed, fq):
    """Q × c and K × 1/c leave S unchanged: only the quantizers see the change of scale."""
    q, k, v = _qkv(seed)
    base = _check(q, k, v, f"seed={seed}")
    got = _check(_scaled(q, fq), _scaled(k, 1 / fq), v, f"Q x {fq:g}, K x {1 / fq:g} seed={seed}")
    assert abs(got - base) <= SCALED_TOL * base, (fq, got, base, seed)


def test_each_head_has_its_own_tensor_scale(seed):
    """V heads 1e6 apart (Q, K heads too): a per-tensor FP32 scale would flush the small head's groups
    (their E4M3 scales would underflow); per-(b, head) scales keep both."""
    q, k, v = _qkv(seed)
    head = torch.tensor([1e-3, 1e3])[None, :, None, None]
    vv = (v.float() * head).to(v.dtype)
    qq = (q.float() * head.repeat_interleave(2, 1)).to(q.dtype)
    kk = (k.float() / head).to(k.dtype)
    ref = sq.reference_attention(qq, kk, vv, is_causal=True)
    out = sq.emulate(qq, kk, vv, RECIPE, is_causal=True)
    for h in range(4):  # every q head against its own reference
        assert_rows_close(out[:, h], ref[:, h], rel_l1=REL_L1, row_rel_l1_max=ROW_MAX, msg=f"head {h} seed={seed}")


def test_mxfp4_option_also_keeps_scaled_v(seed):
    """MXFP4 (one level: E8M0 scales span 2**±127) stays available and needs no FP32 level."""
    q, k, v = _qkv(seed)
    ref = sq.reference_attention(q, k, _scaled(v, 1e-3), is_causal=True)
    out = sq.emulate(q, k, _scaled(v, 1e-3), RECIPE, is_causal=True, fmt="mxfp4")
    assert_rows_close(out, ref, rel_l1=0.2, row_rel_l1_max=0.8, msg=f"seed={seed}")


def test_zero_v_gives_exact_zero(seed):
    q, k, v = _qkv(seed)
    out = sq.emulate(q, k, torch.zeros_like(v), RECIPE, is_causal=True)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_v_gives_nan_in_its_channel(seed, fmt, bad):
    """One Inf/NaN at v[j, c]: its 16-token group (32 for MXFP4) gets the E4M3/E8M0 NaN scale, so
    channel c of every row is NaN (the emulation multiplies masked keys too, 0 · NaN); the tensor
    scale skips non-finite values, so every other channel and head stays finite."""
    q, k, v = _qkv(seed)
    j, c = 150, 5
    v[0, 0, j, c] = bad
    out = sq.emulate(q, k, v, RECIPE, is_causal=True, fmt=fmt)
    # kv head 0 feeds q heads 0 and 1
    assert torch.isnan(out[0, :2, :, c]).all(), f"{bad} must not come out finite; seed={seed}"
    others = torch.ones(out.shape[-1], dtype=torch.bool)
    others[c] = False
    assert torch.isfinite(out[0, :2][..., others]).all() and torch.isfinite(out[0, 2:]).all(), f"seed={seed}"


@pytest.mark.parametrize("where", ["q", "k"])
def test_inf_in_q_or_k_gives_nan_rows(seed, where):
    """Inf reaches the smoothing mean (Inf - Inf = NaN) and then NaN group scales: the same rows
    as a NaN (docs/support.md): q -> its 128-row Q block, k -> every row of its heads."""
    q, k, v = _qkv(seed)
    (q if where == "q" else k)[0, 0, 37, 5] = float("inf")
    out = sq.emulate(q, k, v, RECIPE, is_causal=True)
    nan_rows = torch.isnan(out[0]).any(dim=-1)  # (h_q, s_q)
    want = torch.zeros_like(nan_rows)
    if where == "q":
        want[0, :128] = True
    else:
        want[:2] = True  # kv head 0 -> q heads 0, 1
    assert torch.equal(nan_rows, want), f"{where} seed={seed}"
    assert torch.isnan(out[0][want]).all(), "affected rows are NaN throughout"
