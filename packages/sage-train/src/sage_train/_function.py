"""``sage_train.attention``: the train_s8 (SageBwd) recipe, differentiable, through custom ops."""

from __future__ import annotations

from typing import Optional

import torch

from sage_quant.emulation.train_s8 import DP_PRECISIONS

from . import _dispatch
from . import _ops  # noqa: F401 - registers torch.ops.sage_train.attention_fwd / attention_bwd
from ._validate import validate

__all__ = ["attention", "kernel_available"]


def kernel_available(device: torch.device, dtype: Optional[torch.dtype] = None,
                     head_dim: Optional[int] = None) -> bool:
    """Whether a registered, available train_s8 kernel exists for ``device`` (and, when given,
    ``dtype`` and ``head_dim``). Where it is False, :func:`attention` runs the exact emulation."""
    device = torch.device(device)
    arch = _dispatch.device_arch(device)
    for spec in _dispatch.registered_kernels():
        if (arch in spec.archs and (dtype is None or dtype in spec.dtypes)
                and (head_dim is None or head_dim in spec.head_dims) and _dispatch._available(spec)[0]):
            return True
    return False


def _check_flag(name: str, value: object, allow_none: bool) -> None:
    if value is True or value is False or (allow_none and value is None):
        return
    accepted = "True, False or None" if allow_none else "True or False"
    raise TypeError(f"{name} must be {accepted}, got {value!r} of type {type(value).__name__}")


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
    emulate: Optional[bool] = None,
    strict: Optional[bool] = None,
) -> torch.Tensor:
    """8-bit attention for training (recipe ``train_s8``, SageAttention3's SageBwd).

    Forward: INT8 per-block Q, K (smoothed), V; P INT8 per row; online softmax. Backward: S
    recomputed in INT8; dV = P̂ᵀ dÔ, dQ = dŜ K̂, dK = dŜᵀ Q̂ in INT8; dP = dO Vᵀ in 16 bits
    (see ``sage_quant.emulation.train_s8`` for the exact recipe).

    Runs ``torch.ops.sage_train.attention_fwd`` (and ``attention_bwd`` in the backward): a
    registered kernel where one fits (``sage_train.backends``; none exists yet), else the exact
    emulation with a warning once. Works under ``torch.compile`` (no graph break).

    Args:
        q: ``(b, h, sq, d)`` for ``layout="bhsd"``, ``(b, sq, h, d)`` for ``"bshd"``; fp16 or
            bf16 (fp32 accepted: the emulation computes in fp32 anyway); any strides.
        k, v: ``(b, hkv, skv, d)`` / ``(b, hkv, skv, dv)`` (or bshd), ``h % hkv == 0`` (GQA/MQA).
        is_causal: causal mask, bottom-right aligned (query i sees keys j <= i + skv - sq).
        scale: softmax scale, default ``1/sqrt(d)``.
        layout: ``"bhsd"`` or ``"bshd"``; the output has the same layout.
        dp_precision: ``"fp16"`` (dP in the 16-bit input dtype, the recipe) or ``"int8"``
            (ablation: lower gradient accuracy; emulation only).
        smooth_k: K smoothing (on by default; turning it off hurts accuracy on real inputs).
        emulate: True runs the emulation even where a kernel exists (the oracle); default
            ``SAGE_FORCE_EMULATION``.
        strict: True raises ``sage_torch.SageDispatchError`` instead of running the emulation
            where no kernel fits; default ``SAGE_STRICT``.

    Returns:
        O, contiguous, same dtype and layout as ``q``, last dim ``dv``. Differentiable w.r.t.
        q, k, v (first order; double backward raises a RuntimeError).

    Raises:
        TypeError / ValueError for bad input, with the inference API's messages
        (``sage_train._validate``).
    """
    is_causal, scale = validate(q, k, v, layout=layout, is_causal=is_causal, scale=scale)
    if not isinstance(dp_precision, str) or dp_precision not in DP_PRECISIONS:
        raise ValueError(f"dp_precision must be one of {DP_PRECISIONS}, got {dp_precision!r}")
    _check_flag("smooth_k", smooth_k, allow_none=False)
    _check_flag("emulate", emulate, allow_none=True)
    _check_flag("strict", strict, allow_none=True)
    o, _lse = torch.ops.sage_train.attention_fwd(q, k, v, is_causal, scale, layout, dp_precision, smooth_k,
                                                 emulate, strict)
    return o
