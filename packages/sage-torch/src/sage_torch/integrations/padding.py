"""Padded batches as packs: a boolean attention mask that is *only* padding (plus causality) becomes
an unpad -> :func:`sage_torch.attention_varlen` -> pad round trip.

Given the 4-D boolean mask ``M`` (``(b, 1, q_len, kv_len)``, True = attend; the form transformers'
sdpa mask function builds), let ``valid[b, j] = any_i M[b, i, j]`` (the keys some query sees).
Two structures are recognised, each checked element by element against ``M`` itself:

* **padding only** (encoders, cross-attention, one-token decode): every row sees exactly the valid
  keys, ``M[b, i, j] = valid[b, j]``. Sequence ``b`` of the pack is all ``q_len`` queries against
  its valid keys, non-causal. Equal to SDPA with ``M`` on every row.
* **padding + causal** (decoders; queries are the last ``q_len`` key positions, ``off = kv_len -
  q_len``): for every query whose own token is valid (``valid[b, i + off]``),
  ``M[b, i, j] = valid[b, j] and j <= i + off``. Sequence ``b`` is its valid queries against its
  valid keys, causal: in the compacted sequence the ``a``-th of ``m`` valid queries sees exactly
  the first ``a + 1 + L - m`` of the ``L`` valid keys (the valid keys after its position are the
  later valid queries' own tokens), which is sage's bottom-right causal mask. Equal to SDPA with
  ``M`` on every valid query. Rows of padding tokens give 0 (as transformers' flash-attention
  path does; SDPA gives them 0 too under left padding, and under right padding attention over
  the valid keys before them: a value nothing downstream reads).

A mask with no padding at all (a causal mask passed explicitly, or all True) runs as one dense
call. Anything else (sliding windows, packed documents, chunked attention, additive float masks, masks
that differ per head) is not a plan: the caller keeps PyTorch's SDPA with the mask.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref

import torch

__all__ = ["PaddingPlan", "padding_plan", "cached_padding_plan", "run_padded"]


@dataclasses.dataclass(frozen=True)
class PaddingPlan:
    """How a padded batch maps to a pack: ``q_rows`` / ``k_rows`` are (batch index, position) pairs
    of the packed tokens in pack order; ``cu_seqlens_*`` int32 on the mask's device. ``dense``: no
    token is padding (the mask is plain causal or all True): one dense call, no pack."""

    causal: bool
    dense: bool
    q_rows: tuple[torch.Tensor, torch.Tensor]
    k_rows: tuple[torch.Tensor, torch.Tensor]
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def _plan_from(valid_q: torch.Tensor, valid_k: torch.Tensor, causal: bool) -> PaddingPlan:
    counts = torch.stack([valid_q.sum(dim=1), valid_k.sum(dim=1)])  # (2, b)
    zero = torch.zeros((2, 1), dtype=counts.dtype, device=counts.device)
    cu = torch.cat([zero, counts.cumsum(dim=1)], dim=1).to(torch.int32)
    (max_q, max_k), (min_q, min_k) = counts.amax(dim=1).tolist(), counts.amin(dim=1).tolist()
    dense = (min_q, min_k) == (valid_q.shape[1], valid_k.shape[1])
    q_rows = tuple(valid_q.nonzero(as_tuple=True))
    k_rows = tuple(valid_k.nonzero(as_tuple=True))
    return PaddingPlan(causal, dense, q_rows, k_rows, cu[0].contiguous(), cu[1].contiguous(), int(max_q),
                       int(max_k))


def padding_plan(mask: torch.Tensor, q_len: int, kv_len: int) -> PaddingPlan | None:
    """The plan for a ``(b, 1, q_len, >= kv_len)`` boolean mask (its first ``kv_len`` key columns,
    as SDPA uses them), or None when it is more than padding (module docstring). Reads the mask on
    the host (a few reductions and small copies)."""
    if (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4
            or mask.shape[1] != 1 or mask.shape[2] != q_len or mask.shape[3] < kv_len or q_len < 1):
        return None
    m = mask[:, 0, :, :kv_len]
    valid_k = m.any(dim=1)  # (b, kv_len)
    if bool((m == valid_k[:, None, :]).all()):
        valid_q = torch.ones(m.shape[0], q_len, dtype=torch.bool, device=m.device)
        return _plan_from(valid_q, valid_k, causal=False)
    off = kv_len - q_len
    if off < 0:
        return None
    valid_q = valid_k[:, off:]  # a query's own token is the key at its position
    rows = torch.arange(q_len, device=m.device)[:, None]
    cols = torch.arange(kv_len, device=m.device)[None, :]
    expected = valid_k[:, None, :] & (cols <= rows + off)[None]
    if not bool(((m == expected) | ~valid_q[:, :, None]).all()):
        return None
    return _plan_from(valid_q, valid_k, causal=True)


_cache_lock = threading.Lock()
_cache: tuple = (None, None, None)  # (weakref to the mask, key, plan): a model passes one mask to every layer


def cached_padding_plan(mask: torch.Tensor, q_len: int, kv_len: int) -> PaddingPlan | None:
    """:func:`padding_plan`, remembered for the last mask object seen (unchanged, same lengths)."""
    global _cache
    key = (mask.data_ptr(), mask._version, tuple(mask.shape), tuple(mask.stride()), q_len, kv_len)
    with _cache_lock:
        ref, cached_key, plan = _cache
    if ref is not None and ref() is mask and cached_key == key:
        return plan
    plan = padding_plan(mask, q_len, kv_len)
    with _cache_lock:
        _cache = (weakref.ref(mask), key, plan)
    return plan


def run_padded(plan: PaddingPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               scale: float | None) -> torch.Tensor:
    """Unpad ``(b, h, s, d)`` query/key/value by ``plan``, run :func:`sage_torch.attention_varlen`,
    pad back. Returns ``(b, q_len, h_q, d)`` (transformers' attention-output layout), padding rows 0."""
    from .. import api
    from ..varlen import attention_varlen

    if plan.dense:  # nothing to unpad: sage's bottom-right causal is the mask's causal part
        out = api.attention(query, key, value, layout="bhsd", is_causal=plan.causal, scale=scale)
        return out.transpose(1, 2).contiguous()
    q_t, k_t, v_t = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (b, s, h, d) views
    q_packed = q_t[plan.q_rows]
    k_packed = k_t[plan.k_rows]
    v_packed = v_t[plan.k_rows]
    o_packed = attention_varlen(q_packed, k_packed, v_packed, plan.cu_seqlens_q, plan.cu_seqlens_k,
                                plan.max_seqlen_q, plan.max_seqlen_k, is_causal=plan.causal, scale=scale)
    out = query.new_zeros(q_t.shape)
    out[plan.q_rows] = o_packed
    return out
