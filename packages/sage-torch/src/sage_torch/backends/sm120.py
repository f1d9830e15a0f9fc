"""sm120 block-scaled FP4 attention (recipe ``qk_nvfp4_pv_nvfp4``) as a sage_torch backend.

The kernel (``kernels/include/sage/sm120/sm120_attn_fwd_kernel_mma_sync.cuh``) is one mma.sync
mainloop with two MMA policies:

* native (sm_120a/121a, RTX 50 / GB10): ``mma.sync kind::mxf4nvf4.block_scale.scale_vec::4X.m16n8k64``,
  registered here for ``sm120`` and ``sm121`` (``supports`` declines a build without the device's
  own 'a' target: a 120a cubin does not load on a 12.1 GPU);
* twin (sm_90a): the same kernel computing the block-scaled product with FP16 mma.sync from the
  same registers. It is a test vehicle for the H200 and is **never** registered for dispatch: call
  :func:`attention_twin` explicitly.

Both consume what ``sage_quant``'s emulation describes (``emulation/recipes.py``): Q - q_mean (per
``q_block`` rows) and K - k_mean quantized two-level NVFP4 along d, V^T (tokens padded with zeros
to a multiple of 128) two-level NVFP4 along tokens, all by ``sage_quant.ops.quantize_fp4`` (the
CUDA ``quant_fp4`` kernels; bit-exact to ``sage_quant.reference.quant_fp4``); P is quantized in
the kernel (per-row FP32 scale per 128-key tile, E4M3 per 16 keys). Kernel facts the options must
respect (``unsupported_reason``): ``fmt="nvfp4"``, ``p_fp4="two_level"``, ``kv_block=128`` (the
tile), ``q_block`` a multiple of 64 when ``smooth_q``, ``delta_s="quantized_k"``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

import sage_quant

try:
    import sage_core
except ImportError as _exc:  # available() reports it
    sage_core = None
    _SAGE_CORE_ERROR: Optional[BaseException] = _exc
else:
    _SAGE_CORE_ERROR = None
from sage_quant import ops as _qops
from sage_quant import reference as _ref

from . import register_backend
from .. import _dispatch
from .._layout import empty_output

__all__ = ["RECIPE", "HEAD_DIMS", "kKvTile", "kVTokenPad", "kernel_names", "resolve_options",
           "unsupported_reason", "quantize_operands", "attention_twin", "attn_qk_nvfp4_pv_nvfp4"]

RECIPE = "qk_nvfp4_pv_nvfp4"
HEAD_DIMS = (64, 128)
kKvTile = 128  # keys per softmax step = the tile over which P's per-row FP32 scale is taken
kCtaRows = 64  # query rows per CTA: Q smoothing blocks must be multiples
kVTokenPad = 128  # V^T tokens padded to a multiple of the tile
kMaxGridYZ = 65535
_POLICY_FN = {"native": "attn_fwd_sm120_qk_nvfp4_pv_nvfp4", "twin": "attn_fwd_sm120_twin_qk_nvfp4_pv_nvfp4"}
_POLICY_KERNEL = {"native": "attn_sm120_qk_nvfp4_pv_nvfp4", "twin": "attn_sm120_twin_qk_nvfp4_pv_nvfp4"}


def kernel_names(policy: str = "native") -> tuple[str, ...]:
    """sage_core kernel names (has_kernel) of every configuration of ``policy``."""
    return tuple(f"{_POLICY_KERNEL[policy]}_hdim{d}_{io}" for d in HEAD_DIMS for io in ("f16", "bf16"))


def resolve_options(options: dict[str, Any]) -> dict[str, Any]:
    """The recipe's options validated by ``sage_quant.recipe_options`` (TypeError / ValueError)."""
    return sage_quant.recipe_options(RECIPE, **options)


def unsupported_reason(opts: dict[str, Any]) -> Optional[str]:
    """None if the kernel implements these (resolved) options exactly, else why not."""
    if opts["fmt"] != "nvfp4":
        return f"the sm120 kernel multiplies NVFP4 (E2M1, UE4M3 per 16): fmt must be 'nvfp4', got {opts['fmt']!r}"
    if opts["p_fp4"] != "two_level":
        return f"the sm120 kernel quantizes P in two levels: p_fp4 must be 'two_level', got {opts['p_fp4']!r}"
    if opts["kv_block"] != kKvTile:
        return (f"the sm120 kernel steps the softmax (and P's row scale) over {kKvTile}-key tiles: kv_block must be "
                f"{kKvTile}, got {opts['kv_block']}")
    if opts["smooth_q"]:
        if opts["delta_s"] != "quantized_k":
            return f"the kernel adds dS from the dequantized K it holds: delta_s must be 'quantized_k', got {opts['delta_s']!r}"
        if opts["q_block"] % kCtaRows:
            return f"Q smoothing blocks must be multiples of the CTA's {kCtaRows} rows, got q_block={opts['q_block']}"
    return None


def quantize_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, opts: dict[str, Any]):
    """Q, K, V in the kernel's formats (``sage_quant.ops.quantize_fp4``: CUDA kernels on CUDA
    tensors, the bit-exact reference elsewhere). Returns a dict with ``q, q_sf, q_gs`` (of
    Q - q_mean), ``k, k_sf, k_gs`` (of K - k_mean), ``v_t, v_sf, v_gs`` (of V^T padded to
    ``ceil(s_kv/128)*128`` tokens), ``q_mean`` (None without Q smoothing) and ``k_mean``."""
    qb, kb, vb = (_ref.to_bhsd(t, layout) for t in (q, k, v))
    k_mean = _qops.quantize_token_mean(k, layout=layout) if opts["smooth_k"] else None
    q_mean = _qops.quantize_block_mean(q, opts["q_block"], layout=layout) if opts["smooth_q"] else None
    qc, q_sf, q_gs = _qops.quantize_fp4(qb, "nvfp4", mean=q_mean, mean_block=opts["q_block"] if q_mean is not None else None)
    kc, k_sf, k_gs = _qops.quantize_fp4(kb, "nvfp4", mean=k_mean)
    s_kv = vb.shape[2]
    s_pad = -(-s_kv // kVTokenPad) * kVTokenPad
    vc, v_sf, v_gs = _qops.quantize_fp4(vb.transpose(2, 3), "nvfp4", n_pad=s_pad)
    return dict(q=qc, q_sf=q_sf, q_gs=q_gs, k=kc, k_sf=k_sf, k_gs=k_gs, v_t=vc, v_sf=v_sf, v_gs=v_gs,
                q_mean=q_mean, k_mean=k_mean)


# Output allocator (tests swap in a NaN-filling one to poison outputs).
_alloc = torch.empty


def _run(policy: str, q, k, v, *, layout: str, is_causal: bool, scale: float, return_lse: bool, **options):
    opts = resolve_options(options)
    reason = unsupported_reason(opts)
    if reason is not None:
        raise ValueError(f"sm120 backend, recipe {RECIPE}: {reason}")
    ops = quantize_operands(q, k, v, layout, opts)
    qb = _ref.to_bhsd(q, layout)
    b, h_q, s_q, _ = qb.shape
    h_kv = _ref.to_bhsd(k, layout).shape[1]
    o = empty_output(q, layout, alloc=_alloc)
    ob = _ref.to_bhsd(o, layout)
    lse = _alloc((b, h_q, s_q), dtype=torch.float32, device=q.device) if return_lse else None
    stream = torch.cuda.current_stream(q.device).cuda_stream
    getattr(sage_core, _POLICY_FN[policy])(
        ops["q"], ops["q_sf"], ops["q_gs"], ops["k"], ops["k_sf"], ops["k_gs"], ops["v_t"], ops["v_sf"], ops["v_gs"],
        ob, lse, ops["q_mean"], q_mean_block=int(opts["q_block"]), softmax_scale=float(scale),
        is_causal=bool(is_causal), stream=stream)
    if lse is not None and ops["k_mean"] is not None:
        # Softmax ignores the per-row constant q.k_mean; the LSE of the unsmoothed scores needs it.
        rep = h_q // h_kv
        km = ops["k_mean"].repeat_interleave(rep, dim=1) if rep > 1 else ops["k_mean"]
        lse += torch.einsum("bhsd,bhd->bhs", qb.to(torch.float32), km) * float(scale)
    return o, lse


def attn_qk_nvfp4_pv_nvfp4(q, k, v, *, layout: str, is_causal: bool, scale: float, return_lse: bool, **options):
    """qk_nvfp4_pv_nvfp4 on the native sm_120a kernel: (o, lse | None); q, k, v fp16/bf16 CUDA in
    ``layout`` ('bhsd' or 'bshd'), head dim 64/128; see the module docstring."""
    return _run("native", q, k, v, layout=layout, is_causal=is_causal, scale=scale, return_lse=return_lse, **options)


def attention_twin(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str = "bhsd",
                   is_causal: bool = False, scale: Optional[float] = None, return_lse: bool = False, **options):
    """The sm120 kernel with its twin MMA policy on an sm_90 GPU (H100/H200), for tests only.

    Same arguments and results as ``sage_torch.attention(..., recipe="qk_nvfp4_pv_nvfp4")``
    (``q`` ``(b, h_q, s_q, d)`` for bhsd or ``(b, s_q, h_q, d)`` for bshd, fp16/bf16 CUDA, d 64 or
    128; returns ``o`` or ``(o, lse)``), but never chosen by dispatch: the FP4 product runs in FP16
    mma.sync, several times slower than the 8-bit Hopper kernels. Raises RuntimeError when
    sage_core lacks the twin (a build without 90a) and ValueError for options the kernel does not
    implement (see ``unsupported_reason``)."""
    if sage_core is None:
        raise RuntimeError(f"sage_core does not import: {_SAGE_CORE_ERROR}")
    if not hasattr(sage_core, _POLICY_FN["twin"]):
        raise RuntimeError("sage_core was built without the sm120twin family (SAGE_CUDA_ARCHS needs 90a)")
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported by the sm120 kernel; accepted: {HEAD_DIMS}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    o, lse = _run("twin", q, k, v, layout=layout, is_causal=is_causal, scale=float(scale),
                  return_lse=return_lse, **options)
    return (o, lse) if return_lse else o


def _supports(q, k, v, *, layout, is_causal, scale, return_lse, **options) -> Optional[str]:
    b, h_q = q.shape[0], (q.shape[1] if layout == "bhsd" else q.shape[2])
    if b > kMaxGridYZ or h_q > kMaxGridYZ:
        return (f"the sm120 kernel launches one CTA row per (head, batch): batch and q heads must be "
                f"<= {kMaxGridYZ}, got batch={b}, heads={h_q}")
    arch = _dispatch.device_arch(q.device)
    target = {"sm120": "120a", "sm121": "121a"}.get(arch)
    if target is not None and sage_core is not None and target not in sage_core.build_info()["cuda_archs"]:
        return (f"sage_core was built for {list(sage_core.build_info()['cuda_archs'])}, without {target}: the NVFP4 "
                f"kernel's code for {arch} (an 'a' cubin runs only on its own compute capability)")
    try:
        opts = resolve_options(options)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return unsupported_reason(opts)


def _available() -> bool:
    if sage_core is None:
        raise RuntimeError(f"sage_core does not import: {_SAGE_CORE_ERROR}")
    return hasattr(sage_core, _POLICY_FN["native"]) and all(sage_core.has_kernel(n) for n in kernel_names("native"))


register_backend(f"sm120_{RECIPE}", RECIPE, archs=("sm120", "sm121"), head_dims=HEAD_DIMS, fn=attn_qk_nvfp4_pv_nvfp4,
                 available=_available, dtypes=(torch.float16, torch.bfloat16), supports=_supports)
