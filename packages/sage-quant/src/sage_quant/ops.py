"""Quantization entry points that use the CUDA kernels when they can, else the reference.

Each ``quantize_*`` function has exactly the signature of its ``sage_quant.reference``
counterpart. For a CUDA tensor, if ``sage_quant.kernels`` (the thin wrapper over ``sage_core``)
imports and reports the kernel available, it runs; otherwise the bit-exact PyTorch reference
runs (on whatever device the tensor lives on), and so does any input the kernels do not take
(fp32, a last dim that is not a multiple of 8). Results are identical by contract
(``docs/design/quant-formats.md``), so the choice never changes numbers.

Contract expected from ``sage_quant.kernels`` (imported lazily, may be absent):
  * ``available(op: str | None = None) -> bool``: whether the compiled kernel for ``op``
    (one of ``KERNEL_OPS``; ``None``: any) can run here;
  * functions named like the reference ones (``quant_int``, ``quant_v_e4m3_t``, ``quant_v_s8``,
    ``quant_fp4``, ``token_mean``, ``block_mean``), same signatures and return values.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import reference as _ref

__all__ = [
    "KERNEL_OPS",
    "kernels_available",
    "quantize_int",
    "quantize_v_e4m3_t",
    "quantize_v_s8",
    "quantize_fp4",
    "quantize_token_mean",
    "quantize_block_mean",
]

KERNEL_OPS = ("quant_int", "quant_v_e4m3_t", "quant_v_s8", "quant_fp4", "token_mean", "block_mean")

_kernels_module = None
_kernels_import_error: Optional[BaseException] = None


def _kernels():
    """Import ``sage_quant.kernels`` once; None if it is missing or fails to import."""
    global _kernels_module, _kernels_import_error
    if _kernels_module is None and _kernels_import_error is None:
        try:
            _kernels_module = importlib.import_module("sage_quant.kernels")
        except Exception as exc:  # missing module or missing sage_core: use the reference
            _kernels_import_error = exc
    return _kernels_module


def kernels_available(op: Optional[str] = None) -> bool:
    """True if the compiled quantization kernels (for ``op``, or any) can run on this machine."""
    if op is not None and op not in KERNEL_OPS:
        raise ValueError(f"op must be None or one of {KERNEL_OPS}, got {op!r}")
    mod = _kernels()
    if mod is None:
        return False
    fn = getattr(mod, "available", None) or getattr(mod, "is_available", None)
    if fn is None:
        return False
    try:
        return bool(fn(op) if op is not None else fn())
    except Exception:
        return False


_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
kKernelChunk = 8  # the kernels read 16-byte chunks of the last dim


def _kernel_can_take(x) -> bool:
    """Inputs the kernels accept (others go to the reference instead of raising)."""
    return (isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in _KERNEL_DTYPES
            and x.dim() >= 1 and x.shape[-1] % kKernelChunk == 0 and x.numel() > 0)


def _pick(op: str, x):
    if _kernel_can_take(x) and kernels_available(op):
        fn = getattr(_kernels(), op, None)
        if fn is not None:
            return fn
    return getattr(_ref, op)


def quantize_int(x, *, bits=8, granularity="per_thread", role="q", block=None, warp_rows=16,
                 mean=None, mean_block=None, layout="bhsd"):
    """See ``sage_quant.reference.quant_int``."""
    return _pick("quant_int", x)(x, bits=bits, granularity=granularity, role=role, block=block,
                                 warp_rows=warp_rows, mean=mean, mean_block=mean_block, layout=layout)


def quantize_v_e4m3_t(v, layout="bhsd", mean=None, v_max=_ref.kFp8E4m3Max):
    """See ``sage_quant.reference.quant_v_e4m3_t`` (``mean``: optional V smoothing mean;
    ``v_max``: the code a channel's amax maps to)."""
    return _pick("quant_v_e4m3_t", v)(v, layout=layout, mean=mean, v_max=v_max)


def quantize_v_s8(v, layout="bhsd"):
    """See ``sage_quant.reference.quant_v_s8``."""
    return _pick("quant_v_s8", v)(v, layout=layout)


def quantize_fp4(x, fmt="nvfp4", swizzled=False, mean=None, mean_block=None, n_pad=None):
    """See ``sage_quant.reference.quant_fp4``."""
    return _pick("quant_fp4", x)(x, fmt=fmt, swizzled=swizzled, mean=mean, mean_block=mean_block, n_pad=n_pad)


def quantize_token_mean(x, layout="bhsd"):
    """See ``sage_quant.reference.token_mean``."""
    return _pick("token_mean", x)(x, layout=layout)


def quantize_block_mean(x, block, layout="bhsd"):
    """See ``sage_quant.reference.block_mean``."""
    return _pick("block_mean", x)(x, block, layout=layout)
