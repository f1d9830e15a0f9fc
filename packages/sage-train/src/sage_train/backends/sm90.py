"""Hopper (sm_90a) kernels of train_s8: where the SageBwd forward/backward kernels plug in.

Status: **no kernel yet** (issue 10). :func:`available` is False, so every call runs the exact
emulation; everything around the kernels (custom ops, fake implementations, autograd, dispatch,
validation, the benchmark) is in place and tested on CPU with a stand-in kernel
(``tests/test_train_ops.py``). To plug the kernels in, fill in :func:`forward` and
:func:`backward` below (launch the sage_core functions on the current stream, as
``sage_torch.backends.sm90`` does for inference), list the sage_core kernel names in
:data:`KERNEL_NAMES` and set :data:`GLUE_WRITTEN`; nothing else in sage_train changes.

Contract (``sage_train._dispatch.TrainKernel``), all tensors logical ``(b, h, s, d)`` in
``layout`` ("bhsd" or "bshd"), any strides (copy what the kernel cannot read):

* ``forward(q, k, v, *, layout, is_causal, scale, smooth_k) -> (o, lse)``: ``o`` contiguous in
  ``layout``, q's dtype; ``lse`` float32 ``(b, h_q, s_q)``, natural log of the *smoothed*
  scores (the emulation's ``ctx.lse_smoothed``; ``-inf`` for a row that sees no key).
* ``backward(do, q, k, v, o, lse, *, layout, is_causal, scale, smooth_k) -> (dq, dk, dv)``:
  contiguous, each with its input's shape and dtype; dK/dV summed over a GQA group; ``do`` may
  have any strides (``o.sum().backward()`` gives a stride-0 expand). Q, K, V are re-quantized
  from the inputs (deterministic: the same INT8 values as the forward's), as the emulation's
  ``train_s8_context`` does; non-finite values follow the emulation's rule
  (``sage_quant.emulation.train_s8`` module docstring).
* Both must equal ``sage_quant.emulation.train_s8`` to rel-L1 <= 2e-3 (issue 10); the oracle is
  ``sage_train.attention(..., emulate=True)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._dispatch import TrainKernel, register_kernel

__all__ = ["BACKEND_NAME", "HEAD_DIMS", "DTYPES", "KERNEL_NAMES", "GLUE_WRITTEN", "available", "supports",
           "forward", "backward"]

BACKEND_NAME = "sm90_train_s8"
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
#: sage_core kernel instantiations this backend needs (``sage_core.has_kernel``); empty until they exist.
KERNEL_NAMES: Tuple[str, ...] = ()
#: Whether :func:`forward` / :func:`backward` launch real kernels (False: they raise).
GLUE_WRITTEN = False


def available() -> bool:
    """True when the Python glue is written and every kernel in :data:`KERNEL_NAMES` is in sage_core."""
    if not GLUE_WRITTEN or not KERNEL_NAMES or not torch.cuda.is_available():
        return False
    import sage_core

    return all(bool(sage_core.has_kernel(name)) for name in KERNEL_NAMES)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str, is_causal: bool, scale: float,
             dp_precision: str, smooth_k: bool) -> Optional[str]:
    """None when the kernels can run this call, else why not (the emulation runs it)."""
    if dp_precision != "fp16":
        return f"dp_precision={dp_precision!r} is an emulation-only ablation (the kernel keeps dP in 16 bits)"
    return None


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str, is_causal: bool, scale: float,
            smooth_k: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Training forward on sm_90a: ``(o, lse_smoothed)`` (module docstring)."""
    raise NotImplementedError("sage_train.backends.sm90.forward: the sm_90a train_s8 forward kernel is not "
                              "written yet (issue 10); available() is False so dispatch never calls this")


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, *, layout: str, is_causal: bool, scale: float,
             smooth_k: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training backward on sm_90a: ``(dq, dk, dv)`` (module docstring)."""
    raise NotImplementedError("sage_train.backends.sm90.backward: the sm_90a train_s8 backward kernel is not "
                              "written yet (issue 10); available() is False so dispatch never calls this")


register_kernel(TrainKernel(
    name=BACKEND_NAME, archs=frozenset({"sm90"}), dtypes=frozenset(DTYPES), head_dims=frozenset(HEAD_DIMS),
    forward=forward, backward=backward, available=available, supports=supports, module=__name__))
