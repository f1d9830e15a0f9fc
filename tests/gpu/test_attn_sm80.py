"""sm80 mma.sync attention family (kernels/include/sage/sm80): kernel vs emulation vs float64.

GPU tests need CUDA and a sage_core built with the sm80 family (SAGE_CUDA_ARCHS containing one of
80;86;89;90a); they skip with the reason otherwise. The e4m3 recipes need compute capability
>= 8.9 (they run on sm_90a too, where FP8/INT4 mma.sync are emulated by the hardware: correct,
not fast). CPU tests at the top check the V token permutation and the option filter.

Every test draws seeded inputs (the ``seed`` fixture: fixed per test id, SAGE_TEST_SEED replays,
SAGE_TEST_FRESH_SEEDS=1 draws fresh ones; the seed is in every failure message); GPU tests poison
the kernel's outputs with NaN before the launch and check O per row as well as in aggregate
(``sage_quant.testing.assert_rows_close``).

    python -m pytest tests/gpu/test_attn_sm80.py -q -rs
"""

from __future__ import annotations

import math

import pytest
import torch

sage_quant = pytest.importorskip("sage_quant")
sm80 = pytest.importorskip("sage_torch.backends.sm80")
from sage_quant import reference as R  # noqa: E402
from sage_quant.testing import assert_rows_close  # noqa: E402

kRelL1VsEmulation = 2e-3  # docs/design/NUMERICS.md §Accuracy: kernel vs emulation of the same recipe
# Worst single row vs the emulation (sage_quant.testing.row_rel_l1): looser than the aggregate (a K
# code flipped by the fp32 order of the CUDA k_mean moves a row with few dominant keys by ~1%); a
# wrong row (tile, permutation, mask) is off by O(1).
kRowRelL1VsEmulation = 5e-2
kRelL1F64 = {"qk_s8_pv_f16": 0.0025, "qk_s8_pv_e4m3": 0.0041}  # outlier, d=128 (SageAttention 2.2.0)
_F64_OPTIONS = {"qk_s8_pv_f16": {"q_granularity": "per_thread", "k_granularity": "per_thread", "k_block": 64}}
kLseAtol = 2e-3
kLseRtol = 1e-4
kE4m3Cc = (8, 9)


# ------------------------------------------------------------------------------------------------
# CPU: format + fragment bookkeeping
# ------------------------------------------------------------------------------------------------
def test_perm32_matches_mma_fragment_packing():
    """Model the kernel's packing of the 8-bit P A-fragment (m16n8k32) from the S accumulator.

    S n-tile j gives lane t keys 8j + 2t + e; the kernel packs byte i of register (2*half + rowhalf)
    from n-tile 4kk + 2*half + i//2, element e = i%2. PTX puts that byte at contraction slot
    k = 16*half + 4t + i. V's slot k must therefore hold that key: PERM32[k].
    """
    perm = sm80.PERM32
    assert sorted(perm) == list(range(32)), "PERM32 must be a permutation of one 32-key chunk"
    for t in range(4):
        for half in range(2):
            for i in range(4):
                key = 8 * (2 * half + i // 2) + 2 * t + i % 2
                slot = 16 * half + 4 * t + i
                assert perm[slot] == key, (t, half, i, slot, perm[slot], key)


@pytest.mark.parametrize("fmt", ["s8", "e4m3"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("s", [1, 31, 33, 200])
def test_quant_v_t_p32_is_the_shared_format_permuted(fmt, layout, s, seed):
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(2, 3, s, 64, generator=g) * 3).to(torch.bfloat16)
    if layout == "bshd":
        v = v.transpose(1, 2).contiguous()
    v_t, v_scale = sm80.quant_v_t_p32(v, fmt, layout=layout)
    s_pad = -(-s // 128) * 128
    assert v_t.shape == (2, 3, 64, s_pad) and v_t.is_contiguous(), f"seed={seed}"
    # undo the permutation, compare with the shared reference bit for bit
    inv = torch.empty(32, dtype=torch.long)
    inv[torch.tensor(sm80.PERM32)] = torch.arange(32)
    idx = (torch.arange(0, s_pad, 32)[:, None] + inv[None, :]).reshape(-1)
    plain = v_t.index_select(-1, idx)
    if fmt == "e4m3":
        ref_t, ref_scale = R.quant_v_e4m3_t(v, layout=layout)
    else:
        ref_q, ref_scale = R.quant_v_s8(v, layout=layout)
        ref_t = torch.zeros((2, 3, 64, s_pad), dtype=torch.int8)
        ref_t[..., :s] = ref_q.transpose(2, 3)
    assert torch.equal(plain, ref_t), f"seed={seed}"
    assert torch.equal(v_scale, ref_scale), f"seed={seed}"


def test_options_filter():
    for recipe in sm80.RECIPES:
        opts = sm80.resolve_options(recipe, {})
        assert opts["kv_block"] == sm80.kKvTile
        assert sm80.unsupported_reason(recipe, opts) is None, recipe
        assert "kv_block" in sm80.unsupported_reason(recipe, sm80.resolve_options(recipe, {"kv_block": 128}))
    assert sm80.unsupported_reason("qk_s8_pv_f16", sm80.resolve_options("qk_s8_pv_f16", {"pv_dtype": "bf16"}))
    assert sm80.unsupported_reason("qk_s8_pv_e4m3", sm80.resolve_options("qk_s8_pv_e4m3", {"smooth_q": True}))
    assert sm80.resolve_options("qk_s8_pv_e4m3", {})["smooth_v"] is False  # backend default
    assert "smooth_v" in sm80.unsupported_reason("qk_s8_pv_e4m3", sm80.resolve_options("qk_s8_pv_e4m3", {"smooth_v": True}))
    assert sm80.unsupported_reason("qk_s4_pv_e4m3", sm80.resolve_options("qk_s4_pv_e4m3", {"q_block": 96}))
    assert sm80.unsupported_reason("qk_s4_pv_e4m3", sm80.resolve_options("qk_s4_pv_e4m3", {"delta_s": "exact_k"}))
    with pytest.raises(TypeError):
        sm80.resolve_options("qk_s8_pv_f16", {"no_such_option": 1})


def test_options_filter_f16_buffer():
    """pv_accum='f16_buffer' has kernels for qk_s8_pv_f16 and qk_s8_pv_e4m3 (V range 2.25)."""
    for recipe in ("qk_s8_pv_f16", "qk_s8_pv_e4m3"):
        opts = sm80.resolve_options(recipe, {"pv_accum": "f16_buffer"})
        assert sm80.unsupported_reason(recipe, opts) is None, recipe
        assert all("_acc_f16_" in n for n in sm80.kernel_names(recipe, "f16_buffer"))
    assert sm80.resolve_options("qk_s8_pv_e4m3", {"pv_accum": "f16_buffer"})["v_max"] == 2.25
    assert sm80.resolve_options("qk_s8_pv_e4m3", {})["v_max"] == 448.0
    reason = sm80.unsupported_reason("qk_s4_pv_e4m3", sm80.resolve_options("qk_s4_pv_e4m3", {"pv_accum": "f16_buffer"}))
    assert reason and "f16_buffer" in reason
    for accum in ("one_level", "fp32"):
        assert "pv_accum" in sm80.unsupported_reason(
            "qk_s8_pv_e4m3", sm80.resolve_options("qk_s8_pv_e4m3", {"pv_accum": accum}))
    with pytest.raises(ValueError, match="v_max"):  # a 64-key tile could overflow FP16
        sm80.resolve_options("qk_s8_pv_e4m3", {"pv_accum": "f16_buffer", "v_max": 4.0})


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
def _skip_reason(recipe: str, pv_accum: str | None = None) -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import sage_core
    except ImportError as exc:
        return f"sage_core does not import: {exc}"
    missing = [n for n in sm80.kernel_names(recipe, pv_accum) if not sage_core.has_kernel(n)]
    if missing or not hasattr(sage_core, f"attn_fwd_sm80_{recipe}"):
        return f"sage_core was built without the sm80 kernels of {recipe} (missing {missing})"
    if recipe in ("qk_s8_pv_e4m3", "qk_s4_pv_e4m3") and torch.cuda.get_device_capability() < kE4m3Cc:
        return f"{recipe} needs compute capability >= 8.9 (FP8 mma.sync)"
    return None


def _require(recipe: str, pv_accum: str | None = None):
    reason = _skip_reason(recipe, pv_accum)
    if reason:
        pytest.skip(reason)


def _poisoning_alloc(shape, *, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(sm80, "_alloc", _poisoning_alloc)


def _inputs(seed, dist, *, b, h_q, h_kv, s_q, s_kv, d, dtype, layout):
    q, k, v = sage_quant.make_qkv(dist, b=b, h_q=h_q, h_kv=h_kv, s_q=s_q, s_kv=s_kv, d=d, dtype=dtype,
                                  layout=layout, seed=seed, device="cuda")
    return seed, q, k, v


def _kernel(recipe, q, k, v, *, layout, is_causal, return_lse=True, **options):
    d = q.shape[-1]
    fn = getattr(sm80, f"attn_{recipe}")
    o, lse = fn(q, k, v, layout=layout, is_causal=is_causal, scale=1.0 / math.sqrt(d),
                return_lse=return_lse, **options)
    torch.cuda.synchronize()
    return o, lse


def _emulate(recipe, q, k, v, *, layout, is_causal, **options):
    opts = sm80.resolve_options(recipe, options)  # the exact options the kernel ran with
    return sage_quant.emulate(q, k, v, recipe, layout=layout, is_causal=is_causal,
                              scale=1.0 / math.sqrt(q.shape[-1]), return_lse=True, **opts)


def _check_vs_emulation(recipe, seed, q, k, v, *, layout, is_causal, **options):
    o, lse = _kernel(recipe, q, k, v, layout=layout, is_causal=is_causal, **options)
    o_ref, lse_ref = _emulate(recipe, q, k, v, layout=layout, is_causal=is_causal, **options)
    ctx = (f"recipe={recipe} seed={seed} shape q={tuple(q.shape)} k={tuple(k.shape)} layout={layout} "
           f"causal={is_causal} dtype={q.dtype} options={options}")
    assert o.shape == q.shape and o.dtype == q.dtype and o.is_contiguous(), ctx
    assert torch.isfinite(o).all(), f"non-finite output (poison left or NaN): {ctx}"
    assert_rows_close(o, o_ref, rel_l1=kRelL1VsEmulation, row_rel_l1_max=kRowRelL1VsEmulation, msg=ctx)
    masked = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), masked), f"-inf LSE rows differ: {ctx}"
    if masked.any():  # fully masked rows: O = 0 exactly
        o_b = R.to_bhsd(o, layout)
        assert (o_b[masked] == 0).all(), f"fully masked rows must be 0: {ctx}"
    fin = ~masked
    assert torch.isfinite(lse[fin]).all(), ctx
    torch.testing.assert_close(lse[fin], lse_ref[fin].to(torch.float32), atol=kLseAtol, rtol=kLseRtol,
                               msg=lambda m: f"LSE: {m}\n{ctx}")


# (b, h_q, h_kv, s_q, s_kv): odd lengths, s_q != s_kv, GQA and MQA
_SHAPES = [
    (1, 2, 2, 1, 1),
    (2, 2, 1, 17, 17),
    (1, 4, 2, 127, 1000),
    (1, 3, 1, 1000, 127),
    (2, 2, 2, 64, 64),
    (1, 2, 1, 200, 333),
]
_RECIPES_12 = ["qk_s8_pv_f16", "qk_s8_pv_s8"]
_RECIPES_34 = ["qk_s8_pv_e4m3", "qk_s4_pv_e4m3"]


@pytest.mark.gpu
@pytest.mark.sm80
@pytest.mark.parametrize("recipe", _RECIPES_12 + _RECIPES_34)
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "b{}h{}x{}_sq{}_skv{}".format(*s))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_vs_emulation_shapes(recipe, shape, is_causal, d, seed):
    _require(recipe)
    b, h_q, h_kv, s_q, s_kv = shape
    dtype = torch.bfloat16 if (s_q + d) % 2 else torch.float16  # both dtypes across the grid
    layout = "bshd" if (s_kv + int(is_causal)) % 2 else "bhsd"  # both layouts across the grid
    seed, q, k, v = _inputs(seed, "randn", b=b, h_q=h_q, h_kv=h_kv, s_q=s_q, s_kv=s_kv, d=d, dtype=dtype, layout=layout)
    _check_vs_emulation(recipe, seed, q, k, v, layout=layout, is_causal=is_causal)


@pytest.mark.gpu
@pytest.mark.sm80
@pytest.mark.parametrize("recipe", _RECIPES_12 + _RECIPES_34)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("d", [64, 128])
def test_vs_emulation_dtypes_layouts(recipe, dtype, layout, d, seed):
    _require(recipe)
    seed, q, k, v = _inputs(seed, "outlier", b=2, h_q=4, h_kv=2, s_q=300, s_kv=257, d=d, dtype=dtype, layout=layout)
    _check_vs_emulation(recipe, seed, q, k, v, layout=layout, is_causal=False)


@pytest.mark.gpu
@pytest.mark.sm80
@pytest.mark.parametrize("recipe", _RECIPES_12 + _RECIPES_34)
@pytest.mark.parametrize("options", [
    {"q_granularity": "per_token", "k_granularity": "per_token"},
    {"q_granularity": "per_thread", "k_granularity": "per_thread", "k_block": 64},
    {"q_granularity": "per_warp", "k_granularity": "per_block", "k_block": 128},
    {"q_granularity": "per_tensor", "k_granularity": "per_tensor", "smooth_k": False},
], ids=["per_token", "per_thread", "per_warp_block128", "per_tensor_nosmooth"])
def test_vs_emulation_granularities(recipe, options, seed):
    _require(recipe)
    seed, q, k, v = _inputs(seed, "outlier", b=1, h_q=2, h_kv=1, s_q=190, s_kv=300, d=128, dtype=torch.bfloat16,
                            layout="bhsd")
    _check_vs_emulation(recipe, seed, q, k, v, layout="bhsd", is_causal=True, **options)


@pytest.mark.gpu
@pytest.mark.sm80
def test_qk_s4_without_q_smoothing(seed):
    _require("qk_s4_pv_e4m3")
    seed, q, k, v = _inputs(seed, "outlier", b=1, h_q=2, h_kv=2, s_q=150, s_kv=150, d=64, dtype=torch.float16,
                            layout="bhsd")
    _check_vs_emulation("qk_s4_pv_e4m3", seed, q, k, v, layout="bhsd", is_causal=False, smooth_q=False)


@pytest.mark.gpu
@pytest.mark.sm80
@pytest.mark.parametrize("recipe", _RECIPES_12 + _RECIPES_34)
def test_vs_float64_outlier_d128(recipe, seed):
    """Accuracy budget vs exact attention (docs/design/NUMERICS.md §Accuracy; b=1, h=8, n=2048, bf16, outlier, d=128)."""
    _require(recipe)
    seed, q, k, v = _inputs(seed, "outlier", b=1, h_q=8, h_kv=8, s_q=2048, s_kv=2048, d=128, dtype=torch.bfloat16,
                            layout="bhsd")
    # qk_s8_pv_f16: the reference figure (SageAttention 2.2.0) uses per-thread INT8 groups; the
    # recipe's per-block default measures rel-L1 ~0.0033 here (emulation), per-thread ~0.0024.
    options = _F64_OPTIONS.get(recipe, {})
    o, _ = _kernel(recipe, q, k, v, layout="bhsd", is_causal=False, return_lse=False, **options)
    ref = sage_quant.reference_attention(q, k, v, layout="bhsd")
    acc = sage_quant.accuracy(o, ref)
    print(f"\n{recipe} {options} outlier d=128 bf16 n=2048 vs float64: {acc} (seed={seed})")
    if recipe in kRelL1F64:
        assert acc["rel_l1"] <= kRelL1F64[recipe], f"{recipe}: {acc} seed={seed}"
    else:  # no published budget: at least as accurate as the recipe's own emulation (+ slack)
        emu = _emulate(recipe, q, k, v, layout="bhsd", is_causal=False, **options)[0]
        emu_err = sage_quant.rel_l1(emu, ref)
        assert acc["rel_l1"] <= emu_err * 1.1 + 1e-4, f"{recipe}: {acc} vs emulation {emu_err} seed={seed}"


@pytest.mark.gpu
@pytest.mark.sm80
def test_nan_in_one_query_row_stays_in_that_row(seed):
    recipe = "qk_s8_pv_f16"
    _require(recipe)
    seed, q, k, v = _inputs(seed, "randn", b=1, h_q=2, h_kv=2, s_q=100, s_kv=90, d=64, dtype=torch.float16,
                            layout="bhsd")
    q[0, 1, 37, 5] = float("nan")
    o, lse = _kernel(recipe, q, k, v, layout="bhsd", is_causal=False,
                     q_granularity="per_token", k_granularity="per_block")
    bad = torch.zeros(1, 2, 100, dtype=torch.bool, device=q.device)
    bad[0, 1, 37] = True
    assert torch.isnan(o[bad]).all(), f"seed={seed}"
    assert torch.isfinite(o[~bad]).all(), f"rows with finite inputs must be finite, seed={seed}"
    assert torch.isfinite(lse[~bad]).all(), f"seed={seed}"


@pytest.mark.gpu
@pytest.mark.sm80
def test_binding_rejects_bad_input_before_launch():
    recipe = "qk_s8_pv_f16"
    _require(recipe)
    import sage_core
    dev = "cuda"
    q = torch.zeros(1, 2, 16, 64, dtype=torch.int8, device=dev)
    k = torch.zeros(1, 2, 16, 64, dtype=torch.int8, device=dev)
    v = torch.zeros(1, 2, 16, 64, dtype=torch.float16, device=dev)
    o = torch.full((1, 2, 16, 64), float("nan"), dtype=torch.float16, device=dev)
    qs = torch.ones(1, 2, 1, device=dev)
    ks = torch.ones(1, 2, 1, device=dev)
    kw = dict(q_granularity="per_block", q_block=128, k_granularity="per_block", k_block=64,
              softmax_scale=0.125, is_causal=False, stream=torch.cuda.current_stream().cuda_stream)
    sage_core.attn_fwd_sm80_qk_s8_pv_f16(q, k, v, o, None, qs, ks, **kw)  # valid: runs
    torch.cuda.synchronize()
    assert torch.equal(o, torch.zeros_like(o))  # zero Q, K, V -> uniform P over zero V
    with pytest.raises(TypeError, match="q"):
        sage_core.attn_fwd_sm80_qk_s8_pv_f16(q.to(torch.uint8), k, v, o, None, qs, ks, **kw)
    with pytest.raises(ValueError, match="q_scale"):
        sage_core.attn_fwd_sm80_qk_s8_pv_f16(q, k, v, o, None, torch.ones(1, 2, 3, device=dev), ks, **kw)
    with pytest.raises(ValueError, match="head dim"):
        sage_core.attn_fwd_sm80_qk_s8_pv_f16(q[..., :32], k[..., :32], v[..., :32], o[..., :32], None, qs, ks, **kw)
    with pytest.raises(ValueError, match="granularity"):
        sage_core.attn_fwd_sm80_qk_s8_pv_f16(q, k, v, o, None, qs, ks, **{**kw, "q_granularity": "per_row"})
    with pytest.raises(ValueError, match="CUDA"):
        sage_core.attn_fwd_sm80_qk_s8_pv_f16(q.cpu(), k, v, o, None, qs, ks, **kw)
    with pytest.raises(TypeError, match="v"):
        sage_core.attn_fwd_sm80_qk_s8_pv_f16(q, k, v.to(torch.bfloat16), o, None, qs, ks, **kw)


# ------------------------------------------------------------------------------------------------
# GPU: the FP16-accumulate variants (pv_accum="f16_buffer")
# ------------------------------------------------------------------------------------------------
_RECIPES_F16_BUFFER = ["qk_s8_pv_f16", "qk_s8_pv_e4m3"]


@pytest.mark.gpu
@pytest.mark.sm80
@pytest.mark.parametrize("recipe", _RECIPES_F16_BUFFER)
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "b{}h{}x{}_sq{}_skv{}".format(*s))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_f16_buffer_vs_emulation_shapes(recipe, shape, is_causal, d, seed):
    _require(recipe, "f16_buffer")
    b, h_q, h_kv, s_q, s_kv = shape
    dtype = torch.float16 if (s_q + d) % 2 else torch.bfloat16
    layout = "bhsd" if (s_kv + int(is_causal)) % 2 else "bshd"
    seed, q, k, v = _inputs(seed, "randn", b=b, h_q=h_q, h_kv=h_kv, s_q=s_q, s_kv=s_kv, d=d, dtype=dtype, layout=layout)
    _check_vs_emulation(recipe, seed, q, k, v, layout=layout, is_causal=is_causal, pv_accum="f16_buffer")


@pytest.mark.gpu
@pytest.mark.sm80
@pytest.mark.parametrize("recipe", _RECIPES_F16_BUFFER)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("d", [64, 128])
def test_f16_buffer_vs_emulation_dtypes_layouts(recipe, dtype, layout, d, seed):
    _require(recipe, "f16_buffer")
    seed, q, k, v = _inputs(seed, "outlier", b=2, h_q=4, h_kv=2, s_q=300, s_kv=257, d=d, dtype=dtype, layout=layout)
    _check_vs_emulation(recipe, seed, q, k, v, layout=layout, is_causal=False, pv_accum="f16_buffer")


@pytest.mark.gpu
@pytest.mark.sm80
@pytest.mark.parametrize("recipe", _RECIPES_F16_BUFFER)
def test_f16_buffer_vs_float64_outlier_d128(recipe, seed):
    """The FP16 buffer keeps the recipe's accuracy budget (docs/design/NUMERICS.md §Accuracy, outlier, d=128)."""
    _require(recipe, "f16_buffer")
    seed, q, k, v = _inputs(seed, "outlier", b=1, h_q=8, h_kv=8, s_q=2048, s_kv=2048, d=128, dtype=torch.bfloat16,
                            layout="bhsd")
    options = {**_F64_OPTIONS.get(recipe, {}), "pv_accum": "f16_buffer"}
    o, _ = _kernel(recipe, q, k, v, layout="bhsd", is_causal=False, return_lse=False, **options)
    ref = sage_quant.reference_attention(q, k, v, layout="bhsd")
    acc = sage_quant.accuracy(o, ref)
    print(f"\n{recipe} {options} outlier d=128 bf16 n=2048 vs float64: {acc} (seed={seed})")
    assert acc["rel_l1"] <= kRelL1F64[recipe], f"{recipe}: {acc} seed={seed}"


@pytest.mark.gpu
@pytest.mark.sm80
@pytest.mark.parametrize("big_channels", ["all", "some"])
def test_f16_buffer_overflow_guard(big_channels, seed):
    """FP16 V whose 64-key tile sums overflow FP16 (|V| ~ 3000, uniform P: 64 x 3000 > 65504): the
    kernel must detect the overflowing tiles and recompute them in FP32, so O stays finite and
    matches the FP32-accumulate kernel and float64 attention."""
    recipe = "qk_s8_pv_f16"
    _require(recipe, "f16_buffer")
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h, s, d = 1, 2, 256, 128
    q = (torch.randn(b, h, s, d, generator=g) * 0.01).to(torch.float16).cuda()  # ~uniform P
    k = torch.randn(b, h, s, d, generator=g).to(torch.float16).cuda()
    v = torch.rand(b, h, s, d, generator=g) * 1000 + 2500  # same sign: the tile sums add up
    if big_channels == "some":
        v[..., 16:] = torch.randn(b, h, s, d - 16, generator=g)
    v = v.to(torch.float16).cuda()
    tile = v[0, 0, :64].double().sum(dim=0)
    assert (tile.abs() > 65504).any(), "the test must overflow an FP16 buffer"
    o, lse = _kernel(recipe, q, k, v, layout="bhsd", is_causal=False, pv_accum="f16_buffer")
    ctx = f"seed={seed} big_channels={big_channels}"
    assert torch.isfinite(o).all(), f"FP16 overflow leaked into O: {ctx}"
    o32, _ = _kernel(recipe, q, k, v, layout="bhsd", is_causal=False, pv_accum="fp32")
    assert sage_quant.rel_l1(o, o32) <= kRelL1VsEmulation, ctx
    _check_vs_emulation(recipe, seed, q, k, v, layout="bhsd", is_causal=True, pv_accum="f16_buffer")
    ref = sage_quant.reference_attention(q, k, v, layout="bhsd")
    assert sage_quant.rel_l1(o, ref) <= kRelL1F64[recipe], ctx


@pytest.mark.gpu
@pytest.mark.sm80
def test_f16_buffer_e4m3_v_range(seed):
    """qk_s8_pv_e4m3 with the FP16 buffer quantizes V to |V^| <= 2.25 (no tile can overflow)."""
    _require("qk_s8_pv_e4m3", "f16_buffer")
    seed, q, k, v = _inputs(seed, "outlier", b=1, h_q=2, h_kv=2, s_q=64, s_kv=300, d=64, dtype=torch.bfloat16,
                            layout="bhsd")
    v_t, v_scale = sm80.quant_v_t_p32(v, "e4m3", v_max=2.25)
    vals = R.e4m3_to_float(v_t.cpu())
    assert vals.abs().max().item() == 2.25, f"seed={seed}"
    amax = v.float().abs().amax(dim=2).cpu()
    want = amax / torch.full_like(amax, 2.25)  # a true division, as the kernel's __fdiv_rn
    torch.testing.assert_close(v_scale.cpu(), want, rtol=0, atol=0, msg=f"seed={seed}")


@pytest.mark.gpu
@pytest.mark.sm80
def test_f16_buffer_binding_rejects_unknown_accumulation():
    recipe = "qk_s8_pv_f16"
    _require(recipe, "f16_buffer")
    import sage_core
    dev = "cuda"
    q = torch.zeros(1, 2, 16, 64, dtype=torch.int8, device=dev)
    v = torch.zeros(1, 2, 16, 64, dtype=torch.float16, device=dev)
    o = torch.full((1, 2, 16, 64), float("nan"), dtype=torch.float16, device=dev)
    qs = torch.ones(1, 2, 1, device=dev)
    kw = dict(q_granularity="per_block", q_block=128, k_granularity="per_block", k_block=64,
              softmax_scale=0.125, is_causal=False, stream=torch.cuda.current_stream().cuda_stream)
    with pytest.raises(ValueError, match="pv_accum"):
        sage_core.attn_fwd_sm80_qk_s8_pv_f16(q, q, v, o, None, qs, qs, **kw, pv_accum="fp16")
    v_t = torch.zeros(1, 2, 64, 64, dtype=torch.int8, device=dev)
    vs = torch.ones(1, 2, 64, device=dev)
    with pytest.raises(ValueError, match="accepted: int32$"):  # no FP16-accumulate INT8 PV kernel
        sage_core.attn_fwd_sm80_qk_s8_pv_s8(q, q, v_t, o, None, qs, qs, vs, **kw, pv_accum="f16_buffer")
    sage_core.attn_fwd_sm80_qk_s8_pv_f16(q, q, v, o, None, qs, qs, **kw, pv_accum="f16_buffer")
    torch.cuda.synchronize()
    assert torch.equal(o, torch.zeros_like(o))


@pytest.mark.gpu
@pytest.mark.sm80
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_bf16_v_beyond_fp16_range(layout, seed):
    """qk_s8_pv_f16 converts bf16 V to FP16: channels beyond 65504 are scaled by a power of two
    (sage_quant.reference.v_fp16_range_scale) and O's channel multiplied back, as the emulation."""
    recipe = "qk_s8_pv_f16"
    _require(recipe)
    seed, q, k, v = _inputs(seed, "randn", b=1, h_q=4, h_kv=2, s_q=130, s_kv=200, d=64, dtype=torch.bfloat16,
                            layout=layout)
    vb = R.to_bhsd(v, layout)
    vb[0, 1, 17, 3] = 7e4
    vb[0, 0, 100, 40] = -3e5
    _check_vs_emulation(recipe, seed, q, k, v, layout=layout, is_causal=True)
    o, _ = _kernel(recipe, q, k, v, layout=layout, is_causal=False, return_lse=False)
    ref = sage_quant.reference_attention(q, k, v, layout=layout)
    assert sage_quant.rel_l1(o, ref) <= 0.02, f"seed={seed}"
