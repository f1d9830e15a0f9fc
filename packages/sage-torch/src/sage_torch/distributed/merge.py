"""Merging partial attention results by their LSE (the building block of ring / split-KV attention).

Attention over a key set that is the union of disjoint blocks ``B_1 ... B_n`` is, per query row,

    lse = log(sum_i exp(lse_i))
    o   = sum_i exp(lse_i - lse) * o_i

where ``(o_i, lse_i)`` is attention over ``B_i`` alone (``o_i`` normalized, ``lse_i`` its natural-log
sum of ``exp(scores)``). This is exact in real arithmetic; here it is evaluated in float32 with the
largest ``lse_i`` subtracted first (no overflow), and a row whose every ``lse_i`` is ``-inf`` (no key
visible in any block: sage's convention for a fully masked row) gives ``o = 0`` and ``lse = -inf``
instead of NaN. A NaN in an ``lse_i`` or ``o_i`` propagates to that row.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["merge_attention", "LseAccumulator", "MERGE_LAYOUTS", "lse_to_output_shape"]

#: Output layouts and where the LSE's axes sit: bshd / bhsd take LSE ``(b, h, s)``; thd (packed
#: varlen) takes LSE ``(h, t)``.
MERGE_LAYOUTS: tuple[str, ...] = ("bshd", "bhsd", "thd")


def lse_to_output_shape(lse: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of ``lse`` that broadcasts against an output of ``layout`` (a trailing axis of size 1)."""
    if layout == "bshd":
        return lse.transpose(1, 2).unsqueeze(-1)
    if layout == "bhsd":
        return lse.unsqueeze(-1)
    if layout == "thd":
        return lse.transpose(0, 1).unsqueeze(-1)
    raise ValueError(f"layout must be one of {MERGE_LAYOUTS}, got {layout!r}")


def _expected_lse_shape(o: torch.Tensor, layout: str) -> tuple[int, ...]:
    if layout == "bshd":
        return (o.shape[0], o.shape[2], o.shape[1])
    if layout == "bhsd":
        return (o.shape[0], o.shape[1], o.shape[2])
    return (o.shape[1], o.shape[0])


def _check(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], layout: str) -> None:
    if layout not in MERGE_LAYOUTS:
        raise ValueError(f"layout must be one of {MERGE_LAYOUTS}, got {layout!r}")
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge_attention needs as many outputs as LSEs (at least one), got {len(outs)} "
                         f"outputs and {len(lses)} LSEs")
    ndim = 3 if layout == "thd" else 4
    for i, (o, lse) in enumerate(zip(outs, lses)):
        if not isinstance(o, torch.Tensor) or not isinstance(lse, torch.Tensor):
            raise TypeError(f"outs[{i}] and lses[{i}] must be tensors, got {type(o).__name__}, {type(lse).__name__}")
        if o.dim() != ndim:
            raise ValueError(f"outs[{i}] must be {ndim}-D for layout {layout!r}, got shape {tuple(o.shape)}")
        if o.shape != outs[0].shape:
            raise ValueError(f"all outputs must have one shape, got {tuple(outs[0].shape)} and outs[{i}] "
                             f"{tuple(o.shape)}")
        want = _expected_lse_shape(o, layout)
        if tuple(lse.shape) != want:
            raise ValueError(f"lses[{i}] must have shape {want} for an output {tuple(o.shape)} in layout "
                             f"{layout!r}, got {tuple(lse.shape)}")
        if not lse.is_floating_point() or not o.is_floating_point():
            raise TypeError(f"outs[{i}] / lses[{i}] must be floating point, got {o.dtype}, {lse.dtype}")
        if o.device != outs[0].device or lse.device != outs[0].device:
            raise ValueError(f"all tensors must be on one device, got {outs[0].device}, {o.device}, {lse.device}")


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], *, layout: str = "bshd",
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention results over disjoint key blocks (module docstring: the formula).

    Args:
        outs: ``n`` outputs of one shape: ``(b, s, h, d)`` for ``layout="bshd"``, ``(b, h, s, d)``
            for ``"bhsd"``, ``(t, h, d)`` for ``"thd"`` (packed varlen).
        lses: their natural-log LSEs: ``(b, h, s)`` for bshd/bhsd, ``(h, t)`` for thd (sage's and
            flash-attn's conventions); ``-inf`` where a block shows a row no key.
        out_dtype: dtype of the merged output (default ``outs[0].dtype``).

    Returns:
        ``(o, lse)``: ``o`` in ``layout``, contiguous, ``out_dtype``; ``lse`` float32, contiguous.
    """
    _check(outs, lses, layout)
    stacked = torch.stack([lse.to(torch.float32) for lse in lses])  # (n, *lse shape)
    top = stacked.amax(dim=0)
    shift = torch.where(torch.isneginf(top), torch.zeros_like(top), top)  # all -inf: no -inf - -inf
    weights = torch.exp(stacked - shift)
    total = weights.sum(dim=0)
    lse = shift + torch.log(total)  # log(0) = -inf for rows no block sees
    safe_total = torch.where(total == 0, torch.ones_like(total), total)
    o = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    for o_i, w_i in zip(outs, weights):
        o = o + o_i.to(torch.float32) * lse_to_output_shape(w_i / safe_total, layout)
    return o.to(out_dtype or outs[0].dtype).contiguous(), lse.contiguous()


class LseAccumulator:
    """Running merge of block results into float32 ``(o, lse)`` (the ring's accumulator).

    ``o`` starts at 0 and ``lse`` at ``-inf`` (no key seen); :meth:`add` merges one block's result
    into all rows or into a row range ``[start, start + rows)`` of the sequence axis. Same formula
    and guards as :func:`merge_attention`, one block at a time.
    """

    def __init__(self, out_shape: tuple[int, ...], lse_shape: tuple[int, ...], *, layout: str,
                 device: torch.device) -> None:
        if layout not in ("bshd", "bhsd"):
            raise ValueError(f"LseAccumulator: layout must be 'bshd' or 'bhsd', got {layout!r}")
        self.layout = layout
        self.o = torch.zeros(out_shape, dtype=torch.float32, device=device)
        self.lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=device)

    def add(self, o: torch.Tensor, lse: torch.Tensor, start: int = 0) -> None:
        seq_dim = 1 if self.layout == "bshd" else 2
        rows = o.shape[seq_dim]
        acc_o = self.o.narrow(seq_dim, start, rows)
        acc_lse = self.lse.narrow(2, start, rows)
        lse = lse.to(torch.float32)
        top = torch.maximum(acc_lse, lse)
        shift = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
        w_old, w_new = torch.exp(acc_lse - shift), torch.exp(lse - shift)  # the larger is exactly 1
        total = w_old + w_new
        safe_total = torch.where(total == 0, torch.ones_like(total), total)
        acc_o.mul_(lse_to_output_shape(w_old / safe_total, self.layout)).add_(
            o.to(torch.float32) * lse_to_output_shape(w_new / safe_total, self.layout))
        acc_lse.copy_(shift + torch.log(total))

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.o.to(dtype).contiguous(), self.lse.contiguous()
