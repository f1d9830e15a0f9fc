"""Hopper (sm_90a) backend: recipe ``qk_s8_pv_e4m3`` on wgmma + TMA kernels (sage_core sm90 family).

Pipeline per call (no host synchronization, CUDA-graph capturable):

1. ``sage_core.quant_qkv_sm90_fused``: three launches (two for s_kv <= 2048) that produce Q int8
   (per-thread scales), K int8 of ``K - k_mean`` (per-thread scales, 128-key tiles), V E4M3 per channel transposed to
   ``(b, h_kv, d, s_pad)`` with tokens permuted inside every 32-token chunk (format
   ``v_e4m3_t_perm32`` of docs/design/quant-formats.md, see :func:`v_token_permutation`).
2. ``sage_core.attn_fwd_sm90_qk_s8_pv_e4m3``: the warp-specialized attention forward.
3. LSE (if asked): the kernel's LSE of the smoothed scores plus ``q·k_mean·scale``.

Head dims: the kernels are compiled for 64 and 128. When sage_core announces
``SM90_HEAD_DIM_ZERO_FILL`` (:data:`ZERO_FILL`), a head dim d that is another multiple of 8 below 128
runs natively here: the quantizer reads q, k, v of head dim d and zero-fills channels d..D-1 as it
loads them (D = 64 for d <= 64, else 128; the quantized tensors have D, bit for bit those of
zero-padded copies), the kernel runs at D and its epilogue stores only o's d columns. The backend
registers ``pads_head_dim=True`` then, so the dispatcher makes no padded copies. An older sage_core
keeps the dispatcher's copy path (``sage_torch._head_dim.PaddedCall``).

The module imports without a GPU (it only needs ``sage_core`` to import); whether the kernels
are compiled in is answered by :func:`kernels_available`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

import sage_core

from . import register_backend
from .._layout import empty_output

__all__ = [
    "RECIPE",
    "BACKEND_NAME",
    "HEAD_DIMS",
    "V_PERM_CHUNK",
    "v_token_permutation",
    "v_token_positions",
    "permute_v_e4m3_t",
    "unpermute_v_e4m3_t",
    "kernels_available",
    "quantize_qkv_sm90",
    "attention_sm90_qk_s8_pv_e4m3",
    "split_for_bench",
    "ZERO_FILL",
    "kernel_head_dim",
]

RECIPE = "qk_s8_pv_e4m3"
BACKEND_NAME = "sm90_qk_s8_pv_e4m3"
HEAD_DIMS = (64, 128)
V_PERM_CHUNK = 32  # keys of one 8-bit k32 wgmma: the permutation period of v_e4m3_t_perm32
kBlockKV = 128  # the kernel's KV tile = per-thread K scale block = v_t token padding

_ATTN_FN = "attn_fwd_sm90_qk_s8_pv_e4m3"
_QUANT_FN = "quant_qkv_sm90_fused"
_KERNEL_NAMES = {
    (64, torch.float16): "attn_sm90_qk_s8_pv_e4m3_hdim64_f16",
    (64, torch.bfloat16): "attn_sm90_qk_s8_pv_e4m3_hdim64_bf16",
    (128, torch.float16): "attn_sm90_qk_s8_pv_e4m3_hdim128_f16",
    (128, torch.bfloat16): "attn_sm90_qk_s8_pv_e4m3_hdim128_bf16",
}
# pv_accum="one_level" (P~V accumulated straight into O): its own instantiations.
_KERNEL_NAMES_ONE_LEVEL = {key: name.replace("_e4m3_hdim", "_e4m3_one_level_hdim") for key, name in _KERNEL_NAMES.items()}
_QUANT_KERNEL_NAME = "quant_sm90_qkv_fused"

#: sage_core's sm90 bindings take q, k, v of a head dim that is a multiple of 8 below 128 and
#: zero-fill it to the kernel head dim inside the quantizer (the binding module's
#: ``SM90_HEAD_DIM_ZERO_FILL``); False for an older sage_core (the dispatcher then pads copies).
ZERO_FILL: bool = getattr(sage_core._C, "SM90_HEAD_DIM_ZERO_FILL", False) is True


_ACCEPTED_HEAD_DIMS = (f"{HEAD_DIMS}, and other multiples of 8 below 128 (zero-filled)" if ZERO_FILL
                       else f"{HEAD_DIMS}")


def kernel_head_dim(d: int) -> Optional[int]:
    """The kernel head dim (64 / 128) that runs head dim ``d`` here, None if none does: ``d`` itself
    for 64 / 128, with :data:`ZERO_FILL` also 64 for multiples of 8 below 64 and 128 for those
    between 64 and 128."""
    if d in HEAD_DIMS:
        return d
    if ZERO_FILL and isinstance(d, int) and 8 <= d < 128 and d % 8 == 0:
        return 64 if d <= 64 else 128
    return None

# The options of sage_quant.RECIPES["qk_s8_pv_e4m3"] and the only values this kernel implements
# (None = any value is fine because the kernel's arithmetic does not depend on it).
_IMPLEMENTED: Dict[str, Any] = {
    "q_granularity": ("per_thread",),
    "k_granularity": ("per_thread",),
    "q_block": None,  # per-thread Q groups are 16-row MMA tiles; q_block only matters for smooth_q
    "k_block": (None, kBlockKV),
    "smooth_k": (True, False),
    "smooth_v": (True, False),  # V smoothing: quantizer subtracts v_mean, the epilogue adds it back
    "smooth_q": (False,),
    "delta_s": None,  # only used with smooth_q
    "kv_block": (kBlockKV,),
    "pv_accum": ("two_level", "one_level"),
    "acc_mantissa_bits": (13,),  # the FP22 accumulator of Hopper's FP8 wgmma
    "v_max": (None, 448, 448.0),  # the fused quantizer maps V's channel amax to 448
}


# ------------------------------------------------------------------------------------------------
# the V token permutation (format v_e4m3_t_perm32)
# ------------------------------------------------------------------------------------------------
def v_token_permutation(device=None) -> torch.Tensor:
    """``pi``: LongTensor ``(32,)``; position ``p`` of a 32-token chunk of ``v_t`` holds token ``pi[p]``.

    ``pi(p) = 16*(p//16) + 8*((p%4)//2) + 2*((p%16)//4) + p%2``. Why: in the wgmma s32/f32
    accumulator, thread ``t = lane % 4`` holds keys ``{2t, 2t+1, 8+2t, 9+2t}`` (+16 for the upper
    half) of each 32-key chunk, while the 8-bit register A operand of a k32 wgmma gives it logical
    k ``{4t..4t+3}`` (+16). Storing V's tokens in this order lets each thread feed its own P
    values to the PV wgmma without shuffles (the contraction order is free).
    """
    p = torch.arange(V_PERM_CHUNK, dtype=torch.long, device=device)
    return 16 * (p // 16) + 8 * ((p % 4) // 2) + 2 * ((p % 16) // 4) + p % 2


def v_token_positions(device=None) -> torch.Tensor:
    """Inverse of :func:`v_token_permutation`: the position of token ``k`` inside its chunk."""
    pi = v_token_permutation(device)
    inv = torch.empty_like(pi)
    inv[pi] = torch.arange(V_PERM_CHUNK, dtype=torch.long, device=pi.device)
    return inv


def _check_v_t(v_t: torch.Tensor) -> None:
    if not isinstance(v_t, torch.Tensor) or v_t.dim() != 4:
        raise ValueError(f"v_t must be a 4-D tensor (b, h, d, s_pad), got {getattr(v_t, 'shape', type(v_t))}")
    if v_t.shape[-1] % V_PERM_CHUNK:
        raise ValueError(f"v_t token extent must be a multiple of {V_PERM_CHUNK}, got {v_t.shape[-1]}")


def permute_v_e4m3_t(v_t: torch.Tensor) -> torch.Tensor:
    """``v_e4m3_t`` (reference order) -> ``v_e4m3_t_perm32``: ``out[..., 32m + p] = v_t[..., 32m + pi[p]]``."""
    _check_v_t(v_t)
    s_pad = v_t.shape[-1]
    idx = (torch.arange(0, s_pad, V_PERM_CHUNK, device=v_t.device)[:, None]
           + v_token_permutation(v_t.device)[None, :]).reshape(-1)
    return v_t.index_select(-1, idx).contiguous()


def unpermute_v_e4m3_t(v_t_perm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`permute_v_e4m3_t`."""
    _check_v_t(v_t_perm)
    s_pad = v_t_perm.shape[-1]
    idx = (torch.arange(0, s_pad, V_PERM_CHUNK, device=v_t_perm.device)[:, None]
           + v_token_positions(v_t_perm.device)[None, :]).reshape(-1)
    return v_t_perm.index_select(-1, idx).contiguous()


# ------------------------------------------------------------------------------------------------
# availability
# ------------------------------------------------------------------------------------------------
def _has(name: str) -> bool:
    try:
        return bool(sage_core.has_kernel(name))
    except Exception:  # noqa: BLE001  (an old sage_core without has_kernel, ...)
        return False


def kernels_available(head_dim: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                      pv_accum: str = "two_level") -> bool:
    """Whether sage_core was built with the sm90 kernels (for one head dim / dtype / pv_accum, or any)."""
    if not (hasattr(sage_core._C, _ATTN_FN) and hasattr(sage_core._C, _QUANT_FN) and _has(_QUANT_KERNEL_NAME)):
        return False
    names = _KERNEL_NAMES_ONE_LEVEL if pv_accum == "one_level" else _KERNEL_NAMES
    if head_dim is not None:
        head_dim = kernel_head_dim(head_dim)  # a zero-filled head dim runs the 64 / 128 instantiation
        if head_dim is None:
            return False
    if head_dim is None and dtype is None:
        return any(_has(n) for n in names.values())
    return any(_has(n) for (d, dt), n in names.items()
               if (head_dim is None or d == head_dim) and (dtype is None or dt == dtype))


# ------------------------------------------------------------------------------------------------
# quantization
# ------------------------------------------------------------------------------------------------
def _bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "bhsd":
        return x
    if layout == "bshd":
        return x.transpose(1, 2)
    raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")


def _rows_aligned(x: torch.Tensor) -> bool:
    # the fused quantizer reads 16-byte vectors of 8 fp16/bf16 values
    return (x.stride(-1) == 1 and all(s % 8 == 0 for s in x.stride()[:3])
            and x.data_ptr() % 16 == 0)


def _dl(t: Optional[torch.Tensor]):
    """A tensor as a DLPack capsule for sage_core (nanobind takes capsules as well as tensors).

    ``Tensor.__dlpack__`` spends ~10 us in Python per tensor (stream and device checks): ~200 us of
    host time per attention call over its ~20 tensor arguments, against ~1 us for ``to_dlpack``
    (measured on the GPU machine with ``tools/profile_sm90.py --host``). Every kernel here runs on
    the current stream, so the stream handshake of ``__dlpack__`` has nothing to do. A tensor
    that requires grad goes through unchanged (``__dlpack__`` refuses it with a clear error).
    """
    return t if t is None or t.requires_grad else _to_dlpack(t)


try:  # the raw handle without building a torch.cuda.Stream object (~2 us less per call)
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # a CPU-only torch build
    _raw_stream = None


def _stream(device: torch.device) -> int:
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


def _mean_arg(mean: torch.Tensor, name: str, shape: Tuple[int, int, int], dev,
              d_in: Optional[int] = None) -> torch.Tensor:
    """A caller's (b, h_kv, d) mean as the contiguous, 16-byte aligned float32 tensor the kernel reads;
    ``d_in < d`` (a zero-filled head dim): a (b, h_kv, d_in) mean is zero-padded to d."""
    if not isinstance(mean, torch.Tensor):
        raise TypeError(f"{name} must be None or a torch.Tensor, got {type(mean).__name__}")
    if d_in is not None and d_in != shape[2] and tuple(mean.shape) == (*shape[:2], d_in):
        mean = torch.nn.functional.pad(mean.to(device=dev, dtype=torch.float32), (0, shape[2] - d_in))
    if tuple(mean.shape) != shape:
        raise ValueError(f"{name} must be (b, h_kv, d) = {shape}, got {tuple(mean.shape)}")
    m = mean.to(device=dev, dtype=torch.float32).contiguous()
    return m if m.data_ptr() % 16 == 0 else m.clone()


_ITEMSIZE = {torch.int8: 1, torch.uint8: 1, torch.float32: 4}
_CARVE_ALIGN = 256  # bytes; what the caching allocator gives a fresh tensor


def _carve(specs, dev) -> Dict[str, torch.Tensor]:
    """``{name: tensor}`` for ``specs = [(name, dtype, shape), ...]``: contiguous views of one uint8 buffer."""
    offs, total = [], 0
    for _, dt, shape in specs:
        n = _ITEMSIZE[dt]
        for e in shape:
            n *= e
        offs.append((total, n))
        total += -(-n // _CARVE_ALIGN) * _CARVE_ALIGN
    buf = torch.empty((max(total, 1),), dtype=torch.uint8, device=dev)
    return {name: buf[o:o + n].view(dt).view(shape) for (name, dt, shape), (o, n) in zip(specs, offs)}


def quantize_qkv_sm90(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str = "bhsd",
                      smooth_k: bool = True, k_mean: Optional[torch.Tensor] = None,
                      smooth_v: bool = True, v_mean: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Quantize Q, K, V for :func:`attention_sm90_qk_s8_pv_e4m3` with the fused CUDA kernel.

    Args:
        q: ``(b, h_q, s_q, d)`` (``"bhsd"``) or ``(b, s_q, h_q, d)`` (``"bshd"``), fp16/bf16, CUDA.
            ``d``: 64, 128, or (with :data:`ZERO_FILL`) another multiple of 8 below 128, quantized
            as if zero-padded to ``D = kernel_head_dim(d)``.
        k, v: same layout with ``h_kv`` heads and ``s_kv`` tokens, same dtype.
        smooth_k: subtract the token mean of K (per batch, kv head, channel) before quantizing.
        k_mean: optional precomputed float32 ``(b, h_kv, d)`` (or ``(b, h_kv, D)``) mean to subtract
            instead of the kernel's own (used by the bit-exact tests; implies smoothing); a ``d``
            wide one is zero-padded to ``D``.
        smooth_v: V smoothing: quantize ``V - v_mean`` (token mean per batch, kv head, channel);
            the attention kernel adds ``v_mean`` back (rows of a softmax sum to 1).
        v_mean: optional precomputed float32 ``(b, h_kv, d)`` (or ``D``) V mean (bit-exact tests;
            implies smoothing).

    Returns a dict (all contiguous): ``q`` int8 ``(b, h_q, s_q, d)``, ``q_scale`` f32
    ``(b, h_q, ceil(s_q/16)*8)``, ``k`` int8 ``(b, h_kv, s_kv, d)``, ``k_scale`` f32
    ``(b, h_kv, ceil(s_kv/128)*4)``, ``v_t`` uint8 E4M3 ``(b, h_kv, d, ceil(s_kv/128)*128)`` in
    the permuted ``v_e4m3_t_perm32`` order, ``v_scale`` f32 ``(b, h_kv, d)``, ``k_mean`` f32
    ``(b, h_kv, d)`` (zeros when ``smooth_k`` is False), and with V smoothing ``v_mean`` f32
    ``(b, h_kv, d)`` (the key is absent without it; pass ``out.get("v_mean")`` to the kernel).
    Every ``d`` above is ``D`` for a zero-filled head dim (the padded channels: codes 0, k_mean and
    v_mean 0, v_scale 1).
    """
    for name, val in (("smooth_k", smooth_k), ("smooth_v", smooth_v)):
        if not isinstance(val, bool):
            raise ValueError(f"{name} must be True or False, got {val!r}")
    qb, kb, vb = (_bhsd(x, layout) for x in (q, k, v))
    qb, kb, vb = (x if _rows_aligned(x) else x.contiguous() for x in (qb, kb, vb))
    b, h_q, s_q, d_in = qb.shape
    d = kernel_head_dim(d_in) or d_in  # the quantized tensors' head dim (sage_core validates d_in)
    h_kv, s_kv = kb.shape[1], kb.shape[2]
    dev = qb.device
    f32 = torch.float32
    s_pad = -(-s_kv // kBlockKV) * kBlockKV
    own_km = k_mean is None and smooth_k
    own_vm = v_mean is None and smooth_v
    # One allocation carved into every output and the workspace (one allocator call instead of
    # up to nine; the pieces start at 256-byte boundaries, the kernels need 16).
    n_ws = sage_core.quant_qkv_sm90_workspace_size(b, h_kv, s_kv, d)  # d = D: the same for d_in
    specs = [("q", torch.int8, (b, h_q, s_q, d)),
             ("q_scale", f32, (b, h_q, -(-s_q // 16) * 8)),
             ("k", torch.int8, (b, h_kv, s_kv, d)),
             ("k_scale", f32, (b, h_kv, -(-s_kv // kBlockKV) * 4)),
             ("v_t", torch.uint8, (b, h_kv, d, s_pad)),
             ("v_scale", f32, (b, h_kv, d)),
             ("_ws", f32, (n_ws,))]
    if own_km:
        specs.append(("k_mean", f32, (b, h_kv, d)))
    if own_vm:
        specs.append(("v_mean", f32, (b, h_kv, d)))
    out = _carve(specs, dev)
    workspace = out.pop("_ws")
    if k_mean is not None:
        km, given = _mean_arg(k_mean, "k_mean", (b, h_kv, d), dev, d_in), True
    elif smooth_k:
        km, given = out.pop("k_mean"), False
    else:
        km, given = torch.zeros((b, h_kv, d), dtype=f32, device=dev), True
    if v_mean is not None:
        vm, v_given = _mean_arg(v_mean, "v_mean", (b, h_kv, d), dev, d_in), True
    elif smooth_v:
        vm, v_given = out.pop("v_mean"), False
    else:
        vm, v_given = None, False
    extra = {} if vm is None else {"v_mean": _dl(vm), "v_mean_given": v_given}
    sage_core.quant_qkv_sm90_fused(_dl(qb), _dl(kb), _dl(vb), _dl(out["q"]), _dl(out["q_scale"]), _dl(out["k"]),
                                   _dl(out["k_scale"]), _dl(out["v_t"]), _dl(out["v_scale"]), _dl(km), given,
                                   _dl(workspace), _stream(dev), **extra)
    out["k_mean"] = km
    if vm is not None:
        out["v_mean"] = vm
    return out


# ------------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------------
def _unsupported_options(options: Dict[str, Any]) -> Optional[str]:
    for name, value in options.items():
        if name not in _IMPLEMENTED:
            return f"option {name!r} is not known to the sm90 {RECIPE} kernel"
        allowed = _IMPLEMENTED[name]
        if allowed is not None and value not in allowed:
            return (f"the sm90 {RECIPE} kernel implements {name} in {allowed}, got {value!r} "
                    "(use the emulation or another backend for this variant)")
    return None


def _supports(q, k, v, *, layout, is_causal, scale, return_lse, **options) -> Optional[str]:
    reason = _unsupported_options(options)
    if reason is not None:
        return reason
    d = q.shape[-1]
    accum = options.get("pv_accum", "two_level")
    if not kernels_available(d, q.dtype, accum):
        return f"sage_core was built without the sm90 {RECIPE} kernel for d={d}, {q.dtype}, pv_accum={accum!r}"
    b = q.shape[0]
    h_q = q.shape[1] if layout == "bhsd" else q.shape[2]
    h_kv = k.shape[1] if layout == "bhsd" else k.shape[2]
    if b > 65535 or h_q > 65535 or b * h_kv > 65535:
        return f"batch ({b}) / heads ({h_q}) / batch*kv heads ({b * h_kv}) exceed the kernel's grid limit 65535"
    return None


def _alloc_out(q: torch.Tensor, layout: str, b: int, h_q: int, s_q: int, d: int):
    """Output in q's layout and memory order (sage_torch._layout; the epilogue stores by strides)
    and its (b, h, s, d) view for the kernel."""
    o = empty_output(q, layout)
    return o, (o if layout == "bhsd" else o.transpose(1, 2))


def _accum_kwargs(pv_accum: str) -> Dict[str, str]:
    """sage_core's pv_accum keyword, passed only when not the default (an older sage_core has none)."""
    return {} if pv_accum == "two_level" else {"pv_accum": pv_accum}


def _launch_attn(qz: Dict[str, torch.Tensor], o_bhsd: torch.Tensor, lse: Optional[torch.Tensor],
                 scale: float, is_causal: bool, pv_accum: str = "two_level") -> None:
    """The attention kernel alone over the quantizer's outputs (v_mean: V smoothing, if present)."""
    s_kv = qz["k"].shape[2]
    v_mean = qz.get("v_mean")
    # keyword only when present: a sage_core built before v_mean existed still runs unsmoothed V
    extra = {} if v_mean is None else {"v_mean": _dl(v_mean)}
    extra.update(_accum_kwargs(pv_accum))
    sage_core.attn_fwd_sm90_qk_s8_pv_e4m3(_dl(qz["q"]), _dl(qz["k"]), _dl(qz["v_t"]), _dl(qz["q_scale"]),
                                          _dl(qz["k_scale"]), _dl(qz["v_scale"]), _dl(o_bhsd), _dl(lse), int(s_kv),
                                          scale, is_causal, _stream(o_bhsd.device), **extra)


# One binding call for a whole attention call (quantizer + attention over one workspace); an
# older sage_core without it runs the two-call path.
_ONE_CALL = getattr(sage_core._C, "quant_attn_fwd_sm90_qk_s8_pv_e4m3", None)
_ONE_CALL_WS = getattr(sage_core._C, "quant_attn_fwd_sm90_workspace_size", None)


def _one_call(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, o_bhsd: torch.Tensor,
              lse: Optional[torch.Tensor], scale: float, is_causal: bool, smooth_k: bool,
              smooth_v: bool, pv_accum: str = "two_level") -> torch.Tensor:
    """Quantize and attend in one sage_core call; returns the workspace (k_mean is its first piece)."""
    b, h_q, s_q, d = qb.shape
    h_kv, s_kv = kb.shape[1], kb.shape[2]
    ws = torch.empty((_ONE_CALL_WS(b, h_q, s_q, h_kv, s_kv, d),), dtype=torch.uint8, device=qb.device)
    _ONE_CALL(_to_dlpack(qb), _to_dlpack(kb), _to_dlpack(vb), _to_dlpack(o_bhsd),
              None if lse is None else _to_dlpack(lse), _to_dlpack(ws), scale, is_causal, smooth_k, smooth_v,
              _stream(qb.device), **_accum_kwargs(pv_accum))
    return ws


def _fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool,
          scale: float) -> Optional[torch.Tensor]:
    """Host fast path (recipe defaults, no LSE): one allocation each for O and the workspace, one
    sage_core call. sage_core validates every shape, stride, alignment and grid limit before it
    launches anything (ValueError); such a call, and any other unusual one, returns None so that
    the validated path handles it (contiguous copies, fallbacks) and words its errors.
    Checking here in Python as well cost ~4 us per call (bench_host --profile)."""
    if _ONE_CALL is None or q.requires_grad or k.requires_grad or v.requires_grad:
        return None
    if layout == "bhsd":
        qb, kb, vb = q, k, v
    else:
        qb, kb, vb = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    b, h_q, s_q, d = qb.shape
    o, o_bhsd = _alloc_out(q, layout, b, h_q, s_q, d)
    try:
        _one_call(qb, kb, vb, o_bhsd, None, scale, is_causal, True, True)
    except (ValueError, TypeError):
        return None
    return o


def attention_sm90_qk_s8_pv_e4m3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str,
                                 is_causal: bool, scale: float, return_lse: bool,
                                 **options: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention with recipe ``qk_s8_pv_e4m3`` on Hopper (sm_90a).

    Args:
        q: ``(b, h_q, s_q, d)`` for ``layout="bhsd"``, ``(b, s_q, h_q, d)`` for ``"bshd"``; fp16/bf16,
            CUDA, last dim contiguous; ``d`` in (64, 128), with :data:`ZERO_FILL` also any other
            multiple of 8 below 128 (zero-filled inside the quantizer, o of head dim ``d``).
        k, v: same layout, ``h_kv`` heads (``h_q % h_kv == 0``), ``s_kv`` tokens.
        is_causal: bottom-right aligned causal mask.
        scale: softmax scale (> 0).
        return_lse: also return the natural-log LSE ``(b, h_q, s_q)`` float32 of the unsmoothed
            scores (``-inf`` for fully masked rows).
        options: ``sage_quant.RECIPES["qk_s8_pv_e4m3"]`` options; values the kernel does not
            implement raise ``ValueError``.

    Returns:
        ``(o, lse | None)``: ``o`` has q's shape, dtype and layout, in q's memory order (``sage_torch._layout``).
    """
    reason = _unsupported_options(options)
    if reason is not None:
        raise ValueError(reason)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q must be float16 or bfloat16, got {q.dtype}")
    d = q.shape[-1]
    d_kernel = kernel_head_dim(d)
    if d_kernel is None:
        raise ValueError(f"head dim {d} is not supported by the sm90 kernel; accepted: {_ACCEPTED_HEAD_DIMS}")
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    smooth_k = bool(options.get("smooth_k", True))
    smooth_v = bool(options.get("smooth_v", True))  # V smoothing: qz["v_mean"] is added back by the epilogue
    pv_accum = options.get("pv_accum", "two_level")
    if pv_accum != "two_level" and not kernels_available(d, q.dtype, pv_accum):
        raise ValueError(f"sage_core was built without the sm90 pv_accum={pv_accum!r} kernel for d={d}, {q.dtype}")

    qb = _bhsd(q, layout)
    b, h_q, s_q, _ = qb.shape
    o, o_bhsd = _alloc_out(q, layout, b, h_q, s_q, d)
    lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=q.device) if return_lse else None
    if _ONE_CALL is not None:
        kb, vb = _bhsd(k, layout), _bhsd(v, layout)
        qb, kb, vb = (x if _rows_aligned(x) else x.contiguous() for x in (qb, kb, vb))
        ws = _one_call(qb, kb, vb, o_bhsd, lse, float(scale), bool(is_causal), smooth_k, smooth_v, pv_accum)
        h_kv = kb.shape[1]
        km = ws[:4 * b * h_kv * d_kernel].view(torch.float32).view(b, h_kv, d_kernel)
    else:
        qz = quantize_qkv_sm90(q, k, v, layout=layout, smooth_k=smooth_k, smooth_v=smooth_v)
        _launch_attn(qz, o_bhsd, lse, float(scale), bool(is_causal), pv_accum)
        km = qz["k_mean"]
    if lse is not None and smooth_k:
        # LSE of the unsmoothed scores: softmax ignored the per-row constant q·k_mean·scale. A
        # zero-filled head dim: k_mean has the kernel's D channels, the first d are q's.
        km = km[..., :d]
        h_kv = km.shape[1]
        if h_q != h_kv:
            km = km.repeat_interleave(h_q // h_kv, dim=1)
        corr = torch.einsum("bhsd,bhd->bhs", qb.to(torch.float32), km) * float(scale)
        lse = (lse + corr).contiguous()
    return o, lse


def split_for_bench(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                    layout: str = "bhsd", scale: Optional[float] = None):
    """Split one call into quantization (done now) and the attention kernel (returned).

    For ``python -m sage_torch.bench``'s kernel-only column. Returns ``(prepared, kernel_fn)``:
    ``prepared`` holds the quantized tensors (``quantize_qkv_sm90``'s dict, default options) and a
    preallocated output; ``kernel_fn(prepared)`` launches only the attention kernel (no
    allocation, no LSE) on the current stream and returns the output in q's layout.
    """
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q must be float16 or bfloat16, got {q.dtype}")
    d = q.shape[-1]
    if kernel_head_dim(d) is None:
        raise ValueError(f"head dim {d} is not supported by the sm90 kernel; accepted: {_ACCEPTED_HEAD_DIMS}")
    if scale is None:
        scale = d ** -0.5
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    qz = quantize_qkv_sm90(q, k, v, layout=layout)
    b, h_q, s_q, _ = _bhsd(q, layout).shape
    o, o_bhsd = _alloc_out(q, layout, b, h_q, s_q, d)
    prepared = {"qz": qz, "o": o, "o_bhsd": o_bhsd, "scale": float(scale), "is_causal": bool(is_causal)}

    def kernel_fn(pr: Dict[str, Any]) -> torch.Tensor:
        _launch_attn(pr["qz"], pr["o_bhsd"], None, pr["scale"], pr["is_causal"])
        return pr["o"]

    return prepared, kernel_fn


register_backend(
    BACKEND_NAME,
    RECIPE,
    archs=("sm90",),
    head_dims=HEAD_DIMS,
    fn=attention_sm90_qk_s8_pv_e4m3,
    available=kernels_available,
    dtypes=(torch.float16, torch.bfloat16),
    supports=_supports,
    fast=_fast,
    pads_head_dim=ZERO_FILL,
)
