"""CPU tests of the host fast path and auto's routing rule (the GPU side: tests/gpu/test_sm90_host_path.py)."""

from __future__ import annotations

import torch

from sage_torch import _dispatch


def test_fast_call_declines_what_it_cannot_run():
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    assert _dispatch.fast_call(q, q, q, "bhsd", False, None, "auto") is None  # CPU tensors
    assert _dispatch.fast_call(q[0], q, q, "bhsd", False, None, "auto") is None  # 3-D
    assert _dispatch.fast_call("q", q, q, "bhsd", False, None, "auto") is None


def test_auto_rule_decode_and_tiny():
    min_rows, min_macs = _dispatch.AUTO_TORCH_RULES["sm90_qk_s8_pv_e4m3"]
    why = _dispatch.auto_torch_reason("sm90_qk_s8_pv_e4m3", 8, 32, 1, 8192, 128, False)
    assert why is not None and "decode-shaped" in why
    why = _dispatch.auto_torch_reason("sm90_qk_s8_pv_e4m3", 1, 8, 128, 128, 64, False)
    assert why is not None and "a call this small" in why
    assert _dispatch.auto_torch_reason("sm90_qk_s8_pv_e4m3", 1, 32, 16384, 16384, 128, True) is None
    assert _dispatch.auto_torch_reason("sm80_qk_s8_pv_f16", 1, 8, 1, 128, 64, False) is None  # no rule there
    # causal halves the work: the same shape can be routed causal and not routed non-causal
    n = 64
    while 32 * n * n * 128 < min_macs:
        n += 64
    assert 32 * n * n * 128 // 2 < min_macs
    assert _dispatch.auto_torch_reason("sm90_qk_s8_pv_e4m3", 1, 32, n, n, 128, False) is None
    assert _dispatch.auto_torch_reason("sm90_qk_s8_pv_e4m3", 1, 32, n, n, 128, True) is not None


def test_resolve_applies_the_rule_only_for_auto_and_not_in_strict_mode(as_arch, fake_backend, monkeypatch):
    as_arch("sm90")
    fake_backend("qk_s8_pv_e4m3", archs=("sm90",), name="fake_sm90")
    monkeypatch.setitem(_dispatch.AUTO_TORCH_RULES, "fake_sm90", (64, 1 << 30))
    q = torch.empty(1, 8, 1, 64)
    k = torch.empty(1, 8, 4096, 64)
    call = {"q": q, "k": k, "v": k, "kwargs": {"layout": "bhsd", "is_causal": False}}
    d = _dispatch.resolve("sm90", torch.bfloat16, 64, "auto", call=call, strict=False)
    assert d.kind == _dispatch.KIND_TORCH and "decode-shaped" in d.reason and d.warn
    d = _dispatch.resolve("sm90", torch.bfloat16, 64, "auto", call=call, strict=True)
    assert d.kind == _dispatch.KIND_KERNEL and d.backend.name == "fake_sm90"
    d = _dispatch.resolve("sm90", torch.bfloat16, 64, "qk_s8_pv_e4m3", call=call, strict=False)
    assert d.kind == _dispatch.KIND_KERNEL  # an explicit recipe is never routed


# ----------------------------------------------------------------- auto's route through the front ends

def test_auto_torch_route_only_decides_cuda_calls():
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    assert _dispatch.auto_torch_route(q, q, q, "bhsd", False) is None  # CPU: nothing to route


def test_auto_torch_route_answers_from_a_bounded_cache(monkeypatch):
    """One dict lookup per routed call: the answer is cached per (shapes, dtype, device, layout,
    causal), the cache is bounded (a decode loop adds one kv length per step) and refresh()
    forgets it (environment switches)."""
    monkeypatch.setattr(_dispatch, "_route_cache", {})
    monkeypatch.setattr(_dispatch, "_ROUTE_CACHE_MAX", 3)
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    key = (q.shape, q.shape, q.dtype, q.device, "bhsd", False)
    assert _dispatch.auto_torch_route(q, q, q, "bhsd", False) is None and _dispatch._route_cache == {key: None}
    _dispatch._route_cache[key] = "cached reason"
    assert _dispatch.auto_torch_route(q, q, q, "bhsd", False) == "cached reason"
    for n in (9, 10, 11):
        k = torch.randn(1, 2, n, 64, dtype=torch.bfloat16)
        _dispatch.auto_torch_route(q, k, k, "bhsd", False)
    assert len(_dispatch._route_cache) == 1 and key not in _dispatch._route_cache  # cleared at the bound
    _dispatch.refresh()
    assert _dispatch._route_cache == {}


def test_sdpa_drop_in_makes_the_callers_own_call_where_auto_routes(monkeypatch):
    """Where auto would run PyTorch, the drop-in runs the caller's SDPA call itself (same
    arguments, incl. enable_gqa), so the result and the backend choice are PyTorch's own."""
    import warnings

    from sage_torch import api

    calls = []

    def spy_sdpa(*args, **kwargs):
        calls.append(kwargs)
        return torch.zeros(1)

    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cpu", "cuda"))
    monkeypatch.setattr(api, "TORCH_SDPA", spy_sdpa)
    monkeypatch.setattr(_dispatch, "auto_torch_route", lambda q, k, v, layout, is_causal: "a call this small")
    q = torch.randn(1, 4, 8, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = api.scaled_dot_product_attention(q, k, k, is_causal=True, scale=0.125, enable_gqa=True)
    assert out.shape == (1,) and calls == [{"attn_mask": None, "dropout_p": 0.0, "is_causal": True, "scale": 0.125,
                                            "enable_gqa": True}]
    # every argument is the caller's: a masked call auto routes runs with its mask
    mask = torch.ones(8, 8, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)
    assert calls[-1]["attn_mask"] is mask and calls[-1]["is_causal"] is False and calls[-1]["scale"] is None
    # strict (patch_sdpa(strict=...)) never routes: the call goes to sage's own checks
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api._sdpa(q, k, k, mask, 0.0, False, None, True, strict=False)
    assert calls and calls[-1]["attn_mask"] is mask  # attn_mask: PyTorch's fallback, not the route


def test_hf_attention_runs_transformers_sdpa_where_auto_routes(monkeypatch):
    """transformers' attn_implementation="sage": a shape auto gives to PyTorch runs transformers'
    own sdpa_attention_forward with the call's arguments (as attn_implementation="sdpa" would)."""
    import warnings

    pytest = __import__("pytest")
    sdpa_mod = pytest.importorskip("transformers.integrations.sdpa_attention")
    from sage_torch.integrations import hf

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs))
        return "out", None

    monkeypatch.setattr(sdpa_mod, "sdpa_attention_forward", spy)
    monkeypatch.setattr(_dispatch, "auto_torch_route", lambda q, k, v, layout, is_causal: "decode-shaped")

    class Module(torch.nn.Module):
        is_causal = True

    q = torch.randn(1, 4, 3, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 3, 64, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf.hf_attention_forward(Module(), q, k, k, None, dropout=0.0, scaling=0.125, is_causal=None)
    assert out == ("out", None)
    assert seen == [(None, {"dropout": 0.0, "scaling": 0.125, "is_causal": None})]
