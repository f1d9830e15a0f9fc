"""``QuantizedKVCache``: an INT8 KV cache and decode attention that reads it (issue 11).

A decode step re-quantizing a 16-bit cache through the prefill path costs more than it saves
(``recipe="auto"`` gives such calls to PyTorch's SDPA). This cache quantizes each token once, as
it is appended (INT8 per token of ``(K - k_mean) / k_chan`` and ``(V - v_mean) / v_chan``, the
means and channel equalizers fixed by the first append), and :meth:`QuantizedKVCache.attention` reads the 8-bit codes directly: half the bytes
of a bf16 cache. Recipe, arithmetic and oracle: :mod:`sage_quant.emulation.kvcache`.

On CUDA with ``sage_core``'s ``decode`` family the attention runs the split-KV kernel
(``sage_core.decode_s8``); anywhere else it runs the emulation and warns once (``strict=True``
or ``SAGE_STRICT=1``: an error instead).

    cache = sage_torch.QuantizedKVCache(batch=1, heads_kv=8, head_dim=128, capacity=8192,
                                        device="cuda", dtype=torch.bfloat16)
    cache.append(k_prompt, v_prompt)          # (b, h_kv, n, d); fixes the smoothing means
    o = cache.attention(q_prompt)             # prefill rows are fine too (causal, bottom-right)
    for step in ...:
        cache.append(k_t, v_t)                # (b, h_kv, 1, d)
        o_t = cache.attention(q_t)            # (b, h_q, 1, d), h_q a multiple of h_kv
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _dispatch

__all__ = ["QuantizedKVCache", "decode_kernel_available"]

_TILE = 64  # the kernel's key tile: capacity and split sizes are multiples of it
_HEAD_DIMS = (64, 128)
_DTYPES = (torch.float16, torch.bfloat16)
#: CTAs per SM assumed when sage_core cannot say (its occupancy query is the rule)
_CTAS_PER_SM_DEFAULT = 4
_available: dict[tuple, bool] = {}
_occupancy: dict[tuple, int] = {}


def decode_kernel_available(head_dim: int, device: torch.device | str | None = None) -> bool:
    """Whether ``sage_core.decode_s8`` holds the kernel for ``head_dim`` (and ``device`` is CUDA).
    Asked once per (head dim, device type): the answer cannot change within a process."""
    dev_type = torch.device(device).type if device is not None else "cuda"
    key = (head_dim, dev_type)
    ok = _available.get(key)
    if ok is None:
        ok = False
        if head_dim in _HEAD_DIMS and dev_type == "cuda" and torch.cuda.is_available():
            try:
                import sage_core

                ok = bool(sage_core.has_kernel(f"decode_s8_hdim{head_dim}")) and hasattr(sage_core._C, "decode_s8")
            except ImportError:
                ok = False
        _available[key] = ok
    return ok


def _append_kernel_available(head_dim: int, device: torch.device) -> bool:
    """``sage_core.kv_append_s8`` (one launch per append; else ~20 PyTorch ops, ~0.3 ms of host)."""
    key = ("append", head_dim, device.type)
    ok = _available.get(key)
    if ok is None:
        ok = False
        if head_dim in _HEAD_DIMS and device.type == "cuda" and torch.cuda.is_available():
            try:
                import sage_core

                ok = bool(sage_core.has_kernel("kv_append_s8")) and hasattr(sage_core._C, "kv_append_s8")
            except ImportError:
                ok = False
        _available[key] = ok
    return ok


def _bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhsd" else x.transpose(1, 2)


def _check_layout(layout: str) -> None:
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")


def split_tokens_for(length: int, ctas_without_split: int, slots: int) -> int:
    """Keys per split-KV CTA (whole 64-key tiles): as many splits as fill the GPU's resident CTA
    ``slots`` (SMs x CTAs per SM) in one wave and no more. A grid a little over one wave runs a
    second, nearly empty one: the first GPU run, sized for ~1.1 waves, read 2.1 TB/s at b=8, 16k."""
    tiles = math.ceil(length / _TILE)
    splits = max(1, min(tiles, slots // max(1, ctas_without_split)))
    return math.ceil(tiles / splits) * _TILE


class QuantizedKVCache:
    """INT8 K/V cache of fixed capacity for ``batch`` sequences of equal length.

    Args:
        batch, heads_kv, head_dim: cache shape (head dim 64 or 128 for the kernel; others run the
            emulation).
        capacity: tokens it can hold (rounded up to a multiple of 64).
        device, dtype: of the keys, values and queries it will see (float16 or bfloat16).
        strict: raise instead of warning when the attention cannot run the kernel
            (default: ``SAGE_STRICT``).

    Attributes: ``length`` (tokens held), ``k``/``v`` (int8 ``(batch, heads_kv, capacity, head_dim)``),
    ``k_scale``/``v_scale`` (float32 ``(batch, heads_kv, capacity)``), ``k_mean``/``v_mean`` (float32
    ``(batch, heads_kv, head_dim)``, None until the first append), ``k_chan``/``v_chan`` (the channel
    equalizers, likewise).
    """

    def __init__(self, batch: int, heads_kv: int, head_dim: int, capacity: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                 strict: Optional[bool] = None) -> None:
        for name, val in (("batch", batch), ("heads_kv", heads_kv), ("head_dim", head_dim), ("capacity", capacity)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        if strict is not None and not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool or None, got {type(strict).__name__}")
        self.batch, self.heads_kv, self.head_dim, self.dtype = batch, heads_kv, head_dim, dtype
        self.capacity = math.ceil(capacity / _TILE) * _TILE
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda" and dev.index is None:  # "cuda" means the current device, as tensors say it
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.strict = strict
        shape = (batch, heads_kv, self.capacity, head_dim)
        self.k = torch.zeros(shape, dtype=torch.int8, device=self.device)
        self.v = torch.zeros(shape, dtype=torch.int8, device=self.device)
        # unused slots keep scale 1: finite whatever the kernel's last tile reads past length
        self.k_scale = torch.ones(shape[:3], dtype=torch.float32, device=self.device)
        self.v_scale = torch.ones(shape[:3], dtype=torch.float32, device=self.device)
        self.k_mean: Optional[torch.Tensor] = None
        self.v_mean: Optional[torch.Tensor] = None
        self.k_chan: Optional[torch.Tensor] = None
        self.v_chan: Optional[torch.Tensor] = None
        self.length = 0

    def __repr__(self) -> str:
        return (f"QuantizedKVCache(batch={self.batch}, heads_kv={self.heads_kv}, head_dim={self.head_dim}, "
                f"length={self.length}/{self.capacity}, dtype={self.dtype}, device={self.device})")

    def reset(self) -> None:
        """Empty the cache (the next append fixes new means)."""
        self.length = 0
        self.k_mean = self.v_mean = self.k_chan = self.v_chan = None

    def _check_kv(self, x: torch.Tensor, what: str, layout: str) -> int:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{what} must be 4-D ({layout}), got shape {tuple(x.shape)}")
        xb = _bhsd(x, layout)
        b, h, n, d = xb.shape
        if (b, h, d) != (self.batch, self.heads_kv, self.head_dim):
            raise ValueError(f"{what} has (batch, heads, head_dim) = {(b, h, d)} in layout {layout!r}; "
                             f"the cache holds {(self.batch, self.heads_kv, self.head_dim)}")
        if x.dtype != self.dtype:
            raise TypeError(f"{what} dtype {x.dtype} differs from the cache's {self.dtype}")
        if x.device != self.device:
            raise ValueError(f"{what} is on {x.device}, the cache on {self.device}")
        if n < 1:
            raise ValueError(f"{what} holds no tokens")
        return n

    def append(self, k: torch.Tensor, v: torch.Tensor, *, layout: str = "bhsd") -> None:
        """Quantize ``n`` new tokens into the cache (``k``, ``v``: ``(b, h_kv, n, d)`` or ``bshd``).

        The first append fixes the smoothing means and channel equalizers (from its tokens:
        ``sage_quant.emulation.kvcache.kv_stats``). Runs PyTorch ops on the cache's device."""
        _check_layout(layout)
        n = self._check_kv(k, "k", layout)
        if self._check_kv(v, "v", layout) != n:
            raise ValueError(f"k and v hold different token counts ({n} vs {_bhsd(v, layout).shape[2]})")
        if self.length + n > self.capacity:
            raise ValueError(f"appending {n} tokens to {self.length} exceeds the capacity {self.capacity}")
        from sage_quant.emulation import kvcache as emu

        kb, vb = _bhsd(k, layout), _bhsd(v, layout)
        if self.k_mean is None:
            self.k_mean, self.k_chan = emu.kv_stats(kb)
            self.v_mean, self.v_chan = emu.kv_stats(vb)
        if _append_kernel_available(self.head_dim, self.device) and kb.stride(-1) == 1 and vb.stride(-1) == 1:
            import sage_core

            _, _, _dl, _stream = _kernel_fns()
            sage_core._C.kv_append_s8(_dl(kb), _dl(vb), _dl(self.k_mean), _dl(self.k_chan), _dl(self.v_mean),
                                      _dl(self.v_chan), _dl(self.k), _dl(self.v), _dl(self.k_scale),
                                      _dl(self.v_scale), start=self.length, stream=_stream(self.device))
            self.length += n
            return
        k8, ks = emu.quantize_kv_tokens(kb, self.k_mean, self.k_chan)
        v8, vs = emu.quantize_kv_tokens(vb, self.v_mean, self.v_chan)
        end = self.length + n
        self.k[:, :, self.length:end] = k8
        self.v[:, :, self.length:end] = v8
        self.k_scale[:, :, self.length:end] = ks
        self.v_scale[:, :, self.length:end] = vs
        self.length = end

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache's ``length`` tokens back in the cache dtype: ``(k, v)`` ``(b, h_kv, length, d)``
        (``codes * scale * chan + mean``), for a caller that needs plain K/V (a masked call)."""
        if self.length < 1:
            raise ValueError("the cache is empty")
        n = self.length

        def one(codes, scale, chan, mean):
            return ((codes[:, :, :n].to(torch.float32) * scale[:, :, :n, None]) * chan[:, :, None, :]
                    + mean[:, :, None, :]).to(self.dtype)
        return (one(self.k, self.k_scale, self.k_chan, self.k_mean),
                one(self.v, self.v_scale, self.v_chan, self.v_mean))

    def attention(self, q: torch.Tensor, *, is_causal: bool = True, scale: Optional[float] = None,
                  layout: str = "bhsd") -> torch.Tensor:
        """Attention of ``q`` (``(b, h_q, s_q, d)`` or ``bshd``, ``h_q`` a multiple of ``heads_kv``)
        over the cache's ``length`` tokens; ``is_causal``: query ``i`` of ``s_q`` sees keys
        ``j <= length - s_q + i`` (the queries are the last ``s_q`` tokens appended). Returns
        q's shape, dtype and layout."""
        _check_layout(layout)
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError(f"q must be a 4-D tensor ({layout}), got {getattr(q, 'shape', type(q).__name__)}")
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        qb = _bhsd(q, layout)
        b, h_q, s_q, d = qb.shape
        if b != self.batch or d != self.head_dim or h_q < 1 or h_q % self.heads_kv:
            raise ValueError(f"q has (batch, heads, head_dim) = {(b, h_q, d)}; the cache needs batch {self.batch}, "
                             f"head_dim {self.head_dim} and heads a multiple of {self.heads_kv}")
        if s_q < 1:
            raise ValueError("q holds no query rows")
        if q.dtype != self.dtype or q.device != self.device:
            raise ValueError(f"q ({q.dtype}, {q.device}) must match the cache ({self.dtype}, {self.device})")
        if self.length < 1:
            raise ValueError("the cache is empty: append keys and values first")
        if scale is None:
            scale = d ** -0.5
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < float(scale) < math.inf:
            raise ValueError(f"scale must be a positive finite float, got {scale!r}")
        if qb.stride(-1) != 1:
            qb = qb.contiguous()
        if decode_kernel_available(d, q.device):
            return self._kernel(q, qb, is_causal, float(scale), layout)
        strict = _dispatch._resolve_flags(None, self.strict)[1]
        why = (f"no sage_core decode kernel for head dim {d} on {q.device.type}"
               if d in _HEAD_DIMS else f"head dim {d} has no decode kernel (64, 128)")
        if strict:
            raise _dispatch.SageDispatchError(f"sage_torch strict mode: QuantizedKVCache.attention: {why}")
        _dispatch.warn_once(f"kvcache:{why}", f"sage_torch.QuantizedKVCache.attention: {why}; running the "
                            f"recipe's emulation (sage_quant.emulation.kvcache), which is slow.", stacklevel=3)
        from sage_quant.emulation import kvcache as emu

        o = emu.decode_attention(qb, self.k, self.k_scale, self.v, self.v_scale, self.v_mean, length=self.length,
                                 is_causal=is_causal, scale=float(scale), k_chan=self.k_chan,
                                 v_chan=self.v_chan).to(q.dtype)
        return o if layout == "bhsd" else o.transpose(1, 2).contiguous()

    def _kernel(self, q: torch.Tensor, qb: torch.Tensor, is_causal: bool, scale: float, layout: str) -> torch.Tensor:
        decode_s8, workspace_floats, _dl, _stream = _kernel_fns()
        b, h_q, s_q, d = qb.shape
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous in the caller's layout
        ob = _bhsd(o, layout)
        rows = (h_q // self.heads_kv) * s_q
        row_blocks = 1 if rows <= 4 else math.ceil(rows / 16)  # decode_s8_row_blocks
        split = split_tokens_for(self.length, b * self.heads_kv * row_blocks, _slots(q.device, d, q.dtype, rows))
        n_ws = workspace_floats(b, h_q, s_q, d, self.length, split)
        ws = torch.empty((n_ws,), dtype=torch.float32, device=q.device) if n_ws else None
        decode_s8(_dl(qb), _dl(self.k), _dl(self.v), _dl(self.k_scale), _dl(self.v_scale),
                               _dl(self.v_mean), _dl(self.k_chan), _dl(self.v_chan), _dl(ob), _dl(ws),
                               length=self.length, causal=is_causal,
                               scale_log2=scale * 1.4426950408889634, split_tokens=split,
                               stream=_stream(q.device))
        return o


_KERNEL_FNS: list = []


def _kernel_fns() -> tuple:
    """(decode_s8, decode_s8_workspace_floats, to-capsule, raw stream) looked up once: imports
    inside the per-call path cost ~2 us of a decode step's ~12 us of Python."""
    if not _KERNEL_FNS:
        import sage_core

        from .backends.sm90 import _dl, _stream  # DLPack capsules: ~1 us each instead of ~10

        _KERNEL_FNS[:] = [sage_core._C.decode_s8, sage_core._C.decode_s8_workspace_floats, _dl, _stream]
    return tuple(_KERNEL_FNS)


def _slots(device: torch.device, d: int, dtype: torch.dtype, rows: int) -> int:
    """Resident CTAs of the decode kernel on the whole GPU (SMs x occupancy), cached."""
    import sage_core

    idx = device.index if device.index is not None else torch.cuda.current_device()
    bucket = 1 if rows <= 1 else (4 if rows <= 4 else 16)  # the kernel's row-block configurations
    key = (idx, d, dtype, bucket)
    n = _occupancy.get(key)
    if n is None:
        per_sm = 0
        fn = getattr(sage_core._C, "decode_s8_ctas_per_sm", None)
        if fn is not None:
            per_sm = fn(d, "float16" if dtype == torch.float16 else "bfloat16", bucket, idx)
        n = _occupancy[key] = torch.cuda.get_device_properties(idx).multi_processor_count * (
            per_sm if per_sm > 0 else _CTAS_PER_SM_DEFAULT)
    return n

