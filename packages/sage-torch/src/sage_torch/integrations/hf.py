"""Hugging Face transformers: sage as an attention implementation (``attn_implementation="sage"``).

transformers is imported only inside :func:`register_hf`.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import api

HF_ATTENTION_NAME = "sage"


def hf_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0,
                         scaling: float | None = None, is_causal: bool | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function.

    query ``(b, h_q, s_q, d)``, key/value ``(b, h_kv, s_kv, d)`` (transformers' convention);
    returns ``(out (b, s_q, h_q, d), None)``. Causality follows transformers' SDPA integration:
    causal when the module is causal, no mask is given and s_q > 1. Everything goes through
    sage's SDPA drop-in, so calls sage cannot run (masks, dropout, ...) use PyTorch's SDPA.
    """
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='sage' cannot return attention weights "
                         "(output_attentions=True); use attn_implementation='eager'")
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    is_causal = bool(is_causal) and query.shape[2] > 1 and attention_mask is None
    out = api.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                           is_causal=is_causal, scale=scaling,
                                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_hf(name: str = HF_ATTENTION_NAME) -> str:
    """Register :func:`hf_attention_forward` with transformers under ``name``; returns ``name``.

    Then ``AutoModel.from_pretrained(..., attn_implementation="sage")``. Masks are prepared in
    SDPA's format (transformers' mask registry, where it has one).
    """
    try:
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError(f"register_hf needs transformers with AttentionInterface (>= 4.48): {exc}") from exc
    AttentionInterface.register(name, hf_attention_forward)
    try:  # newer transformers build masks per implementation; ours wants SDPA's
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    except (ImportError, KeyError, AttributeError):
        pass
    return name
