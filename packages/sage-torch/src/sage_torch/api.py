"""The public functions: attention(), the SDPA drop-in and the SageAttention-compatible sageattn()."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from . import _dispatch
from . import _ops  # noqa: F401 - registers torch.ops.sage.attention_fwd
from ._head_dim import kernel_head_dim, no_kernel_head_dim_reason
from ._recipes import SUPPORTED_DTYPES, SUPPORTED_LAYOUTS, dtype_name
from ._torch_fallback import TORCH_SDPA

__all__ = ["attention", "scaled_dot_product_attention", "sageattn", "SAGEATTN_ACCEPTED_KWARGS"]


def _shape_text(layout: str) -> str:
    return "(batch, heads, seq, head_dim)" if layout == "bhsd" else "(batch, seq, heads, head_dim)"


def _is_numpy_bool(value: Any) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


def _as_bool(name: str, value: Any) -> bool:
    """A Python bool, or numpy.bool_ (np.True_) converted; anything else is a TypeError."""
    if value is True or value is False:
        return value
    if _is_numpy_bool(value):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True/False; numpy.bool_ is accepted), got {value!r} "
                    f"of type {type(value).__module__}.{type(value).__qualname__}")


def _as_scale(scale: Any) -> float | None:
    """None, or a positive finite real number (int, float, numpy scalar) as a float."""
    if scale is None:
        return None
    if isinstance(scale, bool) or _is_numpy_bool(scale) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be None or a positive finite real number (int, float or a numpy "
                        f"scalar such as np.float32), got {scale!r} of type "
                        f"{type(scale).__module__}.{type(scale).__qualname__}")
    value = float(scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be None or a positive finite real number, got {scale!r}")
    return value


def _check_qkv_tensors(q: Any, k: Any, v: Any, *, ndim: int, shape_text: str,
                       dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES, dtype_note: str = "",
                       last_dim_contiguous: bool = True) -> None:
    """The per-tensor checks every front end shares (attention, attention_varlen, sage_train): a
    tensor of ``ndim`` dims and an accepted dtype each, a contiguous last dim (where the kernels
    read rows), one dtype and one device for all three. Same order and words everywhere, so an
    input with several faults gets the same first error from each API."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {shape_text}, got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} has dtype {dtype_name(t.dtype)}; accepted: "
                            f"{', '.join(dtype_name(d) for d in dtypes)}{dtype_note}")
        if last_dim_contiguous and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides "
                             f"{tuple(t.stride())}; call .contiguous() first")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {dtype_name(q.dtype)}, "
                        f"{dtype_name(k.dtype)}, {dtype_name(v.dtype)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check_qkv_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, *,
                      v_head_dim_own: bool = False) -> None:
    """The shape checks of a dense 4-D call (attention, sage_train): one batch, k/v heads and
    lengths, sizes >= 1, GQA. ``v_head_dim_own``: v may have its own head dim (training)."""
    h_axis, s_axis = (1, 2) if layout == "bhsd" else (2, 1)
    b, h_q, s_q, d = q.shape[0], q.shape[h_axis], q.shape[s_axis], q.shape[3]
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != b:
            raise ValueError(f"batch size of {name} ({t.shape[0]}) differs from q's ({b})")
        if not v_head_dim_own and t.shape[3] != d:
            raise ValueError(f"head_dim of {name} ({t.shape[3]}) differs from q's ({d}); "
                             f"q, k and v must share one head dim")
    if v_head_dim_own and k.shape[3] != d:
        raise ValueError(f"head_dim of k ({k.shape[3]}) differs from q's ({d}); "
                         f"q and k must share one head dim (v may have its own)")
    h_kv, s_kv = k.shape[h_axis], k.shape[s_axis]
    if v.shape[h_axis] != h_kv or v.shape[s_axis] != s_kv:
        raise ValueError(f"k and v must have the same heads and length, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (layout {layout!r})")
    sizes = [("batch", b), ("q heads", h_q), ("kv heads", h_kv), ("q length", s_q), ("kv length", s_kv),
             ("head_dim", d)] + ([("v head_dim", v.shape[3])] if v_head_dim_own else [])
    for name, size in sizes:
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if h_q % h_kv:
        raise ValueError(f"q heads ({h_q}) must be a multiple of kv heads ({h_kv}) (GQA/MQA)")


def _validate(q: Any, k: Any, v: Any, *, layout: Any, is_causal: Any, scale: Any, return_lse: Any) -> None:
    """Every check the front end owns; raises TypeError/ValueError naming what was given."""
    if not isinstance(layout, str) or layout not in SUPPORTED_LAYOUTS:
        raise ValueError(f"layout must be one of {SUPPORTED_LAYOUTS}, got {layout!r}")
    for name, flag in (("is_causal", is_causal), ("return_lse", return_lse)):
        _as_bool(name, flag)
    _as_scale(scale)
    _check_qkv_tensors(q, k, v, ndim=4, shape_text=f"{_shape_text(layout)} for layout={layout!r}")
    _check_qkv_shapes(q, k, v, layout)


def _check_no_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("sage_torch.attention is inference-only (it has no backward): run it under "
                           "torch.no_grad()/torch.inference_mode(), or use sage_train for 8-bit training")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str = "bhsd",
              is_causal: bool = False, scale: float | None = None, recipe: str = "auto",
              return_lse: bool = False, **recipe_options: Any):
    """Quantized attention (forward only).

    Args:
        q: ``(b, h_q, s_q, d)`` for ``layout="bhsd"`` or ``(b, s_q, h_q, d)`` for ``"bshd"``;
            float16 or bfloat16; any strides with the last dim contiguous.
        k, v: same layout, ``h_kv`` heads (``h_q % h_kv == 0``: GQA/MQA, query head i uses kv
            head ``i // (h_q // h_kv)``), ``s_kv`` tokens, the same ``d``.
        is_causal: bottom-right aligned causal mask (query i sees keys j <= i + s_kv - s_q);
            a fully masked row outputs 0 and LSE -inf.
        scale: softmax scale, default ``1/sqrt(d)`` (of the call's d, also where the kernel runs
            zero-padded to a larger head dim).
        recipe: ``"auto"`` (the device's default, see ``_dispatch``), a docs/design/NUMERICS.md §Recipes name,
            or ``"torch"`` (PyTorch's SDPA with sage semantics, for A/B comparisons).
            An explicit recipe without a kernel on this device runs its emulation (slow; warns
            once; raises in strict mode).
        return_lse: also return the natural-log LSE, float32 ``(b, h_q, s_q)``.
        **recipe_options: options of the recipe (names and defaults: ``sage_quant.RECIPES``);
            an unknown name is a TypeError. Two front-end keywords: ``emulate=True`` runs the
            emulation even where a kernel exists; ``strict=True`` raises instead of any fallback
            (both default to ``SAGE_FORCE_EMULATION`` / ``SAGE_STRICT``).

    Returns:
        ``o`` with q's shape, dtype and layout, or ``(o, lse)`` with ``return_lse``. o's memory
        follows q's order of the batch/head/seq dims (``sage_torch._layout``): for ``(b, h, s, d)``
        views of ``(b, s, h, d)`` memory (a packed qkv projection) o is such a view too, as with
        PyTorch's flash/cuDNN SDPA, so ``o.transpose(1, 2).reshape(...)`` costs no copy; else o is
        contiguous in ``layout``.
    """
    if type(is_causal) is not bool:  # np.True_ hashes like True: normalize before the cached fast path
        is_causal = _as_bool("is_causal", is_causal)
    if not recipe_options and return_lse is False:
        o = _dispatch.fast_call(q, k, v, layout, is_causal, scale, recipe)
        if o is not None:
            return o
    emulate = recipe_options.pop("emulate", None)
    strict = recipe_options.pop("strict", None)
    for name, flag in (("emulate", emulate), ("strict", strict)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool or None, got {type(flag).__name__}")
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a str, got {type(recipe).__name__}")
    _validate(q, k, v, layout=layout, is_causal=is_causal, scale=scale, return_lse=return_lse)
    is_causal, return_lse = bool(is_causal), bool(return_lse)  # numpy bools accepted above
    _check_no_grad(q, k, v)
    options_text = _dispatch.encode_options(recipe_options)  # also rejects non-literal values
    scale_arg = _as_scale(scale)
    if torch.compiler.is_compiling():
        o, lse = torch.ops.sage.attention_fwd(q, k, v, layout, is_causal, scale_arg, recipe, return_lse,
                                              options_text, emulate, strict)
        return (o, lse) if return_lse else o
    o, lse = _dispatch.run(q, k, v, layout=layout, is_causal=is_causal, scale=scale_arg, recipe=recipe,
                           return_lse=return_lse, options=recipe_options, emulate=emulate, strict=strict)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- SDPA drop-in

#: Device types the SDPA drop-in sends to sage (everything else goes to PyTorch's SDPA).
SDPA_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
                          ) -> tuple[str | None, bool]:
    """(why sage cannot run this call, whether to warn) or (None, False) when sage runs it.

    Calls PyTorch itself rejects return warn=False: PyTorch raises its own error.
    """
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "non-tensor inputs", False
    if not all(t.dim() == 4 for t in tensors):
        return f"inputs are not 4-D (got {[tuple(t.shape) for t in tensors]})", True
    if not (query.device == key.device == value.device):
        return "devices differ", False
    h_q, h_kv = query.shape[1], key.shape[1]
    if value.shape[1] != h_kv or (h_q != h_kv and (not enable_gqa or h_q % h_kv)):
        return "head counts PyTorch rejects", False
    if attn_mask is not None:
        return "attn_mask is given (sage supports is_causal masks only)", True
    if isinstance(dropout_p, torch.Tensor) or dropout_p != 0.0:
        return f"dropout_p={dropout_p!r} (sage has no dropout)", True
    if query.device.type not in SDPA_DEVICE_TYPES:
        return f"tensors on {query.device.type} (sage kernels need CUDA)", True
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in SUPPORTED_DTYPES:
        return (f"dtypes {dtype_name(query.dtype)}/{dtype_name(key.dtype)}/{dtype_name(value.dtype)} "
                f"(sage needs float16 or bfloat16 throughout)"), True
    d = query.shape[3]
    if key.shape[3] != d or value.shape[3] != d:
        return "q, k, v head dims differ", True
    if kernel_head_dim(d) is None:  # the rule of sage_torch._head_dim (padded head dims run on sage)
        return no_kernel_head_dim_reason(d), True
    if not (query.shape[0] == key.shape[0] == value.shape[0]) or key.shape[2] != value.shape[2]:
        return "batch sizes or key/value lengths differ (broadcasting)", True
    if any(t.stride(-1) != 1 for t in tensors):
        return "last dim not contiguous", True
    if is_causal and query.shape[2] != key.shape[2]:
        return ("is_causal with q_len != kv_len: PyTorch aligns that mask top-left, sage bottom-right; "
                "PyTorch's SDPA keeps PyTorch's meaning"), True
    if scale is not None and (isinstance(scale, bool) or _is_numpy_bool(scale)
                              or not isinstance(scale, numbers.Real) or not 0 < float(scale) < math.inf):
        return f"scale={scale!r}", True
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "inputs require grad (sage attention is forward-only; sage_train is the training path)", True
    return None, False


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *, strict: bool | None):
    if (strict is None and type(query) is torch.Tensor and type(key) is torch.Tensor and type(value) is torch.Tensor
            and value.dim() == 4 and (is_causal is True or is_causal is False)):
        # A shape recipe="auto" gives to PyTorch (checked first: the host cost of such a call is
        # all overhead): the caller's own SDPA call with every argument, exactly as without sage
        # (same backend choice, same output); whatever else sage would say about it, PyTorch runs it.
        auto_why = _dispatch.auto_torch_route(query, key, value, "bhsd", is_causal)
        if auto_why is not None:
            _dispatch._warn_torch(auto_why, {})
            return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
    why, warn = _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if why is None:
        if strict is None:  # no keyword: attention()'s host fast path applies
            return attention(query, key, value, layout="bhsd", is_causal=bool(is_causal), scale=scale)
        return attention(query, key, value, layout="bhsd", is_causal=bool(is_causal), scale=scale, strict=strict)
    if warn:
        strict_flag = _dispatch._resolve_flags(None, strict)[1]
        if strict_flag:
            raise _dispatch.SageDispatchError(f"sage_torch strict mode: scaled_dot_product_attention cannot "
                                              f"run this call on sage ({why}); not falling back")
        if not torch.compiler.is_compiling():  # the result is PyTorch's exactly; keep graphs whole
            _dispatch.warn_once(f"sdpa:{why}", f"sage_torch.scaled_dot_product_attention: using PyTorch's "
                                f"SDPA for this call because {why}.")
    return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                      scale=scale, enable_gqa=enable_gqa)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same signature/semantics).

    Runs sage (``recipe="auto"``) for 4-D CUDA fp16/bf16 inputs with head dim 64/128 (or a multiple
    of 8 below 128, zero-padded to the next: ``sage_torch._head_dim``), no mask, no
    dropout, and (when causal) q_len == kv_len. Every other call goes to PyTorch's own SDPA,
    with a warning once per reason (``SAGE_STRICT=1``: an error instead), so a result never
    silently changes meaning. Forward only: inputs requiring grad go to PyTorch as well.
    """
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, strict=None)


# ----------------------------------------------------------------------------- sageattn

_SAGEATTN_LAYOUTS = {"HND": "bhsd", "NHD": "bshd"}
#: SageAttention keywords sageattn() accepts, and what they mean here.
SAGEATTN_ACCEPTED_KWARGS: dict[str, str] = {
    "smooth_k": "bool, passed as the recipe option smooth_k (K smoothing; default True)",
    "smooth_v": "bool: V smoothing of the recipe sage picks on this device (qk_s8_pv_e4m3 on sm90 "
                "smooths V by default); False is always honoured, True raises ValueError where the "
                "recipe has no V smoothing",
    "pv_accum_dtype": "'fp32' or 'fp32+fp32' only (sage always accumulates PV in fp32, two-level for "
                      "FP8 PV); fp16 accumulation raises ValueError",
}
#: SageAttention keywords that raise TypeError, with the reason shown to the user.
SAGEATTN_REJECTED_KWARGS: dict[str, str] = {
    "qk_quant_gran": "sage chooses the Q/K scale granularity per recipe; to choose it yourself call "
                     "sage_torch.attention(..., recipe=..., q_granularity=..., k_granularity=...)",
    "quantization_backend": "sage quantizes with its own CUDA kernels",
    "attn_mask": "sage supports is_causal masks only; use torch SDPA for arbitrary masks",
}


def sageattn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str = "HND",
             is_causal: bool = False, sm_scale: float | None = None, return_lse: bool = False,
             **kwargs: Any):
    """SageAttention-compatible entry: ``from sage_torch import sageattn`` replaces
    ``from sageattention import sageattn``.

    ``tensor_layout="HND"`` is ``(b, h, s, d)``, ``"NHD"`` is ``(b, s, h, d)``. Runs
    :func:`attention` with ``recipe="auto"``. Accepted extra keywords:
    :data:`SAGEATTN_ACCEPTED_KWARGS`; the rest raise TypeError (:data:`SAGEATTN_REJECTED_KWARGS`
    explains the known ones). Returns ``o`` or ``(o, lse)`` (natural log, float32 ``(b, h, s_q)``).
    """
    if tensor_layout not in _SAGEATTN_LAYOUTS:
        raise ValueError(f"tensor_layout must be 'HND' (b, h, s, d) or 'NHD' (b, s, h, d), got {tensor_layout!r}")
    options = _sageattn_options(q, kwargs, "sageattn")
    return attention(q, k, v, layout=_SAGEATTN_LAYOUTS[tensor_layout], is_causal=is_causal, scale=sm_scale,
                     recipe="auto", return_lse=return_lse, **options)


def _sageattn_options(q: Any, kwargs: dict[str, Any], fn_name: str) -> dict[str, Any]:
    """Recipe options from SageAttention's extra keywords (shared by sageattn and sageattn_varlen);
    ``q`` (4-D, any layout) tells which recipe "auto" picks here, for ``smooth_v``."""
    options: dict[str, Any] = {}
    smooth_v = None
    for name, value in kwargs.items():
        if name == "smooth_k":
            if not isinstance(value, bool):
                raise TypeError(f"smooth_k must be a bool, got {type(value).__name__}")
            options["smooth_k"] = value
        elif name == "smooth_v":
            if not isinstance(value, bool):
                raise TypeError(f"smooth_v must be a bool, got {type(value).__name__}")
            smooth_v = value
        elif name == "pv_accum_dtype":
            if value not in ("fp32", "fp32+fp32"):
                raise ValueError(f"pv_accum_dtype={value!r} is not supported: {fn_name}() accumulates PV in fp32 "
                                 f"(accepted: 'fp32', 'fp32+fp32'); FP16-buffered accumulation is "
                                 f"sage_torch.attention(..., recipe='qk_s8_pv_f16' or 'qk_s8_pv_e4m3', "
                                 f"pv_accum='f16_buffer') on the sm80-family kernels")
        elif name in SAGEATTN_REJECTED_KWARGS:
            raise TypeError(f"{fn_name}() does not accept {name}=: {SAGEATTN_REJECTED_KWARGS[name]}")
        else:
            raise TypeError(f"{fn_name}() got an unexpected keyword argument {name!r}; accepted extra "
                            f"keywords: {sorted(SAGEATTN_ACCEPTED_KWARGS)}")
    if smooth_v is not None and isinstance(q, torch.Tensor) and q.dim() == 4:
        # Only some recipes smooth V: pass the choice to the one "auto" picks here when it has the
        # option; a recipe without it never smooths V, which is what smooth_v=False asks for.
        recipe = _dispatch.resolve(_dispatch.device_arch(q.device), q.dtype, q.shape[-1]).recipe
        names = _dispatch.recipe_option_names(recipe) if recipe is not None else None
        if names is not None and "smooth_v" in names:
            options["smooth_v"] = smooth_v
        elif smooth_v:
            raise ValueError(f"smooth_v=True: the recipe sage runs on this device ({recipe or 'PyTorch SDPA'}) "
                             f"has no V smoothing (accepted here: False)")
    return options
