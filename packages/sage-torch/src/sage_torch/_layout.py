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


def _axes(layout: str) -> tuple[int, int]:
    """(head axis, sequence axis) of a 4-D tensor in ``layout``."""
    return (1, 2) if layout == "bhsd" else (2, 1)


def heads_inside_seq(q: torch.Tensor, layout: str) -> bool:
    """True when q's memory steps over heads faster than over tokens: (b, s, h, d) order.
    Extents of 1 carry no order (their stride is arbitrary): then the layout's own order."""
    h_axis, s_axis = _axes(layout)
    if q.shape[h_axis] == 1 or q.shape[s_axis] == 1:
        return layout == "bshd"
    return q.stride(h_axis) < q.stride(s_axis)


def _memory_dims(q: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """q's dims from outermost to innermost in o's memory: batch, the outer of seq/head, the
    inner one, head_dim."""
    h_axis, s_axis = _axes(layout)
    inner, outer = (h_axis, s_axis) if heads_inside_seq(q, layout) else (s_axis, h_axis)
    return (0, outer, inner, 3)


def output_strides(q: torch.Tensor, layout: str) -> tuple[int, ...]:
    """Strides of o (shape q.shape) in the order :func:`heads_inside_seq` picks, dense."""
    strides = [0, 0, 0, 0]
    step = 1
    for dim in reversed(_memory_dims(q, layout)):
        strides[dim] = step
        step *= q.shape[dim]
    return tuple(strides)


def empty_output(q: torch.Tensor, layout: str, dtype: torch.dtype | None = None, alloc=torch.empty) -> torch.Tensor:
    """Uninitialized o: q's shape, ``dtype`` (default q's), q's device, :func:`output_strides`.
    ``alloc(shape, dtype=, device=)`` makes the dense buffer (tests pass a poisoning one)."""
    dims = _memory_dims(q, layout)
    buf = alloc(tuple(q.shape[i] for i in dims), dtype=dtype or q.dtype, device=q.device)
    inverse = [0, 0, 0, 0]
    for pos, dim in enumerate(dims):
        inverse[dim] = pos
    return buf.permute(*inverse)


def as_output(o: torch.Tensor, q: torch.Tensor, layout: str) -> torch.Tensor:
    """o (shape q.shape, the call's layout) with :func:`output_strides`: itself when it has them
    (a backend that allocated with :func:`empty_output`), else one copy into that order."""
    if o.stride() == output_strides(q, layout) or o.numel() == 0:
        return o
    out = empty_output(q, layout, dtype=o.dtype)
    out.copy_(o)
    return out
