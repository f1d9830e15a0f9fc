"""Variable-length (packed) attention: :func:`attention_varlen` and SageAttention's :func:`sageattn_varlen`.

A *pack* holds ``batch`` sequences back to back along the token axis: ``q`` is
``(total_q, h_q, d)`` and sequence ``i`` owns the rows ``cu_seqlens_q[i] : cu_seqlens_q[i + 1]``
(likewise ``k``/``v`` with ``cu_seqlens_k``), the layout of flash-attn's ``flash_attn_varlen_func``.
Sequence ``i``'s queries attend only to sequence ``i``'s keys.

Numerics. Every quantization group of a recipe (per-thread / per-block Q and K scales, the K
smoothing mean, V's per-channel scale and mean) is taken **per sequence**: a varlen kernel tiles
each sequence separately, so sequence ``i`` of a pack gives exactly the result of
``attention(q_i, k_i, v_i)`` on that sequence alone. The emulation (:func:`emulate_varlen`) is
therefore ``sage_quant.emulate`` run per sequence.

Execution (``_run``; the one place that chooses). The dense dispatcher's decision for
(device arch, dtype, head dim, recipe) is taken once per call. If it picks a kernel backend that
registered a ``varlen`` entry (``register_backend(..., varlen=fn)``, contract in
``backends/README.md``) the whole pack is one call of it. Otherwise -- today every backend: no
varlen kernel exists yet -- the pack runs sequence by sequence through :func:`sage_torch.attention`
(the same kernels, emulation or PyTorch fallback a dense call would run, views, no padding;
consecutive sequences of one length go as one dense batch, so a pack of equal lengths is one
call), and a :class:`~sage_torch.SageFallbackWarning` says so once.

Validation happens before anything is launched and reads ``cu_seqlens`` on the host (one small
device-to-host copy): a call is therefore not capturable in a CUDA graph, and under
``torch.compile`` it runs eagerly (``torch.compiler.disable``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch

from . import _dispatch, api
from ._head_dim import PaddedCall
from ._recipes import dtype_name

__all__ = ["attention_varlen", "sageattn_varlen", "emulate_varlen", "VarlenPack", "validate_varlen",
           "CU_SEQLENS_DTYPE"]

#: The dtype ``cu_seqlens_q`` / ``cu_seqlens_k`` must have (flash-attn's, and what a kernel reads).
CU_SEQLENS_DTYPE = torch.int32


@dataclasses.dataclass(frozen=True)
class VarlenPack:
    """Host copy of a validated pack's boundaries: ``q_bounds[i] : q_bounds[i + 1]`` are the rows of
    sequence ``i`` in ``q`` (``k_bounds`` likewise in ``k``/``v``)."""

    q_bounds: tuple[int, ...]
    k_bounds: tuple[int, ...]

    @property
    def batch(self) -> int:
        return len(self.q_bounds) - 1

    def sequences(self):
        """Yields ``(i, q0, q1, k0, k1)`` for every sequence of the pack."""
        for i in range(self.batch):
            yield i, self.q_bounds[i], self.q_bounds[i + 1], self.k_bounds[i], self.k_bounds[i + 1]


def _max_seqlen(name: str, value: Any) -> int | None:
    if value is None:  # internal callers (emulate_varlen): no bound to check
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _bounds(name: str, cu: Any, device: torch.device, total_name: str) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu).__name__}")
    if cu.dtype != CU_SEQLENS_DTYPE:
        raise ValueError(f"{name} must have dtype int32 (flash-attn's cu_seqlens convention), got "
                         f"{dtype_name(cu.dtype)}; convert with .to(torch.int32)")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D of length batch + 1 >= 2 (its first entry 0, its last "
                         f"{total_name}), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")
    return cu


def _check_bounds(name: str, bounds: list[int], total: int, total_name: str) -> None:
    if bounds[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {bounds[0]} ({name} = {_preview(bounds)})")
    for i in range(len(bounds) - 1):
        if bounds[i + 1] < bounds[i]:
            raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), but "
                             f"{name}[{i + 1}] = {bounds[i + 1]} < {name}[{i}] = {bounds[i]} "
                             f"({name} = {_preview(bounds)})")
    if bounds[-1] != total:
        raise ValueError(f"{name}[-1] = {bounds[-1]} must equal {total_name} = {total} (the packed "
                         f"token count of the tensor), got {name} = {_preview(bounds)}")


def _preview(values: list[int], limit: int = 12) -> str:
    if len(values) <= limit:
        return str(values)
    return f"[{', '.join(map(str, values[:limit // 2]))}, ..., {', '.join(map(str, values[-limit // 2:]))}]"


def validate_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: Any,
                    max_seqlen_k: Any, *, is_causal: Any = False, scale: Any = None,
                    return_lse: Any = False) -> VarlenPack:
    """Every check of a varlen call (nothing is launched); returns the pack's host boundaries.

    Raises TypeError for wrong types/dtypes of q, k, v and ValueError for shapes, devices and
    ``cu_seqlens`` / ``max_seqlen`` values, each message naming what was given and what is accepted.
    """
    for name, flag in (("is_causal", is_causal), ("return_lse", return_lse)):
        api._as_bool(name, flag)
    api._as_scale(scale)
    api._check_qkv_tensors(q, k, v, ndim=3, shape_text="packed (total_tokens, heads, head_dim)")
    total_q, h_q, d = q.shape
    total_k, h_kv, d_k = k.shape
    if d_k != d or v.shape[2] != d:
        raise ValueError(f"q, k and v must share one head dim, got {d}, {d_k}, {v.shape[2]}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must have the same shape (total_k, h_kv, d), got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if h_q < 1 or h_kv < 1 or d < 1:
        raise ValueError(f"heads and head_dim must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if h_q % h_kv:
        raise ValueError(f"q heads ({h_q}) must be a multiple of kv heads ({h_kv}) (GQA/MQA)")
    cq = _bounds("cu_seqlens_q", cu_seqlens_q, q.device, "q.shape[0]")
    ck = _bounds("cu_seqlens_k", cu_seqlens_k, q.device, "k.shape[0]")
    if cq.shape[0] != ck.shape[0]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"lengths {cq.shape[0]} and {ck.shape[0]} (batch + 1 each)")
    mq = _max_seqlen("max_seqlen_q", max_seqlen_q)
    mk = _max_seqlen("max_seqlen_k", max_seqlen_k)
    host = torch.stack([cq, ck]).cpu().tolist()  # one device-to-host copy for both
    qb, kb = host
    _check_bounds("cu_seqlens_q", qb, total_q, "q.shape[0]")
    _check_bounds("cu_seqlens_k", kb, total_k, "k.shape[0]")
    for name, bounds, given in (("max_seqlen_q", qb, mq), ("max_seqlen_k", kb, mk)):
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        if given is not None and given < longest:
            i = next(j for j in range(len(bounds) - 1) if bounds[j + 1] - bounds[j] == longest)
            raise ValueError(f"{name} = {given} is smaller than the longest sequence of the pack "
                             f"(sequence {i}: {longest} tokens); pass an upper bound (>= {longest})")
    return VarlenPack(tuple(qb), tuple(kb))


def _split_options(recipe_options: dict[str, Any]) -> tuple[bool | None, bool | None, dict[str, Any]]:
    options = dict(recipe_options)
    emulate = options.pop("emulate", None)
    strict = options.pop("strict", None)
    for name, flag in (("emulate", emulate), ("strict", strict)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool or None, got {type(flag).__name__}")
    return emulate, strict, options


def _alloc_outputs(q: torch.Tensor, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    total_q, h_q, _ = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((h_q, total_q), dtype=torch.float32, device=q.device) if return_lse else None
    return o, lse


def _fill_empty_keys(o: torch.Tensor, lse: torch.Tensor | None, q0: int, q1: int) -> None:
    """Queries of a sequence with no keys: every row is fully masked (output 0, LSE -inf)."""
    o[q0:q1].zero_()
    if lse is not None:
        lse[:, q0:q1] = -math.inf


def _runs(pack: VarlenPack):
    """The pack as runs of consecutive sequences of one (q length, k length): yields
    ``(q0, q1, k0, k1, n, s_q, s_k)``, the rows of ``n`` back-to-back sequences. Empty sequences
    (no queries) and sequences without keys are runs of their own (``n == 1``)."""
    run = None
    for _, q0, q1, k0, k1 in pack.sequences():
        s_q, s_k = q1 - q0, k1 - k0
        if run is not None and s_q > 0 and s_k > 0 and (run[5], run[6]) == (s_q, s_k):
            run[1], run[3], run[4] = q1, k1, run[4] + 1
            continue
        if run is not None:
            yield tuple(run)
        run = [q0, q1, k0, k1, 1, s_q, s_k]
    if run is not None:
        yield tuple(run)


def _each_sequence(q, k, v, pack: VarlenPack, return_lse: bool, attend):
    """o (and LSE) of a pack, every sequence on its own: ``attend(q_run, k_run, v_run)`` gets
    ``(n, s, h, d)`` views of a run of ``n`` consecutive sequences of one length (``_runs``; packed
    rows of equal-length sequences *are* a dense (n, s, h, d) batch, and a dense call keeps every
    quantization group per batch element, i.e. per sequence) and returns o (or ``(o, lse)`` with
    ``return_lse``) for them; empty sequences are skipped, sequences without keys get 0 / -inf. A
    pack of equal lengths is one call."""
    o, lse = _alloc_outputs(q, return_lse)
    h_q, d = q.shape[1], q.shape[2]
    for q0, q1, k0, k1, n, s_q, s_k in _runs(pack):
        if s_q == 0:
            continue
        if s_k == 0:
            _fill_empty_keys(o, lse, q0, q1)
            continue
        out = attend(q[q0:q1].view(n, s_q, h_q, d), k[k0:k1].view(n, s_k, *k.shape[1:]),
                     v[k0:k1].view(n, s_k, *v.shape[1:]))
        if return_lse:
            out, run_lse = out
            lse[:, q0:q1] = run_lse.transpose(0, 1).reshape(h_q, q1 - q0)
        o[q0:q1] = out.reshape(q1 - q0, h_q, -1).to(q.dtype)
    return o, lse


def _per_sequence(q, k, v, pack: VarlenPack, *, is_causal: bool, scale: float | None, recipe: str,
                  return_lse: bool, call_options: dict[str, Any]):
    return _each_sequence(q, k, v, pack, return_lse, lambda qs, ks, vs: api.attention(
        qs, ks, vs, layout="bshd", is_causal=is_causal, scale=scale, recipe=recipe, return_lse=return_lse,
        **call_options))


def _check_varlen_output(name: str, q: torch.Tensor, o: Any, lse: Any, return_lse: bool) -> None:
    if not isinstance(o, torch.Tensor) or o.shape != q.shape or o.dtype != q.dtype or o.device != q.device:
        got = f"{tuple(o.shape)} {o.dtype} {o.device}" if isinstance(o, torch.Tensor) else type(o).__name__
        raise RuntimeError(f"varlen backend {name!r} returned o = {got}; expected {tuple(q.shape)} {q.dtype} "
                           f"{q.device}")
    want = (q.shape[1], q.shape[0])
    if return_lse and (not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32
                       or tuple(lse.shape) != want or lse.device != q.device):
        got = f"{tuple(lse.shape)} {lse.dtype} {lse.device}" if isinstance(lse, torch.Tensor) else repr(lse)
        raise RuntimeError(f"varlen backend {name!r} returned lse = {got}; expected float32 {want} on {q.device}")


def _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, pack: VarlenPack, *,
         is_causal: bool, scale: float | None, recipe: str, return_lse: bool, emulate: bool | None,
         strict: bool | None, options: dict[str, Any]):
    """The one place that decides how a validated pack runs (module docstring)."""
    arch = _dispatch.device_arch(q.device)
    d = q.shape[2]
    _dispatch.check_option_values(arch, recipe, options)  # a bad value never reaches a launch
    decision = _dispatch.resolve(arch, q.dtype, d, recipe, emulate=emulate, strict=strict)
    _dispatch.check_options(decision.recipe, options)
    spec = decision.backend if decision.kind == _dispatch.KIND_KERNEL else None
    varlen_fn = getattr(spec, "varlen", None) if spec is not None else None
    if varlen_fn is not None:
        scale_value = float(scale) if scale is not None else d ** -0.5  # of the call's d, also when padded
        # a kernel head dim above d: zero-padded copies of the pack, o sliced back (sage_torch._head_dim)
        padded = PaddedCall(q, k, v, "thd", decision.pad_to) if decision.pad_to is not None else None
        qk, kk, vk = padded.inputs() if padded is not None else (q, k, v)
        result = varlen_fn(qk, kk, vk, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=is_causal,
                           scale=scale_value, return_lse=return_lse, **options)
        if result is not None:  # None: the backend declined this pack (checked before any launch)
            o, lse = result
            _check_varlen_output(spec.name, qk, o, lse, return_lse)
            o = padded.output(o) if padded is not None else o.contiguous()
            return o, (lse.contiguous() if return_lse else None)
        why = f"the varlen entry of backend {spec.name!r} declined this pack"
    elif spec is not None:
        why = f"backend {spec.name!r} has no varlen kernel"
    else:
        why = decision.reason or decision.kind
    # emulate=True / recipe="torch" asked for that path: per sequence is what it is, nothing to say
    asked = decision.kind in (_dispatch.KIND_EMULATION, _dispatch.KIND_TORCH) and not decision.warn
    if not asked and not torch.compiler.is_compiling():
        where = spec.name if spec is not None else decision.kind
        _dispatch.warn_once(f"varlen:per_sequence:{arch}:{where}",
                            f"sage_torch.attention_varlen: {why} on {arch}: running the pack sequence by "
                            f"sequence through sage_torch.attention() (views, no padding; consecutive sequences "
                            f"of one length as one dense batch; the same per-sequence numerics a varlen kernel "
                            f"has, one launch set per run of equal lengths).",
                            stacklevel=5)  # the caller of attention_varlen (past torch.compiler.disable)
    call_options = dict(options)
    if emulate is not None:
        call_options["emulate"] = emulate
    if strict is not None:
        call_options["strict"] = strict
    return _per_sequence(q, k, v, pack, is_causal=is_causal, scale=scale, recipe=recipe, return_lse=return_lse,
                         call_options=call_options)


@torch.compiler.disable
def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                     is_causal: bool = False, scale: float | None = None, return_lse: bool = False,
                     recipe: str = "auto", **recipe_options: Any):
    """Quantized attention over a pack of variable-length sequences (forward only).

    Args:
        q: ``(total_q, h_q, d)`` packed queries, float16/bfloat16, last dim contiguous.
        k, v: ``(total_k, h_kv, d)`` packed keys/values (``h_q % h_kv == 0``: GQA/MQA).
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` on q's device, ``[0, ..., total]``,
            non-decreasing: sequence ``i`` owns rows ``cu[i]:cu[i + 1]``. Empty sequences are
            allowed (no queries: nothing to compute; no keys: its query rows give 0 and LSE -inf).
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths (ints, >= the real max).
        is_causal: bottom-right aligned **per sequence**: query ``i`` of a sequence with
            ``s_q`` queries and ``s_k`` keys sees keys ``j <= i + s_k - s_q``; fully masked rows
            give 0 and LSE -inf.
        scale: softmax scale, default ``1/sqrt(d)``.
        return_lse: also return the natural-log LSE, float32 ``(h_q, total_q)`` (flash-attn's
            varlen LSE layout).
        recipe, **recipe_options: as :func:`sage_torch.attention` (``emulate=``, ``strict=``
            included); the quantization groups are per sequence (module docstring).

    Returns:
        ``o`` ``(total_q, h_q, d)`` in q's dtype, contiguous, or ``(o, lse)``.

    Raises:
        TypeError / ValueError before anything runs: wrong tensor types, dtypes, shapes or devices;
        ``cu_seqlens`` not int32, not on q's device, not starting at 0, decreasing, not ending at
        the packed token count, of different lengths; ``max_seqlen`` below a sequence's length.
    """
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a str, got {type(recipe).__name__}")
    emulate, strict, options = _split_options(recipe_options)
    pack = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=is_causal,
                           scale=scale, return_lse=return_lse)
    api._check_no_grad(q, k, v)
    _dispatch.encode_options(options)  # only literal values, as attention() accepts
    is_causal, return_lse = bool(is_causal), bool(return_lse)
    o, lse = _run(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), pack,
                  is_causal=is_causal, scale=api._as_scale(scale), recipe=recipe, return_lse=return_lse,
                  emulate=emulate, strict=strict, options=options)
    return (o, lse) if return_lse else o


def emulate_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, recipe: str, *, is_causal: bool = False, scale: float | None = None,
                   return_lse: bool = False, **options: Any):
    """The exact emulation of a varlen call: ``sage_quant.emulate`` per sequence (the oracle a varlen
    kernel is tested against; the quantization groups are per sequence, see the module docstring).

    Same tensors and results as :func:`attention_varlen` (``(total_q, h_q, d)``, LSE
    ``(h_q, total_q)``); ``recipe`` is a ``sage_quant.RECIPES`` name. No dispatch, no warnings.
    """
    import sage_quant

    pack = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, None, None, is_causal=is_causal, scale=scale,
                           return_lse=return_lse)
    o, lse = _each_sequence(q, k, v, pack, return_lse, lambda qs, ks, vs: sage_quant.emulate(
        qs, ks, vs, recipe, layout="bshd", is_causal=bool(is_causal), scale=api._as_scale(scale),
        return_lse=bool(return_lse), **options))
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- sageattn_varlen


def sageattn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, is_causal: bool = False,
                    sm_scale: float | None = None, smooth_k: bool = True, **kwargs: Any) -> torch.Tensor:
    """SageAttention-compatible varlen entry: ``from sage_torch import sageattn_varlen`` replaces
    ``from sageattention import sageattn_varlen`` (same argument names and order).

    ``q`` ``(total_q, h_q, d)``, ``k``/``v`` ``(total_k, h_kv, d)``; ``cu_seqlens_*`` int32 or int64
    (SageAttention accepts both; int64 is converted to int32 after a range check) on q's device.
    Runs :func:`attention_varlen` with ``recipe="auto"``. Differences from SageAttention, both on
    the side of exactness: the K smoothing mean is taken per sequence (SageAttention takes one mean
    over the whole pack), and ``is_causal`` with ``s_q != s_k`` in a sequence is bottom-right
    aligned (SageAttention documents causal for ``s_q == s_k`` only). Extra keywords: those of
    :func:`sage_torch.sageattn` (``smooth_v``, ``pv_accum_dtype``); anything else is a TypeError.
    Returns ``o`` ``(total_q, h_q, d)``.
    """
    cu_seqlens_q = _as_int32("cu_seqlens_q", cu_seqlens_q)
    cu_seqlens_k = _as_int32("cu_seqlens_k", cu_seqlens_k)
    if not isinstance(smooth_k, bool):
        raise TypeError(f"smooth_k must be a bool, got {type(smooth_k).__name__}")
    if "return_lse" in kwargs:
        raise TypeError("sageattn_varlen() has no return_lse (as SageAttention's); use "
                        "sage_torch.attention_varlen(..., return_lse=True)")
    probe = q[None] if isinstance(q, torch.Tensor) and q.dim() == 3 else None
    options = api._sageattn_options(probe, kwargs, "sageattn_varlen")
    if not smooth_k:  # True is every recipe's default: passing it would only make the fallback warn
        options["smooth_k"] = False
    return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=is_causal,
                            scale=sm_scale, recipe="auto", **options)


def _as_int32(name: str, cu: Any) -> Any:
    if isinstance(cu, torch.Tensor) and cu.dtype == torch.int64:
        if cu.numel() and (int(cu.max()) > torch.iinfo(torch.int32).max or int(cu.min()) < 0):
            raise ValueError(f"{name} (int64) holds values outside [0, 2**31 - 1]: packs that large are "
                             f"not supported")
        return cu.to(CU_SEQLENS_DTYPE)
    return cu

