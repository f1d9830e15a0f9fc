"""Route ``torch.nn.functional.scaled_dot_product_attention`` calls to ``sage_train.attention``.

How: while a patched model's forward runs (or inside ``sage_train.patched()``), the module
attribute ``torch.nn.functional.scaled_dot_product_attention`` is replaced by
:func:`scaled_dot_product_attention` below; it is restored when the outermost such region exits
(also on an exception). The autograd graph built during the forward keeps the train_s8 backward,
so ``loss.backward()`` after the forward uses it.

Limits (documented in the README): the swap is process-wide while a patched forward runs (other
threads calling SDPA at that moment are routed too); code that bound the function at import time
(``from torch.nn.functional import scaled_dot_product_attention``) is not routed. Under
``torch.compile`` the hooks are traced instead: the call is routed in the graph and nothing is
swapped at run time.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from . import _function
from ._warn import warn_once

__all__ = ["scaled_dot_product_attention", "patch_model", "unpatch_model", "is_patched", "patched",
           "torch_sdpa"]

#: PyTorch's own SDPA, captured at import: the fallback never calls the (possibly patched) attribute.
torch_sdpa = F.scaled_dot_product_attention

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PATCH_ATTR = "_sage_train_patch"
_lock = threading.RLock()
_depth = 0
_saved_sdpa = None


def _fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Optional[str]:
    """Why this call cannot run train_s8 with torch SDPA's exact semantics (None: it can)."""
    if attn_mask is not None:
        return "attn_mask is given (train_s8 supports no arbitrary masks)"
    if dropout_p != 0.0:
        return "dropout_p > 0 (train_s8 has no attention dropout)"
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "query/key/value are not all tensors"
    if any(t.dim() != 4 for t in tensors):
        return "inputs are not 4-D (batch, heads, tokens, head_dim)"
    if any(t.dtype not in _SUPPORTED_DTYPES for t in tensors) or not (query.dtype == key.dtype == value.dtype):
        return "dtype is not one float16/bfloat16/float32 for all inputs"
    if any(t.is_nested for t in tensors):
        return "nested tensors"
    if min(query.shape) == 0 or min(key.shape) == 0 or min(value.shape) == 0:
        return "an empty dimension"
    b, h, sq, d = query.shape
    bk, hkv, skv, dk = key.shape
    if (bk, hkv, skv) != tuple(value.shape[:3]) or bk != b or dk != d:
        return "shapes that torch itself must check"
    if h != hkv and (not enable_gqa or h % hkv != 0):
        return "q and kv head counts differ without enable_gqa (torch decides)"
    if is_causal and sq != skv:
        # torch's is_causal is top-left aligned for sq != skv; train_s8 is bottom-right aligned.
        return "is_causal with q_len != kv_len (torch aligns the mask top-left, train_s8 bottom-right)"
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        return "a scale that is not a positive finite number"
    return None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` that trains with train_s8.

    Same signature and semantics as PyTorch's (inputs ``(b, h, s, d)``). Calls train_s8 cannot
    express exactly (an ``attn_mask``, ``dropout_p > 0``, inputs that are not 4-D fp16/bf16/fp32,
    causal with ``q_len != kv_len``, …) run PyTorch's SDPA instead, with a warning once per reason.
    """
    reason = _fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reason is not None:
        if not torch.compiler.is_compiling():  # the result is PyTorch's exactly; keep graphs whole
            warn_once("fallback:" + reason,
                      f"sage_train: PyTorch SDPA runs instead of train_s8 for calls with {reason}; "
                      "those attention calls are not quantized.")
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        if enable_gqa:  # only pass it when set: torch < 2.5 has no such keyword
            kwargs["enable_gqa"] = enable_gqa
        return torch_sdpa(query, key, value, **kwargs)
    return _function.attention(query, key, value, is_causal=bool(is_causal), scale=scale, layout="bhsd")


def _swap_in() -> None:
    global _depth, _saved_sdpa
    if _depth == 0:
        _saved_sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = scaled_dot_product_attention
    _depth += 1


def _swap_out() -> None:
    global _depth, _saved_sdpa
    if _depth == 0:  # an always-called post hook whose pre hook never ran (an earlier hook raised)
        return
    _depth -= 1
    if _depth == 0:
        F.scaled_dot_product_attention = _saved_sdpa
        _saved_sdpa = None


def _enter_routing() -> None:
    if torch.compiler.is_compiling():
        # Traced by dynamo: the swap is a side effect of the trace, the SDPA call in between is
        # traced as sage_train's op, and the net effect of the pair is nothing (no lock: dynamo
        # cannot enter one, and nothing is swapped at run time, so no other thread can see it).
        _swap_in()
        return
    with _lock:
        _swap_in()


def _exit_routing() -> None:
    if torch.compiler.is_compiling():
        _swap_out()
        return
    with _lock:
        _swap_out()


@contextlib.contextmanager
def _routing() -> Iterator[None]:
    _enter_routing()
    try:
        yield
    finally:
        _exit_routing()


def _routing_pre_hook(module, args):
    _enter_routing()


def _routing_post_hook(module, args, output):
    _exit_routing()


def is_patched(model: torch.nn.Module) -> bool:
    """Whether ``patch_model`` is in effect on ``model``."""
    return isinstance(model, torch.nn.Module) and _PATCH_ATTR in model.__dict__


def patch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Route every ``F.scaled_dot_product_attention`` call made during ``model``'s forward to
    train_s8 (:func:`scaled_dot_product_attention`). Returns ``model`` (patched in place).

    Implemented with a forward pre-hook and an always-called forward hook (so the swap is undone
    even when the forward raises); parameters, ``state_dict`` and ``forward`` are untouched.
    Patching an already patched model does nothing. Undo with :func:`unpatch_model`.
    Patch the outermost module you call.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_model expects a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        return model
    pre = model.register_forward_pre_hook(_routing_pre_hook, prepend=True)  # first: nothing runs unrouted
    post = model.register_forward_hook(_routing_post_hook, always_call=True)
    model.__dict__[_PATCH_ATTR] = (pre, post)
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_model`. Returns ``model``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unpatch_model expects a torch.nn.Module, got {type(model).__name__}")
    handles = model.__dict__.pop(_PATCH_ATTR, None)
    if handles is None:
        raise ValueError(f"this {type(model).__name__} is not patched by sage_train.patch_model")
    for handle in handles:
        handle.remove()
    return model


@contextlib.contextmanager
def patched(model: Optional[torch.nn.Module] = None) -> Iterator[Optional[torch.nn.Module]]:
    """Context manager: route SDPA calls to train_s8 inside the ``with`` block.

    ``patched(model)`` patches ``model`` (only its forward is routed) and unpatches it on exit
    (unless it was patched before). ``patched()`` routes every SDPA call in the block.
    """
    if model is None:
        with _routing():
            yield None
        return
    was_patched = is_patched(model)
    patch_model(model)
    try:
        yield model
    finally:
        if not was_patched:
            unpatch_model(model)
