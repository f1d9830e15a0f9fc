"""SageKVCache (transformers Cache over sage_torch.QuantizedKVCache) on a tiny random Llama, CPU.

The decode steps run the kvcache_s8 emulation here (the kernel needs CUDA); the test checks that
they reach QuantizedKVCache.attention, that the logits follow the DynamicCache + SDPA run within
the INT8 cache's error, that a padding mask falls back to the dequantized cache (warned), and that
what the cache cannot do raises.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import sage_torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (CI installs it)")
hf_kvcache = pytest.importorskip("sage_torch.integrations.hf_kvcache",
                                 reason="this transformers has no cache_utils.CacheLayerMixin")

_SMALL = dict(vocab_size=97, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=64)


def _model(impl):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**_SMALL), attn_implementation=impl,
                                                      dtype=torch.bfloat16).eval()


def _decode(model, cache, ids, steps, mask=None):
    """Prompt, then `steps` single-token steps feeding the reference's tokens; logits per step."""
    out = []
    with torch.no_grad():
        r = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        out.append(r.logits[:, -1].float())
        for t in range(steps):
            nxt = ids[:, t % ids.shape[1]:t % ids.shape[1] + 1]
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            r = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            out.append(r.logits[:, -1].float())
    return torch.stack(out)


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
        yield


def test_decode_steps_read_the_int8_cache(monkeypatch, quiet):
    sage_torch.register_hf()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = _decode(_model("sdpa"), transformers.DynamicCache(), ids, steps=5)
    calls = []
    real = sage_torch.QuantizedKVCache.attention

    def spy(self, q, **kw):
        calls.append((tuple(q.shape), self.length, kw.get("is_causal")))
        return real(self, q, **kw)
    monkeypatch.setattr(sage_torch.QuantizedKVCache, "attention", spy)
    cache = hf_kvcache.SageKVCache(max_cache_len=32)
    got = _decode(_model("sage"), cache, ids, steps=5)
    # the prompt ran the normal path; each of the 5 steps read the INT8 cache in both layers
    assert len(calls) == 5 * 2
    assert calls[0] == ((2, 4, 1, 64), 10, True) and calls[-1] == ((2, 4, 1, 64), 14, True)
    assert cache.get_seq_length() == 14 and cache.layers[0].cache.k.dtype == torch.int8
    rel = float((got - ref).abs().sum() / ref.abs().sum())
    assert rel < 0.03, rel


def test_padding_mask_falls_back_to_the_dequantized_cache():
    sage_torch.register_hf()
    from sage_torch import _dispatch

    _dispatch.reset_warnings()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    ref = _decode(_model("sdpa"), transformers.DynamicCache(), ids, steps=3, mask=mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _decode(_model("sage"), hf_kvcache.SageKVCache(max_cache_len=16), ids, steps=3, mask=mask)
    msgs = [str(w.message) for w in caught if issubclass(w.category, sage_torch.SageFallbackWarning)]
    assert any("dequantizing" in m for m in msgs), msgs
    keep = mask[:, -1].bool()  # rows whose last token is real
    rel = float((got[:, keep] - ref[:, keep]).abs().sum() / ref[:, keep].abs().sum())
    assert rel < 0.03, rel


def test_unsupported_operations_raise(quiet):
    layer = hf_kvcache.SageKVLayer(16)
    for call in (lambda: layer.crop(-1), lambda: layer.batch_repeat_interleave(2),
                 lambda: layer.batch_select_indices(torch.tensor([0])), lambda: layer.reorder_cache(torch.tensor([0]))):
        with pytest.raises(NotImplementedError, match="beam search"):
            call()
    with pytest.raises(ValueError, match="max_cache_len"):
        hf_kvcache.SageKVCache(max_cache_len=0)
    cache = hf_kvcache.SageKVCache(max_cache_len=10)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad(), pytest.raises(ValueError, match="capacity"):
        _decode(_model("sage"), cache, ids, steps=80)  # 8 + 80 > 64 (capacity rounded up to 64)


def test_other_attention_implementations_fail_loudly_on_the_reference(quiet):
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad(), pytest.raises(RuntimeError):
        _decode(_model("sdpa"), hf_kvcache.SageKVCache(max_cache_len=16), ids, steps=1)


def test_dequantize_round_trips():
    cache = sage_torch.QuantizedKVCache(1, 2, 64, 64)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 20, 64, generator=g).to(torch.bfloat16)
    v = torch.randn(1, 2, 20, 64, generator=g).to(torch.bfloat16)
    cache.append(k, v)
    kd, vd = cache.dequantize()
    assert kd.shape == k.shape and kd.dtype == k.dtype
    for a, b in ((kd, k), (vd, v)):
        assert float((a.double() - b.double()).abs().sum() / b.double().abs().sum()) < 0.01
