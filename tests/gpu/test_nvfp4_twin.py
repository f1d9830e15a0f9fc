"""The sm120 NVFP4 attention kernel (recipe qk_nvfp4_pv_nvfp4) on the H200 through its twin MMA
policy (kernels/include/sage/sm120: the same mainloop, the block-scaled FP4 MMA computed with FP16
mma.sync), against sage_quant's exact emulation; and the quantization it consumes, bit for bit.

Everything but the one MMA instruction runs here: the loads, the K row order, fragments, scale
indexing, masking, online softmax, P's two-level quantization, the epilogue and LSE. The native
instruction's fragment conventions are checked on the CPU (tests/test_sm120_fragments.py). The
last test runs the native kernel where there is an sm_120 GPU (skipped elsewhere).

Needs a sage_core with the sm120twin family (SAGE_CUDA_ARCHS containing 90a) and a compute
capability 9.0 GPU; skips with the reason otherwise. Outputs (and the quantizers' outputs) are
poisoned with NaN before each launch; O is checked per row and in aggregate.

    python -m pytest tests/gpu/test_nvfp4_twin.py -q -rs
"""

from __future__ import annotations

import math

import pytest
import torch

sage_quant = pytest.importorskip("sage_quant")
sm120 = pytest.importorskip("sage_torch.backends.sm120")
from sage_quant import kernels as K  # noqa: E402
from sage_quant import reference as R  # noqa: E402
from sage_quant.testing import assert_rows_close  # noqa: E402

RECIPE = "qk_nvfp4_pv_nvfp4"
kRelL1VsEmulation = 2e-3  # docs/design/NUMERICS.md §Accuracy: kernel vs emulation, aggregate
# Worst row: P is FP4, so an E2M1 code that flips between kernel and emulation (ex2.approx vs
# torch.exp2, FP32 order; or a K code flipped by the CUDA k_mean's summation order) moves a
# randn row by ~0.1/sqrt(keys); measured bound to be set from the first H200 run. A wrong tile,
# permutation or mask is off by O(1).
kRowRelL1VsEmulation = 2e-2
# Same operands as the emulation (reference quantization, the emulation's own means): only the
# kernel's arithmetic differs, so rows must agree more tightly.
kRowRelL1SameOperands = 1e-2
kLseAtol = 2e-3
kLseRtol = 1e-4


def _twin_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import sage_core
    except ImportError as exc:
        return f"sage_core does not import: {exc}"
    if not hasattr(sage_core, "attn_fwd_sm120_twin_qk_nvfp4_pv_nvfp4"):
        return "sage_core was built without the sm120twin family (SAGE_CUDA_ARCHS needs 90a)"
    missing = [n for n in sm120.kernel_names("twin") if not sage_core.has_kernel(n)]
    if missing:
        return f"sage_core lacks {missing}"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"the twin is built for sm_90a, the GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    return None


def _require_twin():
    reason = _twin_skip_reason()
    if reason:
        pytest.skip(reason)


def _poisoning_alloc(shape, *, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, 0xAB, dtype=dtype, device=device)  # codes / scales: garbage, not zero


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(sm120, "_alloc", _poisoning_alloc)
    monkeypatch.setattr(K, "_alloc", _poisoning_alloc)


def _inputs(seed, dist, *, b, h_q, h_kv, s_q, s_kv, d, dtype, layout):
    return sage_quant.make_qkv(dist, b=b, h_q=h_q, h_kv=h_kv, s_q=s_q, s_kv=s_kv, d=d, dtype=dtype,
                               layout=layout, seed=seed, device="cuda")


def _emulate(q, k, v, *, layout, is_causal, **options):
    opts = sm120.resolve_options(options)
    return sage_quant.emulate(q, k, v, RECIPE, layout=layout, is_causal=is_causal,
                              scale=1.0 / math.sqrt(q.shape[-1]), return_lse=True, **opts)


def _check(o, lse, o_ref, lse_ref, *, layout, row_tol, ctx):
    assert torch.isfinite(o).all(), f"non-finite output (poison left or NaN): {ctx}"
    assert_rows_close(o, o_ref, rel_l1=kRelL1VsEmulation, row_rel_l1_max=row_tol, msg=ctx)
    masked = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), masked), f"-inf LSE rows differ: {ctx}"
    if masked.any():
        assert (R.to_bhsd(o, layout)[masked] == 0).all(), f"fully masked rows must be 0: {ctx}"
    fin = ~masked
    torch.testing.assert_close(lse[fin], lse_ref[fin].to(torch.float32), atol=kLseAtol, rtol=kLseRtol,
                               msg=lambda m: f"LSE: {m}\n{ctx}")


def _check_vs_emulation(seed, q, k, v, *, layout, is_causal, **options):
    o, lse = sm120.attention_twin(q, k, v, layout=layout, is_causal=is_causal, return_lse=True, **options)
    torch.cuda.synchronize()
    o_ref, lse_ref = _emulate(q, k, v, layout=layout, is_causal=is_causal, **options)
    ctx = (f"seed={seed} q={tuple(q.shape)} k={tuple(k.shape)} layout={layout} causal={is_causal} "
           f"dtype={q.dtype} options={options}")
    assert o.shape == q.shape and o.dtype == q.dtype and o.is_contiguous(), ctx
    _check(o, lse, o_ref, lse_ref, layout=layout, row_tol=kRowRelL1VsEmulation, ctx=ctx)


# (b, h_q, h_kv, s_q, s_kv): odd lengths, s_q != s_kv (both ways), GQA and MQA, tile edges
_SHAPES = [
    (1, 2, 2, 1, 1),
    (2, 2, 1, 17, 17),
    (1, 4, 2, 127, 1000),
    (1, 3, 1, 1000, 127),
    (2, 2, 2, 64, 128),
    (1, 2, 1, 200, 333),
    (1, 4, 4, 129, 257),
]


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "b{}h{}x{}_sq{}_skv{}".format(*s))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_twin_vs_emulation_shapes(shape, is_causal, d, seed):
    _require_twin()
    b, h_q, h_kv, s_q, s_kv = shape
    dtype = torch.bfloat16 if (s_q + d) % 2 else torch.float16  # both dtypes across the grid
    layout = "bshd" if (s_kv + int(is_causal)) % 2 else "bhsd"  # both layouts across the grid
    q, k, v = _inputs(seed, "randn", b=b, h_q=h_q, h_kv=h_kv, s_q=s_q, s_kv=s_kv, d=d, dtype=dtype, layout=layout)
    _check_vs_emulation(seed, q, k, v, layout=layout, is_causal=is_causal)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_twin_vs_emulation_dtypes_layouts(dtype, layout, d, is_causal, seed):
    _require_twin()
    q, k, v = _inputs(seed, "outlier", b=2, h_q=4, h_kv=2, s_q=300, s_kv=257, d=d, dtype=dtype, layout=layout)
    _check_vs_emulation(seed, q, k, v, layout=layout, is_causal=is_causal)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("options", [{"smooth_q": False}, {"smooth_k": False}, {"smooth_q": False, "smooth_k": False},
                                     {"q_block": 64}], ids=["no_smooth_q", "no_smooth_k", "no_smoothing", "q_block64"])
def test_twin_vs_emulation_options(options, seed):
    _require_twin()
    q, k, v = _inputs(seed, "outlier", b=1, h_q=2, h_kv=1, s_q=190, s_kv=300, d=128, dtype=torch.bfloat16, layout="bhsd")
    _check_vs_emulation(seed, q, k, v, layout="bhsd", is_causal=True, **options)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("d", [64, 128])
def test_twin_kernel_on_the_emulations_operands(d, seed):
    """The binding fed with operands quantized by sage_quant.reference from the emulation's own
    means: the rows agree more tightly (no quantizer in the comparison)."""
    _require_twin()
    import sage_core

    q, k, v = _inputs(seed, "outlier", b=1, h_q=4, h_kv=2, s_q=333, s_kv=500, d=d, dtype=torch.float16, layout="bhsd")
    opts = sm120.resolve_options({})
    qm, km = R.block_mean(q, opts["q_block"]), R.token_mean(k)
    qc, q_sf, q_gs = R.quant_fp4(q, mean=qm, mean_block=opts["q_block"])
    kc, k_sf, k_gs = R.quant_fp4(k, mean=km)
    s_pad = -(-k.shape[2] // sm120.kVTokenPad) * sm120.kVTokenPad
    vc, v_sf, v_gs = R.quant_fp4(v.transpose(2, 3), n_pad=s_pad)
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(d)
    sage_core.attn_fwd_sm120_twin_qk_nvfp4_pv_nvfp4(
        qc, q_sf, q_gs, kc, k_sf, k_gs, vc, v_sf, v_gs, o, lse, qm.contiguous(), q_mean_block=opts["q_block"],
        softmax_scale=scale, is_causal=False, stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    o_ref, lse_ref = _emulate(q, k, v, layout="bhsd", is_causal=False)
    lse += torch.einsum("bhsd,bhd->bhs", q.float(), km.repeat_interleave(2, dim=1)) * scale
    _check(o, lse, o_ref, lse_ref, layout="bhsd", row_tol=kRowRelL1SameOperands, ctx=f"seed={seed} d={d}")


@pytest.mark.gpu
@pytest.mark.sm90
def test_twin_fully_masked_rows_and_tiny_large_values(seed):
    """s_q > s_kv causal: the first rows see no key (O = 0, LSE -inf); V scaled by 1e-3 and Q by 1e3
    must neither flush nor saturate (the per-head FP32 tensor scales)."""
    _require_twin()
    q, k, v = _inputs(seed, "randn", b=1, h_q=2, h_kv=2, s_q=300, s_kv=100, d=64, dtype=torch.float16, layout="bhsd")
    _check_vs_emulation(seed, q, k, v, layout="bhsd", is_causal=True)
    _check_vs_emulation(seed, q * 30, k, v * 1e-3, layout="bhsd", is_causal=False)


@pytest.mark.gpu
@pytest.mark.sm90
def test_twin_nan_in_v_poisons_only_its_rows(seed):
    _require_twin()
    q, k, v = _inputs(seed, "randn", b=1, h_q=2, h_kv=2, s_q=70, s_kv=200, d=64, dtype=torch.float16, layout="bhsd")
    v[0, 0, 5, 3] = float("nan")
    o = sm120.attention_twin(q, k, v, layout="bhsd")
    assert torch.isnan(o[0, 0]).any(), "a NaN in V must reach the output of its head"
    assert torch.isfinite(o[0, 1]).all(), "the other head's rows must stay finite"


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("s", [1, 100, 128, 333])
def test_quantized_operands_bit_exact(layout, s, seed):
    """quantize_operands on CUDA (quant_fp4 with mean / n_pad) == sage_quant.reference bit for bit,
    given the same means (the CUDA means' summation order is the one documented difference)."""
    _require_twin()
    q, k, v = _inputs(seed, "outlier", b=2, h_q=4, h_kv=2, s_q=s, s_kv=s + 7, d=128, dtype=torch.bfloat16, layout=layout)
    opts = sm120.resolve_options({})
    got = sm120.quantize_operands(q, k, v, layout, opts)
    torch.cuda.synchronize()
    qb, kb, vb = (R.to_bhsd(t, layout) for t in (q, k, v))
    want_q = R.quant_fp4(qb, mean=got["q_mean"], mean_block=opts["q_block"])
    want_k = R.quant_fp4(kb, mean=got["k_mean"])
    s_pad = -(-kb.shape[2] // sm120.kVTokenPad) * sm120.kVTokenPad
    want_v = R.quant_fp4(vb.transpose(2, 3), n_pad=s_pad)
    for name, want in (("q", want_q), ("k", want_k), ("v_t", want_v)):
        sf = {"q": "q_sf", "k": "k_sf", "v_t": "v_sf"}[name]
        gs = {"q": "q_gs", "k": "k_gs", "v_t": "v_gs"}[name]
        assert torch.equal(got[name], want[0]), f"{name} codes differ, seed={seed}"
        assert torch.equal(got[sf], want[1]), f"{name} scales differ, seed={seed}"
        assert torch.equal(got[gs], want[2]), f"{name} tensor scales differ, seed={seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_native_vs_emulation_on_sm120(layout, is_causal, seed):
    """The native kernel, where an sm_120 GPU exists (never run by this project so far)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (12, 0):
        pytest.skip("needs an sm_120 GPU (RTX 50): the native kernel is built for sm_120a")
    import sage_core

    if not hasattr(sage_core, "attn_fwd_sm120_qk_nvfp4_pv_nvfp4"):
        pytest.skip("sage_core was built without the sm120 family (SAGE_CUDA_ARCHS needs 120a)")
    q, k, v = _inputs(seed, "outlier", b=2, h_q=4, h_kv=2, s_q=300, s_kv=257, d=128, dtype=torch.bfloat16, layout=layout)
    o, lse = sm120.attn_qk_nvfp4_pv_nvfp4(q, k, v, layout=layout, is_causal=is_causal, scale=1.0 / math.sqrt(128),
                                          return_lse=True)
    torch.cuda.synchronize()
    o_ref, lse_ref = _emulate(q, k, v, layout=layout, is_causal=is_causal)
    _check(o, lse, o_ref, lse_ref, layout=layout, row_tol=kRowRelL1VsEmulation, ctx=f"native seed={seed}")
