"""flash-attn-compatible entry points: ``from sage_torch.flash_attn import flash_attn_func`` replaces
``from flash_attn import flash_attn_func`` for forward-only callers (context-parallel frameworks such
as ring attention / Ulysses implementations call attention through these names).

Argument names and order are flash-attn 2's (``flash_attn_interface.py``): BSHD tensors,
``softmax_scale``, ``causal``; causal is bottom-right aligned as in flash-attn >= 2.1 (and in sage).
What sage cannot honour is refused, never ignored: ``dropout_p > 0``, a sliding ``window_size``,
``softcap``, ``alibi_slopes`` raise ValueError. ``deterministic`` is accepted (sage's forward is
deterministic). ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: the LSE (natural
log, float32) as flash-attn returns it, and no attention-probability matrix (flash-attn's is only
meaningful for its dropout tests).

Keyword-only extras (not in flash-attn): ``recipe=`` and the recipe options of
:func:`sage_torch.attention`.
"""

from __future__ import annotations

from typing import Any

import torch

from . import api, varlen

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _refuse_unsupported(fn: str, dropout_p: Any, window_size: Any, softcap: Any, alibi_slopes: Any,
                        deterministic: Any, block_table: Any = None) -> None:
    if isinstance(dropout_p, torch.Tensor) or dropout_p != 0.0:
        raise ValueError(f"{fn}: dropout_p={dropout_p!r} is not supported (sage has no dropout; accepted: 0.0)")
    if window_size is not None and tuple(window_size) != (-1, -1):
        raise ValueError(f"{fn}: window_size={tuple(window_size)!r} (local attention) is not supported; "
                         f"accepted: (-1, -1)")
    if softcap != 0.0:
        raise ValueError(f"{fn}: softcap={softcap!r} is not supported (sage has no logit soft-capping; "
                         f"accepted: 0.0)")
    if alibi_slopes is not None:
        raise ValueError(f"{fn}: alibi_slopes is not supported (sage adds no position bias; accepted: None)")
    if not isinstance(deterministic, bool):
        raise TypeError(f"{fn}: deterministic must be a bool, got {type(deterministic).__name__}")
    if block_table is not None:
        raise ValueError(f"{fn}: block_table (paged KV cache) is not supported; accepted: None")


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, recipe: str = "auto", **recipe_options: Any):
    """flash-attn's ``flash_attn_func`` on sage (forward only).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)`` (BSHD), float16/bfloat16.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``, ``nheads % nheads_k == 0`` (GQA/MQA).
        softmax_scale: default ``1/sqrt(headdim)``.
        causal: bottom-right aligned causal mask.
        return_attn_probs: also return the LSE ``(batch, nheads, seqlen_q)`` float32 (natural log).

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)``, or ``(out, softmax_lse, None)``.
    """
    _refuse_unsupported("flash_attn_func", dropout_p, window_size, softcap, alibi_slopes, deterministic)
    lse_flag = api._as_bool("return_attn_probs", return_attn_probs)
    result = api.attention(q, k, v, layout="bshd", is_causal=causal, scale=softmax_scale, recipe=recipe,
                           return_lse=lse_flag, **recipe_options)
    if lse_flag:
        out, lse = result
        return out, lse, None
    return result


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: torch.Tensor | None = None, *,
                           recipe: str = "auto", **recipe_options: Any):
    """flash-attn's ``flash_attn_varlen_func`` on sage: :func:`sage_torch.attention_varlen`.

    ``q`` ``(total_q, nheads, headdim)``, ``k``/``v`` ``(total_k, nheads_k, headdim)``,
    ``cu_seqlens_*`` int32 ``(batch + 1,)`` on q's device. Returns ``out`` ``(total_q, nheads,
    headdim)``, or ``(out, softmax_lse, None)`` with the LSE ``(nheads, total_q)`` float32.
    """
    _refuse_unsupported("flash_attn_varlen_func", dropout_p, window_size, softcap, alibi_slopes, deterministic,
                        block_table)
    lse_flag = api._as_bool("return_attn_probs", return_attn_probs)
    result = varlen.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     is_causal=causal, scale=softmax_scale, return_lse=lse_flag, recipe=recipe,
                                     **recipe_options)
    if lse_flag:
        out, lse = result
        return out, lse, None
    return result
