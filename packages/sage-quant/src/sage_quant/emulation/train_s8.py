"""Exact emulation of the ``train_s8`` recipe (SageBwd: 8-bit attention for training).

Recipe (``docs/design/NUMERICS.md``, SageAttention3 "SageBwd"); every quantization below is symmetric INT8
with the arithmetic of ``docs/design/quant-formats.md`` (``s = amax / 127``, ``amax == 0 -> s = 1``,
``q = clamp(round_half_even(x / s), -127, 127)``, IEEE division):

Forward (online softmax over KV blocks of ``block_kv`` keys):

* K smoothing: ``K' = K - mean_tokens(K)`` per (batch, kv-head, channel) (``smooth_k=True``).
* Q INT8 per block of ``block_q`` tokens, K' and V INT8 per block of ``block_kv`` tokens
  (``sage_quant.reference.quant_int(granularity="per_block")``).
* ``S = (Q̂ K̂ᵀ) · s_Q · s_K`` (exact int32 accumulation, dequantized in fp32), exponentials are
  ``exp2`` with ``log2e`` folded into the softmax scale.
* ``P̃ = exp2(S·scale·log2e - m)``; the row sum ``l`` is accumulated from the fp32 ``P̃`` before
  rounding; ``P̃`` is quantized INT8 **per row of the (query, KV block) tile** (one scale per query
  row and KV block: ``max_j P̃ / 127``), so the scale factors out of ``P̂ V̂`` as a row scale
  times V's block scale.
* Two-level accumulation: each KV block's ``(P̂ V̂)·s_P·s_V`` lands in a fresh fp32 buffer that is
  added into the running fp32 ``O`` after the online-softmax rescale.
* ``O = O / l`` (a fully masked row gives 0), returned in the input dtype;
  ``LSE = (m + log2 l)·ln2 + scale·(q · mean(K))`` (natural log of the *unsmoothed* scores,
  float32, ``-inf`` for a fully masked row).

Backward (one pass over tiles of ``block_q`` queries × ``block_kv`` keys):

* ``S`` recomputed in INT8 from the same ``Q̂, K̂`` and scales, ``P = exp2(S·scale·log2e - LSE')``
  (``LSE'`` the smoothed LSE kept from the forward).
* ``dO`` INT8 per block of ``block_q`` tokens; ``P`` INT8 **per tile** (one scale per
  ``block_q × block_kv`` tile: the contraction of ``dV = Pᵀ dO`` runs over queries, so a per-row
  scale could not be factored out); ``dV_j = Σ_i (P̂_ijᵀ dÔ_i)·s_P,ij·s_dO,i``.
* ``dP = dO Vᵀ``: ``dp_precision="fp16"`` (the default) keeps it in 16-bit operands (the input's
  fp16/bf16, fp32 accumulate; emulated as a float64 matmul of the exactly converted values,
  rounded to fp32);
  ``dp_precision="int8"`` (ablation only) uses ``(dÔ V̂ᵀ)·s_dO·s_V`` with the INT8 tensors above.
* ``D = rowsum(dO ∘ O)`` in fp32 from the stored (input-dtype) ``O``; ``dS = P ∘ (dP - D)`` in fp32,
  quantized INT8 per tile.
* ``dQ_i = scale · Σ_j (dŜ_ij K̂_j)·s_dS,ij·s_K,j`` (smoothed K̂: ``rowsum(dS) = 0`` so smoothing
  needs no correction), ``dK_j = scale · Σ_i (dŜ_ijᵀ Q̂_i)·s_dS,ij·s_Q,i``.
* GQA/MQA: ``dK``/``dV`` of a kv head are the sums over the q heads of its group.

Non-finite values in the backward (a NaN/Inf in ``dO``, or one that the forward's inputs put into
``P``): the quantization groups of ``P``, ``dO`` and ``dS`` take their scale from their *finite*
entries only, and a non-finite entry quantizes to 0, so one bad value does not change how its
neighbours are rounded; its non-finiteness is carried to the outputs as NaN, in exactly the rows
and channels that exact attention's gradient has non-finite:

* ``dO[r, c]`` non-finite: ``dV[j, c]`` for every key ``j`` that query ``r`` sees (the dO block
  scale could only spread it over every channel); row ``r`` of ``dP`` (INT8 ablation) is NaN.
* ``dS[r, j]`` non-finite (row ``r`` of ``dP - D``, e.g. from that dO row): ``dQ`` row ``r`` and
  ``dK`` row ``j`` (the per-tile dS scale would spread it over the whole 128 x 64 tile).
* ``P[r, j]`` non-finite (a non-finite forward input): ``dV`` row ``j``.
* Masked entries of ``P`` and ``dS`` (causal) are structural zeros, so a NaN never reaches keys its
  query does not see.

A kernel implements this with an amax that skips non-finite values (``fmaxf`` already skips NaN;
Inf needs a select), a conversion of non-finite values to 0, and per-row / per-column "any
non-finite" flags of the tile ORed into the output rows (dQ, dK) and channels (dV). Finite inputs
are quantized exactly as without this rule.

Integer matmuls are done in float64 on integer values (exact: |sum| < 2^53) and converted to
float32 like an int32 accumulator would be. Causal masking is bottom-right aligned (query ``i``
sees keys ``j <= i + kv_len - q_len``). Runs on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..reference import kInt8Max, quant_int, to_bhsd, token_mean
from .reference_attention import causal_allowed

__all__ = [
    "kLog2e",
    "kLn2",
    "kDefaultBlockQ",
    "kDefaultBlockKv",
    "DP_PRECISIONS",
    "TrainS8Context",
    "train_s8_forward",
    "train_s8_context",
    "train_s8_backward",
    "ablation_rows",
]

kLog2e = 1.4426950408889634  # log2(e): folded into the softmax scale, exponentials are exp2
kLn2 = 0.6931471805599453  # ln(2): converts the log2-domain LSE back to natural log
kDefaultBlockQ = 128  # query tokens per Q / dO scale block and per backward tile row
kDefaultBlockKv = 64  # key tokens per K / V scale block and per KV tile
DP_PRECISIONS = ("fp16", "int8")
_LAYOUTS = ("bhsd", "bshd")
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class TrainS8Context:
    """What the backward needs from the forward (the tensors a kernel would keep or recompute).

    All tensors are logical ``(b, h, s, d)`` contiguous; ``h`` is the q-head count for ``o``,
    ``lse_smoothed`` and ``q_*``, the kv-head count for ``k_*`` and ``v_*``.
    """

    q_i8: torch.Tensor  # (b, h, sq, d) int8
    q_scale: torch.Tensor  # (b, h, ceil(sq/block_q)) f32
    k_i8: torch.Tensor  # (b, hkv, skv, d) int8, smoothed
    k_scale: torch.Tensor  # (b, hkv, ceil(skv/block_kv)) f32
    v_i8: torch.Tensor  # (b, hkv, skv, dv) int8
    v_scale: torch.Tensor  # (b, hkv, ceil(skv/block_kv)) f32
    v_hp: torch.Tensor  # (b, hkv, skv, dv) input dtype: the 16-bit dP operand
    o: torch.Tensor  # (b, h, sq, dv) output dtype (as stored by the forward)
    lse_smoothed: torch.Tensor  # (b, h, sq) f32, natural log of the smoothed scores
    k_mean: Optional[torch.Tensor]  # (b, hkv, d) f32 or None
    scale: float
    is_causal: bool
    layout: str
    dtype: torch.dtype
    block_q: int
    block_kv: int
    dp_precision: str
    smooth_k: bool


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_pos_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _check_inputs(q, k, v, layout: str):
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({layout}), got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    qb, kb, vb = (to_bhsd(x, layout) for x in (q, k, v))
    b, h, sq, d = qb.shape
    bk, hkv, skv, dk = kb.shape
    if bk != b or vb.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {vb.shape[0]}")
    if dk != d:
        raise ValueError(f"q and k head dims differ: {d} vs {dk}")
    if tuple(vb.shape[:3]) != (b, hkv, skv):
        raise ValueError(f"v must match k in (batch, heads, tokens) = {(b, hkv, skv)}, got {tuple(vb.shape[:3])}")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of kv heads ({hkv}) (GQA/MQA)")
    if sq == 0 or skv == 0 or d == 0 or vb.shape[3] == 0:
        raise ValueError(f"empty dimension: q {tuple(qb.shape)}, k {tuple(kb.shape)}, v {tuple(vb.shape)}")
    return qb, kb, vb


# --------------------------------------------------------------------------------------------
# INT8 building blocks for the tiles that quant_int's token groups do not describe
# --------------------------------------------------------------------------------------------
def _sym_scale(amax: torch.Tensor) -> torch.Tensor:
    scale = amax / float(kInt8Max)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def _round_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer values (kept as float32: the matmuls below are float64 on integers)."""
    qv = torch.round(x / scale).clamp_(-kInt8Max, kInt8Max)
    return torch.nan_to_num(qv, nan=0.0)


def _quant_rows_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One scale per row (last dim is the group): forward P̃ of one KV block."""
    scale = _sym_scale(x.abs().amax(dim=-1, keepdim=True))
    return _round_int8(x, scale), scale


def _quant_tiles_int8(x: torch.Tensor, block_rows: int
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One scale per tile of ``block_rows`` rows × all columns of ``x`` (b, h, s, n), from the
    tile's finite entries (module docstring, "Non-finite values").

    Returns integer values (b, h, s, n), the scale expanded per row (b, h, s, 1) and the bool mask
    of the non-finite entries of ``x`` (quantized to 0), or None when there are none.
    """
    b, h, s, n = x.shape
    nb = -(-s // block_rows)
    pad = nb * block_rows - s

    def tile_amax(t: torch.Tensor) -> torch.Tensor:
        a = t.abs()
        if pad:
            a = torch.nn.functional.pad(a, (0, 0, 0, pad))
        return a.reshape(b, h, nb, block_rows * n).amax(dim=-1)  # (b, h, nb); NaN/Inf propagate

    amax = tile_amax(x)
    bad = None
    if not bool(torch.isfinite(amax).all()):  # the rare case: look at the entries themselves
        bad = ~torch.isfinite(x)
        x = x.masked_fill(bad, 0.0)
        amax = tile_amax(x)
    scale = _sym_scale(amax)
    rows = torch.arange(s, device=x.device) // block_rows
    scale_rows = scale[:, :, rows, None]
    return _round_int8(x, scale_rows), scale_rows, bad


def _imm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Integer matmul ``a @ b`` of integer-valued tensors, exact, as fp32 (an int32 accumulator
    converted to float)."""
    return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.float32)


def _per_token(scale: torch.Tensor, s: int, block: int) -> torch.Tensor:
    """(b, h, nblocks) block scales -> (b, h, s) per-token scales."""
    return scale[:, :, torch.arange(s, device=scale.device) // block]


def _expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _finite_or_zero(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(x with its non-finite entries set to 0, bool mask of those entries)``; the mask is None
    (and ``x`` returned as is) when every entry is finite, the normal case."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return x, None
    return x.masked_fill(bad, 0.0), bad


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
def _resolve_args(q, k, v, *, is_causal, scale, layout, block_q, block_kv, smooth_k, k_mean, dp_precision):
    """Validate the recipe's arguments; returns ``(qb, kb, vb, scale, k_mean)`` (logical bhsd views,
    the resolved float scale, the float32 ``(b, hkv, d)`` K mean or None)."""
    qb, kb, vb = _check_inputs(q, k, v, layout)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(smooth_k, bool):
        raise TypeError(f"smooth_k must be a bool, got {type(smooth_k).__name__}")
    _check_pos_int(block_q, "block_q")
    _check_pos_int(block_kv, "block_kv")
    if dp_precision not in DP_PRECISIONS:
        raise ValueError(f"dp_precision must be one of {DP_PRECISIONS}, got {dp_precision!r}")
    b, hkv, d = kb.shape[0], kb.shape[1], qb.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    if smooth_k:
        if k_mean is None:
            k_mean = token_mean(kb)
        elif not isinstance(k_mean, torch.Tensor) or tuple(k_mean.shape) != (b, hkv, d):
            raise ValueError(f"k_mean must be a (b, hkv, d)={(b, hkv, d)} tensor, got "
                             f"{tuple(k_mean.shape) if isinstance(k_mean, torch.Tensor) else k_mean!r}")
        k_mean = k_mean.to(device=qb.device, dtype=torch.float32).contiguous()
    elif k_mean is not None:
        raise ValueError("k_mean was given but smooth_k=False: pass smooth_k=True to use it")
    return qb, kb, vb, float(scale), k_mean


def _quantize_inputs(qb, kb, vb, block_q: int, block_kv: int, k_mean: Optional[torch.Tensor]):
    """INT8 per-block Q (``block_q`` tokens), smoothed K and V (``block_kv`` tokens):
    ``(q_i8, q_scale, k_i8, k_scale, v_i8, v_scale)``, the tensors of :class:`TrainS8Context`."""
    q_i8, q_scale = quant_int(qb, bits=8, granularity="per_block", role="q", block=block_q)
    k_i8, k_scale = quant_int(kb, bits=8, granularity="per_block", role="k", block=block_kv, mean=k_mean)
    v_i8, v_scale = quant_int(vb, bits=8, granularity="per_block", role="k", block=block_kv)
    return q_i8, q_scale, k_i8, k_scale, v_i8, v_scale


def train_s8_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    layout: str = "bhsd",
    block_q: int = kDefaultBlockQ,
    block_kv: int = kDefaultBlockKv,
    smooth_k: bool = True,
    k_mean: Optional[torch.Tensor] = None,
    dp_precision: str = "fp16",
) -> Tuple[torch.Tensor, torch.Tensor, TrainS8Context]:
    """Forward of the ``train_s8`` recipe.

    Args:
        q: ``(b, h, sq, d)`` (``layout="bhsd"``) or ``(b, sq, h, d)`` (``"bshd"``); fp16, bf16
            (or fp32, emulation only).
        k: ``(b, hkv, skv, d)`` / ``(b, skv, hkv, d)``, ``h % hkv == 0``.
        v: ``(b, hkv, skv, dv)`` / ``(b, skv, hkv, dv)``.
        is_causal: bottom-right aligned causal mask.
        scale: softmax scale, default ``1/sqrt(d)``.
        layout: ``"bhsd"`` or ``"bshd"``; the output uses the same layout.
        block_q: query tokens per Q/dO scale block and per backward tile (128).
        block_kv: key tokens per K/V scale block and per KV tile (64).
        smooth_k: subtract the token mean of K before quantizing (on by default).
        k_mean: optional precomputed ``(b, hkv, d)`` float32 mean (only with ``smooth_k``).
        dp_precision: ``"fp16"`` (16-bit dP = dO Vᵀ, default) or ``"int8"`` (ablation);
            used by ``train_s8_backward``.

    Returns:
        ``(o, lse, ctx)``: ``o`` in q's dtype and layout ``(…, dv)``; ``lse`` float32
        ``(b, h, sq)`` natural log of the unsmoothed scaled scores (``-inf`` for a fully masked
        row); ``ctx`` for ``train_s8_backward`` (``ctx.lse_smoothed`` is the LSE of the smoothed
        scores, the one the backward uses).
    """
    qb, kb, vb, scale, k_mean = _resolve_args(
        q, k, v, is_causal=is_causal, scale=scale, layout=layout, block_q=block_q, block_kv=block_kv,
        smooth_k=smooth_k, k_mean=k_mean, dp_precision=dp_precision)
    b, h, sq, d = qb.shape
    hkv, skv, dv = kb.shape[1], kb.shape[2], vb.shape[3]
    group = h // hkv
    dev = qb.device

    q_i8, q_scale, k_i8, k_scale, v_i8, v_scale = _quantize_inputs(qb, kb, vb, block_q, block_kv, k_mean)

    qf = q_i8.to(torch.float32)
    kf = _expand_heads(k_i8, group).to(torch.float32)
    vf = _expand_heads(v_i8, group).to(torch.float32)
    sq_tok = _per_token(q_scale, sq, block_q)  # (b, h, sq)
    sk_tok = _expand_heads(_per_token(k_scale, skv, block_kv), group)  # (b, h, skv)
    sv_blk = _expand_heads(v_scale, group)  # (b, h, nkv)
    scale_log2 = scale * kLog2e

    neg_inf = float("-inf")
    m = torch.full((b, h, sq), neg_inf, dtype=torch.float32, device=dev)
    l = torch.zeros((b, h, sq), dtype=torch.float32, device=dev)
    o = torch.zeros((b, h, sq, dv), dtype=torch.float32, device=dev)
    for jb, k0 in enumerate(range(0, skv, block_kv)):
        k1 = min(k0 + block_kv, skv)
        acc = _imm(qf, kf[:, :, k0:k1].transpose(-1, -2))  # (b, h, sq, kj)
        s2 = acc * (sq_tok[..., :, None] * sk_tok[:, :, None, k0:k1]) * scale_log2
        if is_causal:
            s2 = s2.masked_fill(~causal_allowed(sq, skv, dev, keys=(k0, k1)), neg_inf)
        m_new = torch.maximum(m, s2.amax(dim=-1))
        m_safe = torch.where(m_new == neg_inf, torch.zeros_like(m_new), m_new)
        alpha = torch.exp2(m - m_safe)
        p = torch.exp2(s2 - m_safe[..., None])  # fp32 P̃, masked entries 0
        l = l * alpha + p.sum(dim=-1)
        p_int, p_scale = _quant_rows_int8(p)
        buf = _imm(p_int, vf[:, :, k0:k1]) * (p_scale * sv_blk[:, :, jb, None, None])
        o = o * alpha[..., None] + buf
        m = m_new
    # l == 0 only for a row that sees no key; a NaN row keeps its NaN (NaN == 0 is False).
    empty = l == 0
    o = torch.where(empty[..., None], torch.zeros_like(o), o / l[..., None])
    lse_smoothed = torch.where(empty, torch.full_like(l, neg_inf), (m + torch.log2(l)) * kLn2)
    lse = lse_smoothed
    if k_mean is not None:
        # softmax ignores the per-row constant scale·q·mean(K); the LSE gets it back.
        corr = torch.einsum("bhsd,bhd->bhs", qb.to(torch.float64),
                            _expand_heads(k_mean, group).to(torch.float64)) * scale
        lse = (lse_smoothed.to(torch.float64) + corr).to(torch.float32)

    o_out = o.to(q.dtype)
    ctx = TrainS8Context(
        q_i8=q_i8, q_scale=q_scale, k_i8=k_i8, k_scale=k_scale, v_i8=v_i8, v_scale=v_scale,
        v_hp=vb.contiguous(), o=o_out, lse_smoothed=lse_smoothed, k_mean=k_mean, scale=scale,
        is_causal=is_causal, layout=layout, dtype=q.dtype, block_q=block_q, block_kv=block_kv,
        dp_precision=dp_precision, smooth_k=smooth_k,
    )
    o_ret = o_out if layout == "bhsd" else o_out.transpose(1, 2).contiguous()
    return o_ret, lse.contiguous(), ctx


def train_s8_context(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse_smoothed: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    layout: str = "bhsd",
    block_q: int = kDefaultBlockQ,
    block_kv: int = kDefaultBlockKv,
    smooth_k: bool = True,
    k_mean: Optional[torch.Tensor] = None,
    dp_precision: str = "fp16",
) -> TrainS8Context:
    """The backward's context rebuilt from what a training forward keeps: the inputs, ``O`` and the
    smoothed LSE (``ctx.lse_smoothed`` of :func:`train_s8_forward`); Q, K, V are quantized again
    (deterministic, so the result equals the forward's context exactly). This is how
    ``sage_train`` saves memory between forward and backward (16-bit inputs instead of INT8 copies
    plus V), like a FlashAttention backward.

    Args:
        q, k, v: the forward's inputs (same shapes, dtype and layout as for :func:`train_s8_forward`).
        o: the forward's output, ``(b, h, sq, dv)`` / ``(b, sq, h, dv)``, q's dtype.
        lse_smoothed: float32 ``(b, h, sq)``, natural log of the smoothed scores.
        The keywords must be the forward's.

    Returns:
        A :class:`TrainS8Context` for :func:`train_s8_backward`.
    """
    qb, kb, vb, scale, k_mean = _resolve_args(
        q, k, v, is_causal=is_causal, scale=scale, layout=layout, block_q=block_q, block_kv=block_kv,
        smooth_k=smooth_k, k_mean=k_mean, dp_precision=dp_precision)
    b, h, sq, _ = qb.shape
    dv = vb.shape[3]
    if not isinstance(o, torch.Tensor) or o.dim() != 4:
        raise ValueError(f"o must be the forward's 4-D output, got "
                         f"{tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__}")
    ob = to_bhsd(o, layout)
    if tuple(ob.shape) != (b, h, sq, dv) or o.dtype != q.dtype:
        want = (b, h, sq, dv) if layout == "bhsd" else (b, sq, h, dv)
        raise ValueError(f"o must have shape {want} ({layout}) and dtype {q.dtype}, got "
                         f"{tuple(o.shape)} {o.dtype}")
    if (not isinstance(lse_smoothed, torch.Tensor) or tuple(lse_smoothed.shape) != (b, h, sq)
            or lse_smoothed.dtype != torch.float32):
        got = (f"{tuple(lse_smoothed.shape)} {lse_smoothed.dtype}" if isinstance(lse_smoothed, torch.Tensor)
               else type(lse_smoothed).__name__)
        raise ValueError(f"lse_smoothed must be float32 {(b, h, sq)}, got {got}")
    q_i8, q_scale, k_i8, k_scale, v_i8, v_scale = _quantize_inputs(qb, kb, vb, block_q, block_kv, k_mean)
    return TrainS8Context(
        q_i8=q_i8, q_scale=q_scale, k_i8=k_i8, k_scale=k_scale, v_i8=v_i8, v_scale=v_scale,
        v_hp=vb.contiguous(), o=ob.to(qb.device).contiguous(), lse_smoothed=lse_smoothed.to(qb.device).contiguous(),
        k_mean=k_mean, scale=scale, is_causal=is_causal, layout=layout, dtype=q.dtype, block_q=block_q,
        block_kv=block_kv, dp_precision=dp_precision, smooth_k=smooth_k,
    )


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
def train_s8_backward(do: torch.Tensor, ctx: TrainS8Context) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the ``train_s8`` recipe.

    Args:
        do: gradient of ``o``, same shape and layout as ``o``; fp16/bf16/fp32.
        ctx: the context returned by ``train_s8_forward`` (or ``train_s8_context``).

    Returns:
        ``(dq, dk, dv)`` in the inputs' dtype and layout (dk, dv with the kv-head count).
        Non-finite values: see the module docstring (NaN only where exact attention's gradient
        is non-finite).
    """
    if not isinstance(ctx, TrainS8Context):
        raise TypeError(f"ctx must be the TrainS8Context from train_s8_forward, got {type(ctx).__name__}")
    if not isinstance(do, torch.Tensor):
        raise TypeError(f"do must be a torch.Tensor, got {type(do).__name__}")
    if do.dtype not in _INPUT_DTYPES:
        raise TypeError(f"do must be float16, bfloat16 or float32, got {do.dtype}")
    b, h, sq, dv = ctx.o.shape
    dob = to_bhsd(do, ctx.layout) if do.dim() == 4 else do
    if tuple(dob.shape) != (b, h, sq, dv):
        want = (b, h, sq, dv) if ctx.layout == "bhsd" else (b, sq, h, dv)
        raise ValueError(f"do must have o's shape {want} ({ctx.layout}), got {tuple(do.shape)}")
    dev = ctx.o.device
    dob = dob.to(dev)
    hkv, skv, d = ctx.k_i8.shape[1], ctx.k_i8.shape[2], ctx.k_i8.shape[3]
    group = h // hkv
    bq, bkv = ctx.block_q, ctx.block_kv
    scale_log2 = ctx.scale * kLog2e
    neg_inf = float("-inf")
    nan = float("nan")

    # dO: the block scales come from the finite entries; the non-finite ones (do_bad) reach dV,
    # dP and dS as NaN below (module docstring). D and the 16-bit dP use dO as given.
    do_finite, do_bad = _finite_or_zero(dob)
    do_i8, do_scale = quant_int(do_finite, bits=8, granularity="per_block", role="q", block=bq)
    do_int = do_i8.to(torch.float32)
    sdo_tok = _per_token(do_scale, sq, bq)  # (b, h, sq)
    do_f = dob.to(torch.float32)
    delta = (do_f * ctx.o.to(torch.float32)).sum(dim=-1)  # D = rowsum(dO ∘ O), (b, h, sq)
    do_bad_rows = do_bad.any(dim=-1) if do_bad is not None else None  # (b, h, sq)
    do_bad_f = do_bad.to(torch.float32) if do_bad is not None else None

    qf = ctx.q_i8.to(torch.float32)
    kf = _expand_heads(ctx.k_i8, group).to(torch.float32)
    vf = _expand_heads(ctx.v_i8, group).to(torch.float32)
    v_hp = _expand_heads(ctx.v_hp, group).to(torch.float32)
    sq_tok = _per_token(ctx.q_scale, sq, bq)
    sk_tok = _expand_heads(_per_token(ctx.k_scale, skv, bkv), group)
    sk_blk = _expand_heads(ctx.k_scale, group)
    sv_blk = _expand_heads(ctx.v_scale, group)
    lse2 = ctx.lse_smoothed * kLog2e
    lse2_safe = torch.where(lse2 == neg_inf, torch.zeros_like(lse2), lse2)

    dq = torch.zeros((b, h, sq, d), dtype=torch.float32, device=dev)
    dk = torch.zeros((b, h, skv, d), dtype=torch.float32, device=dev)
    dvv = torch.zeros((b, h, skv, dv), dtype=torch.float32, device=dev)
    # Where the outputs are NaN because a non-finite value entered them (None: nowhere).
    dq_bad: Optional[torch.Tensor] = None  # (b, h, sq) rows
    dk_bad: Optional[torch.Tensor] = None  # (b, h, skv) rows
    dv_bad: Optional[torch.Tensor] = None  # (b, h, skv, dv) entries
    for jb, k0 in enumerate(range(0, skv, bkv)):
        k1 = min(k0 + bkv, skv)
        allowed = causal_allowed(sq, skv, dev, keys=(k0, k1)) if ctx.is_causal else None  # (sq, kj)
        acc = _imm(qf, kf[:, :, k0:k1].transpose(-1, -2))
        s2 = acc * (sq_tok[..., :, None] * sk_tok[:, :, None, k0:k1]) * scale_log2
        if allowed is not None:
            s2 = s2.masked_fill(~allowed, neg_inf)
        p = torch.exp2(s2 - lse2_safe[..., None])  # (b, h, sq, kj), masked / empty rows 0
        if allowed is not None:  # structural zeros, also where a non-finite LSE made exp2 NaN
            p = p.masked_fill(~allowed, 0.0)

        # dV_j = Σ_i P̂_ijᵀ dÔ_i: one P scale per (i, j) tile, one dO scale per query block i
        p_int, p_scale_rows, p_bad = _quant_tiles_int8(p, bq)
        dvv[:, :, k0:k1] = _tile_sum_at_b(p_int, p_scale_rows, do_int, sdo_tok, bq)
        if p_bad is not None or do_bad is not None:
            if dv_bad is None:
                dv_bad = torch.zeros((b, h, skv, dv), dtype=torch.bool, device=dev)
            if p_bad is not None:  # a non-finite P[i, j] reaches every channel of dV row j
                dv_bad[:, :, k0:k1] |= p_bad.any(dim=-2)[..., None]
            if do_bad is not None:  # a non-finite dO[i, c] reaches channel c of the keys i sees
                seen = (torch.ones((sq, k1 - k0), device=dev) if allowed is None
                        else allowed.to(torch.float32))
                dv_bad[:, :, k0:k1] |= torch.matmul(seen.transpose(0, 1), do_bad_f) > 0

        if ctx.dp_precision == "fp16":
            # 16-bit operands, products exact, fp32 result (float64 here: immune to TF32 settings)
            dp = torch.matmul(do_f.double(), v_hp[:, :, k0:k1].transpose(-1, -2).double()).float()
        else:
            dp = _imm(do_int, vf[:, :, k0:k1].transpose(-1, -2)) * (sdo_tok[..., None] * sv_blk[:, :, jb, None, None])
            if do_bad_rows is not None:
                dp = dp.masked_fill(do_bad_rows[..., None], nan)
        ds = p * (dp - delta[..., None])
        if allowed is not None:
            ds = ds.masked_fill(~allowed, 0.0)
        ds_int, ds_scale_rows, ds_bad = _quant_tiles_int8(ds, bq)
        # dQ_i += dŜ_ij K̂_j (K block j has one scale); dK_j = Σ_i dŜ_ijᵀ Q̂_i
        dq += _imm(ds_int, kf[:, :, k0:k1]) * (ds_scale_rows * sk_blk[:, :, jb, None, None])
        dk[:, :, k0:k1] = _tile_sum_at_b(ds_int, ds_scale_rows, qf, sq_tok, bq)
        if ds_bad is not None:
            if dq_bad is None:
                dq_bad = torch.zeros((b, h, sq), dtype=torch.bool, device=dev)
                dk_bad = torch.zeros((b, h, skv), dtype=torch.bool, device=dev)
            dq_bad |= ds_bad.any(dim=-1)
            dk_bad[:, :, k0:k1] |= ds_bad.any(dim=-2)

    dq = dq * ctx.scale
    dk = dk * ctx.scale
    if dq_bad is not None:
        dq = dq.masked_fill(dq_bad[..., None], nan)
        dk = dk.masked_fill(dk_bad[..., None], nan)
    if dv_bad is not None:
        dvv = dvv.masked_fill(dv_bad, nan)
    if group > 1:
        dk = dk.reshape(b, hkv, group, skv, d).sum(dim=2)
        dvv = dvv.reshape(b, hkv, group, skv, dv).sum(dim=2)
    outs = []
    for g in (dq, dk, dvv):
        g = g.to(ctx.dtype)
        outs.append(g if ctx.layout == "bhsd" else g.transpose(1, 2).contiguous())
    return outs[0], outs[1], outs[2]


def _tile_sum_at_b(a_int: torch.Tensor, a_scale_rows: torch.Tensor, b_int: torch.Tensor,
                    b_scale_tok: torch.Tensor, block_rows: int) -> torch.Tensor:
    """``Σ_i (Â_iᵀ B̂_i)·s_A,i·s_B,i`` over query tiles ``i`` of ``block_rows`` rows.

    a_int (b, h, s, n) with one scale per tile (given per row, constant inside a tile),
    b_int (b, h, s, m) with one scale per block of ``block_rows`` tokens (given per token).
    Each tile's integer product is exact; tiles are added in fp32 in tile order.
    """
    bsz, h, s, n = a_int.shape
    m = b_int.shape[-1]
    out = torch.zeros((bsz, h, n, m), dtype=torch.float32, device=a_int.device)
    for i0 in range(0, s, block_rows):
        i1 = min(i0 + block_rows, s)
        tile = _imm(a_int[:, :, i0:i1].transpose(-1, -2), b_int[:, :, i0:i1])
        out += tile * (a_scale_rows[:, :, i0, :, None] * b_scale_tok[:, :, i0, None, None])
    return out


# --------------------------------------------------------------------------------------------
# accuracy ablation: dP in 16 bits (the recipe) vs INT8
# --------------------------------------------------------------------------------------------
kAblationDoDists = ("randn", "token_scaled")
kTokenScaledSigma = 2.0  # "token_scaled" dO: each token's row times exp(2·N(0,1)), like real gradients


def _float64_autograd_grads(q, k, v, do, *, is_causal: bool, scale: float):
    """dQ, dK, dV of float64 SDPA math by torch.autograd, logical (b, h, s, d) inputs."""
    q64, k64, v64 = (x.detach().to(torch.float64).requires_grad_(True) for x in (q, k, v))
    group = q64.shape[1] // k64.shape[1]
    s = torch.matmul(q64, _expand_heads(k64, group).transpose(-1, -2)) * scale
    if is_causal:
        s = s.masked_fill(~causal_allowed(s.shape[-2], s.shape[-1], s.device, keys=(0, s.shape[-1])), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a fully masked row: P = 0
    o = torch.matmul(p, _expand_heads(v64, group))
    o.backward(do.to(torch.float64))
    return q64.grad, k64.grad, v64.grad


def ablation_rows(
    *,
    dists: Sequence[str] = ("randn", "outlier"),
    head_dims: Sequence[int] = (64, 128),
    dp_precisions: Sequence[str] = DP_PRECISIONS,
    do_dists: Sequence[str] = kAblationDoDists,
    b: int = 1,
    h: int = 4,
    seq_len: int = 1024,
    is_causal: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    device="cpu",
) -> List[Dict[str, object]]:
    """Accuracy of the ``train_s8`` gradients vs float64 autograd, dP in 16 bits vs INT8.

    For each input distribution (``sage_quant.inputs.make_qkv``), head dim and dO distribution
    (``"randn"``: N(0,1); ``"token_scaled"``: N(0,1) rows scaled by ``exp(2·N(0,1))`` per token,
    the spread real gradients have), one row per ``dp_precision`` with keys
    ``recipe, dist, do_dist, d, dp_precision, b, h, seq_len, is_causal, dtype, seed`` and
    ``{dq,dk,dv}_{cos,rel_l1,rmse}`` (``sage_quant.metrics``). Same inputs for both precisions.
    """
    from ..inputs import make_qkv
    from ..metrics import cosine, rel_l1, rmse

    rows: List[Dict[str, object]] = []
    for dist in dists:
        for d in head_dims:
            for do_dist in do_dists:
                if do_dist not in kAblationDoDists:
                    raise ValueError(f"do_dist must be one of {kAblationDoDists}, got {do_dist!r}")
                case_seed = seed + 1000 * d + (0 if dist == "randn" else 1) + (0 if do_dist == "randn" else 2)
                q, k, v = make_qkv(dist, b=b, h_q=h, h_kv=h, s_q=seq_len, s_kv=seq_len, d=d, dtype=dtype,
                                   seed=case_seed, device=device)
                gen = torch.Generator(device="cpu").manual_seed(case_seed + 7)
                do = torch.randn(b, h, seq_len, d, generator=gen)
                if do_dist == "token_scaled":
                    do = do * torch.exp(kTokenScaledSigma * torch.randn(b, h, seq_len, 1, generator=gen))
                do = do.to(dtype).to(device)
                scale = 1.0 / math.sqrt(d)
                ref = _float64_autograd_grads(q, k, v, do, is_causal=is_causal, scale=scale)
                for dp in dp_precisions:
                    _, _, ctx = train_s8_forward(q, k, v, is_causal=is_causal, dp_precision=dp)
                    grads = train_s8_backward(do, ctx)
                    row: Dict[str, object] = dict(
                        recipe="train_s8", dist=dist, do_dist=do_dist, d=d, dp_precision=dp, b=b, h=h,
                        seq_len=seq_len, is_causal=is_causal, dtype=str(dtype).replace("torch.", ""),
                        seed=case_seed)
                    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
                        row[f"{name}_cos"] = cosine(g, r)
                        row[f"{name}_rel_l1"] = rel_l1(g, r)
                        row[f"{name}_rmse"] = rmse(g, r)
                    rows.append(row)
    return rows
