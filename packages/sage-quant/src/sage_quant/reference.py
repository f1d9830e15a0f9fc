"""Bit-exact PyTorch references of the quantized tensor formats.

The contract is ``docs/design/quant-formats.md``: every function here must agree bit for bit
with the CUDA quantization kernels in ``kernels/include/sage/quant/`` (exposed by ``sage_core``)
given the same inputs (and the same precomputed token mean, whose fp32 summation order is the
one documented exception).

All math is float32 on the fp16/bf16 input converted exactly to float32. Divisions are IEEE
divisions (never a multiply by a reciprocal), rounding is ``torch.round`` (half to even).
Functions run on any device.

Shapes: ``layout="bhsd"`` means the tensor passed is ``(b, h, s, d)``; ``layout="bshd"`` means
it is ``(b, s, h, d)``. Quantized outputs are always contiguous ``(b, h, s, d)`` (or the packed /
transposed forms documented per function).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "kInt8Max",
    "kInt4Max",
    "kFp8E4m3Max",
    "kFp4E2m1Max",
    "kNvfp4Group",
    "kMxfp4Group",
    "kVTokenPad",
    "check_v_max",
    "GRANULARITIES",
    "to_bhsd",
    "token_mean",
    "block_mean",
    "default_block",
    "num_scale_groups",
    "scale_group_index",
    "quant_int",
    "dequant_int",
    "pack_int4",
    "unpack_int4",
    "quant_v_e4m3_t",
    "dequant_v_e4m3_t",
    "quant_v_s8",
    "e4m3_to_float",
    "float_to_e4m3",
    "float_to_e2m1_code",
    "e2m1_code_to_float",
    "quant_fp4",
    "dequant_fp4",
    "fake_quant_fp4",
    "fake_quant_fp4_blocks",
    "fake_quant_fp4_parts",
    "fp4_tensor_scale",
    "e2m1_round",
    "swizzle_scale_offsets",
    "v_fp16_range_scale",
    "swizzle_scales",
    "unswizzle_scales",
]

kInt8Max = 127
kInt4Max = 7
kFp8E4m3Max = 448.0
kFp4E2m1Max = 6.0
kNvfp4Group = 16
kMxfp4Group = 32
kVTokenPad = 128  # v_e4m3_t token padding: the PV matmul's K-tile
kE8m0Bias = 127
kE8m0Nan = 0xFF
kE4m3Nan = 0x7F
# Two-level NVFP4: the matrix amax maps to 448 * 6, so the largest E4M3 group scale is 448.
kFp4TensorScaleTarget = kFp8E4m3Max * kFp4E2m1Max
kFp32MinNormal = 2.0 ** -126
kSwizzleTileRows = 128
kSwizzleTileCols = 4
kSwizzleTileBytes = kSwizzleTileRows * kSwizzleTileCols  # 512
kMmaTileRows = 16  # rows of one mma.sync m16 / wgmma m64 sub-tile a warp owns
kQThreadGroups = 8  # rows r and r+8 of a 16-row tile share a thread: 8 groups per 16 rows
kKThreadGroups = 4  # key columns 8j + 2(lane%4) + {0,1}: 4 groups per key tile

GRANULARITIES = ("per_tensor", "per_block", "per_warp", "per_thread", "per_token")
_LAYOUTS = ("bhsd", "bshd")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# E2M1 magnitudes by code 0..7 (bit 3 is the sign).
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")


def _check_float_tensor(x, name: str, ndim: Optional[int] = 4) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16 (or float32 for references), got {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def to_bhsd(x: torch.Tensor, layout: str = "bhsd") -> torch.Tensor:
    """View a (b,h,s,d) or (b,s,h,d) tensor as logical (b,h,s,d) (no copy)."""
    _check_layout(layout)
    return x if layout == "bhsd" else x.transpose(1, 2)


def _f32_bhsd(x: torch.Tensor, layout: str, name: str = "x") -> torch.Tensor:
    _check_float_tensor(x, name)
    return to_bhsd(x, layout).to(torch.float32)


# --------------------------------------------------------------------------------------------
# V in FP16 range (qk_s8_pv_f16)
# --------------------------------------------------------------------------------------------
kF16Max = 65504.0


def v_fp16_range_scale(v: torch.Tensor, layout: str = "bhsd") -> torch.Tensor:
    """Per (b, h, channel) power of two ``f >= 1``, float32 ``(b, h, d)``, such that
    ``amax_tokens|V| / f <= 65504`` (FP16's max).

    ``qk_s8_pv_f16`` computes P·V with FP16 V; a bf16 (or fp32) V channel above FP16's range
    would become Inf and poison every row. The recipe divides such a channel by ``f`` before the
    FP16 conversion and multiplies O's channel by ``f`` in the epilogue (both exact: powers of
    two). ``f = 1`` for every channel already in range (then nothing changes), and for channels
    whose amax is NaN or Inf (NaN/Inf propagate as before)."""
    amax = _f32_bhsd(v, layout, "v").abs().amax(dim=2)
    e = torch.ceil(torch.log2(amax / kF16Max)).clamp(min=0)
    e = torch.where(torch.isfinite(amax), e, torch.zeros_like(e))
    f = torch.exp2(e)
    f = torch.where(torch.isfinite(amax) & (amax / f > kF16Max), f * 2, f)  # log2 rounding at a power of two
    return f.contiguous()


# --------------------------------------------------------------------------------------------
# token means (smoothing)
# --------------------------------------------------------------------------------------------
def token_mean(x: torch.Tensor, layout: str = "bhsd") -> torch.Tensor:
    """Mean over all tokens: ``(b, h, d)`` float32 (K smoothing's ``k_mean``)."""
    xf = _f32_bhsd(x, layout)
    if xf.shape[2] == 0:
        raise ValueError("token_mean needs at least one token (s >= 1)")
    return xf.mean(dim=2).contiguous()


def block_mean(x: torch.Tensor, block: int, layout: str = "bhsd") -> torch.Tensor:
    """Mean over each block of ``block`` tokens: ``(b, h, ceil(s/block), d)`` float32.

    The last block averages only its valid tokens (Q smoothing's ``q_mean``).
    """
    xf = _f32_bhsd(x, layout)
    block = _check_positive_int(block, "block")
    b, h, s, d = xf.shape
    if s == 0:
        raise ValueError("block_mean needs at least one token (s >= 1)")
    nb = -(-s // block)
    pad = nb * block - s
    xp = torch.nn.functional.pad(xf, (0, 0, 0, pad)) if pad else xf
    sums = xp.reshape(b, h, nb, block, d).sum(dim=3)
    counts = torch.full((nb,), float(block), dtype=torch.float32, device=xf.device)
    counts[-1] = float(s - (nb - 1) * block)
    return (sums / counts[:, None]).contiguous()


def _check_positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


# --------------------------------------------------------------------------------------------
# integer Q/K scale groups
# --------------------------------------------------------------------------------------------
def default_block(granularity: str, role: str) -> Optional[int]:
    """Default token block: Q 128; K 64 for per_block, 128 for per_thread (the kernel's KV tile)."""
    if granularity not in ("per_block", "per_thread"):
        return None
    if role == "q":
        return 128
    return 64 if granularity == "per_block" else 128


def _resolve_group_args(granularity: str, role: str, block: Optional[int], warp_rows: int):
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if role not in ("q", "k"):
        raise ValueError(f"role must be 'q' or 'k', got {role!r}")
    if granularity == "per_warp" and role != "q":
        raise ValueError("granularity 'per_warp' is defined for role 'q' only")
    if block is None:
        block = default_block(granularity, role)
    elif granularity in ("per_block", "per_thread"):
        block = _check_positive_int(block, "block")
    if granularity == "per_thread" and role == "k" and block % 8 != 0:
        raise ValueError(f"per_thread K needs block % 8 == 0 (key tile of 8-column MMA atoms), got {block}")
    warp_rows = _check_positive_int(warp_rows, "warp_rows")
    return block, warp_rows


def num_scale_groups(s: int, granularity: str, role: str = "q", block: Optional[int] = None,
                     warp_rows: int = kMmaTileRows) -> int:
    """Number of scales per (b, h) for a sequence of ``s`` tokens (last dim of the scale tensor)."""
    block, warp_rows = _resolve_group_args(granularity, role, block, warp_rows)
    if granularity == "per_tensor":
        return 1
    if granularity == "per_block":
        return -(-s // block)
    if granularity == "per_warp":
        return -(-s // warp_rows)
    if granularity == "per_token":
        return s
    if role == "q":  # per_thread
        return -(-s // kMmaTileRows) * kQThreadGroups
    return -(-s // block) * kKThreadGroups


def scale_group_index(s: int, granularity: str, role: str = "q", block: Optional[int] = None,
                      warp_rows: int = kMmaTileRows, device=None) -> torch.Tensor:
    """Scale group of each token: LongTensor ``(s,)`` (the table in quant-formats.md)."""
    block, warp_rows = _resolve_group_args(granularity, role, block, warp_rows)
    t = torch.arange(s, dtype=torch.long, device=device)
    if granularity == "per_tensor":
        return torch.zeros_like(t)
    if granularity == "per_block":
        return t // block
    if granularity == "per_warp":
        return t // warp_rows
    if granularity == "per_token":
        return t
    if role == "q":
        return (t // kMmaTileRows) * kQThreadGroups + t % kQThreadGroups
    return (t // block) * kKThreadGroups + (t % 8) // 2


def _group_amax(a: torch.Tensor, granularity: str, role: str, block: Optional[int],
                warp_rows: int) -> torch.Tensor:
    """amax of |x'| per scale group. ``a`` is |x'| (b,h,s,d) f32 -> (b,h,G) f32.

    Reshape-based (zero padding never changes an amax of absolute values; NaN propagates).
    """
    b, h, s, d = a.shape

    def padded(mult):
        n = -(-s // mult) * mult
        return torch.nn.functional.pad(a, (0, 0, 0, n - s)) if n != s else a, n // mult

    if granularity == "per_tensor":
        return a.reshape(b, h, s * d).amax(dim=2, keepdim=True)
    if granularity == "per_token":
        return a.amax(dim=3)
    if granularity in ("per_block", "per_warp"):
        mult = block if granularity == "per_block" else warp_rows
        ap, nb = padded(mult)
        return ap.reshape(b, h, nb, mult * d).amax(dim=3)
    if role == "q":  # per_thread: token 16*i + 8*hi + r  -> group 8*i + r
        ap, nt = padded(kMmaTileRows)
        return ap.reshape(b, h, nt, 2, kQThreadGroups, d).amax(dim=(3, 5)).reshape(b, h, nt * kQThreadGroups)
    # per_thread K: token blk*n + 8*i + 2*j + e -> group 4*n + j
    ap, nb = padded(block)
    return (
        ap.reshape(b, h, nb, block // 8, kKThreadGroups, 2, d)
        .amax(dim=(3, 5, 6))
        .reshape(b, h, nb * kKThreadGroups)
    )


def _expand_mean(mean, b, h, s, d, mean_block, device) -> torch.Tensor:
    """Mean tensor broadcast to (b,h,s,d) float32 (or (b,h,1,d))."""
    if not isinstance(mean, torch.Tensor):
        raise TypeError(f"mean must be None or a torch.Tensor, got {type(mean).__name__}")
    if not mean.is_floating_point():
        raise TypeError(f"mean must be a floating tensor (float32), got {mean.dtype}")
    m = mean.to(device=device, dtype=torch.float32)
    if m.dim() == 3:
        if tuple(m.shape) != (b, h, d):
            raise ValueError(f"mean of shape (b,h,d)={(b, h, d)} expected, got {tuple(m.shape)}")
        return m[:, :, None, :]
    if m.dim() == 4:
        mean_block = _check_positive_int(mean_block, "mean_block")
        nb = -(-s // mean_block)
        if tuple(m.shape) != (b, h, nb, d):
            raise ValueError(
                f"block mean of shape (b,h,ceil(s/mean_block),d)={(b, h, nb, d)} expected "
                f"(mean_block={mean_block}), got {tuple(m.shape)}"
            )
        idx = torch.arange(s, device=device) // mean_block
        return m[:, :, idx, :]
    raise ValueError(f"mean must be (b,h,d) or (b,h,nb,d), got shape {tuple(m.shape)}")


def quant_int(
    x: torch.Tensor,
    *,
    bits: int = 8,
    granularity: str = "per_thread",
    role: str = "q",
    block: Optional[int] = None,
    warp_rows: int = kMmaTileRows,
    mean: Optional[torch.Tensor] = None,
    mean_block: Optional[int] = None,
    layout: str = "bhsd",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8/INT4 quantization of Q or K with the given scale granularity.

    Args:
        x: ``(b, h, s, d)`` (``layout="bhsd"``) or ``(b, s, h, d)`` (``"bshd"``), fp16/bf16/fp32.
        bits: 8 (qmax 127) or 4 (qmax 7).
        granularity: one of ``GRANULARITIES``; role ``"q"``/``"k"`` picks the per-thread layout.
        block: token block for per_block / per_thread (defaults: Q 128; K 64 per_block, 128 per_thread).
        warp_rows: rows of a per_warp group (16).
        mean: optional smoothing mean subtracted first: ``(b, h, d)`` (token mean) or
            ``(b, h, ceil(s/mean_block), d)`` (block means). float32.
        mean_block: tokens per mean block for a 4-D mean (default: ``block``, else 128).

    Returns:
        ``(values, scale)``: values int8 ``(b, h, s, d)`` for 8 bits, uint8 ``(b, h, s, d/2)``
        (packed two's complement nibbles, element 2i low) for 4 bits; scale float32
        ``(b, h, G)`` with ``G = num_scale_groups(s, ...)``. Both contiguous.
    """
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    block, warp_rows = _resolve_group_args(granularity, role, block, warp_rows)
    xf = _f32_bhsd(x, layout)
    b, h, s, d = xf.shape
    if bits == 4 and d % 2 != 0:
        raise ValueError(f"INT4 packs two values per byte: head dim d must be even, got {d}")
    if mean is not None:
        if mean_block is None:
            mean_block = block if block is not None else 128
        xf = xf - _expand_mean(mean, b, h, s, d, mean_block, xf.device)
    qmax = kInt8Max if bits == 8 else kInt4Max
    amax = _group_amax(xf.abs(), granularity, role, block, warp_rows)
    scale = _ieee_div(amax, float(qmax))
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    idx = scale_group_index(s, granularity, role, block, warp_rows, device=xf.device)
    per_token_scale = scale[:, :, idx, None]  # (b,h,s,1)
    q = torch.round(xf / per_token_scale).clamp_(-qmax, qmax)
    # NaN -> int conversion is undefined; the contract leaves values of a non-finite group
    # unspecified, we pick 0 so the reference is deterministic.
    q = torch.nan_to_num(q, nan=0.0).to(torch.int8)
    if bits == 4:
        q = pack_int4(q)
    return q.contiguous(), scale.contiguous()


def dequant_int(
    values: torch.Tensor,
    scale: torch.Tensor,
    *,
    bits: int,
    granularity: str,
    role: str,
    block: Optional[int] = None,
    warp_rows: int = kMmaTileRows,
    seq_len: int,
) -> torch.Tensor:
    """Inverse of ``quant_int`` (without adding any smoothing mean back): float32 ``(b, h, s, d)``."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    block, warp_rows = _resolve_group_args(granularity, role, block, warp_rows)
    if values.dim() != 4:
        raise ValueError(f"values must be 4-D (b,h,s,d or d/2), got shape {tuple(values.shape)}")
    if bits == 8:
        if values.dtype != torch.int8:
            raise TypeError(f"INT8 values must be int8, got {values.dtype}")
        q = values
    else:
        q = unpack_int4(values)
    if q.shape[2] != seq_len:
        raise ValueError(f"values hold {q.shape[2]} tokens but seq_len={seq_len}")
    g = num_scale_groups(seq_len, granularity, role, block, warp_rows)
    if scale.dim() != 3 or tuple(scale.shape) != (q.shape[0], q.shape[1], g):
        raise ValueError(f"scale must be (b,h,{g}) for this granularity, got {tuple(scale.shape)}")
    idx = scale_group_index(seq_len, granularity, role, block, warp_rows, device=q.device)
    return q.to(torch.float32) * scale.to(torch.float32)[:, :, idx, None]


# --------------------------------------------------------------------------------------------
# INT4 packing
# --------------------------------------------------------------------------------------------
def pack_int4(x: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dim even -> uint8 ``(..., n/2)``, element 2i in the low nibble."""
    if x.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 values, got {x.dtype}")
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"pack_int4 needs an even last dim, got {x.shape[-1]}")
    u = x.to(torch.int16) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8).contiguous()


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., n/2)`` -> int8 ``(..., n)`` (sign-extended two's complement nibbles)."""
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8 packed values, got {p.dtype}")
    u = p.to(torch.int16)
    lo = u & 0xF
    hi = (u >> 4) & 0xF
    both = torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


# --------------------------------------------------------------------------------------------
# FP8 E4M3
# --------------------------------------------------------------------------------------------
def float_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> E4M3 bits (uint8), round to nearest even, saturate to +-448 (satfinite); NaN -> 0x7F."""
    return x.to(torch.float32).clamp(-kFp8E4m3Max, kFp8E4m3Max).to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_to_float(bits: torch.Tensor) -> torch.Tensor:
    """E4M3 bits (uint8) -> float32 (exact)."""
    if bits.dtype == torch.float8_e4m3fn:
        return bits.to(torch.float32)
    if bits.dtype != torch.uint8:
        raise TypeError(f"e4m3_to_float expects uint8 bits, got {bits.dtype}")
    return bits.view(torch.float8_e4m3fn).to(torch.float32)



def _ieee_div(a: torch.Tensor, c: float) -> torch.Tensor:
    """a / c, correctly rounded on every device. PyTorch's CUDA division by a Python scalar
    multiplies by the reciprocal (not bit-exact with the kernels' __fdiv_rn); tensor / tensor
    is a true division on CPU and CUDA alike."""
    return a / torch.full_like(a, c)


def _channel_scale(vf: torch.Tensor, qmax: float) -> torch.Tensor:
    amax = vf.abs().amax(dim=2)  # (b,h,d)
    scale = _ieee_div(amax, qmax)
    return torch.where(amax == 0, torch.ones_like(scale), scale).contiguous()


def check_v_max(v_max) -> float:
    """``v_max`` of the E4M3 V quantizers: a float in (0, 448] (ValueError otherwise)."""
    if isinstance(v_max, bool) or not isinstance(v_max, (int, float)) or not 0.0 < float(v_max) <= kFp8E4m3Max:
        raise ValueError(f"v_max must be a float in (0, {kFp8E4m3Max:g}], got {v_max!r}")
    return float(v_max)


def quant_v_e4m3_t(v: torch.Tensor, layout: str = "bhsd",
                   mean: Optional[torch.Tensor] = None,
                   v_max: float = kFp8E4m3Max) -> Tuple[torch.Tensor, torch.Tensor]:
    """V per-channel E4M3, transposed for K-major 8-bit B operands.

    Returns ``(v_t, v_scale)``: ``v_t`` uint8 E4M3 bits ``(b, h, d, s_pad)``,
    ``s_pad = ceil(s/128)*128``, padding 0; ``v_scale`` float32 ``(b, h, d)`` = amax/v_max
    (1.0 for an all-zero channel). ``v_t[..., c, t] = E4M3(V[..., t, c] / v_scale[c])``.

    ``v_max`` (default 448, E4M3's largest finite value): the code each channel's amax maps to.
    A smaller one bounds |V̂| so that a P̃V block cannot overflow an FP16 accumulator (the
    ``pv_accum="f16_buffer"`` recipes use 2.25: 64 keys x 448 x 2.25 = 64512 < 65504).

    ``mean``: optional float32 ``(b, h, d)`` V smoothing mean (``token_mean(v)``). With it, V is
    replaced by ``V' = fp32(V) - mean`` (one fp32 subtraction) before the amax and the division;
    the consumer adds ``mean`` back to the attention output (softmax rows sum to 1).
    """
    v_max = check_v_max(v_max)
    vf = _f32_bhsd(v, layout, "v")
    b, h, s, d = vf.shape
    if mean is not None:
        if isinstance(mean, torch.Tensor) and mean.dim() != 3:
            raise ValueError(f"V mean must be (b, h, d) = {(b, h, d)}, got shape {tuple(mean.shape)}")
        vf = vf - _expand_mean(mean, b, h, s, d, None, vf.device)
    scale = _channel_scale(vf, v_max)
    codes = float_to_e4m3(vf / scale[:, :, None, :])  # (b,h,s,d)
    s_pad = -(-s // kVTokenPad) * kVTokenPad
    out = torch.zeros((b, h, d, s_pad), dtype=torch.uint8, device=vf.device)
    out[:, :, :, :s] = codes.transpose(2, 3)
    return out, scale


def dequant_v_e4m3_t(v_t: torch.Tensor, v_scale: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Inverse of ``quant_v_e4m3_t``: float32 ``(b, h, s, d)``."""
    vals = e4m3_to_float(v_t[:, :, :, :seq_len]).transpose(2, 3)
    return vals * v_scale[:, :, None, :]


def quant_v_s8(v: torch.Tensor, layout: str = "bhsd") -> Tuple[torch.Tensor, torch.Tensor]:
    """V per-channel INT8 (INT-FlashAttention): int8 ``(b, h, s, d)``, scale ``(b, h, d)`` = amax/127."""
    vf = _f32_bhsd(v, layout, "v")
    scale = _channel_scale(vf, float(kInt8Max))
    q = torch.round(vf / scale[:, :, None, :]).clamp_(-kInt8Max, kInt8Max)
    q = torch.nan_to_num(q, nan=0.0).to(torch.int8)
    return q.contiguous(), scale


# --------------------------------------------------------------------------------------------
# FP4 E2M1 and microscaling
# --------------------------------------------------------------------------------------------
def float_to_e2m1_code(y: torch.Tensor) -> torch.Tensor:
    """float32 -> E2M1 code (uint8, 0..15): RN on {0,.5,1,1.5,2,3,4,6}, ties to the even code,
    saturate at 6, sign bit 0x8 whenever the sign bit of ``y`` is set (so negatives that round
    to 0, and -0.0, give 0x8). NaN gives 0x0 or 0x8 (unspecified by the contract)."""
    y = y.to(torch.float32)
    a = y.abs()
    # Thresholds between neighbouring codes; '>' sends a tie down, '>=' up, so that ties
    # land on the even code (0.25->0, 0.75->2, 1.25->2, 1.75->4, 2.5->4, 3.5->6, 5->6).
    code = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75).to(torch.uint8)
        + (a > 1.25).to(torch.uint8)
        + (a >= 1.75).to(torch.uint8)
        + (a > 2.5).to(torch.uint8)
        + (a >= 3.5).to(torch.uint8)
        + (a > 5.0).to(torch.uint8)
    )
    return code | (torch.signbit(y).to(torch.uint8) << 3)


def e2m1_code_to_float(code: torch.Tensor) -> torch.Tensor:
    """E2M1 code (uint8 0..15) -> float32."""
    table = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=code.device)
    c = code.to(torch.long)
    mag = table[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def _fp4_group(fmt: str) -> int:
    if fmt == "nvfp4":
        return kNvfp4Group
    if fmt == "mxfp4":
        return kMxfp4Group
    raise ValueError(f"fmt must be 'nvfp4' or 'mxfp4', got {fmt!r}")


def _pow2_f32(e: torch.Tensor) -> torch.Tensor:
    """Exact 2**e as float32 for integer e in [-127, 127] (2**-127 is subnormal)."""
    e = e.to(torch.int32)
    normal = ((e + 127).clamp(min=1) << 23).view(torch.float32)
    sub = torch.full_like(e, 1 << 22).view(torch.float32)  # 2**-127
    return torch.where(e >= -126, normal, sub)


def fp4_tensor_scale(x: torch.Tensor, fmt: str = "nvfp4") -> torch.Tensor:
    """Second-level FP32 scale of two-level NVFP4: one per matrix of the last two dims of ``x``,
    float32 ``x.shape[:-2]`` (per (b, h) for Q/K ``(b, h, s, d)`` and for ``Vᵀ`` ``(b, h, d, s)``).

    ``g = amax / (448 * 6)`` (IEEE division) with ``amax`` the largest *finite* ``|x|`` of the
    matrix, so the largest group scale lands on E4M3's max (448) and the others use its whole
    range; raised to 2**-126 when smaller (a subnormal ``g`` would no longer map amax to about
    2688) and 1 when ``amax == 0``. Non-finite elements are skipped so that they poison only their
    own group (``quant_fp4`` gives that group a NaN scale), not every group of the matrix.
    MXFP4 has no second level (its E8M0 scales span 2**±127): all ones.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _fp4_group(fmt)
    lead = x.shape[:-2]
    if fmt == "mxfp4":
        return torch.ones(lead, dtype=torch.float32, device=x.device)
    m = x.shape[-2] if x.dim() >= 2 else 1
    xf = x.to(torch.float32).reshape(*lead, m * x.shape[-1])
    finite = torch.where(torch.isfinite(xf), xf.abs(), torch.zeros_like(xf))
    if finite.shape[-1] == 0:
        return torch.ones(lead, dtype=torch.float32, device=x.device)
    amax = finite.amax(dim=-1)
    g = _ieee_div(amax, kFp4TensorScaleTarget).clamp(min=kFp32MinNormal)
    return torch.where(amax == 0, torch.ones_like(g), g).contiguous()


def _tensor_scale_for_groups(g: torch.Tensor, x_dim: int) -> torch.Tensor:
    """g ``x.shape[:-2]`` broadcast against groups ``(*x.shape[:-1], n/group, group)``."""
    return g.reshape(*g.shape, *([1] * (min(x_dim, 2) + 1)))


def fp4_input(x: torch.Tensor, mean: Optional[torch.Tensor] = None, mean_block: Optional[int] = None,
              n_pad: Optional[int] = None) -> torch.Tensor:
    """The matrix ``quant_fp4`` quantizes given its options: ``fp32(x) - mean`` for a smoothing
    ``mean`` of a 4-D ``(b, h, s, d)`` x (``(b, h, d)``, or ``(b, h, ceil(s/mean_block), d)``: the
    mean of token t's block), or x with its last dim zero-padded to ``n_pad``; x itself otherwise."""
    if mean is not None:
        if x.dim() != 4:
            raise ValueError(f"quant_fp4: mean needs a 4-D (b, h, s, d) x, got shape {tuple(x.shape)}")
        if n_pad is not None:
            raise ValueError("quant_fp4: mean and n_pad cannot be combined")
        b, h, s, d = x.shape
        return x.to(torch.float32) - _expand_mean(mean, b, h, s, d, mean_block, x.device)
    if n_pad is not None:
        n = x.shape[-1]
        if isinstance(n_pad, bool) or not isinstance(n_pad, int) or n_pad < n:
            raise ValueError(f"quant_fp4: n_pad must be an int >= the last dim ({n}), got {n_pad!r}")
        return torch.nn.functional.pad(x.to(torch.float32), (0, n_pad - n))
    return x


def quant_fp4(x: torch.Tensor, fmt: str = "nvfp4", swizzled: bool = False,
              mean: Optional[torch.Tensor] = None, mean_block: Optional[int] = None,
              n_pad: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Microscaling FP4 along the last dim of ``x`` (``(..., m, n)``).

    ``mean`` / ``mean_block`` (Q/K smoothing) and ``n_pad`` (a V^T of any token count): see
    ``fp4_input``, which gives the matrix that is quantized.

    NVFP4 (two levels, as NVIDIA defines it): ``g = fp4_tensor_scale(x)`` per matrix of the last
    two dims; ``y = x / g`` (IEEE division); groups of 16 along the last dim of ``y``, scale
    ``E4M3(amax(y) / 6)`` (RN, satfinite) or the E4M3 NaN 0x7F when the group's amax is not finite
    (an Inf must not saturate to a finite value), values ``E2M1(y / s)`` with s the decoded scale
    (``s == 0`` -> all codes 0). Decoded: ``x ≈ E2M1 · s · g``. MXFP4 (OCP, one level): groups of
    32, E8M0 scale ``e = clamp(floor(log2(amax)) - 2, -127, 127)`` stored as ``e + 127``
    (``amax == 0`` -> -127; non-finite amax -> 0xFF, the E8M0 NaN), values ``E2M1(x / 2**e)``,
    ``g = 1``. Codes of a non-finite group are unspecified.

    Returns ``(packed, scales, tensor_scale)``: packed uint8 ``(..., n/2)`` (element 2i low
    nibble); scales uint8 ``(..., n/group)`` row-major, or, with ``swizzled=True``, the 1-D
    Blackwell block-scaled layout of the scale matrix ``(prod(...), n/group)`` (see
    ``swizzle_scales``); tensor_scale float32 ``x.shape[:-2]``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    x = fp4_input(x, mean, mean_block, n_pad)
    group = _fp4_group(fmt)
    n = x.shape[-1]
    if n % group != 0:
        raise ValueError(f"{fmt} quantizes groups of {group} along the last dim: n={n} is not a multiple")
    lead = x.shape[:-1]
    g = fp4_tensor_scale(x, fmt)
    xf = x.to(torch.float32).reshape(*lead, n // group, group)
    if fmt == "nvfp4":
        xf = xf / _tensor_scale_for_groups(g, x.dim())
    s, scale_bits = _fp4_scales(xf, fmt)
    codes = float_to_e2m1_code(xf / s[..., None])
    if fmt == "nvfp4":
        codes = torch.where((s == 0)[..., None], torch.zeros_like(codes), codes)
    codes = codes.reshape(*lead, n)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    scale_bits = scale_bits.contiguous()
    if swizzled:
        scale_bits = swizzle_scales(scale_bits.reshape(-1, n // group))
    return packed, scale_bits, g


def dequant_fp4(packed: torch.Tensor, scales: torch.Tensor, tensor_scale: Optional[torch.Tensor],
                fmt: str = "nvfp4", swizzled: bool = False, n: Optional[int] = None) -> torch.Tensor:
    """Inverse of ``quant_fp4``: float32 ``(..., n)`` (``n = 2 * packed.shape[-1]`` by default),
    ``E2M1 · s · tensor_scale``; ``dequant_fp4(*quant_fp4(x, fmt), fmt)`` round-trips.
    ``tensor_scale``: float32 ``packed.shape[:-2]`` (None: 1, one-level blocks only)."""
    if packed.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"packed and scales must be uint8, got {packed.dtype} and {scales.dtype}")
    if tensor_scale is not None and not isinstance(tensor_scale, torch.Tensor):
        raise TypeError("dequant_fp4(packed, scales, tensor_scale, fmt=...): tensor_scale must be a float32 "
                        f"tensor of shape packed.shape[:-2] or None, got {type(tensor_scale).__name__}")
    group = _fp4_group(fmt)
    if n is None:
        n = 2 * packed.shape[-1]
    if n != 2 * packed.shape[-1] or n % group != 0:
        raise ValueError(f"n={n} must equal 2*packed.shape[-1]={2 * packed.shape[-1]} and be a multiple of {group}")
    lead = packed.shape[:-1]
    ng = n // group
    if swizzled:
        rows = int(math.prod(lead))
        scales = unswizzle_scales(scales, rows, ng).reshape(*lead, ng)
    if tuple(scales.shape) != (*lead, ng):
        raise ValueError(f"scales must have shape {(*lead, ng)}, got {tuple(scales.shape)}")
    if tensor_scale is not None and tuple(tensor_scale.shape) != tuple(packed.shape[:-2]):
        raise ValueError(f"tensor_scale must have shape {tuple(packed.shape[:-2])}, got {tuple(tensor_scale.shape)}")
    u = packed.to(torch.int16)
    codes = torch.stack((u & 0xF, (u >> 4) & 0xF), dim=-1).reshape(*lead, n)
    vals = e2m1_code_to_float(codes).reshape(*lead, ng, group)
    if fmt == "nvfp4":
        s = e4m3_to_float(scales)
    else:
        e = scales.to(torch.int32) - kE8m0Bias
        s = torch.where(scales == kE8m0Nan, torch.full(scales.shape, float("nan"), device=scales.device),
                        _pow2_f32(e.clamp(-127, 127)))
    vals = vals * s[..., None]
    if tensor_scale is not None:
        vals = vals * _tensor_scale_for_groups(tensor_scale.to(torch.float32), packed.dim())
    return vals.reshape(*lead, n)


def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest E2M1 value as float32 (same rounding as ``float_to_e2m1_code``).

    Steps are 0.5 below 2, 1 below 4, 2 up to 6; ``torch.round`` (half to even) on each step
    lands every tie on the even code. NaN stays NaN. A fast path for emulation.
    """
    a = y.abs()
    v = torch.where(a < 2.0, torch.round(a * 2.0) * 0.5,
                    torch.where(a < 4.0, torch.round(a), torch.round(a * 0.5) * 2.0))
    return torch.copysign(v.clamp_(max=kFp4E2m1Max), y)


def _fp4_scales(xg: torch.Tensor, fmt: str):
    """Per-group decoded scale (float32) and its stored byte for groups on the last dim of xg."""
    amax = xg.abs().amax(dim=-1)
    finite = torch.isfinite(amax)
    if fmt == "nvfp4":
        # satfinite would turn an Inf group into 448: give it the E4M3 NaN instead
        bits = torch.where(finite, float_to_e4m3(_ieee_div(amax, kFp4E2m1Max)),
                           torch.full_like(amax, kE4m3Nan, dtype=torch.uint8))
        return e4m3_to_float(bits), bits
    _, ex = torch.frexp(amax)  # amax = mant * 2**ex, mant in [0.5, 1): floor(log2) = ex - 1
    e = (ex.to(torch.int32) - 1 - 2).clamp(-127, 127)
    e = torch.where(amax == 0, torch.full_like(e, -127), e)
    e = torch.where(finite, e, torch.zeros_like(e))
    bits = torch.where(finite, (e + kE8m0Bias).to(torch.uint8), torch.full_like(e, kE8m0Nan).to(torch.uint8))
    scale = torch.where(finite, _pow2_f32(e), torch.full_like(amax, float("nan")))
    return scale, bits


def fake_quant_fp4_blocks(y: torch.Tensor, fmt: str = "nvfp4") -> torch.Tensor:
    """One level only: ``E2M1 · s`` of the 16/32-element groups along the last dim of ``y``, the
    operand a block-scaled MMA multiplies (float32, same shape). A group with a NaN/Inf comes out
    NaN. Two-level NVFP4 is ``fake_quant_fp4_blocks(x / g) · g``; the recipe quantizes P this way
    after its own per-row FP32 scale."""
    group = _fp4_group(fmt)
    n = y.shape[-1]
    if n % group != 0:
        raise ValueError(f"{fmt} quantizes groups of {group} along the last dim: n={n} is not a multiple")
    yg = y.to(torch.float32).reshape(*y.shape[:-1], n // group, group)
    scale, _ = _fp4_scales(yg, fmt)
    s = scale[..., None]
    vals = e2m1_round(yg / s) * s
    if fmt == "nvfp4":
        vals = torch.where(s == 0, torch.zeros_like(vals), vals)
    return vals.reshape(y.shape)


def fake_quant_fp4_parts(x: torch.Tensor, fmt: str = "nvfp4") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, tensor_scale)``: the one-level operand ``E2M1 · s`` of ``x / g`` (float32, shape
    of x) and ``g = fp4_tensor_scale(x)``, kept apart as a kernel keeps them (the MMA sees the
    blocks, ``g`` multiplies its fp32 result)."""
    g = fp4_tensor_scale(x, fmt)
    xf = x.to(torch.float32)
    if fmt == "nvfp4":
        xf = xf / g.reshape(*g.shape, *([1] * min(x.dim(), 2)))
    return fake_quant_fp4_blocks(xf, fmt), g


def fake_quant_fp4(x: torch.Tensor, fmt: str = "nvfp4") -> torch.Tensor:
    """``dequant_fp4(*quant_fp4(x, fmt), fmt)`` without packing (float32, same shape as x).

    Identical for finite groups; a group with a NaN/Inf comes out NaN.
    """
    blocks, g = fake_quant_fp4_parts(x, fmt)
    return blocks * g.reshape(*g.shape, *([1] * min(x.dim(), 2)))


def swizzle_scale_offsets(rows: int, cols: int, device=None) -> torch.Tensor:
    """Byte offset of scale (r, c) in the Blackwell block-scaled layout: LongTensor ``(rows, cols)``.

    Tiles of 128 rows x 4 scale columns (512 bytes), row-major over tiles; inside a tile
    (r, c) sits at ``(r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4``.
    """
    r = torch.arange(rows, dtype=torch.long, device=device)[:, None]
    c = torch.arange(cols, dtype=torch.long, device=device)[None, :]
    col_tiles = -(-cols // kSwizzleTileCols)
    tile = (r // kSwizzleTileRows) * col_tiles + c // kSwizzleTileCols
    inner = (r % 32) * 16 + ((r % kSwizzleTileRows) // 32) * 4 + c % kSwizzleTileCols
    return tile * kSwizzleTileBytes + inner


def swizzle_scales(scales_2d: torch.Tensor) -> torch.Tensor:
    """Row-major ``(rows, cols)`` uint8 scales -> 1-D swizzled buffer of
    ``ceil(rows/128)*128 * ceil(cols/4)*4`` bytes, padding 0."""
    rows, cols = scales_2d.shape
    rows_pad = -(-rows // kSwizzleTileRows) * kSwizzleTileRows
    cols_pad = -(-cols // kSwizzleTileCols) * kSwizzleTileCols
    out = torch.zeros(rows_pad * cols_pad, dtype=scales_2d.dtype, device=scales_2d.device)
    off = swizzle_scale_offsets(rows, cols, device=scales_2d.device)
    out[off.reshape(-1)] = scales_2d.reshape(-1)
    return out


def unswizzle_scales(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``swizzle_scales``: ``(rows, cols)``."""
    rows_pad = -(-rows // kSwizzleTileRows) * kSwizzleTileRows
    cols_pad = -(-cols // kSwizzleTileCols) * kSwizzleTileCols
    if buf.dim() != 1 or buf.numel() != rows_pad * cols_pad:
        raise ValueError(f"swizzled scales must be 1-D with {rows_pad * cols_pad} bytes, got {tuple(buf.shape)}")
    off = swizzle_scale_offsets(rows, cols, device=buf.device)
    return buf[off]
