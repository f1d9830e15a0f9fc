"""``sage_train.attention``: the train_s8 (SageBwd) recipe as a ``torch.autograd.Function``."""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from sage_quant.emulation.train_s8 import DP_PRECISIONS, train_s8_backward, train_s8_forward

from ._warn import warn_once

__all__ = ["attention", "kernel_available"]


def kernel_available(device: torch.device) -> bool:
    """Whether a compiled train_s8 kernel exists for ``device``.

    No GPU kernel of the recipe exists yet (sage_core has none): always False, and every call
    runs the exact PyTorch emulation from ``sage_quant.emulation.train_s8``.
    """
    return False


class _TrainS8Attention(torch.autograd.Function):
    """O = attention(q, k, v) with the train_s8 forward; backward = the train_s8 backward.

    The emulation's context (INT8 Q/K/V and scales, O, the smoothed LSE, V in 16 bits for dP)
    is kept on ``ctx``; double backward is not supported.
    """

    @staticmethod
    def forward(ctx, q, k, v, is_causal, scale, layout, dp_precision, smooth_k):
        o, _lse, recipe_ctx = train_s8_forward(
            q.detach(), k.detach(), v.detach(), is_causal=is_causal, scale=scale, layout=layout,
            dp_precision=dp_precision, smooth_k=smooth_k)
        ctx.recipe_ctx = recipe_ctx
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        dq, dk, dv = train_s8_backward(do, ctx.recipe_ctx)
        ctx.recipe_ctx = None  # free the saved INT8 tensors now
        return dq, dk, dv, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    layout: str = "bhsd",
    dp_precision: str = "fp16",
    smooth_k: bool = True,
) -> torch.Tensor:
    """8-bit attention for training (recipe ``train_s8``, SageAttention3's SageBwd).

    Forward: INT8 per-block Q, K (smoothed), V; P INT8 per row; online softmax. Backward: S
    recomputed in INT8; dV = P̂ᵀ dÔ, dQ = dŜ K̂, dK = dŜᵀ Q̂ in INT8; dP = dO Vᵀ in 16 bits
    (see ``sage_quant.emulation.train_s8`` for the exact recipe).

    Args:
        q: ``(b, h, sq, d)`` for ``layout="bhsd"``, ``(b, sq, h, d)`` for ``"bshd"``; fp16 or
            bf16 (fp32 accepted: the emulation computes in fp32 anyway).
        k, v: ``(b, hkv, skv, d)`` / ``(b, hkv, skv, dv)`` (or bshd), ``h % hkv == 0`` (GQA/MQA).
        is_causal: causal mask, bottom-right aligned (query i sees keys j <= i + skv - sq).
        scale: softmax scale, default ``1/sqrt(d)``.
        layout: ``"bhsd"`` or ``"bshd"``; the output has the same layout.
        dp_precision: ``"fp16"`` (dP in the 16-bit input dtype, the recipe) or ``"int8"``
            (ablation: lower gradient accuracy).
        smooth_k: K smoothing (on by default; turning it off hurts accuracy on real inputs).

    Returns:
        O, same dtype and layout as ``q``, last dim ``dv``. Differentiable w.r.t. q, k, v.
    """
    if dp_precision not in DP_PRECISIONS:
        raise ValueError(f"dp_precision must be one of {DP_PRECISIONS}, got {dp_precision!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not kernel_available(q.device):
        warn_once(
            "emulation",
            "sage_train: no train_s8 GPU kernel is available yet; running the exact PyTorch "
            "emulation of the recipe (same numerics, much slower, more memory).",
        )
    return _TrainS8Attention.apply(q, k, v, is_causal, scale, layout, dp_precision, smooth_k)
