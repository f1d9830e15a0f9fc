"""transformers / diffusers integrations (the libraries are optional) and info()."""

import json
import sys

import pytest
import torch

import sage_torch
from sage_torch import api
from sage_torch._torch_fallback import TORCH_SDPA
from sage_torch_testing import make_qkv


class _Module(torch.nn.Module):
    is_causal = True


def test_hf_attention_forward_semantics(as_arch, fake_backend, monkeypatch, seed):
    as_arch("sm90")
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cuda", "cpu"))
    fn = fake_backend("qk_s8_pv_e4m3", marker=1.0)
    q, k, v = make_qkv(b=2, h_q=4, h_kv=2, s_q=6, d=64, seed=seed)
    out, weights = sage_torch.hf_attention_forward(_Module(), q, k, v, None, scaling=0.125)
    assert weights is None and out.shape == (2, 6, 4, 64) and out.is_contiguous()
    ref = TORCH_SDPA(q, k, v, is_causal=True, scale=0.125, enable_gqa=True).transpose(1, 2) + 1.0
    torch.testing.assert_close(out, ref)
    assert fn.calls[0]["is_causal"] is True
    # a mask that is more than padding (here a sliding window) goes to PyTorch's SDPA (exact)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)
    with pytest.warns(sage_torch.SageFallbackWarning, match="attn_mask"):
        out, _ = sage_torch.hf_attention_forward(_Module(), q, k, v, mask)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2))
    # a causal mask without padding is sage's causal call; a padding mask is a varlen pack
    # (integrations/padding.py; tests in test_torch_varlen.py and test_torch_integrations_models.py)
    n = len(fn.calls)
    sage_torch.hf_attention_forward(_Module(), q, k, v, torch.ones(2, 1, 6, 6, dtype=torch.bool).tril())
    assert len(fn.calls) == n + 1 and fn.calls[-1]["is_causal"] is True
    padded = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    padded[1, :, :, :2] = False
    with pytest.warns(sage_torch.SageFallbackWarning, match="sequence by sequence"):
        out, _ = sage_torch.hf_attention_forward(_Module(), q, k, v, padded)
    assert [c["shapes"][0] for c in fn.calls[n + 1:]] == [(1, 6, 4, 64), (1, 4, 4, 64)]
    torch.testing.assert_close(out[1, 2:], TORCH_SDPA(q, k, v, attn_mask=padded, enable_gqa=True).transpose(1, 2)[1, 2:]
                               + 1.0)
    sage_torch.hf_attention_forward(_Module(), q[:, :, :1], k, v, None)
    assert fn.calls[-1]["is_causal"] is False
    with pytest.raises(ValueError, match="output_attentions"):
        sage_torch.hf_attention_forward(_Module(), q, k, v, None, output_attentions=True)


def test_register_hf():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed here")
    assert sage_torch.register_hf() == "sage"
    assert transformers.AttentionInterface._global_mapping["sage"] is sage_torch.hf_attention_forward


def test_integrations_exported_at_top_level():
    """The README's calls (sage_torch.register_hf / register_diffusers) exist without the libraries."""
    from sage_torch import integrations
    for name in ("register_hf", "register_diffusers", "hf_attention_forward", "SageAttnProcessor", "patch_sdpa"):
        assert name in sage_torch.__all__, name
        assert getattr(sage_torch, name) is getattr(integrations, name), name


def test_register_diffusers_without_diffusers(monkeypatch):
    """Without diffusers the call says what it needs (diffusers is imported only inside it)."""
    monkeypatch.setitem(sys.modules, "diffusers", None)  # an import of diffusers now fails
    monkeypatch.setitem(sys.modules, "diffusers.models.attention_dispatch", None)
    with pytest.raises(ImportError, match="register_diffusers needs diffusers"):
        sage_torch.register_diffusers()


class _FakeDiffusersAttention(torch.nn.Module):
    """The attributes diffusers' Attention exposes to processors (no diffusers needed)."""

    def __init__(self, dim=128, heads=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0)])
        self.spatial_norm = self.group_norm = self.norm_q = self.norm_k = None
        self.norm_cross = None
        self.residual_connection = False
        self.rescale_output_factor = 1.0


def _reference_processor(attn, x):
    b, n, _ = x.shape
    q, k, v = (f(x).view(b, n, attn.heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    o = TORCH_SDPA(q, k, v, scale=attn.scale).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[1](attn.to_out[0](o))


def test_diffusers_processor(as_arch, fake_backend, monkeypatch, seed):
    as_arch("sm90")
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cuda", "cpu"))
    fn = fake_backend("qk_s8_pv_e4m3")
    attn = _FakeDiffusersAttention(seed=seed % 1000).to(torch.bfloat16)
    x = torch.randn(2, 10, 128, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    with torch.no_grad():
        out = sage_torch.SageAttnProcessor()(attn, x)
        ref = _reference_processor(attn, x)
    torch.testing.assert_close(out, ref)
    assert len(fn.calls) == 1
    # 4-D (image) input goes through the same path
    img = torch.randn(1, 128, 2, 3, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    with torch.no_grad():
        assert sage_torch.SageAttnProcessor()(attn, img).shape == img.shape


def test_diffusers_processor_refuses_what_it_would_drop(seed):
    """Rotary embeddings, pre-only blocks (no to_out) and joint attention are not silently mangled."""
    attn = _FakeDiffusersAttention(seed=seed % 1000)
    x = torch.randn(1, 4, 128)
    proc = sage_torch.SageAttnProcessor()
    with torch.no_grad():
        with pytest.raises(TypeError, match="image_rotary_emb="):
            proc(attn, x, None, None, image_rotary_emb=(x, x))
        with pytest.raises(TypeError, match="positional argument"):
            proc(attn, x, None, None, None, (x, x))
        attn.add_q_proj = torch.nn.Linear(128, 128)
        with pytest.raises(TypeError, match="joint attention"):
            proc(attn, x)
        attn.add_q_proj = None
        attn.to_out = None
        with pytest.raises(TypeError, match="to_out"):
            proc(attn, x)


def test_info_is_json_and_complete(as_arch, fake_backend):
    fake_backend("qk_s8_pv_e4m3", name="fake_info")
    info = sage_torch.info()
    json.dumps(info)
    for key in ("sage_torch", "torch", "sage_core", "sage_quant", "device", "backend_modules", "backends",
                "auto_dispatch", "env", "recipes"):
        assert key in info, key
    assert set(info["backend_modules"]) >= {"sage_torch.backends.sm90", "sage_torch.backends.sm80"}
    assert "importable" in info["sage_core"]
    if not torch.cuda.is_available():  # a CPU machine: nothing but PyTorch can run
        assert info["auto_dispatch"]["bfloat16"]["head_dim=64"]["kind"] == "torch"
    as_arch("sm90")
    dec = sage_torch.info()["auto_dispatch"]["bfloat16"]["head_dim=128"]
    assert dec == {"kind": "kernel", "recipe": "qk_s8_pv_e4m3", "backend": "fake_info", "reason": ""}
