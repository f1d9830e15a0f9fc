"""Backend registry: kernels announce themselves here; ``sage_torch._dispatch`` picks among them.

A backend is one callable that runs one recipe on some GPU archs for some head dims and dtypes.
Kernel modules (``sage_torch.backends.sm90``, ``sage_torch.backends.sm80``, or third-party
modules named in the ``sage_torch.backends`` entry-point group) call :func:`register_backend` at
import time. They are imported lazily, on the first dispatch or :func:`sage_torch.info` call;
a module that is missing or fails to import is skipped and the reason is kept for ``info()``.

The contract (shapes, layouts, streams, CUDA graphs) is in ``backends/README.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import threading
from typing import Any, Callable, Iterable, Protocol

import torch

from .._recipes import SUPPORTED_DTYPES, dtype_name, known_recipes

__all__ = [
    "BackendFn",
    "BackendSpec",
    "BUILTIN_BACKEND_MODULES",
    "ENTRY_POINT_GROUP",
    "register_backend",
    "unregister_backend",
    "registered_backends",
    "load_backend_modules",
    "backend_module_status",
    "registry_generation",
]

#: Modules shipped in this package that register kernels (owned by the kernel authors).
BUILTIN_BACKEND_MODULES: tuple[str, ...] = ("sage_torch.backends.sm90", "sage_torch.backends.sm80",
                                            "sage_torch.backends.sm120")
#: Entry-point group through which other distributions can add backend modules.
ENTRY_POINT_GROUP = "sage_torch.backends"

_ARCH_PATTERN = re.compile(r"^sm\d{2,3}$")


class BackendFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str,
                 is_causal: bool, scale: float, return_lse: bool,
                 **options: Any) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One registered backend. ``archs`` are arch families such as ``"sm90"`` (see _dispatch)."""

    name: str
    recipe: str
    archs: frozenset[str]
    head_dims: frozenset[int]
    dtypes: frozenset[torch.dtype]
    fn: BackendFn
    available: Callable[[], bool]
    #: Optional per-call check: ``supports(q, k, v, *, layout, is_causal, scale, return_lse,
    #: **options) -> None`` when the backend can run the call, else a short reason string.
    supports: Callable[..., str | None] | None = None
    #: Module that registered it (for info()).
    module: str | None = None
    #: The archs it was written for (a subset of ``archs``); on these it comes before backends
    #: of the same recipe that merely run there (e.g. sm80 mma.sync kernels built for sm_90a).
    native_archs: frozenset[str] = frozenset()
    #: Optional host fast path for the plain call (recipe defaults, no LSE):
    #: ``fast(q, k, v, layout, is_causal, scale) -> o``, or None to take the validated path
    #: (e.g. a layout it cannot read without a copy). Called only after the dispatcher chose this
    #: backend for the call's signature; it must check what varies per call (shapes, strides).
    fast: Callable[..., torch.Tensor | None] | None = None
    #: Optional varlen entry (packed sequences, ``sage_torch.attention_varlen``):
    #: ``varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal, scale,
    #: return_lse, **options) -> (o, lse | None)`` on ``(total, h, d)`` tensors, or None to decline
    #: (the pack then runs sequence by sequence through ``fn``). Contract: ``backends/README.md``.
    varlen: Callable[..., tuple[torch.Tensor, torch.Tensor | None] | None] | None = None
    #: The backend zero-fills head dims itself: ``fn``, ``fast`` and ``supports`` accept the call's
    #: own head dim d below a registered kernel head dim (``d`` a multiple of 8 that
    #: ``sage_torch._head_dim.kernel_head_dim`` maps to one of ``head_dims``), read the unpadded
    #: q, k, v, run the kernel head dim with zero channels filled in inside the kernel, and return
    #: o of head dim d. The dispatcher then builds no ``PaddedCall`` for them (no copies). False:
    #: such a call gets zero-padded copies and its o is sliced back. (``varlen`` is not covered: a
    #: packed call still gets padded copies.)
    pads_head_dim: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "recipe": self.recipe,
            "archs": sorted(self.archs),
            "head_dims": sorted(self.head_dims),
            "dtypes": sorted(dtype_name(d) for d in self.dtypes),
            "module": self.module,
            "native_archs": sorted(self.native_archs),
            "varlen": self.varlen is not None,
            "pads_head_dim": self.pads_head_dim,
        }


_lock = threading.RLock()
_registry: dict[str, BackendSpec] = {}
_generation = 0  # bumped on every change; the dispatcher rebuilds its table when it moves
_module_status: dict[str, str] = {}  # module name -> "loaded" | "not present" | "failed: ..."
_modules_loaded = False


def registry_generation() -> int:
    return _generation


def register_backend(name: str, recipe: str, archs: Iterable[str], head_dims: Iterable[int],
                     fn: BackendFn, available: Callable[[], bool], *,
                     dtypes: Iterable[torch.dtype] = SUPPORTED_DTYPES,
                     supports: Callable[..., str | None] | None = None,
                     native_archs: Iterable[str] | None = None,
                     fast: Callable[..., torch.Tensor | None] | None = None,
                     varlen: Callable[..., Any] | None = None,
                     pads_head_dim: bool = False,
                     replace: bool = False) -> BackendSpec:
    """Register a kernel backend.

    Args:
        name: unique name, e.g. ``"sm90_qk_s8_pv_e4m3"``.
        recipe: the recipe it implements exactly (docs/design/NUMERICS.md §Recipes name), e.g. ``"qk_s8_pv_e4m3"``.
        archs: arch families it runs on, e.g. ``("sm90",)``; ``"sm{major}{minor}"`` of the device.
        head_dims: head dims it supports, e.g. ``(64, 128)``.
        fn: ``fn(q, k, v, *, layout, is_causal, scale, return_lse, **options) -> (o, lse | None)``.
        available: ``() -> bool``, cheap, no CUDA work; e.g. "sage_core has this kernel compiled in".
            Evaluated once per registry change; an exception counts as unavailable (reason kept).
        dtypes: input dtypes it accepts (default fp16 and bf16).
        supports: optional per-call filter returning None (ok) or a reason string.
        native_archs: the archs among ``archs`` it was written for (default: all of them). For one
            (arch, recipe, dtype, head dim), native backends come first, then registration order.
        fast: optional host fast path, see :attr:`BackendSpec.fast`.
        varlen: optional packed-sequence entry, see :attr:`BackendSpec.varlen`.
        pads_head_dim: the backend zero-fills smaller head dims inside its kernel (no padded
            copies), see :attr:`BackendSpec.pads_head_dim`.
        replace: allow replacing a backend of the same name.

    Returns the stored :class:`BackendSpec`.
    """
    global _generation
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_backend: name must be a non-empty str, got {name!r}")
    recipes = known_recipes()
    if recipe not in recipes:
        raise ValueError(f"register_backend({name!r}): unknown recipe {recipe!r}; known: {', '.join(recipes)}")
    arch_set = frozenset(archs if not isinstance(archs, str) else (archs,))
    bad_archs = sorted(a for a in arch_set if not isinstance(a, str) or not _ARCH_PATTERN.match(a))
    if not arch_set or bad_archs:
        raise ValueError(f"register_backend({name!r}): archs must be arch families like 'sm90', 'sm80', "
                         f"got {sorted(map(str, arch_set))}")
    hd_set = frozenset(head_dims)
    if not hd_set or any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in hd_set):
        raise ValueError(f"register_backend({name!r}): head_dims must be positive ints, got {sorted(map(repr, hd_set))}")
    dtype_set = frozenset(dtypes)
    if not dtype_set or any(d not in SUPPORTED_DTYPES for d in dtype_set):
        raise ValueError(f"register_backend({name!r}): dtypes must be among "
                         f"{[dtype_name(d) for d in SUPPORTED_DTYPES]}, got {sorted(map(str, dtype_set))}")
    if not callable(fn) or not callable(available):
        raise TypeError(f"register_backend({name!r}): fn and available must be callable")
    if supports is not None and not callable(supports):
        raise TypeError(f"register_backend({name!r}): supports must be callable or None")
    if fast is not None and not callable(fast):
        raise TypeError(f"register_backend({name!r}): fast must be callable or None")
    if varlen is not None and not callable(varlen):
        raise TypeError(f"register_backend({name!r}): varlen must be callable or None")
    if not isinstance(pads_head_dim, bool):
        raise TypeError(f"register_backend({name!r}): pads_head_dim must be True or False, got {pads_head_dim!r}")
    native_set = arch_set if native_archs is None else frozenset(
        native_archs if not isinstance(native_archs, str) else (native_archs,))
    if not native_set <= arch_set:
        raise ValueError(f"register_backend({name!r}): native_archs {sorted(map(str, native_set))} must be "
                         f"among archs {sorted(arch_set)}")
    module = getattr(fn, "__module__", None)
    spec = BackendSpec(name, recipe, arch_set, hd_set, dtype_set, fn, available, supports, module, native_set,
                       fast, varlen, pads_head_dim)
    with _lock:
        if name in _registry and not replace:
            raise ValueError(f"register_backend: a backend named {name!r} is already registered "
                             f"(from {_registry[name].module}); pass replace=True to replace it")
        _registry[name] = spec
        _generation += 1
    return spec


def unregister_backend(name: str) -> BackendSpec | None:
    """Remove a backend by name; returns it, or None if there was none."""
    global _generation
    with _lock:
        spec = _registry.pop(name, None)
        if spec is not None:
            _generation += 1
        return spec


def registered_backends() -> tuple[BackendSpec, ...]:
    """All registered backends, in registration order (earlier wins on a tie)."""
    with _lock:
        return tuple(_registry.values())


def _entry_point_modules() -> list[str]:
    try:
        from importlib.metadata import entry_points
        return [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    except Exception:  # noqa: BLE001 - metadata problems must not break attention()
        return []


def load_backend_modules(force: bool = False) -> dict[str, str]:
    """Import the built-in and entry-point backend modules once; returns module -> status.

    A module that does not exist is "not present"; one that raises while importing (e.g.
    ImportError because sage_core lacks its kernels) is "failed: <why>" and is skipped.
    """
    global _modules_loaded
    with _lock:
        if _modules_loaded and not force:
            return dict(_module_status)
        _modules_loaded = True  # set first: a backend module importing sage_torch must not recurse
        for module_name in BUILTIN_BACKEND_MODULES + tuple(_entry_point_modules()):
            try:
                importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name == module_name:
                    _module_status[module_name] = "not present"
                else:
                    _module_status[module_name] = f"failed: {type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - any failure of one backend is reported, not fatal
                _module_status[module_name] = f"failed: {type(exc).__name__}: {exc}"
            else:
                _module_status[module_name] = "loaded"
        return dict(_module_status)


def backend_module_status() -> dict[str, str]:
    """module -> status of the last :func:`load_backend_modules` (empty before the first)."""
    with _lock:
        return dict(_module_status)
