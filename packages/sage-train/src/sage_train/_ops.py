"""``torch.ops.sage_train.attention_fwd`` / ``attention_bwd``: the train_s8 custom ops.

What torch.compile, AOTAutograd and autograd see: two opaque ops with fake (meta)
implementations and an autograd formula (``register_autograd``), so a compiled training step
holds one forward and one backward op and no graph break. Which implementation runs (a
registered kernel or the emulation, ``_dispatch.decide``) is decided when the op runs, in eager
Python.

Schemas (positional)::

    attention_fwd(q, k, v, is_causal: bool, scale: float?, layout: str, dp_precision: str,
                  smooth_k: bool, emulate: bool?, strict: bool?) -> (o, lse)
    attention_bwd(do, q, k, v, o, lse, is_causal, scale, layout, dp_precision, smooth_k,
                  emulate, strict) -> (dq, dk, dv)

``o`` is contiguous in ``layout`` with q's shape and dtype and v's last dim; ``lse`` is float32
``(b, h_q, s_q)``, the natural-log LSE of the *smoothed* scores (what the backward needs; not the
user-facing LSE of the unsmoothed scores) and not differentiable. ``dq, dk, dv`` are contiguous
with their inputs' shapes and dtype. The backward saves q, k, v, o and lse and re-quantizes Q, K,
V (FlashAttention-style memory: no INT8 copies kept between the passes).

Double backward (differentiating the gradients) raises a RuntimeError that says so; first-order
gradients with ``create_graph=True`` and repeated ``backward(retain_graph=True)`` work.
"""

# No `from __future__ import annotations`: torch.library reads the annotations at definition.
import math
from typing import Optional, Tuple

import torch

from sage_quant.emulation.train_s8 import train_s8_backward, train_s8_context, train_s8_forward

from . import _dispatch

FWD_NAME = "sage_train::attention_fwd"
BWD_NAME = "sage_train::attention_bwd"


def _scale_value(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _lse_shape(q: torch.Tensor, layout: str) -> Tuple[int, int, int]:
    if layout == "bhsd":
        return (q.shape[0], q.shape[1], q.shape[2])
    return (q.shape[0], q.shape[2], q.shape[1])


def _check_kernel_outputs(name: str, what: str, outs, expected, device: torch.device) -> None:
    """Host-side checks (shape, dtype, device, contiguity: no sync) that name a misbehaving kernel."""
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    if len(outs) != len(expected):
        raise RuntimeError(f"train_s8 kernel {name!r} {what} returned {len(outs)} values, expected {len(expected)}")
    for i, (t, (shape, dtype)) in enumerate(zip(outs, expected)):
        if (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype
                or t.device != device or not t.is_contiguous()):
            got = (f"{tuple(t.shape)} {t.dtype} {t.device} contiguous={t.is_contiguous()}"
                   if isinstance(t, torch.Tensor) else type(t).__name__)
            raise RuntimeError(f"train_s8 kernel {name!r} {what} output {i} is {got}; expected a contiguous "
                               f"{tuple(shape)} {dtype} tensor on {device}")


# ----------------------------------------------------------------------------- forward


@torch.library.custom_op(FWD_NAME, mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: Optional[float],
                  layout: str, dp_precision: str, smooth_k: bool, emulate: Optional[bool],
                  strict: Optional[bool]) -> Tuple[torch.Tensor, torch.Tensor]:
    scale_value = _scale_value(q, scale)
    spec = _dispatch.decide(q, k, v, layout=layout, is_causal=is_causal, scale=scale_value,
                            dp_precision=dp_precision, smooth_k=smooth_k, emulate=emulate, strict=strict)
    if spec is not None:
        o, lse = spec.forward(q, k, v, layout=layout, is_causal=is_causal, scale=scale_value, smooth_k=smooth_k)
        _check_kernel_outputs(spec.name, "forward", (o, lse), ((q.shape[:3] + (v.shape[3],), q.dtype),
                                                               (_lse_shape(q, layout), torch.float32)), q.device)
        return o, lse
    o, _lse, ctx = train_s8_forward(q, k, v, is_causal=is_causal, scale=scale, layout=layout,
                                    dp_precision=dp_precision, smooth_k=smooth_k)
    return o, ctx.lse_smoothed


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, is_causal, scale, layout, dp_precision, smooth_k, emulate, strict):
    o = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    lse = q.new_empty(_lse_shape(q, layout), dtype=torch.float32)
    return o, lse


# ----------------------------------------------------------------------------- backward


@torch.library.custom_op(BWD_NAME, mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, is_causal: bool, scale: Optional[float], layout: str, dp_precision: str,
                  smooth_k: bool, emulate: Optional[bool],
                  strict: Optional[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale_value = _scale_value(q, scale)
    spec = _dispatch.decide(q, k, v, layout=layout, is_causal=is_causal, scale=scale_value,
                            dp_precision=dp_precision, smooth_k=smooth_k, emulate=emulate, strict=strict)
    if spec is not None:
        grads = spec.backward(do, q, k, v, o, lse, layout=layout, is_causal=is_causal, scale=scale_value,
                              smooth_k=smooth_k)
        _check_kernel_outputs(spec.name, "backward", grads, tuple((x.shape, x.dtype) for x in (q, k, v)), q.device)
        return tuple(grads)
    ctx = train_s8_context(q, k, v, o, lse, is_causal=is_causal, scale=scale, layout=layout,
                           dp_precision=dp_precision, smooth_k=smooth_k)
    return train_s8_backward(do, ctx)


@attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, o, lse, is_causal, scale, layout, dp_precision, smooth_k, emulate, strict):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


# ----------------------------------------------------------------------------- autograd

_N_OPTIONS = 7  # is_causal, scale, layout, dp_precision, smooth_k, emulate, strict


def _fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v, *options = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.options = tuple(options)
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, grad_o, grad_lse):
    nones = (None,) * _N_OPTIONS
    if grad_o is None:
        return (None, None, None) + nones
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.sage_train.attention_bwd(grad_o, q, k, v, o, lse, *ctx.options)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None) + nones


attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)

DOUBLE_BACKWARD_MESSAGE = (
    "sage_train.attention does not support double backward: the train_s8 backward "
    "(torch.ops.sage_train.attention_bwd) has no derivative of its own. First-order gradients work, "
    "also with create_graph=True and with repeated backward(retain_graph=True); differentiating those "
    "gradients again (gradgradcheck, gradient penalties through attention) needs PyTorch's SDPA.")


def _bwd_setup_context(ctx, inputs, output) -> None:
    pass


def _bwd_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


attention_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)
