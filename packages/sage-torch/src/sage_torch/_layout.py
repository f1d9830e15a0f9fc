"""Memory order of sage's outputs: the batch/head/sequence order of q's memory, like cuDNN's SDPA.

A model usually hands attention (b, h, s, d) *views* of (b, s, h, d) memory (a packed qkv
projection, or transformers' ``view(b, s, h, d).transpose(1, 2)``) and turns the output back with
``o.transpose(1, 2).reshape(b, s, h*d)`` or ``.contiguous()``. PyTorch's flash and cuDNN SDPA
return o in that (b, s, h, d) memory, so the turn back is free; an output contiguous in (b, h, s, d)
costs the model a full copy of o there. So sage allocates o in q's order of the b/h/s dims: a
(b, h, s, d) view of (b, s, h, d) memory when q is one, else contiguous in the call's layout (as
before). Every path (kernels, emulation, PyTorch fallback, the custom op's fake) uses these helpers,
so o's strides depend only on q's shape, strides and the layout.
"""

from __future__ import annotations

import torch


def _swapped(q: torch.Tensor, layout: str) -> bool:
    """True when q's memory order of dims 1 and 2 is the other one than ``layout`` names, i.e. a
    (b, h, s, d) view of (b, s, h, d) memory (or the reverse for "bshd"). Extents of 1 carry no
    order (their stride is arbitrary): not swapped."""
    shape, stride = q.shape, q.stride()
    if shape[1] == 1 or shape[2] == 1:
        return False
    return stride[1] < stride[2]


def output_strides(q: torch.Tensor, layout: str) -> tuple[int, ...]:
    """Strides of o (shape q.shape): dense, dims 1 and 2 in q's memory order."""
    b, x, y, d = q.shape
    if _swapped(q, layout):
        return (x * y * d, d, x * d, 1)
    return (x * y * d, y * d, d, 1)


def empty_output(q: torch.Tensor, layout: str, dtype: torch.dtype | None = None, alloc=torch.empty) -> torch.Tensor:
    """Uninitialized o: q's shape, ``dtype`` (default q's), q's device, :func:`output_strides`.
    ``alloc(shape, dtype=, device=)`` makes the dense buffer (tests pass a poisoning one).
    On the host path of every call: kept to a stride comparison and one allocation."""
    shape = q.shape
    if not q.is_contiguous() and _swapped(q, layout):
        return alloc((shape[0], shape[2], shape[1], shape[3]), dtype=dtype or q.dtype, device=q.device).transpose(1, 2)
    return alloc(shape, dtype=dtype or q.dtype, device=q.device)


def as_output(o: torch.Tensor, q: torch.Tensor, layout: str) -> torch.Tensor:
    """o (shape q.shape, the call's layout) with :func:`output_strides`: itself when it has them
    (a backend that allocated with :func:`empty_output`), else one copy into that order."""
    if o.stride() == output_strides(q, layout) or o.numel() == 0:
        return o
    out = empty_output(q, layout, dtype=o.dtype)
    out.copy_(o)
    return out
