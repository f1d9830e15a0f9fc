"""Test inputs for attention accuracy (docs/design/NUMERICS.md, "Input distributions").

``make_qkv`` draws Q, K, V in float32 from a CPU ``torch.Generator`` seeded with ``seed`` (so a
seed reproduces the same tensors on every device), then casts to ``dtype`` and moves to ``device``.

Distributions:

- ``"randn"``: i.i.d. N(0, 1) Q, K and V.
- ``"outlier"`` (what real attention activations look like):
    * K = N(0,1) + 4 * bias_k, bias_k ~ N(0,1) drawn once per (batch, kv-head, channel) and
      shared by all tokens (the per-channel offset that K smoothing removes);
    * Q = N(0,1), then ``max(2, d // 32)`` channels per (batch, q-head), chosen at random, are
      multiplied by 6 (a few outlier channels);
    * V = N(0,1) + bias_v, bias_v ~ N(0,1) per (batch, kv-head, channel).
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["DISTRIBUTIONS", "make_qkv", "kOutlierKBias", "kOutlierQGain"]

DISTRIBUTIONS = ("randn", "outlier")
kOutlierKBias = 4.0  # K per-channel bias multiplier
kOutlierQGain = 6.0  # gain of Q's outlier channels
kOutlierQChannelsPer32 = 1  # outlier Q channels per 32 head-dim channels (at least 2)


def make_qkv(
    dist: str = "randn",
    *,
    b: int,
    h_q: int,
    h_kv: int,
    s_q: int,
    s_kv: int,
    d: int,
    dtype: torch.dtype = torch.bfloat16,
    layout: str = "bhsd",
    seed: int,
    device="cpu",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(q, k, v)``: ``(b, h, s, d)`` for ``layout="bhsd"``, ``(b, s, h, d)`` (contiguous)
    for ``"bshd"``; q has ``h_q`` heads and ``s_q`` tokens, k/v ``h_kv`` heads and ``s_kv`` tokens."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    for name, val in (("b", b), ("h_q", h_q), ("h_kv", h_kv), ("s_q", s_q), ("s_kv", s_kv), ("d", d)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if h_q % h_kv != 0:
        raise ValueError(f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    f32 = torch.float32
    q = torch.randn(b, h_q, s_q, d, generator=g, dtype=f32)
    k = torch.randn(b, h_kv, s_kv, d, generator=g, dtype=f32)
    v = torch.randn(b, h_kv, s_kv, d, generator=g, dtype=f32)
    if dist == "outlier":
        k_bias = torch.randn(b, h_kv, 1, d, generator=g, dtype=f32)
        k = k + kOutlierKBias * k_bias
        n_out = max(2, (d // 32) * kOutlierQChannelsPer32)
        n_out = min(n_out, d)
        gain = torch.ones(b, h_q, 1, d, dtype=f32)
        for bi in range(b):
            for hi in range(h_q):
                ch = torch.randperm(d, generator=g)[:n_out]
                gain[bi, hi, 0, ch] = kOutlierQGain
        q = q * gain
        v_bias = torch.randn(b, h_kv, 1, d, generator=g, dtype=f32)
        v = v + v_bias

    def finish(t):
        t = t.to(dtype)
        if layout == "bshd":
            t = t.transpose(1, 2).contiguous()
        return t.to(device)

    return finish(q), finish(k), finish(v)
