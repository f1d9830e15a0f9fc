"""Fuzz findings of issue 9 (each pinned by a test) and the standing seeded fuzz set CI runs on CPU
through the validation and emulation paths (a few hundred small cases; SAGE_TEST_FRESH_SEEDS=1
draws new ones, SAGE_TEST_SEED=<n> replays one).

Oracle: a call is either valid (then it runs and returns q's shape, finite, close to float64
attention) or a TypeError/ValueError before dispatch; never a silent fallback for a bad value,
never another exception.
"""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch

import sage_quant
import sage_torch
from sage_torch.backends import sm80
from sage_torch_testing import make_qkv

# ------------------------------------------------------------------------------ finding 1


@pytest.mark.parametrize("options, match", [
    ({"kv_block": 7}, "kv_block"),
    ({"pv_accum": "bogus"}, "pv_accum"),
    ({"q_granularity": "per_row"}, "q_granularity"),
    ({"smooth_k": "yes"}, "smooth_k"),
])
def test_bad_option_values_raise_before_dispatch(options, match, seed, as_arch, fake_backend):
    """recipe='auto': a declining backend used to fall back to SDPA with only a warning."""
    q, k, v = make_qkv(b=1, h_q=2, s_q=16, d=64, seed=seed)
    as_arch("sm90")
    fake = fake_backend("qk_s8_pv_e4m3", supports=lambda *a, **kw: "declined")
    fake_backend("qk_s8_pv_f16", supports=lambda *a, **kw: "declined")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either: the error comes first
        with pytest.raises(ValueError, match=match):
            sage_torch.attention(q, k, v, **options)
        with pytest.raises(ValueError, match=match):
            sage_torch.attention(q, k, v, recipe="qk_s8_pv_e4m3", **options)
    assert fake.calls == []


def test_valid_option_values_still_dispatch(seed, as_arch, fake_backend):
    q, k, v = make_qkv(b=1, h_q=2, s_q=16, d=64, seed=seed)
    as_arch("sm90")
    fake = fake_backend("qk_s8_pv_e4m3")
    sage_torch.attention(q, k, v, kv_block=128, pv_accum="two_level")
    assert len(fake.calls) == 1 and fake.calls[0]["options"] == {"kv_block": 128, "pv_accum": "two_level"}


def test_option_valid_for_the_second_auto_candidate(seed, as_arch, fake_backend):
    """pv_dtype exists only in qk_s8_pv_f16 (sm90's second preference): not an error."""
    q, k, v = make_qkv(b=1, h_q=2, s_q=16, d=64, seed=seed)
    as_arch("sm90")
    fake = fake_backend("qk_s8_pv_f16")
    sage_torch.attention(q, k, v, pv_dtype="fp16")
    assert len(fake.calls) == 1
    with pytest.raises(ValueError, match="pv_dtype"):
        sage_torch.attention(q, k, v, pv_dtype="fp8")


# ------------------------------------------------------------------------------ finding 2


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("which", ["batch", "heads"])
def test_sm80_declines_grids_beyond_65535(layout, which):
    n = sm80.kMaxGridYZ + 1
    b, h = (n, 1) if which == "batch" else (1, n)
    shape = (b, h, 1, 64) if layout == "bhsd" else (b, 1, h, 64)
    q = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16).expand(shape)  # no memory
    assert "65535" in sm80.grid_limit_reason(q, layout)
    for recipe in sm80.RECIPES:
        reason = sm80._make_supports(recipe)(q, q, q, layout=layout, is_causal=False, scale=0.125,
                                             return_lse=False)
        assert reason is not None and "65535" in reason and f"{which[:5]}" in reason.replace("heads", "heads")
    ok = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16).expand((sm80.kMaxGridYZ, 1, 1, 64))
    assert sm80.grid_limit_reason(ok, "bhsd") is None


# ------------------------------------------------------------------------------ finding 3


def test_qk_s8_pv_f16_bf16_v_beyond_fp16_range(seed):
    """One V element of 7e4 made its channel Inf in every row (bf16 V cast to FP16)."""
    q, k, v = make_qkv(b=1, h_q=2, h_kv=1, s_q=40, s_kv=70, d=64, seed=seed)
    v[0, 0, 11, 3] = 7e4
    v[0, 0, 12, 9] = -3e5
    o = sage_quant.emulate(q, k, v, "qk_s8_pv_f16", is_causal=True)
    assert torch.isfinite(o).all(), f"seed={seed}"
    ref = sage_quant.reference_attention(q, k, v, is_causal=True)
    assert sage_quant.rel_l1(o, ref) < 0.02, f"seed={seed}"
    f = sage_quant.reference.v_fp16_range_scale(v)
    assert f[0, 0, 3].item() == 2.0 and f[0, 0, 9].item() == 8.0, f[0, 0, [3, 9]]
    assert (f[0, 0, [c for c in range(64) if c not in (3, 9)]] == 1).all()
    # in range: exactly the old recipe (plain FP16 conversion, no scale)
    v_ok = v.clone()
    v_ok[0, 0, 11, 3], v_ok[0, 0, 12, 9] = 1.0, 1.0
    assert (sage_quant.reference.v_fp16_range_scale(v_ok) == 1).all()


def test_v_fp16_range_scale_edges():
    v = torch.zeros(1, 1, 4, 8)
    v[0, 0, 0, 0] = 65504.0       # fits exactly
    v[0, 0, 0, 1] = 65504.0 * 2   # exactly two ranges: f = 2
    v[0, 0, 0, 2] = float("nan")  # non-finite channels keep f = 1 (NaN propagates as before)
    v[0, 0, 0, 3] = float("inf")
    v[0, 0, 0, 4] = 3e38
    f = sage_quant.reference.v_fp16_range_scale(v)[0, 0]
    assert f[:4].tolist() == [1.0, 2.0, 1.0, 1.0]
    assert (v[0, 0, :, 4].abs().max() / f[4]).item() <= 65504.0 and f[4] > 1
    assert (f[5:] == 1).all()


# ------------------------------------------------------------------------------ finding 7


def test_numpy_scalars_are_accepted(seed):
    q, k, v = make_qkv(b=1, h_q=2, s_q=9, s_kv=13, d=64, seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning):
        want = sage_torch.attention(q, k, v, is_causal=True, scale=0.125)
    for scale in (np.float32(0.125), np.float64(0.125), np.float16(0.125)):
        for causal in (np.True_, np.bool_(True)):
            got = sage_torch.attention(q, k, v, is_causal=causal, scale=scale)
            assert torch.equal(got, want), (type(scale), type(causal))
    o, lse = sage_torch.attention(q, k, v, scale=np.float32(0.125), return_lse=np.True_)
    assert lse.shape == (1, 2, 9)
    got = sage_torch.sageattn(q, k, v, is_causal=np.True_, sm_scale=np.float32(0.125))
    assert torch.equal(got, want)


@pytest.mark.parametrize("kw, err, match", [
    ({"is_causal": 1}, TypeError, r"is_causal must be a bool .*numpy.bool_ is accepted.*got 1 of type builtins.int"),
    ({"is_causal": "yes"}, TypeError, r"got 'yes' of type builtins.str"),
    ({"return_lse": np.int64(1)}, TypeError, r"return_lse must be a bool.*numpy.int64"),
    ({"scale": "0.1"}, TypeError, r"scale must be None or a positive finite real number .*np.float32.*got '0.1'"),
    ({"scale": np.True_}, TypeError, r"scale must be None .*numpy.bool"),
    ({"scale": np.float32(-1)}, ValueError, r"positive finite real number, got .*-1\.0"),
    ({"scale": np.float64("nan")}, ValueError, r"positive finite real number, got .*nan"),
])
def test_bad_scalar_messages_say_what_was_given(kw, err, match, seed):
    q, k, v = make_qkv(b=1, h_q=2, s_q=8, d=64, seed=seed)
    with pytest.raises(err, match=match):
        sage_torch.attention(q, k, v, **kw)


# ------------------------------------------------------------------------------ standing fuzz set

_VALUE_POOL = {
    "kv_block": [16, 64, 128, 7, 0, -64, 1.5, True, "64"],
    "q_block": [64, 128, 96, 0, -1],
    "k_block": [None, 64, 128, 12, 0],
    "q_granularity": ["per_thread", "per_block", "per_warp", "per_token", "per_tensor", "per_row", 3],
    "k_granularity": ["per_thread", "per_block", "per_token", "per_tensor", "per_warp", None],
    "smooth_k": [True, False, 1, "yes"],
    "smooth_q": [True, False, None],
    "smooth_v": [True, False, 0],
    "pv_accum": ["two_level", "one_level", "fp32", "f16_buffer", "bogus"],
    "pv_dtype": ["fp16", "bf16", "fp8"],
    "delta_s": ["quantized_k", "exact_k", "x"],
    "acc_mantissa_bits": [13, 23, 0, 24],
    "v_max": [None, 448.0, 2.25, -1.0, float("nan")],
    "fmt": ["nvfp4", "mxfp4", "fp4"],
    "p_fp4": ["two_level", "direct", "none"],
}
_FUZZ_RECIPES = [r for r in sage_quant.RECIPES if r != "train_s8"]


def _valid(recipe, options):
    try:
        sage_quant.recipe_options(recipe, **options)
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("case", range(6))
def test_fuzz_recipe_options_via_emulation(case, seed):
    """Random option subsets and values (valid and not) with an explicit recipe, emulated:
    valid -> runs and is close to float64; invalid -> TypeError/ValueError naming the option."""
    rng = random.Random(seed)
    for _ in range(20):
        recipe = rng.choice(_FUZZ_RECIPES)
        names = [n for n in _VALUE_POOL if n in sage_quant.RECIPES[recipe]]
        options = {n: rng.choice(_VALUE_POOL[n]) for n in rng.sample(names, rng.randint(1, min(3, len(names))))}
        b, h_kv = rng.choice([1, 2]), rng.choice([1, 2])
        h_q = h_kv * rng.choice([1, 2])
        s_q, s_kv = rng.randint(1, 40), rng.randint(1, 40)
        layout, causal = rng.choice(["bhsd", "bshd"]), rng.random() < 0.5
        q, k, v = make_qkv(b=b, h_q=h_q, h_kv=h_kv, s_q=s_q, s_kv=s_kv, d=64, layout=layout,
                           seed=rng.randrange(1 << 30))
        ctx = f"seed={seed} recipe={recipe} options={options} shape=({b},{h_q},{h_kv},{s_q},{s_kv}) {layout} causal={causal}"
        if _valid(recipe, options):
            o = sage_torch.attention(q, k, v, layout=layout, is_causal=causal, recipe=recipe, emulate=True, **options)
            assert o.shape == q.shape and o.dtype == q.dtype, ctx
            assert torch.isfinite(o).all(), ctx
            ref = sage_quant.reference_attention(q, k, v, layout=layout, is_causal=causal)
            if ref.abs().sum() > 0:
                assert sage_quant.rel_l1(o, ref) < 0.35, ctx  # FP4 and INT4 at a few keys are coarse
        else:
            with pytest.raises((TypeError, ValueError)):
                sage_torch.attention(q, k, v, layout=layout, is_causal=causal, recipe=recipe, emulate=True, **options)


@pytest.mark.parametrize("case", range(4))
def test_fuzz_auto_options_never_fall_back_on_a_bad_value(case, seed, as_arch, fake_backend):
    """recipe='auto' on sm90 (fake backends that decline everything): an option value valid for no
    candidate recipe is a ValueError before dispatch; otherwise the call falls back (warning) or
    runs, and unknown names are a TypeError."""
    rng = random.Random(seed)
    as_arch("sm90")
    fake_backend("qk_s8_pv_e4m3", supports=lambda *a, **kw: "declined")
    fake_backend("qk_s8_pv_f16", supports=lambda *a, **kw: "declined")
    q, k, v = make_qkv(b=1, h_q=2, s_q=8, d=64, seed=seed)
    candidates = ["qk_s8_pv_e4m3", "qk_s8_pv_f16"]  # sm90's preference list
    every = list(sage_quant.RECIPES)
    union = set().union(*(set(sage_quant.RECIPES[r]) for r in every))
    for _ in range(25):
        names = rng.sample(sorted(_VALUE_POOL), rng.randint(1, 2))
        options = {n: rng.choice(_VALUE_POOL[n]) for n in names}
        declared = ([r for r in candidates if set(options) <= set(sage_quant.RECIPES[r])]
                    or [r for r in every if set(options) <= set(sage_quant.RECIPES[r])])
        ctx = f"seed={seed} options={options}"
        if not set(options) <= union:
            with pytest.raises(TypeError):
                sage_torch.attention(q, k, v, **options)
        elif declared and not any(_valid(r, options) for r in declared):
            with pytest.raises(ValueError):
                sage_torch.attention(q, k, v, **options)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                o = sage_torch.attention(q, k, v, **options)  # falls back: every backend declines
            assert o.shape == q.shape and torch.isfinite(o).all(), ctx


@pytest.mark.parametrize("case", range(4))
def test_fuzz_scalars(case, seed):
    """scale / is_causal of many kinds: accepted exactly when a real positive finite number / a
    Python or numpy bool, with TypeError/ValueError otherwise."""
    rng = random.Random(seed)
    q, k, v = make_qkv(b=1, h_q=1, s_q=5, s_kv=6, d=64, seed=seed)
    scales = [None, 0.1, 1, np.float32(0.2), np.float64(0.3), np.int32(1), -0.1, 0.0, math.inf, math.nan,
              True, np.False_, "0.1", [0.1], torch.tensor(0.1)]
    flags = [True, False, np.True_, np.False_, 1, 0, None, "True", np.int8(1)]
    for _ in range(30):
        scale, causal = rng.choice(scales), rng.choice(flags)
        ok_scale = scale is None or (isinstance(scale, (int, float, np.integer, np.floating))
                                     and not isinstance(scale, (bool, np.bool_)) and 0 < float(scale) < math.inf)
        ok_flag = isinstance(causal, (bool, np.bool_))
        ctx = f"seed={seed} scale={scale!r} is_causal={causal!r}"
        if ok_scale and ok_flag:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                o = sage_torch.attention(q, k, v, scale=scale, is_causal=causal)
            assert torch.isfinite(o).all(), ctx
        else:
            with pytest.raises((TypeError, ValueError)):
                sage_torch.attention(q, k, v, scale=scale, is_causal=causal)
