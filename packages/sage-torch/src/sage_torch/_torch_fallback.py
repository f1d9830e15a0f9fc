"""PyTorch-only attention with sage's semantics (the fallback when no sage kernel fits).

sage's semantics differ from ``F.scaled_dot_product_attention`` in two places, handled here:
causal masking is bottom-right aligned (query i sees keys j <= i + s_kv - s_q), and a fully
masked row gives output 0 and LSE -inf. Nothing here reads tensor data on the host, so it is
safe inside CUDA graph capture and torch.compile.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._layout import as_output

#: PyTorch's SDPA captured at import, before anyone (patch_sdpa) replaces the module attribute.
TORCH_SDPA = F.scaled_dot_product_attention

try:  # bottom-right causal without a dense mask: SDPA keeps its fused kernels (torch >= 2.3)
    from torch.nn.attention.bias import causal_lower_right as _causal_lower_right
except ImportError:  # pragma: no cover - older torch
    _causal_lower_right = None

#: Upper bound on the float32 score block of the LSE path (elements), so long sequences are
#: processed in query chunks instead of one (b, h, s_q, s_kv) matrix.
kMaxScoreElements = 1 << 27


def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhsd" else x.transpose(1, 2)


def from_bhsd(x: torch.Tensor, q: torch.Tensor, layout: str) -> torch.Tensor:
    """Back to the caller's layout, in the memory order every path gives o (sage_torch._layout)."""
    return as_output(x if layout == "bhsd" else x.transpose(1, 2), q, layout)


def bottom_right_causal_mask(s_q: int, s_kv: int, device: torch.device) -> torch.Tensor:
    """Boolean (s_q, s_kv), True where query i may see key j, i.e. j <= i + s_kv - s_q."""
    return torch.ones(s_q, s_kv, dtype=torch.bool, device=device).tril(diagonal=s_kv - s_q)


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str,
                    is_causal: bool, scale: float, return_lse: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with sage semantics on PyTorch ops. Inputs already validated by the front end.

    Without LSE this is PyTorch's SDPA (fast, memory efficient). With LSE it is float32 math in
    query chunks (PyTorch has no public SDPA that returns the LSE); o comes from the same math
    so that o and LSE agree.
    """
    qb, kb, vb = to_bhsd(q, layout), to_bhsd(k, layout), to_bhsd(v, layout)
    s_q, s_kv = qb.shape[2], kb.shape[2]
    if return_lse:
        o, lse = _math_attention_with_lse(qb, kb, vb, is_causal=is_causal, scale=scale)
        return from_bhsd(o.to(q.dtype), q, layout), lse
    gqa = qb.shape[1] != kb.shape[1]
    o = None
    if not is_causal or s_q == s_kv:
        o = TORCH_SDPA(qb, kb, vb, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    elif s_q == 1:  # bottom-right aligned, the one query sees every key: no mask (decode)
        o = TORCH_SDPA(qb, kb, vb, is_causal=False, scale=scale, enable_gqa=gqa)
    elif s_q < s_kv and _causal_lower_right is not None:
        # chunked prefill / speculative decode: PyTorch's lower-right causal bias runs on its fused
        # kernels; a dense boolean mask would send the call to a slower masked kernel.
        try:
            o = TORCH_SDPA(qb, kb, vb, attn_mask=_causal_lower_right(s_q, s_kv), scale=scale, enable_gqa=gqa)
        except (RuntimeError, NotImplementedError, TypeError):  # a torch whose bias lacks this case
            o = None
    if o is None:
        # torch's is_causal is top-left aligned when s_q != s_kv; give it our mask explicitly.
        mask = bottom_right_causal_mask(s_q, s_kv, qb.device)
        o = TORCH_SDPA(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=gqa)
        fully_masked = s_q - s_kv  # rows i < s_q - s_kv see no key at all
        if fully_masked > 0:
            o[:, :, :fully_masked] = 0  # fresh tensor, forward only: in place is safe
    return from_bhsd(o, q, layout), None


def _math_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 attention over (b, h, s, d) views; returns (o float32, lse float32 (b, h_q, s_q))."""
    b, h_q, s_q, d = q.shape
    h_kv, s_kv = k.shape[1], k.shape[2]
    group = h_q // h_kv
    kf = k.float().repeat_interleave(group, dim=1) if group > 1 else k.float()
    vf = v.float().repeat_interleave(group, dim=1) if group > 1 else v.float()
    chunk = max(1, min(s_q, kMaxScoreElements // max(1, b * h_q * s_kv)))
    outs, lses = [], []
    for start in range(0, s_q, chunk):
        stop = min(s_q, start + chunk)
        scores = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale
        if is_causal:
            rows = torch.arange(start, stop, device=q.device).unsqueeze(1)
            cols = torch.arange(s_kv, device=q.device).unsqueeze(0)
            scores = scores.masked_fill(cols > rows + (s_kv - s_q), -math.inf)
        lse = torch.logsumexp(scores, dim=-1)
        # A fully masked row has lse = -inf; exp(-inf - (-inf)) would be NaN, so shift by 0 there.
        shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        probs = torch.exp(scores - shift.unsqueeze(-1))
        outs.append(torch.matmul(probs, vf))
        lses.append(lse)
    o = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]
    return o, lse.contiguous()
