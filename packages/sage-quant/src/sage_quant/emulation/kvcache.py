"""Exact emulation of decode attention over an INT8 KV cache (recipe ``kvcache_s8``).

The oracle of ``sage_core.decode_s8`` and of :class:`sage_torch.QuantizedKVCache`. Recipe:

* Per (batch, kv head, channel) float32 constants, **fixed** when the cache is first filled, from
  those tokens (:func:`kv_stats`): the means ``k_mean``, ``v_mean`` (``token_mean``) and the
  channel equalizers ``k_chan``, ``v_chan``: ``amax_t |x - mean|`` per channel divided by its
  largest channel (IEEE division), clamped to ``[1/64, 1]``, 1 where the largest is 0. Every
  later token is quantized against the same constants, so appending never re-quantizes what is
  stored. Exactness: ``q . k = (q * k_chan) . ((k - k_mean) / k_chan) + q . k_mean`` and the last
  term is one constant per query row (the softmax drops it); ``v = v_chan * ((v - v_mean) / v_chan)
  + v_mean`` is put back on the output. Equalizing makes a channel with large values (common in V
  and K) stop setting every token's scale (outlier V: rel-L1 0.035 -> 0.009 against float64).
* The cache holds INT8 **per token** (``sage_quant.reference.quant_int``, ``granularity="per_token"``:
  ``s = amax / 127``, ``amax == 0 -> s = 1``, ``clamp(round_half_even(y / s), -127, 127)``, IEEE
  division) of ``y = (K - k_mean) / k_chan`` and ``(V - v_mean) / v_chan`` (fp32 subtraction, then
  IEEE division).
* Query rows: ``q * k_chan`` (fp32), INT8 per row (``granularity="per_token"``). Scores, in float32
  exactly as written (the kernel computes the same operations in the same order)::

      t[r, j] = (float(q8[r] . k8[j]) * k_scale[j]) * (q_scale[r] * scale_log2)

  with ``scale_log2 = float32(scale * log2(e))`` and the integer dot product exact.
* ``o[r] = (sum_j 2^(t[r,j] - m_r) v_scale[j] v8[j] / sum_j 2^(t[r,j] - m_r)) * v_chan + v_mean``
  over the keys row ``r`` sees, here in float64 (the kernel: fp32 exp2 and accumulation in its
  split-KV order, so it matches this to fp32 rounding, not bit for bit). Causal is bottom-right:
  query ``i`` of ``s_q`` sees cache keys ``j <= length - s_q + i``. A row that sees no key is 0.

Runs on any device; inputs in ``bhsd``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..reference import quant_int, token_mean

__all__ = ["kLog2e", "kChanMin", "kv_stats", "quantize_kv_tokens", "decode_attention", "visible_keys"]

kLog2e = 1.4426950408889634
#: smallest channel equalizer: a near-constant channel is not blown up past 64x
kChanMin = 1.0 / 64


def kv_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean, chan)`` float32 ``(b, h, d)`` of a cache's first tokens ``x`` ``(b, h, n, d)``."""
    mean = token_mean(x)
    amax = (x.to(torch.float32) - mean[:, :, None, :]).abs().amax(dim=2)
    top = amax.amax(dim=-1, keepdim=True)
    chan = torch.where(top > 0, amax / torch.where(top > 0, top, torch.ones_like(top)), torch.ones_like(amax))
    return mean, chan.clamp(kChanMin, 1.0).contiguous()


def quantize_kv_tokens(x: torch.Tensor, mean: torch.Tensor, chan: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 (b, h, n, d), scale float32 (b, h, n))`` of ``(x - mean) / chan`` per token."""
    y = x.to(torch.float32) - mean[:, :, None, :]
    if chan is not None:
        y = y / chan[:, :, None, :]
    return quant_int(y, bits=8, granularity="per_token", role="k")


def visible_keys(s_q: int, length: int, is_causal: bool, device=None) -> torch.Tensor:
    """Bool ``(s_q, length)``: which cache keys each query row sees (bottom-right causal)."""
    j = torch.arange(length, device=device)
    if not is_causal:
        return torch.ones((s_q, length), dtype=torch.bool, device=device)
    i = torch.arange(s_q, device=device)
    return j[None, :] <= (length - s_q + i)[:, None]


def decode_attention(q: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, v8: torch.Tensor,
                     v_scale: torch.Tensor, v_mean: Optional[torch.Tensor], *, length: int, is_causal: bool,
                     scale: float, k_chan: Optional[torch.Tensor] = None,
                     v_chan: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The recipe's output, float32 ``(b, h_q, s_q, d)``.

    Args:
        q: ``(b, h_q, s_q, d)`` fp16/bf16/fp32 (bhsd).
        k8, v8: int8 ``(b, h_kv, >= length, d)`` codes; k_scale, v_scale: float32 ``(b, h_kv, >= length)``.
        v_mean, k_chan, v_chan: float32 ``(b, h_kv, d)`` or None (0, 1, 1).
        length: cache tokens attended (the first ``length``).
        is_causal: bottom-right causal mask.
        scale: softmax scale.
    """
    b, h_q, s_q, d = q.shape
    h_kv = k8.shape[1]
    if h_q % h_kv:
        raise ValueError(f"h_q={h_q} is not a multiple of h_kv={h_kv}")
    if not 1 <= length <= k8.shape[2]:
        raise ValueError(f"length must be in [1, {k8.shape[2]}], got {length}")
    group = h_q // h_kv
    kv_of = torch.arange(h_q, device=q.device) // group
    qf = q.to(torch.float32)
    if k_chan is not None:
        qf = qf * k_chan[:, kv_of, None, :]
    q8, q_scale = quant_int(qf, bits=8, granularity="per_token", role="q")  # (b,h_q,s_q,d), (b,h_q,s_q)
    k8 = k8[:, kv_of, :length].to(torch.float64)
    v8 = v8[:, kv_of, :length].to(torch.float64)
    ks = k_scale[:, kv_of, :length].to(torch.float32)
    vs = v_scale[:, kv_of, :length].to(torch.float64)
    dot = torch.matmul(q8.to(torch.float64), k8.transpose(-1, -2)).to(torch.float32)  # exact integers
    c = q_scale.to(torch.float32) * torch.tensor(float(scale) * kLog2e, dtype=torch.float32, device=q.device)
    t = (dot * ks[:, :, None, :]) * c[..., None]  # float32, in the kernel's order
    seen = visible_keys(s_q, length, is_causal, q.device)
    t = t.to(torch.float64).masked_fill(~seen, float("-inf"))
    m = t.amax(dim=-1, keepdim=True)
    p = torch.exp2(t - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    p = torch.where(seen, p, torch.zeros_like(p))
    l = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, vs[..., None] * v8) / torch.where(l > 0, l, torch.ones_like(l))
    if v_chan is not None:
        o = o * v_chan[:, kv_of, None, :].to(torch.float64)
    if v_mean is not None:
        o = o + v_mean[:, kv_of, None, :].to(torch.float64)
    o = torch.where(l > 0, o, torch.zeros_like(o))
    return o.to(torch.float32)
