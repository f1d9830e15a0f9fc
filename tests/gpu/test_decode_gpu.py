"""Decode over an INT8 KV cache on the GPU: ``sage_core.decode_s8`` (through
``sage_torch.QuantizedKVCache``) against its oracle ``sage_quant.emulation.kvcache`` and float64.

The kernel's scores are the emulation's bit for bit (same integer dot products, same fp32
products); exp2 and the fp32 accumulation in split-KV order differ by rounding only, so O is held
to rel-L1 <= 5e-4 against the emulation rounded to O's dtype, every row to 5e-3. Outputs are
poisoned (NaN) first.
Across head dims, dtypes, GQA groups, query rows (1 .. 64: several row blocks), lengths that are
not tile multiples, forced single and many splits, causal and not, both layouts, outlier inputs.
"""

from __future__ import annotations

import pytest
import torch

sage_quant = pytest.importorskip("sage_quant", reason="sage_quant is not installed")
from sage_quant.emulation import kvcache as emu  # noqa: E402
from sage_quant.emulation.reference_attention import reference_attention  # noqa: E402
from sage_torch import kvcache as kvc  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _need_kernel(d):
    if not kvc.decode_kernel_available(d, "cuda"):
        pytest.skip(f"sage_core has no decode_s8 kernel for head dim {d}")


def _filled(b, h_kv, d, length, dtype, seed, outlier=False, layout="bhsd"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(b, h_kv, length, d, device="cuda", generator=g)
    v = torch.randn(b, h_kv, length, d, device="cuda", generator=g)
    if outlier:
        k = k + 6 * torch.randn(b, h_kv, 1, d, device="cuda", generator=g)
        v[..., :3] *= 25
    k, v = k.to(dtype), v.to(dtype)
    cache = kvc.QuantizedKVCache(b, h_kv, d, length + 37, device="cuda", dtype=dtype, strict=True)
    split = max(1, length // 3)  # prefill, then the rest in pieces (decode-like appends)
    for lo, hi in ((0, split), (split, length)):
        if hi > lo:
            kk, vv = k[:, :, lo:hi], v[:, :, lo:hi]
            if layout == "bshd":
                kk, vv = kk.transpose(1, 2), vv.transpose(1, 2)
            cache.append(kk, vv, layout=layout)
    return cache, k, v


def _emulated(cache, q, is_causal, scale):
    return emu.decode_attention(q, cache.k, cache.k_scale, cache.v, cache.v_scale, cache.v_mean,
                                length=cache.length, is_causal=is_causal, scale=scale,
                                k_chan=cache.k_chan, v_chan=cache.v_chan)


def _check(o, ref, agg=5e-4, row=5e-3):
    """o against the emulation rounded to o's dtype: what is left is fp32 rounding that flips an
    output's last bit now and then (bf16: 2^-8 relative), not a wrong key, tile or mask (O(1e-2+))."""
    o, ref = o.double(), ref.to(o.dtype).double()
    assert torch.isfinite(o).all()
    err = float((o - ref).abs().sum() / ref.abs().sum().clamp_min(1e-30))
    assert err <= agg, err
    row_err = (o - ref).abs().sum(-1) / ref.abs().sum(-1).clamp_min(1e-6)
    assert float(row_err.max()) <= row, float(row_err.max())


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h_q,h_kv,s_q", [(8, 8, 1), (32, 8, 1), (16, 2, 3), (64, 4, 4)])
@pytest.mark.parametrize("length", [1, 63, 65, 1000, 4099])
def test_decode_vs_emulation(d, dtype, h_q, h_kv, s_q, length):
    _need_kernel(d)
    if s_q > length:
        s_q = length
    cache, _, _ = _filled(2, h_kv, d, length, dtype, seed=length + d)
    q = torch.randn(2, h_q, s_q, d, device="cuda").to(dtype)
    for is_causal in (True, False):
        o = cache.attention(q, is_causal=is_causal)
        _check(o, _emulated(cache, q, is_causal, d ** -0.5))


@pytest.mark.parametrize("split_tokens", [64, 192, 1 << 20])
def test_split_sizes_agree(monkeypatch, split_tokens):
    """One split (o written directly) and many (partials + combine) give the emulation's result."""
    d = 128
    _need_kernel(d)
    cache, _, _ = _filled(1, 4, d, 2100, torch.bfloat16, seed=3)
    q = torch.randn(1, 16, 2, d, device="cuda").to(torch.bfloat16)
    monkeypatch.setattr(kvc, "split_tokens_for", lambda length, base, slots: min(split_tokens, -(-length // 64) * 64))
    o = cache.attention(q)
    _check(o, _emulated(cache, q, True, d ** -0.5))


def test_poisoned_output_fully_written_and_rows_without_keys_zero(monkeypatch):
    d = 64
    _need_kernel(d)
    cache, _, _ = _filled(1, 2, d, 3, torch.float16, seed=4)
    q = torch.randn(1, 4, 6, d, device="cuda").to(torch.float16)  # rows 0-2 see no key (causal)
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t
    monkeypatch.setattr(torch, "empty", poisoned)
    o = cache.attention(q, is_causal=True)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert torch.isfinite(o).all()
    assert torch.all(o[:, :, :3] == 0)
    _check(o[:, :, 3:], _emulated(cache, q, True, d ** -0.5)[:, :, 3:])


@pytest.mark.parametrize("outlier", [False, True])
def test_decode_vs_float64(outlier):
    d, length = 128, 3000
    _need_kernel(d)
    cache, k, v = _filled(2, 8, d, length, torch.bfloat16, seed=5, outlier=outlier)
    q = torch.randn(2, 32, 1, d, device="cuda").to(torch.bfloat16)
    o = cache.attention(q)
    ref = reference_attention(q.double(), k.double(), v.double(), is_causal=True)
    err = float((o.double() - ref).abs().sum() / ref.abs().sum())
    assert err < 0.015, err


def test_bshd_layout_and_scale():
    d = 128
    _need_kernel(d)
    cache, _, _ = _filled(2, 2, d, 500, torch.bfloat16, seed=6, layout="bshd")
    q = torch.randn(2, 1, 8, d, device="cuda").to(torch.bfloat16)  # bshd: (b, s_q=1, h_q=8, d)
    o = cache.attention(q, layout="bshd", scale=0.05)
    assert o.shape == q.shape and o.is_contiguous()
    _check(o.transpose(1, 2), _emulated(cache, q.transpose(1, 2), True, 0.05))


def test_binding_rejects_bad_calls():
    d = 64
    _need_kernel(d)
    import sage_core

    cache, _, _ = _filled(1, 1, d, 100, torch.bfloat16, seed=7)
    q = torch.randn(1, 1, 1, d, device="cuda").to(torch.bfloat16)
    o = torch.empty_like(q)
    args = (q, cache.k, cache.v, cache.k_scale, cache.v_scale, cache.v_mean, cache.k_chan, cache.v_chan, o, None)
    kw = dict(length=100, causal=True, scale_log2=0.2, split_tokens=1 << 20, stream=0)
    sage_core._C.decode_s8(*args, **kw)  # fine
    with pytest.raises(ValueError, match="length"):
        sage_core._C.decode_s8(*args, **{**kw, "length": cache.capacity + 1})
    with pytest.raises(ValueError, match="split_tokens"):
        sage_core._C.decode_s8(*args, **{**kw, "split_tokens": 100})
    with pytest.raises(ValueError, match="workspace"):
        sage_core._C.decode_s8(*args, **{**kw, "split_tokens": 64})
    with pytest.raises((TypeError, ValueError)):
        sage_core._C.decode_s8(q, cache.k.float(), *args[2:], **kw)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_append_kernel_is_the_emulation_bit_for_bit(d, dtype):
    if not kvc._append_kernel_available(d, torch.device("cuda")):
        pytest.skip("sage_core has no kv_append_s8 kernel")
    g = torch.Generator(device="cuda").manual_seed(d)
    k = (torch.randn(3, 4, 150, d, device="cuda", generator=g) * 3 + 1).to(dtype)
    v = torch.randn(3, 4, 150, d, device="cuda", generator=g).to(dtype)
    k[0, 1, 120] = float('inf')  # a non-finite appended token: scale inf, codes 0, as the emulation says
    cache = kvc.QuantizedKVCache(3, 4, d, 200, device="cuda", dtype=dtype)
    cache.append(k[:, :, :100], v[:, :, :100])
    cache.append(k[:, :, 100:101], v[:, :, 100:101])  # a decode step
    cache.append(k[:, :, 101:].transpose(1, 2), v[:, :, 101:].transpose(1, 2), layout="bshd")  # strided input
    k8, ks = emu.quantize_kv_tokens(k, cache.k_mean, cache.k_chan)
    v8, vs = emu.quantize_kv_tokens(v, cache.v_mean, cache.v_chan)
    assert torch.equal(cache.k[:, :, :150], k8) and torch.equal(cache.v[:, :, :150], v8)
    torch.testing.assert_close(cache.k_scale[:, :, :150], ks, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(cache.v_scale[:, :, :150], vs, rtol=0, atol=0, equal_nan=True)
    assert torch.isinf(cache.k_scale[0, 1, 120]) and torch.all(cache.k[0, 1, 120] == 0)
    assert cache.length == 150


def test_transformers_generate_with_sage_kv_cache(monkeypatch):
    """A tiny random Llama on the GPU: prompt, then decode steps through SageKVCache with
    attn_implementation="sage" (the decode kernel), against DynamicCache + SDPA."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed here")
    hf_kvcache = pytest.importorskip("sage_torch.integrations.hf_kvcache")
    _need_kernel(64)
    import sage_torch

    sage_torch.register_hf()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=256)
    ids = torch.randint(0, 97, (2, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))

    def run(impl, cache):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl,
                                                           dtype=torch.bfloat16).cuda().eval()
        out = []
        with torch.no_grad():
            r = model(input_ids=ids, past_key_values=cache, use_cache=True)
            out.append(r.logits[:, -1].float())
            for t in range(6):
                r = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                out.append(r.logits[:, -1].float())
        return torch.stack(out)

    ref = run("sdpa", transformers.DynamicCache())
    calls = []
    real = kvc.QuantizedKVCache._kernel

    def spy(self, *args, **kwargs):
        calls.append(self.length)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(kvc.QuantizedKVCache, "_kernel", spy)
    got = run("sage", hf_kvcache.SageKVCache(max_cache_len=128))
    assert len(calls) == 6 * 2  # every decode step of both layers ran the kernel
    rel = float((got - ref).abs().sum() / ref.abs().sum())
    assert rel < 0.03, rel
