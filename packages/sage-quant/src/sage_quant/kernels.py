"""Thin PyTorch wrappers over the ``sage_core`` quantization kernels.

Every function has the signature and return values of its ``sage_quant.reference`` counterpart
and agrees with it bit for bit (``docs/design/quant-formats.md``; the fp32 mean's summation
order is the one documented exception, so pass ``mean`` in to compare). Outputs are allocated
here with torch; ``sage_core`` only writes into them, on ``torch.cuda.current_stream()``.

Kernel limits (the reference has none of them): CUDA tensors, fp16/bf16 inputs, head dim
``d % 8 == 0``, at least one token; ``quant_fp4`` takes any number of leading dims (more than
2 before the last two are flattened, which may copy). Anything else raises ``TypeError``/``ValueError`` before any
launch. ``available(op)`` says whether an op can run here.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import reference as _ref

try:  # sage_core is optional: without it, available() is False and the functions raise.
    import sage_core as _core
except ImportError as _exc:  # pragma: no cover - depends on the install
    _core = None
    _core_import_error: Optional[BaseException] = _exc
else:
    _core_import_error = None

__all__ = [
    "OPS",
    "available",
    "token_mean",
    "block_mean",
    "quant_int",
    "quant_v_e4m3_t",
    "quant_v_s8",
    "quant_fp4",
]

# op (reference function name) -> sage_core kernel instantiations it needs.
OPS = {
    "token_mean": ("quant_mean",),
    "block_mean": ("quant_mean",),
    "quant_int": ("quant_int8", "quant_int4"),
    "quant_v_e4m3_t": ("quant_v",),
    "quant_v_s8": ("quant_v",),
    "quant_fp4": ("quant_fp4",),
}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_CHUNK = 8  # kernels read 8-element (16-byte) chunks of the head dim
_FP4_GROUP = {"nvfp4": _ref.kNvfp4Group, "mxfp4": _ref.kMxfp4Group}


def _alloc(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocates every output (tests replace it to poison outputs and guard their bounds)."""
    return torch.empty(shape, dtype=dtype, device=device)  # the one real allocation


def _positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def available(op: Optional[str] = None) -> bool:
    """True if ``sage_core`` is importable, has the kernels of ``op`` (one of ``OPS``; ``None``:
    every op) compiled in, and a CUDA device is visible to torch."""
    if op is not None and op not in OPS:
        raise ValueError(f"op must be None or one of {tuple(OPS)}, got {op!r}")
    if _core is None or not torch.cuda.is_available():
        return False
    names = OPS[op] if op is not None else tuple(n for v in OPS.values() for n in v)
    return all(_core.has_kernel(n) for n in names)


def _require(op: str) -> None:
    if _core is None:
        raise RuntimeError(f"sage_quant.kernels.{op}: sage_core is not installed ({_core_import_error})")
    missing = [n for n in OPS[op] if not _core.has_kernel(n)]
    if missing:
        info = _core.build_info()
        raise RuntimeError(
            f"sage_quant.kernels.{op}: kernel(s) {missing} not compiled into sage_core "
            f"(cuda_archs={info['cuda_archs']}); rebuild with SAGE_CUDA_ARCHS set, or use sage_quant.reference"
        )


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _check_input(x, name: str, op: str, ndim: Optional[int] = 4) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"{op}: {name} dtype {x.dtype} is not accepted by the CUDA kernel; accepted: float16, "
            "bfloat16 (sage_quant.reference also takes float32)"
        )
    if not x.is_cuda:
        raise ValueError(f"{op}: {name} must be a CUDA tensor, got device {x.device}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")


def _bhsd_view(x: torch.Tensor, layout: str, name: str, op: str) -> torch.Tensor:
    """Logical (b, h, s, d) view with a contiguous last dim (copy only if it is not)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    xl = _ref.to_bhsd(x.detach(), layout)  # validates layout first
    _check_input(x, name, op)
    b, h, s, d = xl.shape
    if min(b, h, s, d) < 1:
        raise ValueError(f"{op}: {name} needs every dim >= 1, got logical (b,h,s,d)={tuple(xl.shape)}")
    if d % _CHUNK != 0:
        raise ValueError(f"{op}: the CUDA kernel needs head dim d % 8 == 0, got d={d}")
    if xl.stride(-1) != 1:
        xl = xl.contiguous()
    return xl


def token_mean(x: torch.Tensor, layout: str = "bhsd") -> torch.Tensor:
    """Mean over all tokens: ``(b, h, d)`` float32 (see ``reference.token_mean``)."""
    _require("token_mean")
    xl = _bhsd_view(x, layout, "x", "token_mean")
    b, h, _, d = xl.shape
    out = _alloc((b, h, d), dtype=torch.float32, device=xl.device)
    _core.token_mean(xl, out, _stream(xl))
    return out


def block_mean(x: torch.Tensor, block: int, layout: str = "bhsd") -> torch.Tensor:
    """Mean over each block of ``block`` tokens: ``(b, h, ceil(s/block), d)`` float32."""
    _require("block_mean")
    block = _positive_int(block, "block")
    xl = _bhsd_view(x, layout, "x", "block_mean")
    b, h, s, d = xl.shape
    out = _alloc((b, h, -(-s // block), d), dtype=torch.float32, device=xl.device)
    _core.block_mean(xl, out, block, _stream(xl))
    return out


def quant_int(
    x: torch.Tensor,
    *,
    bits: int = 8,
    granularity: str = "per_thread",
    role: str = "q",
    block: Optional[int] = None,
    warp_rows: int = _ref.kMmaTileRows,
    mean: Optional[torch.Tensor] = None,
    mean_block: Optional[int] = None,
    layout: str = "bhsd",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """INT8/INT4 quantization of Q or K (see ``reference.quant_int``): ``(values, scale)``."""
    _require("quant_int")
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    _ref.num_scale_groups(1, granularity, role, block, warp_rows)  # the reference's argument checks
    if block is None:
        block = _ref.default_block(granularity, role)
    xl = _bhsd_view(x, layout, "x", "quant_int")
    b, h, s, d = xl.shape
    groups = _ref.num_scale_groups(s, granularity, role, block, warp_rows)
    mean_arg = None
    if mean is not None:
        if not isinstance(mean, torch.Tensor) or not mean.is_floating_point():
            raise TypeError(
                f"quant_int: mean must be None or a floating tensor (float32), got "
                f"{getattr(mean, 'dtype', type(mean).__name__)}"
            )
        mean_arg = mean.detach().to(device=xl.device, dtype=torch.float32).contiguous()
        if mean_block is None:
            mean_block = block if block is not None else 128
        if mean_arg.dim() == 4:
            mean_block = _positive_int(mean_block, "mean_block")
    values = _alloc((b, h, s, d if bits == 8 else d // 2),
                    dtype=torch.int8 if bits == 8 else torch.uint8, device=xl.device)
    scale = _alloc((b, h, groups), dtype=torch.float32, device=xl.device)
    _core.quant_int(
        xl, values, scale, mean_arg,
        bits=bits, granularity=granularity, role=role,
        block=int(block) if block is not None else 0,
        warp_rows=int(warp_rows),
        mean_block=int(mean_block) if mean_block is not None else 1,
        stream=_stream(xl),
    )
    return values, scale


def quant_v_e4m3_t(v: torch.Tensor, layout: str = "bhsd",
                   mean: Optional[torch.Tensor] = None,
                   v_max: float = _ref.kFp8E4m3Max) -> Tuple[torch.Tensor, torch.Tensor]:
    """V per-channel E4M3, transposed (see ``reference.quant_v_e4m3_t``): ``(v_t, v_scale)``.
    ``mean``: optional (b, h, d) V smoothing mean; ``V' = fp32(V) - mean`` is quantized.
    ``v_max``: the code each channel's amax maps to (448; 2.25 for FP16-accumulated P̃V)."""
    _require("quant_v_e4m3_t")
    v_max = _ref.check_v_max(v_max)
    vl = _bhsd_view(v, layout, "v", "quant_v_e4m3_t")
    b, h, s, d = vl.shape
    mean_arg = None
    if mean is not None:
        if not isinstance(mean, torch.Tensor) or not mean.is_floating_point():
            raise TypeError(f"quant_v_e4m3_t: mean must be None or a float32 tensor, got "
                            f"{getattr(mean, 'dtype', type(mean).__name__)}")
        if tuple(mean.shape) != (b, h, d):
            raise ValueError(f"V mean must be (b, h, d) = {(b, h, d)}, got shape {tuple(mean.shape)}")
        mean_arg = mean.detach().to(device=vl.device, dtype=torch.float32).contiguous()
    s_pad = -(-s // _ref.kVTokenPad) * _ref.kVTokenPad
    values = _alloc((b, h, d, s_pad), dtype=torch.uint8, device=vl.device)
    scale = _alloc((b, h, d), dtype=torch.float32, device=vl.device)
    _core.quant_v_e4m3_t(vl, values, scale, mean_arg, _stream(vl), v_max=v_max)
    return values, scale


def quant_v_s8(v: torch.Tensor, layout: str = "bhsd") -> Tuple[torch.Tensor, torch.Tensor]:
    """V per-channel INT8 (see ``reference.quant_v_s8``): ``(values, scale)``."""
    _require("quant_v_s8")
    vl = _bhsd_view(v, layout, "v", "quant_v_s8")
    b, h, s, d = vl.shape
    values = _alloc((b, h, s, d), dtype=torch.int8, device=vl.device)
    scale = _alloc((b, h, d), dtype=torch.float32, device=vl.device)
    _core.quant_v_s8(vl, values, scale, _stream(vl))
    return values, scale


def quant_fp4(x: torch.Tensor, fmt: str = "nvfp4", swizzled: bool = False,
              mean: Optional[torch.Tensor] = None, mean_block: Optional[int] = None,
              n_pad: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 (two levels) / MXFP4 along the last dim (see ``reference.quant_fp4``):
    ``(packed, scales, tensor_scale)``, tensor_scale float32 ``x.shape[:-2]``. ``mean`` (float32
    smoothing mean of a 4-D x) and ``n_pad`` (zero padding of the last dim) as the reference."""
    _require("quant_fp4")
    if fmt not in _FP4_GROUP:
        raise ValueError(f"fmt must be 'nvfp4' or 'mxfp4', got {fmt!r}")
    _check_input(x, "x", "quant_fp4", ndim=None)
    if x.dim() < 1:
        raise ValueError("quant_fp4: x must have at least one dimension")
    group = _FP4_GROUP[fmt]
    n_in = x.shape[-1]
    n = n_in if n_pad is None else int(n_pad)
    if n_pad is not None and (isinstance(n_pad, bool) or not isinstance(n_pad, int) or n_pad < n_in):
        raise ValueError(f"quant_fp4: n_pad must be an int >= the last dim ({n_in}), got {n_pad!r}")
    if mean is not None and (x.dim() != 4 or n_pad is not None):
        raise ValueError("quant_fp4: mean needs a 4-D (b, h, s, d) x and no n_pad")
    if n % group != 0:
        raise ValueError(f"{fmt} quantizes groups of {group} along the last dim: n={n} is not a multiple")
    lead = tuple(x.shape[:-1])
    rows = math.prod(lead)
    ng = n // group
    xk = x.detach()
    if xk.dim() > 4:  # keep the last two dims: the tensor scale is per matrix of them
        xk = xk.reshape(-1, x.shape[-2], n_in)
    packed = _alloc((*lead, n // 2), dtype=torch.uint8, device=x.device)
    if swizzled:
        nbytes = -(-rows // 128) * 128 * (-(-ng // 4) * 4)
        scales = _alloc((nbytes,), dtype=torch.uint8, device=x.device)
    else:
        scales = _alloc((*lead, ng), dtype=torch.uint8, device=x.device)
    tensor_scale = _alloc(tuple(x.shape[:-2]), dtype=torch.float32, device=x.device)
    if rows == 0 or n == 0:
        return packed, scales.zero_(), tensor_scale.fill_(1.0)
    mean_arg = None
    if mean is not None:
        mean_arg = mean.detach().to(device=x.device, dtype=torch.float32).contiguous()
    _core.quant_fp4(xk, packed.view(*xk.shape[:-1], n // 2), scales if swizzled else scales.view(*xk.shape[:-1], ng),
                    tensor_scale.view(xk.shape[:-2]), fmt, bool(swizzled), _stream(x), mean=mean_arg,
                    mean_block=int(mean_block or 0), n_pad=0 if n_pad is None else n)
    return packed, scales, tensor_scale
