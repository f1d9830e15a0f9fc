"""Helpers shared by the sage_torch tests (a unique module name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch


def randn(shape, *, dtype=torch.bfloat16, device="cpu", seed: int, scale: float = 1.0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def make_qkv(b=1, h_q=2, h_kv=None, s_q=16, s_kv=None, d=64, *, layout="bhsd", dtype=torch.bfloat16,
             device="cpu", seed: int):
    h_kv = h_q if h_kv is None else h_kv
    s_kv = s_q if s_kv is None else s_kv

    def shape(h, s):
        return (b, h, s, d) if layout == "bhsd" else (b, s, h, d)

    q = randn(shape(h_q, s_q), dtype=dtype, device=device, seed=seed)
    k = randn(shape(h_kv, s_kv), dtype=dtype, device=device, seed=seed + 1)
    v = randn(shape(h_kv, s_kv), dtype=dtype, device=device, seed=seed + 2)
    return q, k, v


class FakeBackend:
    """A CPU stand-in for a kernel: records calls, returns the torch math result plus a marker
    offset so tests can tell which path ran."""

    def __init__(self, marker: float = 0.0):
        self.calls = []
        self.marker = marker

    def __call__(self, q, k, v, *, layout, is_causal, scale, return_lse, **options):
        from sage_torch._torch_fallback import torch_attention
        self.calls.append(dict(layout=layout, is_causal=is_causal, scale=scale, return_lse=return_lse,
                               options=options, shapes=(tuple(q.shape), tuple(k.shape))))
        o, lse = torch_attention(q, k, v, layout=layout, is_causal=is_causal, scale=scale, return_lse=return_lse)
        return o + self.marker, lse
