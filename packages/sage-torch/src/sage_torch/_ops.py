"""``torch.ops.sage.attention_fwd``: the custom op torch.compile and CUDA graphs see.

The real implementation runs the dispatcher (``_dispatch.run``): which backend runs is decided
at call time, in eager Python, so a compiled graph contains one opaque op and no graph break.
The fake implementation only computes output metadata from input metadata.

Schema (all arguments positional)::

    attention_fwd(q, k, v, layout: str, is_causal: bool, scale: float?, recipe: str,
                  return_lse: bool, options: str, emulate: bool?, strict: bool?) -> (o, lse)

``o`` has q's shape and dtype, in q's memory order (``sage_torch._layout``); ``lse`` is float32 ``(b, h_q, s_q)``
when ``return_lse`` else an empty float32 tensor (custom ops must return tensors).
``options`` is ``_dispatch.encode_options(recipe_options)``.
"""

# No `from __future__ import annotations`: torch.library reads the annotations at definition.
from typing import Optional, Tuple

import torch

from . import _dispatch
from ._layout import empty_output

OP_NAME = "sage::attention_fwd"


def _lse_shape(q: torch.Tensor, layout: str):
    if layout == "bhsd":
        return (q.shape[0], q.shape[1], q.shape[2])
    return (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op(OP_NAME, mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool,
                  scale: Optional[float], recipe: str, return_lse: bool, options: str,
                  emulate: Optional[bool], strict: Optional[bool]) -> Tuple[torch.Tensor, torch.Tensor]:
    o, lse = _dispatch.run(q, k, v, layout=layout, is_causal=is_causal, scale=scale, recipe=recipe,
                           return_lse=return_lse, options=_dispatch.decode_options(options),
                           emulate=emulate, strict=strict)
    if lse is None:
        lse = q.new_empty((0,), dtype=torch.float32)
    return o, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, layout, is_causal, scale, recipe, return_lse, options, emulate, strict):
    o = empty_output(q, layout)  # the strides every real path gives o (sage_torch._layout)
    if return_lse:
        lse = q.new_empty(_lse_shape(q, layout), dtype=torch.float32)
    else:
        lse = q.new_empty((0,), dtype=torch.float32)
    return o, lse
