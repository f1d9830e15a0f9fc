"""The one place that decides what runs a train_s8 call: a registered kernel, or the emulation.

Policy (the inference front end's, ``sage_torch._dispatch``, applied to the training recipe):

* A :class:`TrainKernel` registered for the device's arch family (``"sm90"``), dtype and head dim,
  whose ``available()`` is true and whose ``supports(...)`` does not decline the call, runs
  forward and backward.
* Otherwise the exact emulation (``sage_quant.emulation.train_s8``) runs, with a
  :class:`~sage_train.SageTrainFallbackWarning` once per reason; strict mode (``strict=True`` or
  ``SAGE_STRICT=1``) raises :class:`sage_torch.SageDispatchError` instead.
* ``emulate=True`` (or ``SAGE_FORCE_EMULATION=1``) runs the emulation even where a kernel exists,
  silently (it was asked for): the oracle for kernel tests.

Kernels register themselves with :func:`register_kernel` when their module is imported; the
built-in module :data:`BUILTIN_KERNEL_MODULES` (``sage_train.backends.sm90``) is imported lazily,
on the first decision. Forward and backward decide with the same inputs, so a call that ran the
kernel forward runs the kernel backward.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from sage_torch import SageDispatchError
from sage_torch._dispatch import device_arch
from sage_torch._env import ENV_FORCE_EMULATION, ENV_STRICT, env_flag
from sage_torch._recipes import dtype_name

from ._warn import warn_once

__all__ = [
    "RECIPE",
    "TrainKernel",
    "BUILTIN_KERNEL_MODULES",
    "register_kernel",
    "unregister_kernel",
    "registered_kernels",
    "kernel_module_status",
    "select",
    "decide",
    "describe",
]

RECIPE = "train_s8"
#: Modules shipped with sage_train that register kernels (imported on the first decision).
BUILTIN_KERNEL_MODULES: Tuple[str, ...] = ("sage_train.backends.sm90",)


@dataclasses.dataclass(frozen=True)
class TrainKernel:
    """A forward + backward implementation of train_s8 for some archs, dtypes and head dims.

    ``forward(q, k, v, *, layout, is_causal, scale, smooth_k) -> (o, lse)``: ``o`` contiguous in
    ``layout`` with q's dtype and shape but ``v``'s last dim; ``lse`` float32 ``(b, h_q, s_q)``,
    natural log of the *smoothed* scores (what the backward needs; ``-inf`` for a row that sees
    no key). ``backward(do, q, k, v, o, lse, *, layout, is_causal, scale, smooth_k) ->
    (dq, dk, dv)``: each contiguous with its input's shape and dtype (dk, dv with the kv heads,
    summed over each GQA group). Inputs arrive with any strides; outputs must be new tensors (no
    aliasing of an input: ``torch.library`` custom op rule). Both run on the current CUDA stream.
    ``supports(q, k, v, *, layout, is_causal, scale, dp_precision, smooth_k)`` returns None when
    the kernel can run the call, else a short reason (the emulation runs and the reason is shown).
    """

    name: str
    archs: frozenset
    dtypes: frozenset
    head_dims: frozenset
    forward: Callable[..., Tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    available: Callable[[], bool]
    supports: Optional[Callable[..., Optional[str]]] = None
    module: Optional[str] = None


_lock = threading.RLock()
_kernels: List[TrainKernel] = []
_module_status: Dict[str, str] = {}
_loaded = False


def register_kernel(spec: TrainKernel) -> TrainKernel:
    """Add ``spec`` (replacing a kernel of the same name). Returns it."""
    if not isinstance(spec, TrainKernel):
        raise TypeError(f"register_kernel expects a sage_train TrainKernel, got {type(spec).__name__}")
    with _lock:
        _kernels[:] = [k for k in _kernels if k.name != spec.name] + [spec]
    return spec


def unregister_kernel(name: str) -> None:
    """Remove the kernel called ``name``; a KeyError if there is none."""
    with _lock:
        if not any(k.name == name for k in _kernels):
            raise KeyError(f"no train_s8 kernel named {name!r}; registered: {[k.name for k in _kernels]}")
        _kernels[:] = [k for k in _kernels if k.name != name]


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        for mod in BUILTIN_KERNEL_MODULES:
            try:
                importlib.import_module(mod)
                _module_status[mod] = "imported"
            except Exception as exc:  # noqa: BLE001 - a missing sage_core build must not break training
                _module_status[mod] = f"import failed: {type(exc).__name__}: {exc}"
        _loaded = True


def registered_kernels() -> Tuple[TrainKernel, ...]:
    _load_builtin()
    with _lock:
        return tuple(_kernels)


def kernel_module_status() -> Dict[str, str]:
    """Built-in kernel module -> ``"imported"`` or why its import failed."""
    _load_builtin()
    return dict(_module_status)


def _available(spec: TrainKernel) -> Tuple[bool, str]:
    try:
        return bool(spec.available()), "available() is False"
    except Exception as exc:  # noqa: BLE001 - one broken kernel must not break dispatch
        return False, f"available() raised {type(exc).__name__}: {exc}"


def _head_dims(q: torch.Tensor, v: torch.Tensor) -> Tuple[int, int]:
    return q.shape[-1], v.shape[-1]


def select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str, is_causal: bool, scale: float,
           dp_precision: str, smooth_k: bool) -> Tuple[Optional[TrainKernel], str]:
    """``(kernel, "")`` for the kernel that runs this call, or ``(None, why none does)``."""
    arch = device_arch(q.device)
    d, dv = _head_dims(q, v)
    key = f"{arch}, {dtype_name(q.dtype)}, head_dim={d}" + (f", v head_dim={dv}" if dv != d else "")
    reasons = []
    for spec in registered_kernels():
        if arch not in spec.archs or q.dtype not in spec.dtypes or d not in spec.head_dims or dv != d:
            continue
        ok, why = _available(spec)
        if not ok:
            reasons.append(f"{spec.name}: {why}")
            continue
        if spec.supports is not None:
            why = spec.supports(q, k, v, layout=layout, is_causal=is_causal, scale=scale,
                                dp_precision=dp_precision, smooth_k=smooth_k)
            if why is not None:
                reasons.append(f"{spec.name}: {why}")
                continue
        return spec, ""
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    return None, f"no train_s8 kernel for {key}{detail}"


def decide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str, is_causal: bool, scale: float,
           dp_precision: str, smooth_k: bool, emulate: Optional[bool], strict: Optional[bool]) -> Optional[TrainKernel]:
    """The kernel to run, or None for the emulation (warned once per reason; raises when strict)."""
    emulate_flag = env_flag(ENV_FORCE_EMULATION) if emulate is None else bool(emulate)
    if emulate_flag:
        return None
    spec, why = select(q, k, v, layout=layout, is_causal=is_causal, scale=scale, dp_precision=dp_precision,
                       smooth_k=smooth_k)
    if spec is not None:
        return spec
    strict_flag = env_flag(ENV_STRICT) if strict is None else bool(strict)
    if strict_flag:
        raise SageDispatchError(f"sage_train strict mode: {why}; not falling back to the emulation "
                                f"(pass strict=False or unset {ENV_STRICT} to allow it)")
    warn_once(f"emulation:{why}",
              f"sage_train: running the exact PyTorch emulation of train_s8 because {why}: the "
              f"recipe's numerics, but ~100x slower than SDPA and with more memory. strict=True or "
              f"{ENV_STRICT}=1 makes this an error.")
    return None


def describe(spec: Optional[TrainKernel]) -> Dict[str, Any]:
    """What :func:`decide` returned, as a small dict (benchmarks and tests print it)."""
    if spec is None:
        return {"kind": "emulation", "kernel": None}
    return {"kind": "kernel", "kernel": spec.name, "module": spec.module}
