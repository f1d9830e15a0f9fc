"""The SDPA drop-in, patch_sdpa, and the fallback's sage semantics (bottom-right causal)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import sage_quant
import sage_torch
from sage_torch import api
from sage_torch._torch_fallback import TORCH_SDPA
from sage_torch_testing import make_qkv, randn


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["plain", "causal_square", "gqa", "mask", "dropout_eval_zero", "fp32",
                                  "hd96", "causal_rect", "three_d", "scale"])
def test_dropin_equals_torch_on_cpu(case, seed):
    q, k, v = make_qkv(b=2, h_q=4, s_q=8, d=64, seed=seed)
    kwargs = {}
    if case == "causal_square":
        kwargs["is_causal"] = True
    elif case == "gqa":
        q, k, v = make_qkv(b=1, h_q=6, h_kv=2, s_q=5, s_kv=9, seed=seed)
        kwargs["enable_gqa"] = True
    elif case == "mask":
        kwargs["attn_mask"] = randn((8, 8), seed=seed + 7)
    elif case == "dropout_eval_zero":
        kwargs["dropout_p"] = 0.0
    elif case == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    elif case == "hd96":
        q, k, v = make_qkv(d=96, seed=seed)
    elif case == "causal_rect":
        q, k, v = make_qkv(s_q=3, s_kv=11, seed=seed)
        kwargs["is_causal"] = True
    elif case == "three_d":
        q, k, v = q[0], k[0], v[0]
    elif case == "scale":
        kwargs["scale"] = 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
        ours = sage_torch.scaled_dot_product_attention(q, k, v, **kwargs)
    _same(ours, TORCH_SDPA(q, k, v, **kwargs))


def test_dropin_reports_cpu_once(seed):
    q, k, v = make_qkv(seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning, match="tensors on cpu") as rec:
        sage_torch.scaled_dot_product_attention(q, k, v)
        sage_torch.scaled_dot_product_attention(q, k, v)
    assert sum(issubclass(w.category, sage_torch.SageFallbackWarning) for w in rec) == 1


def test_dropin_strict_raises(seed, monkeypatch):
    q, k, v = make_qkv(seed=seed)
    monkeypatch.setenv("SAGE_STRICT", "1")
    with pytest.raises(sage_torch.SageDispatchError, match="cannot run this call on sage"):
        sage_torch.scaled_dot_product_attention(q, k, v)


def test_dropin_torch_errors_are_torch_errors(seed):
    q, k, v = make_qkv(h_q=4, h_kv=2, seed=seed)
    with pytest.raises(RuntimeError) as ours, warnings.catch_warnings():
        warnings.simplefilter("error", sage_torch.SageFallbackWarning)  # no sage warning first: PyTorch rejects it
        sage_torch.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError) as theirs:
        TORCH_SDPA(q, k, v)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_dropin_supported_path_goes_to_sage(as_arch, fake_backend, monkeypatch, seed, layout):
    """On a (mocked) GPU the supported cases run the kernel; mask/dropout/rect-causal do not."""
    as_arch("sm90")
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cuda", "cpu"))
    fn = fake_backend("qk_s8_pv_e4m3", marker=5.0)
    q, k, v = make_qkv(b=1, h_q=4, h_kv=2, s_q=7, seed=seed)
    if layout == "bshd":  # torch's bhsd view of bshd storage: sage gets strided bhsd tensors
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    o = sage_torch.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    _same(o, TORCH_SDPA(q, k, v, is_causal=True, enable_gqa=True) + 5.0)
    assert len(fn.calls) == 1
    with pytest.warns(sage_torch.SageFallbackWarning, match="top-left"):
        q2, k2, v2 = make_qkv(s_q=3, s_kv=8, seed=seed)
        _same(sage_torch.scaled_dot_product_attention(q2, k2, v2, is_causal=True),
              TORCH_SDPA(q2, k2, v2, is_causal=True))
    with pytest.warns(sage_torch.SageFallbackWarning, match="dropout_p"):
        torch.manual_seed(seed)
        sage_torch.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True)
    with pytest.warns(sage_torch.SageFallbackWarning, match="require grad"):
        sage_torch.scaled_dot_product_attention(q.clone().requires_grad_(), k, v, enable_gqa=True)
    assert len(fn.calls) == 1


def test_patch_sdpa_swaps_and_restores(as_arch, fake_backend, monkeypatch, seed):
    as_arch("sm90")
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cuda", "cpu"))
    fn = fake_backend("qk_s8_pv_e4m3", marker=2.0)
    original = F.scaled_dot_product_attention
    q, k, v = make_qkv(seed=seed)
    with sage_torch.patch_sdpa() as handle:
        assert F.scaled_dot_product_attention is sage_torch.scaled_dot_product_attention
        assert handle.active
        _same(F.scaled_dot_product_attention(q, k, v), TORCH_SDPA(q, k, v) + 2.0)
        with sage_torch.patch_sdpa(strict=True):
            assert F.scaled_dot_product_attention is not sage_torch.scaled_dot_product_attention
            with pytest.raises(sage_torch.SageDispatchError):
                F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool))
        assert F.scaled_dot_product_attention is sage_torch.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is original and not handle.active
    handle.restore()  # idempotent
    assert len(fn.calls) == 1
    # restoring out of order is refused instead of silently losing the inner patch
    outer = sage_torch.patch_sdpa()
    inner = sage_torch.patch_sdpa()
    with pytest.raises(RuntimeError, match="restore the later patch first"):
        outer.restore()
    inner.restore()
    outer.restore()
    assert F.scaled_dot_product_attention is original


def test_patch_sdpa_restores_on_exception():
    original = F.scaled_dot_product_attention
    with pytest.raises(KeyError):
        with sage_torch.patch_sdpa():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is original


# ------------------------------------------------------------------ fallback semantics


@pytest.mark.parametrize("s_q, s_kv", [(7, 7), (3, 11), (11, 4), (1, 9), (5, 1)])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_fallback_matches_float64_reference(s_q, s_kv, layout, return_lse, seed):
    """The fallback keeps sage semantics: bottom-right causal, fully masked rows 0 and LSE -inf."""
    q, k, v = make_qkv(b=2, h_q=4, h_kv=2, s_q=s_q, s_kv=s_kv, d=64, layout=layout, dtype=torch.float16, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
        out = sage_torch.attention(q, k, v, layout=layout, is_causal=True, return_lse=return_lse)
    ref_o, ref_lse = sage_quant.reference_attention(q, k, v, is_causal=True, layout=layout, return_lse=True)
    o = out[0] if return_lse else out
    assert o.dtype == torch.float16 and o.shape == q.shape
    torch.testing.assert_close(o.double(), ref_o.double(), rtol=0, atol=5e-3)
    if s_q > s_kv:
        rows = o[:, :, : s_q - s_kv] if layout == "bhsd" else o[:, : s_q - s_kv]
        assert (rows == 0).all()
    if return_lse:
        lse = out[1]
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, s_q)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(finite, torch.isfinite(lse)) and torch.isneginf(lse[~finite]).all()
        torch.testing.assert_close(lse[finite].double(), ref_lse[finite].double(), rtol=0, atol=1e-4)


def test_fallback_nan_stays_in_its_row(seed):
    q, k, v = make_qkv(s_q=6, d=64, dtype=torch.float16, seed=seed)
    q[0, 1, 2, 5] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
        o, lse = sage_torch.attention(q, k, v, return_lse=True)
    assert torch.isnan(o[0, 1, 2]).all() and torch.isnan(lse[0, 1, 2])
    o[0, 1, 2] = 0
    lse[0, 1, 2] = 0
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
