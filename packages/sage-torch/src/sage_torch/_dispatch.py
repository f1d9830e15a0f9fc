"""The one place that decides what runs: (arch family, recipe, dtype, head_dim) -> backend.

Policy (docs/design/ARCHITECTURE.md §Runtime dispatch; documented for users in the package README):

``recipe="auto"`` (after ``SAGE_FORCE_RECIPE`` replaced it, if set)
    The device's preference list :data:`ARCH_DEFAULT_RECIPES` is tried in order; the first recipe
    with a registered, available backend for (arch, dtype, head_dim) runs; a head dim the kernels
    are not compiled for but a multiple of 8 below 128 runs the next kernel head dim on zero-padded
    copies (``sage_torch._head_dim``: the rule, the padding and its cost), or, for a backend that
    zero-fills inside its kernel (``BackendSpec.pads_head_dim``: sm90), on the call's own tensors
    with no copy. If none fits (CPU, an
    arch without kernels, a head dim above 128 or not a multiple of 8, kernels not built)
    PyTorch's SDPA runs with sage semantics and a :class:`SageFallbackWarning` is issued once per reason;
    strict mode (``strict=True`` or ``SAGE_STRICT=1``) raises :class:`SageDispatchError` instead.
    With ``emulate=True`` / ``SAGE_FORCE_EMULATION=1`` the device's default recipe is emulated.

``recipe="<name>"`` (a docs/design/NUMERICS.md §Recipes recipe)
    Its kernel runs if the device has one. Otherwise the recipe's *emulation* (sage_quant) runs
    on any device, with a once-per-reason warning: it has exactly the recipe's numerics, only
    slowly. Strict mode raises instead. ``emulate=True`` / ``SAGE_FORCE_EMULATION=1`` runs the
    emulation even where a kernel exists (no warning: it was asked for). Head dims as for "auto"
    (padded to a kernel's); one that no recipe takes (not a multiple of 8, or above 256) is an
    error for an explicit recipe. An unknown recipe name is an error.

``recipe="torch"`` / ``SAGE_FORCE_RECIPE=torch`` runs PyTorch's SDPA (sage semantics), silently:
it was asked for (A/B comparisons).
"""

from __future__ import annotations

import ast
import dataclasses
import threading
import warnings
from typing import Any

import torch

from . import _env
from ._head_dim import PaddedCall, kernel_head_dim, no_kernel_head_dim_reason, unsupported_head_dim_reason
from ._recipes import FRONT_END_OPTIONS, RECIPE_AUTO, RECIPE_TORCH, dtype_name, known_recipes
from ._layout import as_output
from ._torch_fallback import TORCH_SDPA, torch_attention
from .backends import BackendSpec, load_backend_modules, registered_backends, registry_generation

#: Preference list per arch family, first = the table's default recipe. The later entries are
#: what "auto" uses when the first recipe has no kernel for this dtype/head dim on this device.
ARCH_DEFAULT_RECIPES: dict[str, tuple[str, ...]] = {
    "sm80": ("qk_s8_pv_f16",),
    "sm86": ("qk_s8_pv_f16",),
    "sm87": ("qk_s8_pv_f16",),
    "sm89": ("qk_s8_pv_e4m3", "qk_s8_pv_f16"),
    "sm90": ("qk_s8_pv_e4m3", "qk_s8_pv_f16"),
    # Blackwell runs the sm80 mma.sync family (built for 100a/103a/120a/121a) until its own kernels
    # exist. sm100/103 have no block-scaled mma.sync and emulate FP8 mma.sync through HMMA (SASS,
    # docs/perf/sm80_family_blackwell.md): FP16 P.V first; put a tcgen05 kernel's recipe first once
    # it exists. sm120/121: the NVFP4 kernel when registered, else FP8 P.V (native QMMA there).
    "sm100": ("qk_s8_pv_f16", "qk_s8_pv_e4m3"),
    "sm103": ("qk_s8_pv_f16", "qk_s8_pv_e4m3"),
    "sm120": ("qk_nvfp4_pv_nvfp4", "qk_s8_pv_e4m3", "qk_s8_pv_f16"),
    "sm121": ("qk_nvfp4_pv_nvfp4", "qk_s8_pv_e4m3", "qk_s8_pv_f16"),
}

KIND_KERNEL = "kernel"
KIND_EMULATION = "emulation"
KIND_TORCH = "torch"


class SageFallbackWarning(UserWarning):
    """sage_torch ran something other than a sage kernel (PyTorch SDPA or a slow emulation)."""


class SageDispatchError(RuntimeError):
    """Strict mode: no sage kernel fits and falling back was forbidden."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a call runs. ``reason`` says why when it is not the requested kernel."""

    kind: str  # KIND_KERNEL | KIND_EMULATION | KIND_TORCH
    recipe: str | None
    backend: BackendSpec | None = None
    reason: str = ""
    warn: bool = False  # a fallback the user did not ask for: warn once (or raise when strict)
    #: KIND_KERNEL on a head dim above the call's: the backend's head dim, the call is zero-padded
    #: to it (sage_torch._head_dim); None: the backend runs the call's own head dim
    pad_to: int | None = None

    def describe(self) -> dict[str, Any]:
        out = {"kind": self.kind, "recipe": self.recipe,
               "backend": self.backend.name if self.backend else None, "reason": self.reason}
        if self.pad_to is not None:
            out["pad_to"] = self.pad_to
        return out


# ----------------------------------------------------------------------------- arch


def device_arch(device: torch.device) -> str:
    """Arch family of a device: ``"sm{major}{minor}"`` for CUDA (``"sm90"``), else the device type.

    torch caches the capability, so this does no CUDA work per call (safe in graph capture).
    """
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


# ----------------------------------------------------------------------------- warn once

_warn_lock = threading.Lock()
_warned: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 4) -> None:
    """warnings.warn(message) the first time ``key`` is seen in this process."""
    if key in _warned:  # the per-call case: no lock (the set only grows; the locked check decides)
        return
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, SageFallbackWarning, stacklevel=stacklevel)


def reset_warnings() -> None:
    """Forget which fallbacks were already reported (tests, or to see them again)."""
    with _warn_lock:
        _warned.clear()


# ----------------------------------------------------------------------------- the table

_table_lock = threading.Lock()
_table_generation = -1
_table: dict[tuple[str, str, torch.dtype, int], tuple[BackendSpec, ...]] = {}
_unavailable: dict[str, str] = {}  # backend name -> why it is not in the table


def _build_table() -> None:
    global _table_generation, _table, _unavailable
    load_backend_modules()
    with _table_lock:
        generation = registry_generation()
        if generation == _table_generation:
            return
        table: dict[tuple[str, str, torch.dtype, int], list[BackendSpec]] = {}
        unavailable: dict[str, str] = {}
        for spec in registered_backends():
            try:
                ok = bool(spec.available())
                why = "available() returned False"
            except Exception as exc:  # noqa: BLE001 - one broken backend must not break dispatch
                ok, why = False, f"available() raised {type(exc).__name__}: {exc}"
            if not ok:
                unavailable[spec.name] = why
                continue
            for arch in spec.archs:
                for dtype in spec.dtypes:
                    for hd in spec.head_dims:
                        table.setdefault((arch, spec.recipe, dtype, hd), []).append(spec)
        # A backend written for the device's arch (native_archs) comes before one that merely
        # runs there (the sm80 mma.sync kernels also run on sm90, slower); otherwise
        # registration order (sorted() is stable).
        _table = {key: tuple(sorted(specs, key=lambda sp, arch=key[0]: arch not in sp.native_archs))
                  for key, specs in table.items()}
        _unavailable = unavailable
        _table_generation = generation


def refresh() -> None:
    """Re-evaluate every backend's ``available()`` (e.g. after building sage_core) and forget the
    per-signature decisions of the fast path (e.g. after changing a ``SAGE_`` environment switch)."""
    global _table_generation
    with _table_lock:
        _table_generation = -1
        _fast_cache.clear()
        _route_cache.clear()
    _build_table()


def dispatch_table() -> dict[tuple[str, str, torch.dtype, int], tuple[BackendSpec, ...]]:
    _build_table()
    return dict(_table)


def unavailable_backends() -> dict[str, str]:
    _build_table()
    return dict(_unavailable)


def lookup(arch: str, recipe: str, dtype: torch.dtype, head_dim: int) -> tuple[BackendSpec, ...]:
    """Available backends for this key, registration order."""
    _build_table()
    return _table.get((arch, recipe, dtype, head_dim), ())


# ----------------------------------------------------------------------------- decisions


def _resolve_flags(emulate: bool | None, strict: bool | None) -> tuple[bool, bool]:
    """(emulate, strict): the arguments where given, else the environment."""
    emulate_flag = _env.env_flag(_env.ENV_FORCE_EMULATION) if emulate is None else bool(emulate)
    strict_flag = _env.env_flag(_env.ENV_STRICT) if strict is None else bool(strict)
    return emulate_flag, strict_flag


def _kernel_head_dims(head_dim: int) -> tuple[int, ...]:
    """Head dims to look a call of ``head_dim`` up at, in order: its own (a backend registered for
    it runs it as is), then the kernel head dim it pads to (``_head_dim.kernel_head_dim``)."""
    padded = kernel_head_dim(head_dim)
    return (head_dim,) if padded in (None, head_dim) else (head_dim, padded)


def _padded_call(call: dict[str, Any], head_dim: int) -> PaddedCall:
    """The call's PaddedCall for ``head_dim``, made once and kept in ``call["padded"]`` so that
    :func:`run` fills the buffers ``supports`` saw instead of allocating them again."""
    made = call.setdefault("padded", {})
    if head_dim not in made:
        made[head_dim] = PaddedCall(call["q"], call["k"], call["v"], call["kwargs"].get("layout", "bhsd"), head_dim)
    return made[head_dim]


def _first_supported(specs: tuple[BackendSpec, ...], call: dict[str, Any] | None,
                     head_dim: int) -> tuple[BackendSpec | None, str]:
    """The first backend of ``specs`` (registered for ``head_dim``) whose ``supports`` accepts the
    call, and the vetoes of those before it. A padded call shows ``supports`` the padded tensors
    (allocated, not yet written: supports reads shapes and strides only), except to a backend that
    zero-fills itself (``pads_head_dim``): that one sees the call's own tensors, as its fn will."""
    reasons = []
    for spec in specs:
        if spec.supports is None or call is None:
            return spec, ""
        if call["q"].shape[-1] == head_dim or spec.pads_head_dim:
            q, k, v = call["q"], call["k"], call["v"]
        else:
            q, k, v = _padded_call(call, head_dim).buffers()
        why = spec.supports(q, k, v, **call["kwargs"])
        if why is None:
            return spec, ""
        reasons.append(f"{spec.name}: {why}")
    return None, "; ".join(reasons)


def _auto_torch_reason_for_call(backend: str, call: dict[str, Any]) -> str | None:
    q, k = call["q"], call["k"]
    kw = call["kwargs"]
    if kw.get("layout", "bhsd") == "bhsd":
        b, h_q, s_q, d = q.shape
        s_kv = k.shape[2]
    else:
        b, s_q, h_q, d = q.shape
        s_kv = k.shape[1]
    return auto_torch_reason(backend, b, h_q, s_q, s_kv, d, bool(kw.get("is_causal", False)))


def resolve(arch: str, dtype: torch.dtype, head_dim: int, recipe: str = RECIPE_AUTO, *,
            emulate: bool | None = None, strict: bool | None = None,
            call: dict[str, Any] | None = None) -> Decision:
    """Decide what runs for one call (pure: no tensors touched unless ``call`` is given).

    ``call`` = ``{"q", "k", "v", "kwargs"}`` lets backends with a ``supports`` filter veto.
    Raises ValueError for an unknown recipe or (explicit recipe) unsupported head dim, and
    SageDispatchError in strict mode when only a fallback is left.
    """
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a str, got {type(recipe).__name__}")
    emulate_flag, strict_flag = _resolve_flags(emulate, strict)
    requested = recipe
    source = "recipe="
    if requested == RECIPE_AUTO:
        forced = _env.env_forced_recipe()
        if forced is not None:
            requested, source = forced, f"{_env.ENV_FORCE_RECIPE}="
    recipes = known_recipes()
    if requested == RECIPE_TORCH:  # asked for: PyTorch SDPA with sage semantics, no warning
        return Decision(KIND_TORCH, None, reason=f"{source}torch")
    if requested != RECIPE_AUTO and requested not in recipes:
        raise ValueError(f"unknown {source}{requested!r}; accepted: 'auto', 'torch' or one of {', '.join(recipes)}")
    key_text = f"{arch}, {dtype_name(dtype)}, head_dim={head_dim}"
    # A head dim no recipe takes (not a multiple of 8, or above 256): auto falls back, an explicit
    # recipe raises (unless a backend was registered for exactly that head dim).
    head_dim_error = unsupported_head_dim_reason(head_dim)
    kernel_dims = _kernel_head_dims(head_dim)

    if requested == RECIPE_AUTO:
        prefs = ARCH_DEFAULT_RECIPES.get(arch, ())
        if emulate_flag:
            if not prefs:
                raise ValueError(f"emulation was requested with recipe='auto' on {arch}, which has no default "
                                 f"recipe; pass recipe= one of {', '.join(recipes)}")
            if head_dim_error:
                raise ValueError(f"emulation of {prefs[0]!r}: {head_dim_error}")
            return Decision(KIND_EMULATION, prefs[0], reason="emulation requested")
        if not prefs:
            why = (no_kernel_head_dim_reason(head_dim) if kernel_head_dim(head_dim) is None else
                   f"no sage kernel for device arch {arch!r} (sage kernels target "
                   f"{', '.join(sorted(ARCH_DEFAULT_RECIPES))})")
        else:
            vetoes = []
            for candidate in prefs:
                for hd in kernel_dims:
                    spec, veto = _first_supported(lookup(arch, candidate, dtype, hd), call, hd)
                    # strict mode asks for sage's kernel: the speed rule does not apply there
                    if (spec is not None and call is not None and not strict_flag
                            and (routed := _auto_torch_reason_for_call(spec.name, call))):
                        return Decision(KIND_TORCH, None, reason=routed, warn=True)
                    if spec is not None:
                        return Decision(KIND_KERNEL, candidate, spec, pad_to=hd if hd != head_dim else None)
                    if veto:
                        vetoes.append(veto)
            if kernel_head_dim(head_dim) is None and not vetoes:
                why = no_kernel_head_dim_reason(head_dim)
            else:
                why = (f"no registered and available kernel for {key_text}"
                       + (f" (padded to {kernel_dims[-1]})" if len(kernel_dims) > 1 else "")
                       + f", recipes {list(prefs)}" + (f" ({'; '.join(vetoes)})" if vetoes else "")
                       + "; see sage_torch.info()")
        if strict_flag:
            raise SageDispatchError(f"sage_torch strict mode: {why}; not falling back to PyTorch SDPA")
        return Decision(KIND_TORCH, None, reason=why, warn=True)

    # An explicit recipe.
    if emulate_flag:
        if head_dim_error:
            raise ValueError(f"recipe {requested!r}: {head_dim_error}")
        return Decision(KIND_EMULATION, requested, reason="emulation requested")
    vetoes = []
    for hd in kernel_dims:
        spec, veto = _first_supported(lookup(arch, requested, dtype, hd), call, hd)
        if spec is not None:
            return Decision(KIND_KERNEL, requested, spec, pad_to=hd if hd != head_dim else None)
        if veto:
            vetoes.append(veto)
    if head_dim_error:
        raise ValueError(f"recipe {requested!r}: {head_dim_error}")
    why = (f"no registered and available kernel for recipe {requested!r} on {key_text}"
           + (f" (padded to {kernel_dims[-1]})" if len(kernel_dims) > 1 else "")
           + (f" ({'; '.join(vetoes)})" if vetoes else "")
           + ("" if kernel_head_dim(head_dim) is not None else f"; {no_kernel_head_dim_reason(head_dim)}"))
    if strict_flag:
        raise SageDispatchError(f"sage_torch strict mode: {why}; not falling back to the emulation")
    return Decision(KIND_EMULATION, requested, reason=why, warn=True)


# ----------------------------------------------------------------------------- auto's routing rule

#: ``recipe="auto"`` runs PyTorch's SDPA where sage's kernel path is slower on this device:
#: decode-shaped calls (few query rows: the quantization of the whole KV cache per call costs
#: more than the attention) and problems so small that a call is launch-bound (sage launches
#: four kernels, SDPA one). Per backend auto would pick: (min query rows, min MACs per call =
#: b*h_q*s_q*s_kv*d, halved for causal). Measured on an H200 (docs/perf/sm90_host_path.md):
#: the sm90 kernel path is 1.5-2x slower than cuDNN SDPA up to 2k tokens x 32 heads (d=128) and
#: at 4k tokens it only ties (Llama-style 32 heads causal, 2^35 MACs) or loses inside a model
#: (DiT-style 24 heads, 2^35.6 MACs: 0.955x per forward at 30f64fa). Rule: below 2^36.
AUTO_TORCH_RULES: dict[str, tuple[int, int]] = {
    "sm90_qk_s8_pv_e4m3": (64, 1 << 36),
}


_AUTO_TORCH_TEXT: dict[tuple[str, str], str] = {}  # (backend, rule) -> reason; made once, not per call


def _auto_torch_text(backend: str, rule: str) -> str:
    text = _AUTO_TORCH_TEXT.get((backend, rule))
    if text is None:
        min_rows, min_macs = AUTO_TORCH_RULES[backend]
        if rule == "rows":
            text = (f"q_len < {min_rows}: decode-shaped calls are faster on PyTorch's SDPA than on {backend} "
                    f"(rule: sage_torch._dispatch.AUTO_TORCH_RULES)")
        else:
            text = (f"b*h*q_len*kv_len*head_dim (halved if causal) < {min_macs}: a call this small is faster "
                    f"on PyTorch's SDPA than on {backend} (rule: sage_torch._dispatch.AUTO_TORCH_RULES)")
        _AUTO_TORCH_TEXT[(backend, rule)] = text
    return text


def auto_torch_reason(backend: str, b: int, h_q: int, s_q: int, s_kv: int, d: int,
                      is_causal: bool) -> str | None:
    """Why ``recipe="auto"`` runs PyTorch's SDPA instead of ``backend`` for this shape, or None."""
    rule = AUTO_TORCH_RULES.get(backend)
    if rule is None:
        return None
    min_rows, min_macs = rule
    if s_q < min_rows:
        return _auto_torch_text(backend, "rows")
    macs = b * h_q * s_q * s_kv * d
    if is_causal:
        macs //= 2
    if macs < min_macs:
        return _auto_torch_text(backend, "macs")
    return None


# ----------------------------------------------------------------------------- fast path

# (device, dtypes, head dim, layout, is_causal, recipe, ...) -> (backend fast fn | None, auto?, backend name)
_fast_cache: dict[tuple, tuple] = {}
# auto_torch_route's answers: (q.shape, k.shape, dtype, device, layout, is_causal) -> reason | None
_route_cache: dict[tuple, str | None] = {}
_ROUTE_CACHE_MAX = 4096
_MISS = object()


def _fast_entry(key: tuple, q: torch.Tensor, recipe: str) -> tuple:
    entry: tuple = (None, False, "")
    arch = device_arch(q.device)
    try:
        decision = resolve(arch, q.dtype, q.shape[-1], recipe)
    except Exception:  # noqa: BLE001 - the validated path raises it with the full message
        decision = None
    # A padded head dim (decision.pad_to) takes the validated path, which pads, unless the backend
    # zero-fills inside its kernel (pads_head_dim: its fast takes the call's own tensors).
    if (decision is not None and decision.kind == KIND_KERNEL and not decision.warn
            and decision.backend is not None and decision.backend.fast is not None
            and (decision.pad_to is None or decision.backend.pads_head_dim)):
        requested = recipe if recipe != RECIPE_AUTO else (_env.env_forced_recipe() or RECIPE_AUTO)
        # auto's routing to PyTorch never applies in strict mode (SAGE_STRICT, read here once)
        auto = requested == RECIPE_AUTO and not _env.env_flag(_env.ENV_STRICT)
        entry = (decision.backend.fast, auto, decision.backend.name)
    with _table_lock:
        _fast_cache[key] = entry
    return entry


def _fast_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool, recipe: str) -> tuple:
    return (q.device, q.dtype, k.dtype, v.dtype, k.device, v.device, q.shape[3], layout, is_causal, recipe,
            q.stride(3), k.stride(3), v.stride(3))


def auto_torch_route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool) -> str | None:
    """Why ``recipe="auto"`` would run PyTorch's SDPA for this plain call (AUTO_TORCH_RULES), or None
    (it runs a sage kernel, or the call is not one the fast path decides). For front ends that
    can then make *the caller's own* SDPA call instead (the SDPA drop-in, transformers'
    attention function): a shape auto gives to PyTorch then runs exactly as without sage."""
    if torch.compiler.is_compiling():
        return None
    # The answer depends on the shapes (the rule) and on what the signature dispatches to: cached
    # per (shapes, dtype, device, layout, causal), so a routed call costs one dict lookup here.
    rkey = (q.shape, k.shape, q.dtype, q.device, layout, is_causal)
    why = _route_cache.get(rkey, _MISS)
    if why is not _MISS:
        return why
    why = None
    if q.device.type == "cuda" and q.dim() == 4 and k.dim() == 4 and v.dim() == 4:
        key = _fast_key(q, k, v, layout, is_causal, RECIPE_AUTO)
        entry = _fast_cache.get(key)
        if entry is None:
            entry = _fast_entry(key, q, RECIPE_AUTO)
        fast, auto, backend = entry
        if fast is not None and auto:
            if layout == "bhsd":
                b, h_q, s_q, d = q.shape
                s_kv = k.shape[2]
            else:
                b, s_q, h_q, d = q.shape
                s_kv = k.shape[1]
            why = auto_torch_reason(backend, b, h_q, s_q, s_kv, d, is_causal)
    with _table_lock:
        if len(_route_cache) >= _ROUTE_CACHE_MAX:  # e.g. a decode loop: one kv length per step
            _route_cache.clear()
        _route_cache[rkey] = why
    return why


def fast_call(q: Any, k: Any, v: Any, layout: Any, is_causal: Any, scale: Any, recipe: Any) -> torch.Tensor | None:
    """The host fast path of ``attention()`` for a plain call (no recipe options, no LSE).

    What depends only on the call's signature (dispatch decision, environment switches) is
    decided once per signature and cached; what varies per call (shapes, strides, the auto
    routing rule) is checked here or in the backend's ``fast``. Returns None whenever anything
    is unusual: the validated path then runs the call (and raises or warns as it always does).
    Environment switches are read when a signature is first seen; :func:`refresh` re-reads them.
    """
    if (type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor
            or q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.device.type != "cuda"
            or torch.compiler.is_compiling()):  # compiled graphs see the custom op instead
        return None
    if scale is None:
        scale = q.shape[3] ** -0.5
    elif type(scale) is not float or not 0.0 < scale < float("inf"):
        return None
    if recipe == RECIPE_AUTO and (layout == "bhsd" or layout == "bshd") and (is_causal is True or is_causal is False):
        why = auto_torch_route(q, k, v, layout, is_causal)  # one cached lookup per call
        if why is not None:
            return _routed_to_torch(q, k, v, layout, is_causal, scale, why)
    key = _fast_key(q, k, v, layout, is_causal, recipe)
    entry = _fast_cache.get(key)
    if entry is None:
        if not (is_causal is True or is_causal is False) or layout not in ("bhsd", "bshd"):
            return None
        entry = _fast_entry(key, q, recipe)
    fast = entry[0]
    if fast is None:
        return None
    return fast(q, k, v, layout, is_causal, scale)


def _routed_to_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool, scale: float,
                     why: str) -> torch.Tensor | None:
    """PyTorch's SDPA with sage semantics for a call auto gives to PyTorch, after the checks the
    validated path would make (None: let it make them and word the error)."""
    if layout == "bhsd":
        b, h_q, s_q, d = q.shape
        _, h_kv, s_kv, _ = k.shape
    else:
        b, s_q, h_q, d = q.shape
        _, s_kv, h_kv, _ = k.shape
    if (k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h_kv < 1 or h_q % h_kv
            or s_q < 1 or s_kv < 1 or q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1
            or k.dtype is not q.dtype or v.dtype is not q.dtype or k.device != q.device or v.device != q.device
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    _warn_torch(why, {})
    if layout == "bhsd" and (not is_causal or s_q == s_kv):  # sage's semantics are PyTorch's here
        return as_output(TORCH_SDPA(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=h_q != h_kv), q, layout)
    return torch_attention(q, k, v, layout=layout, is_causal=is_causal, scale=scale, return_lse=False)[0]


# ----------------------------------------------------------------------------- options

_OPTION_TYPES = {bool: "b", int: "i", float: "f", str: "s", type(None): "n"}


def encode_options(options: dict[str, Any]) -> str:
    """Recipe options -> one string for the custom op schema: a dict literal, keys sorted.

    Written with plain string operations so that torch.compile traces it without a graph break.
    """
    parts = []
    for key in sorted(options):
        value = options[key]
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise TypeError(f"recipe option {key}={value!r}: only bool, int, float, str or None "
                            f"values are accepted, got {type(value).__name__}")
        parts.append(repr(key) + ": " + repr(value))
    return "{" + ", ".join(parts) + "}" if parts else ""


def decode_options(text: str) -> dict[str, Any]:
    """Inverse of :func:`encode_options` (a dict literal; literal_eval evaluates no code)."""
    return ast.literal_eval(text) if text else {}


def recipe_option_names(recipe: str) -> frozenset[str] | None:
    """Option names a recipe accepts (``sage_quant.RECIPES[recipe]`` keys); None = not described."""
    try:
        import sage_quant
        table = sage_quant.RECIPES
    except (ImportError, AttributeError):
        return None
    entry = table.get(recipe) if isinstance(table, dict) else None
    return frozenset(entry) if isinstance(entry, dict) else None


def check_options(recipe: str | None, options: dict[str, Any]) -> None:
    """Unknown recipe options are a TypeError, whatever path runs (so typos never pass silently)."""
    if not options:
        return
    reserved = sorted(set(options) & set(FRONT_END_OPTIONS))
    if reserved:
        raise TypeError(f"{reserved} are front-end keywords, not recipe options")
    if recipe is not None:
        names = recipe_option_names(recipe)
        candidates = [recipe]
    else:
        candidates = [r for r in known_recipes()]
        collected = [recipe_option_names(r) for r in candidates]
        names = None if any(n is None for n in collected) else frozenset().union(*collected)
    if names is None:
        return  # sage_quant does not describe them: the backend/emulation validates
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown recipe option(s) {unknown} for recipe(s) {candidates}; "
                        f"accepted: {sorted(names) or 'none'}")


def check_option_values(arch: str, recipe: str, options: dict[str, Any]) -> None:
    """Option *values* are checked against the recipe's declared values (``sage_quant.recipe_options``)
    before anything is dispatched: a bad value (``kv_block=7``, ``pv_accum="bogus"``) is a ValueError,
    never a backend veto that silently falls back. For ``recipe="auto"`` the candidates are the
    recipes auto can pick here (the forced recipe or the arch's preference list, else every recipe
    that has these option names); the values must be valid for at least one of them."""
    if not options or recipe == RECIPE_TORCH:
        return
    try:
        import sage_quant
        validate = sage_quant.recipe_options
    except (ImportError, AttributeError):
        return  # no declared values here: the backend/emulation validates
    if recipe != RECIPE_AUTO:
        candidates = [recipe]
    else:
        forced = _env.env_forced_recipe()
        candidates = [forced] if forced not in (None, RECIPE_TORCH) else list(ARCH_DEFAULT_RECIPES.get(arch, ()))
    names = set(options) - set(FRONT_END_OPTIONS)
    described = [r for r in candidates if (n := recipe_option_names(r)) is not None and names <= n]
    if recipe == RECIPE_AUTO and not described:
        described = [r for r in known_recipes() if (n := recipe_option_names(r)) is not None and names <= n]
    errors = []
    for r in described:
        try:
            validate(r, **{k: options[k] for k in names})
        except ValueError as exc:
            errors.append(f"{r}: {exc}")
        except TypeError:
            continue  # unknown names: check_options reports them
        else:
            return
    if errors:
        raise ValueError(f"invalid recipe option value(s) {sorted(names)} for recipe={recipe!r}: "
                         + "; ".join(errors))


# ----------------------------------------------------------------------------- execution


def _check_backend_output(spec: BackendSpec, q: torch.Tensor, o: Any, lse: Any, return_lse: bool,
                          lse_shape: tuple[int, int, int]) -> None:
    """Cheap host-side checks (shape/dtype/device only: no sync) that name a misbehaving backend."""
    if not isinstance(o, torch.Tensor) or o.shape != q.shape or o.dtype != q.dtype or o.device != q.device:
        got = f"{tuple(o.shape)} {o.dtype} {o.device}" if isinstance(o, torch.Tensor) else type(o).__name__
        raise RuntimeError(f"backend {spec.name!r} returned o = {got}; expected {tuple(q.shape)} {q.dtype} {q.device}")
    if return_lse and (not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32
                       or tuple(lse.shape) != lse_shape or lse.device != q.device):
        got = f"{tuple(lse.shape)} {lse.dtype} {lse.device}" if isinstance(lse, torch.Tensor) else repr(lse)
        raise RuntimeError(f"backend {spec.name!r} returned lse = {got}; expected float32 {lse_shape} on {q.device}")


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str, is_causal: bool,
        scale: float | None, recipe: str, return_lse: bool, options: dict[str, Any],
        emulate: bool | None = None, strict: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decide and execute one validated call. Returns (o in the input layout, lse (b, h_q, s_q) | None).

    A kernel decision at a head dim above the call's (``Decision.pad_to``) runs the backend on
    zero-padded copies (``_head_dim.PaddedCall``) with the scale of the call's own head dim, and
    slices o back; the LSE needs nothing (zero channels add 0 to every score). A backend that
    zero-fills inside its kernel (``BackendSpec.pads_head_dim``) gets the call's own tensors instead
    and returns o of the call's head dim (no PaddedCall, no copies)."""
    if layout == "bhsd":
        b, h_q, s_q, d = q.shape
    else:
        b, s_q, h_q, d = q.shape
    scale_value = float(scale) if scale is not None else d ** -0.5
    kwargs = {"layout": layout, "is_causal": is_causal, "scale": scale_value, "return_lse": return_lse}
    call = {"q": q, "k": k, "v": v, "kwargs": {**kwargs, **options}}
    arch = device_arch(q.device)
    check_option_values(arch, recipe, options)  # before dispatch: a bad value never falls back
    decision = resolve(arch, q.dtype, d, recipe, emulate=emulate, strict=strict, call=call)
    check_options(decision.recipe, options)

    if decision.kind == KIND_KERNEL:
        spec = decision.backend
        padded = (_padded_call(call, decision.pad_to)
                  if decision.pad_to is not None and not spec.pads_head_dim else None)
        qk, kk, vk = padded.inputs() if padded is not None else (q, k, v)
        o, lse = spec.fn(qk, kk, vk, **kwargs, **options)
        _check_backend_output(spec, qk, o, lse, return_lse, (b, h_q, s_q))
        o = padded.output(o) if padded is not None else as_output(o, q, layout)
        return o, (lse.contiguous() if return_lse else None)

    if decision.kind == KIND_EMULATION:
        if decision.warn:
            warn_once(f"emulation:{decision.reason}",
                      f"sage_torch: running the EMULATION of recipe {decision.recipe!r} (slow, exact "
                      f"numerics of the recipe) because {decision.reason}. Set strict=True or "
                      f"SAGE_STRICT=1 to make this an error.")
        return _run_emulation(q, k, v, decision.recipe, kwargs, options)

    if decision.warn:
        _warn_torch(decision.reason, options)
    return torch_attention(q, k, v, layout=layout, is_causal=is_causal, scale=scale_value, return_lse=return_lse)


def _warn_torch(reason: str, options: dict[str, Any]) -> None:
    if not options and "torch:" + reason in _warned:  # routed calls: once warned, nothing to format
        return
    ignored = f" Recipe options {sorted(options)} are ignored on this path." if options else ""
    warn_once(f"torch:{reason}",
              f"sage_torch: falling back to torch.nn.functional.scaled_dot_product_attention "
              f"(sage semantics kept: bottom-right causal) because {reason}.{ignored} "
              f"Set strict=True or SAGE_STRICT=1 to make this an error.", stacklevel=5)


def _run_emulation(q, k, v, recipe: str, kwargs: dict[str, Any], options: dict[str, Any]):
    try:
        import sage_quant
    except ImportError as exc:
        raise ImportError(f"recipe {recipe!r} has no kernel here and its emulation needs sage_quant, "
                          f"which failed to import: {exc}") from exc
    result = sage_quant.emulate(q, k, v, recipe, **kwargs, **options)
    if isinstance(result, tuple):
        o, lse = result[0], (result[1] if len(result) > 1 else None)
    else:
        o, lse = result, None
    o = as_output(o.to(q.dtype), q, kwargs["layout"])
    if kwargs["return_lse"]:
        if lse is None:
            raise RuntimeError(f"sage_quant.emulate({recipe!r}, return_lse=True) returned no LSE")
        lse = lse.to(torch.float32).contiguous()
    else:
        lse = None
    return o, lse
