"""The sm90 host path: one sage_core call per attention call, the per-signature fast path, and
``recipe="auto"``'s routing rule (issue 8, items 4 and 5).

* ``quant_attn_fwd_sm90_qk_s8_pv_e4m3`` (quantizer + attention in one binding call over one
  workspace) gives bit for bit the output of the two-call path (``quantize_qkv_sm90`` then the
  attention kernel), over layouts, GQA, causal with q_len != kv_len, odd lengths, dtypes, LSE;
  outputs are poisoned before each run.
* ``sage_torch.attention``'s fast path returns the same tensor as the validated path and hands
  every unusual call (strided rows, requires_grad, options, LSE) to it.
* auto runs PyTorch's SDPA for decode-shaped and launch-bound calls and says so once; strict
  mode and an explicit recipe keep sage's kernel.
"""

from __future__ import annotations

import warnings

import pytest
import torch

sage_quant = pytest.importorskip("sage_quant", reason="sage_quant is not installed")
try:
    import sage_torch
    from sage_torch import _dispatch
    from sage_torch.backends import sm90 as sm90_backend
    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001
    sm90_backend = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _skip_reason():
    if sm90_backend is None:
        return f"sage_torch.backends.sm90 does not import ({_IMPORT_ERROR})"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if torch.cuda.get_device_capability()[0] != 9:
        return "needs an sm_90 (Hopper) GPU"
    if not sm90_backend.kernels_available():
        return "sage_core was built without the sm90 family"
    if sm90_backend._ONE_CALL is None:
        return "sage_core has no quant_attn_fwd_sm90_qk_s8_pv_e4m3"
    return None


_SKIP = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.sm90, pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))]
SEED = 1234


def _qkv(b, h_q, h_kv, s_q, s_kv, d, dtype, layout, seed=SEED):
    return sage_quant.make_qkv("outlier", b=b, h_q=h_q, h_kv=h_kv, s_q=s_q, s_kv=s_kv, d=d, dtype=dtype,
                               layout=layout, seed=seed, device="cuda")


def _two_call(q, k, v, layout, is_causal, scale, return_lse):
    """The path before the one-call binding: quantizer, then the attention kernel, then the LSE fix."""
    qz = sm90_backend.quantize_qkv_sm90(q, k, v, layout=layout)
    qb = sm90_backend._bhsd(q, layout)
    b, h_q, s_q, d = qb.shape
    o, o_bhsd = sm90_backend._alloc_out(q, layout, b, h_q, s_q, d)
    o.fill_(float("nan"))
    lse = torch.full((b, h_q, s_q), float("nan"), device=q.device) if return_lse else None
    sm90_backend._launch_attn(qz, o_bhsd, lse, scale, is_causal)
    if lse is not None:
        km = qz["k_mean"].repeat_interleave(h_q // qz["k_mean"].shape[1], dim=1)
        lse = lse + torch.einsum("bhsd,bhd->bhs", qb.float(), km) * scale
    return o, lse


CASES = [  # b, h_q, h_kv, s_q, s_kv, d, causal
    (1, 8, 8, 128, 128, 64, False),
    (2, 8, 2, 300, 517, 128, True),
    (1, 4, 1, 77, 1000, 64, True),
    (3, 6, 3, 1025, 1025, 128, False),
]


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_one_call_matches_two_calls_bitwise(case, dtype, layout):
    b, h_q, h_kv, s_q, s_kv, d, causal = case
    q, k, v = _qkv(b, h_q, h_kv, s_q, s_kv, d, dtype, layout)
    scale = d ** -0.5
    ref_o, ref_lse = _two_call(q, k, v, layout, causal, scale, True)
    with torch.inference_mode():
        o, lse = sm90_backend.attention_sm90_qk_s8_pv_e4m3(q, k, v, layout=layout, is_causal=causal,
                                                           scale=scale, return_lse=True)
    assert torch.equal(o, ref_o), f"one-call O differs from the two-call path, case {case} {dtype} {layout}"
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-5)
    fast = sm90_backend._fast(q, k, v, layout, causal, scale)
    assert fast is not None and torch.equal(fast, ref_o)
    rows = o.float().reshape(-1, d)
    assert torch.isfinite(rows).all(), "a row of finite inputs came out non-finite"


def test_attention_fast_path_equals_validated_path():
    q, k, v = _qkv(2, 16, 4, 1024, 1024, 128, torch.bfloat16, "bshd")
    _dispatch.refresh()
    with torch.inference_mode():
        fast = sage_torch.attention(q, k, v, layout="bshd", is_causal=True, recipe="qk_s8_pv_e4m3")
        slow = sage_torch.attention(q, k, v, layout="bshd", is_causal=True, recipe="qk_s8_pv_e4m3",
                                    smooth_k=True)  # an option: the validated path
    assert any(e[0] is not None for e in _dispatch._fast_cache.values()), "the fast path was never taken"
    assert torch.equal(fast, slow)


def test_fast_path_hands_unusual_calls_to_the_validated_path():
    q, k, v = _qkv(1, 8, 8, 256, 256, 64, torch.bfloat16, "bhsd")
    g = torch.Generator(device="cuda").manual_seed(SEED)
    odd = torch.randn(1, 8, 256, 68, device="cuda", dtype=torch.bfloat16, generator=g)[..., :64]  # rows not 16-byte aligned
    assert sm90_backend._fast(odd, k, v, "bhsd", False, 0.125) is None
    with torch.inference_mode():
        o_odd = sage_torch.attention(odd, k, v, recipe="qk_s8_pv_e4m3")
        o_ref = sage_torch.attention(odd.contiguous(), k, v, recipe="qk_s8_pv_e4m3")
    assert torch.equal(o_odd, o_ref)
    assert sm90_backend._fast(q, k[:, :, :100], v, "bhsd", False, 0.125) is None  # k, v lengths differ
    with pytest.raises(ValueError, match="k and v must have the same heads and length"):
        sage_torch.attention(q, k[:, :, :100], v, recipe="qk_s8_pv_e4m3")
    qg = q.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        sage_torch.attention(qg, k, v, recipe="qk_s8_pv_e4m3")


def test_auto_routes_decode_and_tiny_calls_to_sdpa_once():
    q, k, v = _qkv(4, 32, 8, 1, 4096, 128, torch.bfloat16, "bhsd")
    _dispatch.reset_warnings()
    with torch.inference_mode():
        with pytest.warns(_dispatch.SageFallbackWarning, match="decode-shaped"):
            o = sage_torch.attention(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert torch.equal(o, ref)
        q_small = q[:, :, :1].clone()
        _dispatch.refresh()
        assert torch.equal(sage_torch.attention(q_small, k, v, layout="bhsd"), ref[:, :, :1])  # fast path
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sage_torch.attention(q, k, v)  # said once
        kern = sage_torch.attention(q, k, v, recipe="qk_s8_pv_e4m3")  # explicit recipe: the kernel
        strict = sage_torch.attention(q, k, v, strict=True)  # strict: the kernel, no routing
    assert torch.equal(kern, strict)
    assert (kern.float() - ref.float()).abs().mean() / ref.float().abs().mean() < 0.05


def test_auto_rule_is_what_the_table_says():
    min_rows, min_macs = _dispatch.AUTO_TORCH_RULES["sm90_qk_s8_pv_e4m3"]
    assert _dispatch.auto_torch_reason("sm90_qk_s8_pv_e4m3", 1, 32, min_rows - 1, 8192, 128, False) is not None
    n = 8192
    assert _dispatch.auto_torch_reason("sm90_qk_s8_pv_e4m3", 1, 32, n, n, 128, True) is None
    assert 1 * 32 * n * n * 128 // 2 >= min_macs


# --------------------------------------------------------------------------- output memory order

def _packed_qkv_cuda(b, s, h, d, dtype, seed=SEED):
    g = torch.Generator(device="cuda").manual_seed(seed)
    packed = torch.randn(b, s, 3, h, d, generator=g, device="cuda", dtype=torch.float32).to(dtype)
    return packed.permute(2, 0, 3, 1, 4).unbind(0)  # (b, h, s, d) views of (b, s, h, d) memory


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("recipe", ["qk_s8_pv_e4m3", "auto"])
def test_packed_qkv_views_get_bshd_memory_output(d, recipe):
    """DiT/transformers hand (b, h, s, d) views of (b, s, h, d) memory: o comes back in that memory
    (like PyTorch's flash/cuDNN SDPA), so the model's transpose + reshape is a view. The kernel
    stores by strides (poisoned buffer: every element written) and the values equal the call on
    contiguous copies bit for bit; auto's SDPA route (small shape) gives the same memory order."""
    b, s, h = 1, 1000 if recipe == "auto" else 777, 4
    q, k, v = _packed_qkv_cuda(b, s, h, d, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = sage_torch.attention(q, k, v, recipe=recipe)
        o_ref = sage_torch.attention(q.contiguous(), k.contiguous(), v.contiguous(), recipe=recipe)
    assert o.shape == q.shape and o.stride() == (s * h * d, d, h * d, 1), o.stride()
    assert o_ref.is_contiguous()
    assert torch.isfinite(o).all()
    if recipe == "auto":  # PyTorch's SDPA may pick another kernel for another input layout
        torch.testing.assert_close(o, o_ref, atol=2e-3, rtol=0)
    else:
        assert torch.equal(o, o_ref)


def test_packed_qkv_output_poisoned_kernel_path(monkeypatch):
    """The bshd-memory output is fully written by the kernel: allocate it NaN-filled."""
    from sage_torch import _layout

    real_empty = _layout.empty_output

    def poisoned(q, layout, dtype=None, alloc=torch.empty):
        def nan_alloc(shape, *, dtype, device):
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return real_empty(q, layout, dtype=dtype, alloc=nan_alloc)

    monkeypatch.setattr(sm90_backend, "empty_output", poisoned)
    q, k, v = _packed_qkv_cuda(2, 333, 3, 128, torch.float16)
    o = sage_torch.attention(q, k, v, recipe="qk_s8_pv_e4m3", is_causal=True)
    assert o.stride() == (333 * 3 * 128, 128, 3 * 128, 1)
    assert torch.isfinite(o).all()
