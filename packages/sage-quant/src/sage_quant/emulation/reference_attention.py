"""Exact attention in float64: the accuracy reference for every recipe."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

__all__ = ["reference_attention", "validate_qkv"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
kRefChunkElems = 1 << 24  # float64 score elements per query chunk (128 MiB)


def validate_qkv(q, k, v, layout: str, allowed_dtypes=_DTYPES):
    """Check q/k/v and return logical (b,h,s,d) views plus (b, h_q, h_kv, s_q, s_kv, d, d_v)."""
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({layout}), got shape {tuple(t.shape)}")
        if t.dtype not in allowed_dtypes:
            raise TypeError(f"{name} dtype must be one of {[str(d) for d in allowed_dtypes]}, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    b, h_q, s_q, d = q.shape
    bk, h_kv, s_kv, dk = k.shape
    if bk != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {v.shape[0]}")
    if dk != d:
        raise ValueError(f"q and k head dims differ: {d} vs {dk}")
    if v.shape[1] != h_kv or v.shape[2] != s_kv:
        raise ValueError(f"k and v must have the same heads and tokens (logical b,h,s,d), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"q heads ({h_q}) must be a multiple of kv heads ({h_kv}) (GQA/MQA)")
    if min(b, h_q, s_q, s_kv, d) < 1:
        raise ValueError(f"all dims must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    return q, k, v, (b, h_q, h_kv, s_q, s_kv, d, v.shape[3])


def causal_allowed(s_q: int, s_kv: int, device, keys: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Bottom-right causal mask: query i sees key j iff j <= i + s_kv - s_q.

    Shape (s_q, s_kv), or (s_q, k1 - k0) for the keys ``[k0, k1)`` when ``keys=(k0, k1)``.
    """
    k0, k1 = keys if keys is not None else (0, s_kv)
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(k0, k1, device=device)[None, :]
    return j <= i + (s_kv - s_q)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    layout: str = "bhsd",
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """softmax(q kᵀ · scale) v in float64.

    GQA by repeating each kv head over its ``h_q / h_kv`` q heads; bottom-right causal;
    fully masked rows give O = 0 and LSE = -inf; NaN/Inf inputs propagate to the rows they touch.

    Returns float64 O in the input layout, and with ``return_lse`` the natural-log LSE
    ``(b, h_q, s_q)`` float64.
    """
    q, k, v, (b, h_q, h_kv, s_q, s_kv, d, dv) = validate_qkv(q, k, v, layout)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    rep = h_q // h_kv
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(rep, dim=1)
    v64 = v.to(torch.float64).repeat_interleave(rep, dim=1)
    allowed = causal_allowed(s_q, s_kv, q.device) if is_causal else None
    out = torch.empty(b, h_q, s_q, dv, dtype=torch.float64, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float64, device=q.device)
    rows = max(1, kRefChunkElems // max(1, b * h_q * s_kv))
    for r0 in range(0, s_q, rows):
        r1 = min(s_q, r0 + rows)
        s = torch.matmul(q64[:, :, r0:r1], k64.transpose(-1, -2)) * scale
        if allowed is not None:
            s = s.masked_fill(~allowed[r0:r1], -math.inf)
        m = s.amax(dim=-1, keepdim=True)
        m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m_safe)
        l = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, v64) / l
        masked_row = l == 0  # every key masked (NaN rows have l = NaN, not 0)
        out[:, :, r0:r1] = torch.where(masked_row, torch.zeros_like(o), o)
        lse[:, :, r0:r1] = (m_safe + torch.log(l)).squeeze(-1)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
