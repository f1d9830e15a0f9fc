"""Exact emulation of the inference recipes of docs/design/NUMERICS.md §Recipes.

Each recipe quantizes Q, K, V (and P inside the loop) with exactly the groups, rounding and
saturation of ``sage_quant.reference`` (the bit-exact contract with the kernels), then follows
the kernel dataflow:

* Q·K: integer (or block-scaled FP4) products, exact in float32, times the per-row and per-key
  scales; ``scale * log2(e)`` is folded in so S lives in the log2 domain; Q smoothing adds
  ``ΔS = q̄ K̂ᵀ`` (a GEMV per query block).
* online softmax over KV blocks of ``kv_block`` keys: running row max ``m``, ``P̃ = exp2(S - m +
  offset)`` (offset ``log2(448)`` for FP8 P), row sum ``l`` accumulated from the float32 P̃
  *before* P̃ is quantized, ``O = O·exp2(m_old - m_new) + P̂ V̂``.
* epilogue: ``O / l`` times V's per-channel (FP8, INT8) or per-head (NVFP4) scale, plus
  ``v_mean`` when V was smoothed
  (``smooth_v``: rows of the softmax sum to 1, so ``softmax(S)·(V - v̄) + v̄`` is exact; fully
  masked rows stay 0); LSE = ``(m + log2 l - offset)·ln 2`` plus ``q·k_mean·scale`` when K was
  smoothed (so it is the LSE of the unsmoothed scores).

All work is vectorized over batch, heads and query rows; the only Python loop is over KV blocks
(and over the 32-key MMA chunks when an FP22 accumulator is emulated).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .. import reference as R
from .reference_attention import causal_allowed, validate_qkv

__all__ = ["RECIPES", "emulate", "recipe_options", "truncate_mantissa"]

kLog2e = 1.4426950408889634
kLn2 = 0.6931471805599453
kFp8Max = R.kFp8E4m3Max
kLog2Fp8Max = math.log2(kFp8Max)
kFp4PScaleMax = R.kFp8E4m3Max * R.kFp4E2m1Max  # 448 * 6: two-level FP4 P row scale target
kInt8PScale = 127.0  # INT-FlashAttention: P = round(127 * exp(S - m))
kMmaChunkKeysFp8 = 32  # keys one FP8 wgmma / mma.sync instruction adds into the accumulator
kMmaChunkKeysF16 = 16  # keys one FP16 mma.sync (m16n8k16) adds into the accumulator
kF16Max = 65504.0
# pv_accum="f16_buffer" with E4M3 V: |V̂| <= v_max keeps a block's P̃V below FP16's max
# (P̃ <= 448): 64 keys x 448 x 2.25 = 64512 <= 65504 (SageAttention2's sm89 choice).
kF16BufferVMax64 = 2.25
kFp22MantissaBits = 13  # Ada/Hopper FP8 MMA accumulator: 1 sign, 8 exponent, 13 mantissa bits
kFp32MantissaBits = 23

_INT_QK_COMMON = {
    "q_granularity": None,
    "k_granularity": None,
    "q_block": 128,
    "k_block": None,
    "smooth_k": True,
    "smooth_q": False,
    "delta_s": "quantized_k",
    "kv_block": None,
}

#: recipe name -> {option: default}. Every option is documented in ``emulate``.
RECIPES: Dict[str, Dict[str, Any]] = {
    "qk_s8_pv_f16": {
        **_INT_QK_COMMON,
        # Per-thread, as the original SageAttention's shipped kernel for this recipe: per-block
        # (docs/design/NUMERICS.md §Recipes, first description) measured rel-L1 0.0033 vs its 0.0025 on outlier
        # inputs (docs/design/decisions.md); per_block stays available as an option.
        "q_granularity": "per_thread",
        "k_granularity": "per_thread",
        "k_block": 64,
        "kv_block": 64,
        "pv_dtype": "fp16",
        "pv_accum": "fp32",
    },
    "qk_s8_pv_e4m3": {
        **_INT_QK_COMMON,
        "q_granularity": "per_thread",
        "k_granularity": "per_thread",
        # V smoothing: E4M3's 3 mantissa bits quantize V - v_mean, not a per-channel bias
        "smooth_v": True,
        "kv_block": 128,
        "pv_accum": "two_level",
        "acc_mantissa_bits": kFp22MantissaBits,
        "v_max": None,
    },
    "qk_s4_pv_e4m3": {
        **_INT_QK_COMMON,
        "q_granularity": "per_thread",
        "k_granularity": "per_thread",
        "smooth_q": True,
        "kv_block": 128,
        "pv_accum": "two_level",
        "acc_mantissa_bits": kFp22MantissaBits,
        "v_max": None,
    },
    "qk_s8_pv_s8": {
        **_INT_QK_COMMON,
        "q_granularity": "per_token",
        "k_granularity": "per_token",
        "kv_block": 64,
    },
    "qk_nvfp4_pv_nvfp4": {
        "fmt": "nvfp4",
        "smooth_q": True,
        "smooth_k": True,
        "q_block": 128,
        "delta_s": "quantized_k",
        "kv_block": 128,
        "p_fp4": "two_level",
    },
}

_QK_BITS = {"qk_s8_pv_f16": 8, "qk_s8_pv_e4m3": 8, "qk_s4_pv_e4m3": 4, "qk_s8_pv_s8": 8}


def recipe_options(recipe: str, **options) -> Dict[str, Any]:
    """Defaults of ``recipe`` updated with ``options``, validated (TypeError / ValueError)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known recipes: {sorted(RECIPES)}")
    defaults = RECIPES[recipe]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(
            f"recipe {recipe!r} got unexpected option(s) {unknown}; accepted options: {sorted(defaults)}"
        )
    opts = dict(defaults)
    opts.update(options)

    def pos_int(name, multiple=1):
        val = opts[name]
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0 or val % multiple:
            raise ValueError(f"option {name} must be a positive int multiple of {multiple}, got {val!r}")

    def boolean(name):
        if not isinstance(opts[name], bool):
            raise ValueError(f"option {name} must be True or False, got {opts[name]!r}")

    def choice(name, allowed):
        if opts[name] not in allowed:
            raise ValueError(f"option {name} must be one of {allowed}, got {opts[name]!r}")

    pos_int("kv_block", 16)
    pos_int("q_block")
    for name in ("smooth_k", "smooth_q", "smooth_v"):
        if name in opts:
            boolean(name)
    if "delta_s" in opts:
        choice("delta_s", ("quantized_k", "exact_k"))
    if "q_granularity" in opts:
        choice("q_granularity", R.GRANULARITIES)
        choice("k_granularity", tuple(g for g in R.GRANULARITIES if g != "per_warp"))
        if opts["k_block"] is None:
            # per-thread K groups follow the kernel's KV tile; per-block K uses 64-token blocks.
            opts["k_block"] = opts["kv_block"] if opts["k_granularity"] == "per_thread" else 64
        pos_int("k_block", 8 if opts["k_granularity"] == "per_thread" else 1)
    if "pv_dtype" in opts:
        choice("pv_dtype", ("fp16", "bf16"))
    if "acc_mantissa_bits" in opts:  # e4m3 recipes
        choice("pv_accum", ("two_level", "one_level", "fp32", "f16_buffer"))
        val = opts["acc_mantissa_bits"]
        if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val <= kFp32MantissaBits:
            raise ValueError(f"option acc_mantissa_bits must be an int in [1, 23], got {val!r}")
        f16_buffer = opts["pv_accum"] == "f16_buffer"
        if opts["v_max"] is None:
            opts["v_max"] = kF16BufferVMax64 * 64 / opts["kv_block"] if f16_buffer else R.kFp8E4m3Max
        opts["v_max"] = R.check_v_max(opts["v_max"])
        if f16_buffer and opts["v_max"] * R.kFp8E4m3Max * opts["kv_block"] > kF16Max:
            raise ValueError(
                f"pv_accum='f16_buffer' with kv_block={opts['kv_block']} needs v_max <= "
                f"{kF16Max / (R.kFp8E4m3Max * opts['kv_block']):.4g} so that a block's P~V (P~ <= 448) "
                f"cannot overflow FP16, got v_max={opts['v_max']!r}")
    elif "pv_accum" in opts:  # qk_s8_pv_f16
        choice("pv_accum", ("fp32", "f16_buffer"))
    if "fmt" in opts:
        choice("fmt", ("nvfp4", "mxfp4"))
        choice("p_fp4", ("two_level", "direct"))
    return opts


def truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep ``bits`` explicit mantissa bits of float32 ``x``, rounding toward zero (NaN kept)."""
    if bits >= kFp32MantissaBits:
        return x
    mask = -(1 << (kFp32MantissaBits - bits))  # ...1110000 in two's complement int32
    t = (x.view(torch.int32) & mask).view(torch.float32)
    return torch.where(torch.isnan(x), x, t)


# --------------------------------------------------------------------------------------------
# Q·K preparation: returns a function S_log2(j0, j1) -> (b, h_q, s_q, j1 - j0) float32
# --------------------------------------------------------------------------------------------
def _expand_kv(t: torch.Tensor, rep: int) -> torch.Tensor:
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _prepare_int_qk(q, k, opts, bits, scale_log2, rep):
    """Integer Q·K: exact integer products (float32 is exact: |sum| < 2**24 for d <= 256)."""
    b, h_q, s_q, d = q.shape
    s_kv = k.shape[2]
    k_mean = R.token_mean(k) if opts["smooth_k"] else None
    q_mean = R.block_mean(q, opts["q_block"]) if opts["smooth_q"] else None
    qv, qs = R.quant_int(q, bits=bits, granularity=opts["q_granularity"], role="q",
                         block=opts["q_block"], mean=q_mean, mean_block=opts["q_block"])
    kv, ks = R.quant_int(k, bits=bits, granularity=opts["k_granularity"], role="k",
                         block=opts["k_block"], mean=k_mean)
    if bits == 4:
        qv, kv = R.unpack_int4(qv), R.unpack_int4(kv)
    q_idx = R.scale_group_index(s_q, opts["q_granularity"], "q", opts["q_block"], device=q.device)
    k_idx = R.scale_group_index(s_kv, opts["k_granularity"], "k", opts["k_block"], device=q.device)
    q_int = qv.to(torch.float32)  # (b, h_q, s_q, d)
    q_row_scale = qs[:, :, q_idx]  # (b, h_q, s_q)
    k_int = _expand_kv(kv.to(torch.float32), rep)  # (b, h_q, s_kv, d)
    k_key_scale = _expand_kv(ks[:, :, k_idx], rep)  # (b, h_q, s_kv)

    delta_fn = None
    if opts["smooth_q"]:
        if opts["delta_s"] == "quantized_k":
            k_for_delta = k_int * k_key_scale[..., None]
        else:
            kf = k.to(torch.float32)
            k_for_delta = _expand_kv(kf - k_mean[:, :, None, :] if k_mean is not None else kf, rep)
        delta_fn = _delta_s_fn(q_mean, k_for_delta, opts["q_block"], s_q, rep_q=1)

    def s_log2(j0, j1):
        acc = torch.matmul(q_int, k_int[:, :, j0:j1].transpose(-1, -2))
        s = acc * (q_row_scale[..., None] * k_key_scale[:, :, None, j0:j1])
        if delta_fn is not None:
            s = s + delta_fn(j0, j1)
        return s * scale_log2

    return s_log2, k_mean


def _delta_s_fn(q_mean, k_for_delta, q_block, s_q, rep_q):
    """ΔS = q̄ K̂ᵀ: one GEMV per query block, gathered to the rows of each block."""
    row_block = torch.arange(s_q, device=q_mean.device) // q_block

    def delta(j0, j1):
        per_block = torch.matmul(q_mean, k_for_delta[:, :, j0:j1].transpose(-1, -2))  # (b,h,nqb,n)
        return per_block[:, :, row_block]

    return delta


def _prepare_fp4_qk(q, k, opts, scale_log2, rep):
    """Block-scaled FP4 Q·K along d, as the block-scaled MMA computes it: products of the
    one-level operands (E2M1 × group scale of ``x / g``), then the per-(b, head) FP32 tensor
    scales ``g_q · g_k`` on the fp32 result (NVFP4; 1 for MXFP4)."""
    fmt = opts["fmt"]
    s_q = q.shape[2]
    qf = q.to(torch.float32)
    kf = k.to(torch.float32)
    k_mean = R.token_mean(k) if opts["smooth_k"] else None
    q_mean = R.block_mean(q, opts["q_block"]) if opts["smooth_q"] else None
    if q_mean is not None:
        row_block = torch.arange(s_q, device=q.device) // opts["q_block"]
        qf = qf - q_mean[:, :, row_block]
    if k_mean is not None:
        kf = kf - k_mean[:, :, None, :]
    q_blk, g_q = R.fake_quant_fp4_parts(qf, fmt)  # (b,h_q,s,d), (b,h_q)
    k_blk, g_k = R.fake_quant_fp4_parts(kf, fmt)  # (b,h_kv,s,d), (b,h_kv)
    k_blk = _expand_kv(k_blk, rep)
    g_k = _expand_kv(g_k, rep)
    g_qk = (g_q * g_k)[:, :, None, None]
    delta_fn = None
    if q_mean is not None:
        # the dequantized smoothed K the kernel holds, or the float32 one
        k_for_delta = k_blk * g_k[:, :, None, None] if opts["delta_s"] == "quantized_k" else _expand_kv(kf, rep)
        delta_fn = _delta_s_fn(q_mean, k_for_delta, opts["q_block"], s_q, rep_q=1)

    def s_log2(j0, j1):
        s = torch.matmul(q_blk, k_blk[:, :, j0:j1].transpose(-1, -2)) * g_qk
        if delta_fn is not None:
            s = s + delta_fn(j0, j1)
        return s * scale_log2

    return s_log2, k_mean


# --------------------------------------------------------------------------------------------
# P·V: each returns (offset_log2, block_fn, epilogue_scale)
#   block_fn(p, j0, j1, o_scaled) -> new O, given fp32 P̃ (b,h,s_q,n) and O·alpha
# --------------------------------------------------------------------------------------------
def _f16_buffer(p, v, chunk):
    """One KV block's p @ v in an FP16 MMA accumulator (``pv_accum="f16_buffer"``), to be added
    into the fp32 O: each ``chunk``-key MMA adds its (fp32-exact) products into the buffer,
    which is rounded to fp16 after every MMA.

    Overflow guard (what the kernel does): where the fp16 buffer reached FP16's max (65504, inf or
    NaN) but the fp32 sum is finite, the block is recomputed in fp32, so an overflow costs speed,
    never accuracy."""
    n = p.shape[-1]
    buf = None
    for c0 in range(0, n, chunk):
        part = torch.matmul(p[..., c0:c0 + chunk], v[..., c0:c0 + chunk, :])
        buf = (part if buf is None else buf + part).to(torch.float16).to(torch.float32)
    exact = torch.matmul(p, v)
    overflow = ~(buf.abs() < kF16Max) & torch.isfinite(exact)
    return torch.where(overflow, exact, buf)


def _mma_fp22_accumulate(acc, p, v, chunk, bits):
    """acc += p @ v, one ``chunk``-key MMA at a time, truncating the accumulator after each."""
    n = p.shape[-1]
    for c0 in range(0, n, chunk):
        part = torch.matmul(p[..., c0:c0 + chunk], v[..., c0:c0 + chunk, :])
        acc = part if acc is None else acc + part
        acc = truncate_mantissa(acc, bits)
    return acc


def _prepare_pv(recipe, v, opts, rep, v_mean=None):
    s_kv = v.shape[2]
    if recipe == "qk_s8_pv_f16":
        pv_dtype = torch.float16 if opts["pv_dtype"] == "fp16" else torch.bfloat16
        v_range = None
        if pv_dtype == torch.float16 and v.dtype != torch.float16:
            # a channel beyond FP16's range is divided by a power of two, multiplied back in the
            # epilogue (R.v_fp16_range_scale; f = 1 for channels in range: no change)
            v_range = R.v_fp16_range_scale(v)
            v = v.to(torch.float32) / v_range[:, :, None, :]
        v_lp = _expand_kv(v.to(pv_dtype).to(torch.float32), rep)
        f16_buffer = opts["pv_accum"] == "f16_buffer"

        def block(p, j0, j1, o_scaled):
            p_lp = p.to(pv_dtype).to(torch.float32)
            if f16_buffer:
                return o_scaled + _f16_buffer(p_lp, v_lp[:, :, j0:j1], kMmaChunkKeysF16)
            return o_scaled + torch.matmul(p_lp, v_lp[:, :, j0:j1])

        return 0.0, block, (None if v_range is None else _expand_kv(v_range, rep))

    if recipe in ("qk_s8_pv_e4m3", "qk_s4_pv_e4m3"):
        v_t, v_scale = R.quant_v_e4m3_t(v, mean=v_mean, v_max=opts["v_max"])  # V - v_mean if smoothing
        v_q = _expand_kv(R.e4m3_to_float(v_t[:, :, :, :s_kv]).transpose(2, 3), rep)  # (b,h,s,d)
        mode, bits = opts["pv_accum"], opts["acc_mantissa_bits"]

        def block(p, j0, j1, o_scaled):
            p_q = R.e4m3_to_float(R.float_to_e4m3(p))
            vb = v_q[:, :, j0:j1]
            if mode == "fp32":
                return o_scaled + torch.matmul(p_q, vb)
            if mode == "f16_buffer":
                return o_scaled + _f16_buffer(p_q, vb, kMmaChunkKeysFp8)
            if mode == "two_level":
                return o_scaled + _mma_fp22_accumulate(None, p_q, vb, kMmaChunkKeysFp8, bits)
            return _mma_fp22_accumulate(o_scaled, p_q, vb, kMmaChunkKeysFp8, bits)

        return kLog2Fp8Max, block, _expand_kv(v_scale, rep)

    if recipe == "qk_s8_pv_s8":
        v_int, v_scale = R.quant_v_s8(v)
        v_i = _expand_kv(v_int.to(torch.float32), rep)

        def block(p, j0, j1, o_scaled):
            p_int = torch.round(p * kInt8PScale)  # in [0, 127]; INT32 accumulate is exact here
            return o_scaled + torch.matmul(p_int, v_i[:, :, j0:j1])

        return 0.0, block, _expand_kv(v_scale, rep) / kInt8PScale

    # qk_nvfp4_pv_nvfp4: V quantized along tokens (Vᵀ), tokens padded with zeros to the group;
    # V's per-(b, head) tensor scale multiplies O in the epilogue, like a per-channel V scale.
    fmt = opts["fmt"]
    group = R.kNvfp4Group if fmt == "nvfp4" else R.kMxfp4Group
    s_pad = -(-s_kv // group) * group
    vt = v.to(torch.float32).transpose(2, 3)
    vt = torch.nn.functional.pad(vt, (0, s_pad - s_kv))
    vt_blk, g_v = R.fake_quant_fp4_parts(vt, fmt)  # (b,h_kv,d,s_pad), (b,h_kv)
    v_blk = _expand_kv(vt_blk.transpose(2, 3), rep)  # (b,h,s_pad,d)
    out_scale = _expand_kv(g_v, rep)[:, :, None].expand(-1, -1, v.shape[3])
    two_level = opts["p_fp4"] == "two_level"

    def block(p, j0, j1, o_scaled):
        n = j1 - j0
        n_pad = -(-n // group) * group
        if two_level:
            # P's second level (SageAttention3): an FP32 scale per row of this block so that its
            # largest P̃ maps to 448*6, hence its largest group scale to E4M3's max
            row_scale = p.amax(dim=-1, keepdim=True) / kFp4PScaleMax
            row_scale = torch.where(row_scale == 0, torch.ones_like(row_scale), row_scale)
            p_in = p / row_scale
        else:
            p_in = p
        p_in = torch.nn.functional.pad(p_in, (0, n_pad - n))
        p_blk = R.fake_quant_fp4_blocks(p_in, fmt)
        vb = v_blk[:, :, j0:j0 + n_pad]
        if vb.shape[2] < n_pad:  # only when s_kv is not a multiple of the group: already padded
            vb = torch.nn.functional.pad(vb, (0, 0, 0, n_pad - vb.shape[2]))
        buf = torch.matmul(p_blk, vb)
        if two_level:
            buf = buf * row_scale
        return o_scaled + buf

    return 0.0, block, out_scale


# --------------------------------------------------------------------------------------------
# public entry
# --------------------------------------------------------------------------------------------
def emulate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    recipe: str,
    *,
    layout: str = "bhsd",
    is_causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    **options,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Emulate attention under ``recipe`` exactly as the kernels compute it.

    Args:
        q: ``(b, h_q, s_q, d)`` (``layout="bhsd"``) or ``(b, s_q, h_q, d)`` (``"bshd"``),
            fp16/bf16 (fp32 accepted).
        k, v: same layout with ``h_kv`` heads (``h_q % h_kv == 0``) and ``s_kv`` tokens.
        recipe: a key of ``RECIPES``.
        is_causal: bottom-right aligned causal mask (query i sees keys j <= i + s_kv - s_q).
        scale: softmax scale (default ``1/sqrt(d)``).
        return_lse: also return the natural-log LSE ``(b, h_q, s_q)`` float32 of the
            unsmoothed scores (-inf for fully masked rows).
        options (defaults in ``RECIPES[recipe]``):
            q_granularity / k_granularity: INT scale groups (``reference.GRANULARITIES``).
            q_block: the CTA query tile: Q per_block scale block and Q smoothing block (128).
            k_block: K per_block block (64) / per_thread key tile (default ``kv_block``).
            smooth_k: subtract the per-(b, kv-head, channel) token mean of K.
            smooth_q: subtract the per-``q_block`` mean of Q and add ``ΔS = q̄ K̂ᵀ`` back.
            smooth_v (qk_s8_pv_e4m3, default True): quantize ``V - v_mean`` (per-(b, kv-head,
                channel) token mean) to E4M3 and add ``v_mean`` to the normalized output.
            delta_s: K used by that GEMV: ``"quantized_k"`` (dequantized smoothed K, what the
                kernel holds) or ``"exact_k"`` (float32 smoothed K).
            kv_block: keys per online-softmax step (a multiple of 16).
            pv_dtype (qk_s8_pv_f16): ``"fp16"`` or ``"bf16"`` P and V operands.
            pv_accum: qk_s8_pv_f16: ``"fp32"`` (the MMA accumulates in fp32) or
                ``"f16_buffer"`` (each block's PV in an FP16 MMA accumulator, rounded after every
                16-key MMA, then added into fp32 O; where the buffer overflows the block is
                recomputed in fp32). e4m3 recipes: ``"two_level"`` (each block's P̃V in a fresh
                accumulator, added into fp32 O), ``"one_level"`` (the MMA accumulates into O
                directly), ``"fp32"`` (ideal fp32 accumulation), ``"f16_buffer"`` (as for
                qk_s8_pv_f16 with 32-key MMAs; ``v_max`` bounds |V̂| so it cannot overflow).
            v_max (e4m3 recipes): the E4M3 code V's per-channel amax maps to; default 448, or
                ``2.25 * 64 / kv_block`` with ``pv_accum="f16_buffer"`` (which requires
                ``v_max * 448 * kv_block <= 65504``).
            acc_mantissa_bits (e4m3 recipes): explicit mantissa bits of the FP8 MMA accumulator
                (13: FP22 of Ada/Hopper), truncated after every 32-key MMA.
            fmt (qk_nvfp4_pv_nvfp4): ``"nvfp4"`` (two levels: E2M1 with E4M3 scales per 16
                elements and an FP32 scale per (b, head) for Q, K and V) or ``"mxfp4"`` (E2M1 with
                E8M0 scales per 32 elements, one level) for Q, K, P and V.
            p_fp4: ``"two_level"`` (per-row FP32 scale so the block's max P̃ is 448·6, then
                FP4) or ``"direct"`` (P in [0, 1] quantized directly).

    Returns:
        O (contiguous) in the input dtype and layout; with ``return_lse`` a tuple ``(O, lse)``.
    """
    opts = recipe_options(recipe, **options)
    q_l, k_l, v_l, (b, h_q, h_kv, s_q, s_kv, d, dv) = validate_qkv(
        q, k, v, layout, allowed_dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    if dv != d:
        raise ValueError(f"v head dim ({dv}) must equal q/k head dim ({d})")
    bits = _QK_BITS.get(recipe)
    if bits == 4 and d % 2:
        raise ValueError(f"{recipe} packs INT4 pairs: head dim must be even, got {d}")
    if recipe == "qk_nvfp4_pv_nvfp4":
        group = R.kNvfp4Group if opts["fmt"] == "nvfp4" else R.kMxfp4Group
        if d % group:
            raise ValueError(f"{opts['fmt']} groups {group} elements along d: head dim {d} is not a multiple")
        if opts["kv_block"] % group:
            raise ValueError(f"kv_block ({opts['kv_block']}) must be a multiple of the {opts['fmt']} group ({group})")

    rep = h_q // h_kv
    scale_log2 = float(scale) * kLog2e
    if bits is not None:
        s_fn, k_mean = _prepare_int_qk(q_l, k_l, opts, bits, scale_log2, rep)
    else:
        s_fn, k_mean = _prepare_fp4_qk(q_l, k_l, opts, scale_log2, rep)
    v_mean = R.token_mean(v_l) if opts.get("smooth_v", False) else None
    offset, pv_block, out_scale = _prepare_pv(recipe, v_l, opts, rep, v_mean)

    dev = q_l.device
    f32 = torch.float32
    m = torch.full((b, h_q, s_q), -math.inf, dtype=f32, device=dev)
    l = torch.zeros((b, h_q, s_q), dtype=f32, device=dev)
    o = torch.zeros((b, h_q, s_q, dv), dtype=f32, device=dev)
    allowed = causal_allowed(s_q, s_kv, dev) if is_causal else None
    kv_block = opts["kv_block"]
    for j0 in range(0, s_kv, kv_block):
        j1 = min(s_kv, j0 + kv_block)
        s = s_fn(j0, j1)
        if allowed is not None:
            s = s.masked_fill(~allowed[:, j0:j1], -math.inf)
        m_new = torch.maximum(m, s.amax(dim=-1))
        m_use = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)  # no -inf - -inf
        alpha = torch.exp2(m - m_use)
        p = torch.exp2(s - (m_use - offset)[..., None])  # fp32 P̃, max = 2**offset
        l = l * alpha + p.sum(dim=-1)
        o = pv_block(p, j0, j1, o * alpha[..., None])
        m = m_new

    out = o / l[..., None]
    if out_scale is not None:
        out = out * out_scale[:, :, None, :]
    if v_mean is not None:
        out = out + _expand_kv(v_mean, rep)[:, :, None, :]
    out = torch.where((l == 0)[..., None], torch.zeros_like(out), out)  # fully masked rows
    out = out.to(q.dtype)
    if layout == "bshd":
        out = out.transpose(1, 2).contiguous()
    if not return_lse:
        return out
    lse = ((m + torch.log2(l) - offset) * kLn2)
    if k_mean is not None:
        corr = (q_l.to(f32) * _expand_kv(k_mean, rep)[:, :, None, :]).sum(dim=-1) * float(scale)
        lse = lse + corr
    lse = torch.where(l == 0, torch.full_like(lse, -math.inf), lse)
    return out, lse.contiguous()
