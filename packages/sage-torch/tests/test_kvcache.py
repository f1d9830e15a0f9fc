"""QuantizedKVCache on the CPU: the recipe's emulation against float64 attention, the cache's
bookkeeping (fixed means, appends), layouts, GQA, causal visibility, and bad input."""

import warnings

import pytest
import torch

import sage_torch
from sage_quant.emulation import kvcache as emu
from sage_quant.emulation.reference_attention import reference_attention
from sage_quant.reference import quant_int, token_mean


def _kv(b, h, n, d, seed, outlier=False, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, n, d, generator=g)
    v = torch.randn(b, h, n, d, generator=g)
    if outlier:  # channel bias in K (what smoothing removes) and a few large V channels
        k = k + 8 * torch.randn(b, h, 1, d, generator=g)
        v[..., :4] *= 20
    return k.to(dtype), v.to(dtype)


def _rel_l1(a, b):
    return float((a.double() - b.double()).abs().sum() / b.double().abs().sum())


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
        yield


@pytest.mark.parametrize("outlier", [False, True])
@pytest.mark.parametrize("h_q,h_kv,s_q", [(4, 4, 1), (8, 2, 1), (8, 2, 5)])
def test_cache_attention_close_to_float64(outlier, h_q, h_kv, s_q):
    b, n, d = 2, 300, 64
    k, v = _kv(b, h_kv, n, d, seed=1, outlier=outlier)
    q = torch.randn(b, h_q, s_q, d, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    cache = sage_torch.QuantizedKVCache(b, h_kv, d, 512)
    cache.append(k[:, :, :200], v[:, :, :200])
    cache.append(k[:, :, 200:], v[:, :, 200:])
    o = cache.attention(q, is_causal=True)
    assert o.shape == q.shape and o.dtype == q.dtype
    ref = reference_attention(q.double(), k.double(), v.double(), is_causal=True)
    err = _rel_l1(o, ref)
    assert err < 0.012, err  # outlier V too: the channel equalizers
    # per row too: no row far off
    row_err = (o.double() - ref).abs().sum(-1) / ref.abs().sum(-1)
    assert float(row_err.max()) < 0.05


def test_means_fixed_by_the_first_append():
    b, h, d = 1, 2, 64
    k, v = _kv(b, h, 70, d, seed=3)
    cache = sage_torch.QuantizedKVCache(b, h, d, 128)
    cache.append(k[:, :, :64], v[:, :, :64])
    (km, kc), (vm, vc) = emu.kv_stats(k[:, :, :64]), emu.kv_stats(v[:, :, :64])
    assert torch.equal(cache.k_mean, km) and torch.equal(cache.v_mean, vm)
    assert torch.equal(cache.k_chan, kc) and torch.equal(cache.v_chan, vc)
    assert torch.equal(km, token_mean(k[:, :, :64]))
    assert float(kc.max()) == 1.0 and float(kc.min()) >= emu.kChanMin
    cache.append(k[:, :, 64:], v[:, :, 64:])
    assert torch.equal(cache.k_mean, km) and torch.equal(cache.k_chan, kc)  # not re-estimated
    k8, ks = quant_int((k.float() - km[:, :, None]) / kc[:, :, None], bits=8, granularity="per_token", role="k")
    v8, vs = quant_int((v.float() - vm[:, :, None]) / vc[:, :, None], bits=8, granularity="per_token", role="k")
    assert torch.equal(cache.k[:, :, :70], k8) and torch.equal(cache.k_scale[:, :, :70], ks)
    assert torch.equal(cache.v[:, :, :70], v8) and torch.equal(cache.v_scale[:, :, :70], vs)
    assert cache.length == 70 and cache.capacity == 128
    cache.reset()
    assert cache.length == 0 and cache.k_mean is None


def test_causal_rows_see_only_their_keys():
    b, h, d, n, s_q = 1, 2, 64, 130, 4
    k, v = _kv(b, h, n, d, seed=4)
    q = torch.randn(b, h, s_q, d, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    c1 = sage_torch.QuantizedKVCache(b, h, d, n)
    c1.append(k, v)
    o1 = c1.attention(q, is_causal=True)
    # changing the last key changes only the last row (query i sees keys <= n - s_q + i)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5
    v2[:, :, -1] -= 5
    c2 = sage_torch.QuantizedKVCache(b, h, d, n)
    # same means and equalizers: only the last token's codes differ
    c2.k_mean, c2.v_mean, c2.k_chan, c2.v_chan = c1.k_mean, c1.v_mean, c1.k_chan, c1.v_chan
    c2.append(k2, v2)
    o2 = c2.attention(q, is_causal=True)
    assert torch.equal(o1[:, :, :-1], o2[:, :, :-1]) and not torch.equal(o1[:, :, -1], o2[:, :, -1])
    o_nc = c1.attention(q, is_causal=False)
    assert torch.equal(o_nc[:, :, -1], o1[:, :, -1])  # the last row sees every key either way


def test_rows_that_see_no_key_are_zero():
    b, h, d = 1, 1, 64
    k, v = _kv(b, h, 2, d, seed=6)
    cache = sage_torch.QuantizedKVCache(b, h, d, 64)
    cache.append(k, v)
    q = torch.randn(b, h, 4, d).to(torch.bfloat16)  # 4 query rows, 2 keys: rows 0, 1 see none
    o = cache.attention(q, is_causal=True)
    assert torch.all(o[:, :, :2] == 0) and torch.all(o[:, :, 2:].abs().sum(-1) > 0)


def test_gqa_and_layouts():
    b, h_kv, group, d, n = 2, 2, 3, 128, 90
    k, v = _kv(b, h_kv, n, d, seed=7)
    q = torch.randn(b, h_kv * group, 2, d, generator=torch.Generator().manual_seed(8)).to(torch.float16)
    cache = sage_torch.QuantizedKVCache(b, h_kv, d, n, dtype=torch.float16)
    cache.append(k.to(torch.float16), v.to(torch.float16))
    o = cache.attention(q)
    # each q head equals the same call on a cache of its own kv head
    for h in range(h_kv * group):
        one = sage_torch.QuantizedKVCache(b, 1, d, n, dtype=torch.float16)
        kv = h // group
        one.append(k[:, kv:kv + 1].to(torch.float16), v[:, kv:kv + 1].to(torch.float16))
        assert torch.equal(one.k_mean, cache.k_mean[:, kv:kv + 1])
        assert torch.equal(one.attention(q[:, h:h + 1]), o[:, h:h + 1])
    # bshd in, bshd out, same values
    cache2 = sage_torch.QuantizedKVCache(b, h_kv, d, n, dtype=torch.float16)
    cache2.append(k.to(torch.float16).transpose(1, 2), v.to(torch.float16).transpose(1, 2), layout="bshd")
    o2 = cache2.attention(q.transpose(1, 2), layout="bshd")
    assert o2.shape == (b, 2, h_kv * group, d) and torch.equal(o2.transpose(1, 2), o)


def test_emulation_scores_are_the_kernels_arithmetic():
    """t = (float(q8 . k8) * k_scale) * (q_scale * float32(scale * log2 e)), in float32."""
    b, h, d, n = 1, 1, 64, 70
    k, v = _kv(b, h, n, d, seed=9)
    q = torch.randn(b, h, 1, d).to(torch.bfloat16)
    (km, kc), (vm, vc) = emu.kv_stats(k), emu.kv_stats(v)
    k8, ks = emu.quantize_kv_tokens(k, km, kc)
    v8, vs = emu.quantize_kv_tokens(v, vm, vc)
    o = emu.decode_attention(q, k8, ks, v8, vs, vm, length=n, is_causal=False, scale=d ** -0.5, k_chan=kc,
                             v_chan=vc)
    q8, qs = quant_int(q.float() * kc[:, :, None], bits=8, granularity="per_token", role="q")
    c = qs * torch.tensor(d ** -0.5 * emu.kLog2e, dtype=torch.float32)
    t = (q8.double() @ k8.double().transpose(-1, -2)).float() * ks[:, :, None, :] * c[..., None]
    p = torch.softmax(t.double() * torch.log(torch.tensor(2.0, dtype=torch.float64)), dim=-1)
    ref = (p @ (vs[..., None].double() * v8.double())) * vc.double()[:, :, None] + vm.double()[:, :, None]
    assert torch.allclose(o.double(), ref, rtol=1e-6, atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="capacity"):
        sage_torch.QuantizedKVCache(1, 1, 64, 0)
    with pytest.raises(TypeError, match="dtype"):
        sage_torch.QuantizedKVCache(1, 1, 64, 64, dtype=torch.float32)
    cache = sage_torch.QuantizedKVCache(1, 2, 64, 64)
    q = torch.randn(1, 2, 1, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="empty"):
        cache.attention(q)
    k, v = _kv(1, 2, 10, 64, seed=10)
    with pytest.raises(ValueError, match="heads"):
        cache.append(k[:, :1], v[:, :1])
    with pytest.raises(TypeError, match="dtype"):
        cache.append(k.float(), v.float())
    with pytest.raises(ValueError, match="token counts"):
        cache.append(k, v[:, :, :5])
    with pytest.raises(ValueError, match="layout"):
        cache.append(k, v, layout="hsd")
    cache.append(k, v)
    with pytest.raises(ValueError, match="capacity"):
        cache.append(*_kv(1, 2, 60, 64, seed=11))
    assert cache.length == 10  # a refused append changes nothing
    with pytest.raises(ValueError, match="multiple"):
        cache.attention(torch.randn(1, 3, 1, 64).to(torch.bfloat16))
    with pytest.raises(ValueError, match="scale"):
        cache.attention(q, scale=-1.0)
    with pytest.raises(TypeError, match="is_causal"):
        cache.attention(q, is_causal=1)
    with pytest.raises(ValueError, match="match the cache"):
        cache.attention(q.half())


def test_strict_refuses_the_emulation_and_default_warns_once():
    cache = sage_torch.QuantizedKVCache(1, 1, 64, 64, strict=True)
    cache.append(*_kv(1, 1, 4, 64, seed=12))
    with pytest.raises(sage_torch.SageDispatchError, match="strict"):
        cache.attention(torch.randn(1, 1, 1, 64).to(torch.bfloat16))
    from sage_torch import _dispatch

    _dispatch.reset_warnings()
    loose = sage_torch.QuantizedKVCache(1, 1, 64, 64)
    loose.append(*_kv(1, 1, 4, 64, seed=12))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        loose.attention(torch.randn(1, 1, 1, 64).to(torch.bfloat16))
        loose.attention(torch.randn(1, 1, 1, 64).to(torch.bfloat16))
    msgs = [w for w in got if issubclass(w.category, sage_torch.SageFallbackWarning)]
    assert len(msgs) == 1 and "emulation" in str(msgs[0].message)


def test_split_tokens_policy():
    from sage_torch.kvcache import split_tokens_for

    slots = 4 * 132  # one wave of resident CTAs
    assert split_tokens_for(16384, 64, slots) == 2048   # 8 splits x 64 = 512 CTAs: one wave, not 1.1
    assert split_tokens_for(100, 1, slots) == 64        # never below one tile
    assert split_tokens_for(8192, 10_000, slots) == 8192  # enough CTAs already: one split
    for n, base in ((1, 1), (65, 3), (32768, 8), (5000, 64), (4096, 100)):
        st = split_tokens_for(n, base, slots)
        splits = -(-n // st)
        assert st % 64 == 0 and st >= 64 and splits <= 65535
        assert splits * base <= max(slots, base)  # never more than one wave
