"""Head dims: which ones sage takes, and the zero padding that runs the others on the kernels.

The kernels are compiled for :data:`KERNEL_HEAD_DIMS` (64, 128). The rule, decided here and used
by the dispatcher (``sage_torch._dispatch``, the one place that chooses) and by the SDPA drop-in:

* ``d`` in (64, 128): the kernel of that head dim.
* ``d`` another multiple of 8 below 128 (8 ... 56, 72 ... 120: 32, 48, 80, 96, 112 in real models):
  the kernel of the next size (:func:`kernel_head_dim`), on copies of q, k, v zero-padded along the
  head dim (:class:`PaddedCall`), with the softmax scale of the *original* d (``1/sqrt(d)`` unless
  given) and o sliced back to d. Exact: a zero channel adds 0 to every q·k (the LSE too), the
  quantization groups of every recipe run along tokens over the whole head dim, so their amax,
  means and codes are those of the unpadded tensors, and output channel c depends on V's channel
  c only. The emulation of the recipe at d is therefore the kernel path's oracle (the only
  differences are fp32 summation orders, e.g. of the LSE's q·mean(K) term; pinned in
  ``tests/test_torch_head_dim.py``).
* ``d`` a multiple of 8 in 136 ... 256 (:data:`MAX_HEAD_DIM`): no kernel. ``recipe="auto"`` runs
  PyTorch's SDPA with a once-per-reason warning, strict mode raises; an explicit recipe runs its
  emulation (warned, strict raises) as for any recipe without a kernel here.
* Any other d (not a multiple of 8, or above 256): ``recipe="auto"`` falls back to PyTorch's SDPA
  (warned; strict raises), an explicit recipe is a ValueError. Why multiples of 8 only: the
  faster form of the padding (zero-filling inside the quantizer, below) reads 16-byte vectors of
  8 channels, and keeping one rule for both forms means moving the padding there later changes
  no user-visible support. Real models' head dims are multiples of 8.

Cost of the padding by copies (:class:`PaddedCall`, every backend without ``pads_head_dim``): per call, q, k and v are copied
into fresh (…, d_kernel) buffers (read 2·d bytes, write 2·d_kernel bytes per row, two launches
each: zero the tail, copy the head), the kernel runs at d_kernel (d_kernel/d times the MMA work:
2x at d=32, 1.6x at d=80, 1.33x at d=96) and o is copied once more from the padded output into
q's memory order (read and write 2·d bytes per row). The copies are O(tokens), the attention
O(tokens^2): at long sequences the padded kernel's extra work dominates, at short ones the extra
launches do. ``python -m sage_torch.bench --d 32 80 96`` measures both (``pad_ms``, kernel only
at d_kernel) next to SDPA.

Zero-filling inside the kernel (sm90; no copies): a backend that registers
``pads_head_dim=True`` (``sage_torch.backends.BackendSpec``) is handed the call's own q, k, v of
head dim d by the dispatcher (``fn``, ``fast`` and ``supports`` alike; no :class:`PaddedCall`, the
fast path included) and returns o of head dim d. The sm90 backend does so when sage_core announces
``SM90_HEAD_DIM_ZERO_FILL`` (``sage_torch.backends.sm90.ZERO_FILL``): the fused quantizer
(``kernels/include/sage/sm90/sm90_quant_qkv_fused.cuh``) reads q, k, v through their strides with
one 16-byte ``ld.global.nc`` per 8 channels (lane ``c8`` of a token) and, as it already did for
tokens past the end, substitutes zeros for the lanes with ``c8 * 8 >= d_in``
(``QuantQkvSm90Args::head_dim_in``) in the stats chunk's K and V loads, ``qk_tile``'s Q/K loads
and ``v_tile``'s V loads. Its int8/E4M3 outputs and scales at the instantiation's D are therefore
exactly those of the zero-padded copy (a zero channel: k_mean 0, v_mean 0, v_scale 1, codes 0),
with 2·d instead of 2·D bytes read per row and nothing copied. The attention kernel's mainloop runs
at D unchanged; its epilogue stores only the first d_out = d columns of O (a column predicate next
to the row predicate for ``s_q``, ``AttnFwdQkS8PvE4m3Args::head_dim_out``), so o needs no slice
copy either. ``quant_attn_fwd_sm90_qk_s8_pv_e4m3`` (the one-call binding) takes inputs of head
dim d with the D-sized workspace; the LSE correction ``q·k_mean·scale`` uses the unpadded q and
the first d channels of k_mean. The softmax scale is still the call's own (``1/sqrt(d)`` unless
given). What remains of the padding cost there is the kernel's extra MMA work at D.

The sm80 family (and an sm90 backend over an older sage_core) still copies: it quantizes through
``sage_quant.ops`` / the generic quant kernels (``kernels/include/sage/quant/``), which would need
the same ``d_in`` predicate. Varlen entries (``attention_varlen``) also still get padded copies.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._layout import as_output, empty_output
from ._recipes import SUPPORTED_HEAD_DIMS

__all__ = ["KERNEL_HEAD_DIMS", "HEAD_DIM_MULTIPLE", "MAX_HEAD_DIM", "HEAD_DIM_RULE", "kernel_head_dim",
           "unsupported_head_dim_reason", "no_kernel_head_dim_reason", "PaddedCall"]

#: Head dims the kernels are compiled for (= ``sage_torch.SUPPORTED_HEAD_DIMS``).
KERNEL_HEAD_DIMS: tuple[int, ...] = SUPPORTED_HEAD_DIMS
#: Every head dim sage takes is a multiple of this (16-byte vectors of fp16/bf16).
HEAD_DIM_MULTIPLE = 8
#: The largest head dim sage takes (kernel, padded kernel or emulation).
MAX_HEAD_DIM = 256
#: One line for messages and docs.
HEAD_DIM_RULE = (f"kernels for head dims {', '.join(map(str, KERNEL_HEAD_DIMS))}; other multiples of "
                 f"{HEAD_DIM_MULTIPLE} below {max(KERNEL_HEAD_DIMS)} run them zero-padded; multiples of "
                 f"{HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM} have the recipes' emulation only")


def kernel_head_dim(d: int) -> Optional[int]:
    """The head dim of the kernel that runs a call of head dim ``d``: ``d`` itself for 64/128, the
    smallest of :data:`KERNEL_HEAD_DIMS` above it for other multiples of 8 (zero-padded), None
    when no kernel takes ``d`` (not a multiple of 8, or above 128)."""
    if d in KERNEL_HEAD_DIMS:
        return d
    if d < 1 or d % HEAD_DIM_MULTIPLE:
        return None
    larger = [k for k in KERNEL_HEAD_DIMS if k > d]
    return min(larger) if larger else None


def unsupported_head_dim_reason(d: int) -> Optional[str]:
    """None when recipes take head dim ``d`` (a multiple of 8 up to 256: kernel, padded kernel or
    emulation), else why not (for the ValueError of an explicit recipe)."""
    if 1 <= d <= MAX_HEAD_DIM and d % HEAD_DIM_MULTIPLE == 0:
        return None
    return (f"head_dim={d} is not supported; supported: multiples of {HEAD_DIM_MULTIPLE} up to "
            f"{MAX_HEAD_DIM} ({HEAD_DIM_RULE})")


def no_kernel_head_dim_reason(d: int) -> str:
    """Why no sage kernel runs head dim ``d`` (``kernel_head_dim(d) is None``), for fallback warnings."""
    return (f"head_dim={d} is not supported by sage kernels (supported: "
            f"{', '.join(map(str, KERNEL_HEAD_DIMS))}, and multiples of {HEAD_DIM_MULTIPLE} below "
            f"{max(KERNEL_HEAD_DIMS)} zero-padded to them)")


def _empty_padded(x: torch.Tensor, layout: str, head_dim: int) -> torch.Tensor:
    """Uninitialized ``x.shape[:-1] + (head_dim,)`` in x's memory order of dims 1/2 (4-D: the rule of
    ``sage_torch._layout``, so the kernel's o, allocated like q's, keeps the order the caller's q has;
    3-D packed varlen tensors: contiguous)."""
    if x.dim() != 4:
        return x.new_empty((*x.shape[:-1], head_dim))

    def alloc(shape, *, dtype, device):  # empty_output picks the order; only the last extent changes
        return torch.empty((*shape[:-1], head_dim), dtype=dtype, device=device)

    return empty_output(x, layout, alloc=alloc)


class PaddedCall:
    """One call's q, k, v zero-padded along the head dim to a kernel's ``head_dim``, and the way back.

    ``q``, ``k``, ``v``: the call's tensors, 4-D in ``layout`` (``"bhsd"`` / ``"bshd"``) or 3-D packed
    ``(total, h, d)`` (varlen), head dim ``d < head_dim``. :meth:`buffers` allocates the padded
    tensors without writing them (for a backend's ``supports``, which reads shapes and strides only);
    :meth:`inputs` fills them (zero channels ``d:``, a copy of the input in ``:d``) once and returns
    them; :meth:`output` turns the backend's padded o into the call's o. No host synchronization:
    capturable in a CUDA graph.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, head_dim: int) -> None:
        d = q.shape[-1]
        if not d < head_dim:
            raise ValueError(f"PaddedCall pads a head dim up: got d={d}, head_dim={head_dim}")
        self.q, self.k, self.v = q, k, v
        self.layout = layout
        self.head_dim = head_dim
        self.d = d
        self._buffers: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._filled = False

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded q, k, v (allocated once, contents not yet written)."""
        if self._buffers is None:
            self._buffers = tuple(_empty_padded(x, self.layout, self.head_dim) for x in (self.q, self.k, self.v))
        return self._buffers

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded q, k, v with their contents: ``x_pad[..., :d] = x``, ``x_pad[..., d:] = 0``."""
        bufs = self.buffers()
        if not self._filled:
            for src, dst in zip((self.q, self.k, self.v), bufs):
                dst[..., self.d:].zero_()  # zero q/k channels add 0 to q·k; zero v channels are sliced off
                dst[..., :self.d].copy_(src)
            self._filled = True
        return bufs

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """The call's o from the backend's padded o (q's padded shape): the first d channels, copied
        into the memory order every path gives o (``sage_torch._layout``; 3-D: contiguous)."""
        head = o[..., :self.d]
        if head.dim() != 4:
            return head.contiguous()
        return as_output(head, self.q, self.layout)
