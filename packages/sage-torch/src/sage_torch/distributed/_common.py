"""What ring and Ulysses attention share: argument checks, the process group, the per-block attention."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .. import api

#: ``fn(q, k, v, *, layout, is_causal, scale, return_lse) -> o`` or ``(o, lse)`` with ``return_lse``:
#: attention over one block, with :func:`sage_torch.attention`'s semantics (bottom-right causal,
#: natural-log float32 LSE ``(b, h_q, s_q)``, fully masked rows 0 / -inf).
AttentionFn = Callable[..., Any]

LAYOUTS: tuple[str, ...] = ("bshd", "bhsd")


def block_attention_fn(recipe: str = "auto", attention_fn: AttentionFn | None = None,
                       **recipe_options: Any) -> AttentionFn:
    """The per-block attention: ``attention_fn`` when given, else sage's attention with ``recipe``."""
    if attention_fn is not None:
        if recipe != "auto" or recipe_options:
            raise TypeError(f"pass either attention_fn or recipe=/recipe options, not both (got recipe={recipe!r}, "
                            f"options {sorted(recipe_options)})")
        if not callable(attention_fn):
            raise TypeError(f"attention_fn must be callable, got {type(attention_fn).__name__}")
        return attention_fn
    return functools.partial(api.attention, recipe=recipe, **recipe_options)


def check_qkv(fn: str, q: Any, k: Any, v: Any, layout: Any) -> tuple[int, int]:
    """Host-side checks; returns (sequence dim, heads dim) of ``layout``. The per-block attention
    validates dtypes, head dims and the rest with its own messages."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            shape = "(batch, seq, heads, head_dim)" if layout == "bshd" else "(batch, heads, seq, head_dim)"
            raise ValueError(f"{fn}: {name} must be 4-D {shape} for layout={layout!r}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    return (1, 2) if layout == "bshd" else (2, 1)


def group_rank_size(fn: str, group: Any) -> tuple[int, int]:
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn} needs torch.distributed initialised (torch.distributed.init_process_group, "
                           f"e.g. under torchrun); for one process call sage_torch.attention")
    return dist.get_rank(group), dist.get_world_size(group)


def split_result(result: Any, fn_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"{fn_name}: the per-block attention must return (o, lse) when asked for the LSE, got "
                        f"{type(result).__name__}")
    return result
