"""Hopper (sm_90a) kernels of train_s8: where the SageBwd forward/backward kernels plug in.

Status (issue 10): both passes are kernels. The **forward** (``sage_core.attn_fwd_sm90_train_s8``,
:data:`FORWARD_KERNEL_NAMES`) and the **backward** (``sage_core.attn_bwd_sm90_train_s8``,
:data:`BACKWARD_KERNEL_NAMES`: a dK/dV kernel per 64-key tile and a dQ kernel per 128-query block,
deterministic, no atomics; ``docs/perf/sm90_train_s8.md``); their GPU tests against the emulation are
``tests/gpu/test_train_sm90.py`` and ``packages/sage-train/tests/test_train_gpu.py``. The
quantization around them runs as PyTorch ops plus ``sage_quant.ops`` kernels (:func:`quantize_forward`,
:func:`quantize_backward`), not yet fused.

Contract (``sage_train._dispatch.TrainKernel``), all tensors logical ``(b, h, s, d)`` in
``layout`` ("bhsd" or "bshd"), any strides (copy what the kernel cannot read):

* ``forward(q, k, v, *, layout, is_causal, scale, smooth_k) -> (o, lse)``: ``o`` contiguous in
  ``layout``, q's dtype; ``lse`` float32 ``(b, h_q, s_q)``, natural log of the *smoothed*
  scores (the emulation's ``ctx.lse_smoothed``; ``-inf`` for a row that sees no key).
* ``backward(do, q, k, v, o, lse, *, layout, is_causal, scale, smooth_k) -> (dq, dk, dv)``:
  contiguous, each with its input's shape and dtype; dK/dV summed over a GQA group; ``do`` may
  have any strides (``o.sum().backward()`` gives a stride-0 expand). Q, K, V are re-quantized
  from the inputs (deterministic: the same INT8 values as the forward's), as the emulation's
  ``train_s8_context`` does; non-finite values follow the emulation's rule
  (``sage_quant.emulation.train_s8`` module docstring).
* Both must equal ``sage_quant.emulation.train_s8`` to rel-L1 <= 2e-3 (issue 10); the oracle is
  ``sage_train.attention(..., emulate=True)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._dispatch import TrainKernel, register_kernel

__all__ = ["BACKEND_NAME", "HEAD_DIMS", "DTYPES", "KERNEL_NAMES", "FORWARD_KERNEL_NAMES", "BACKWARD_KERNEL_NAMES",
           "GLUE_WRITTEN", "available", "supports", "forward", "forward_kernel_available", "backward_kernel_available",
           "quantize_forward", "quantize_backward", "backward"]

BACKEND_NAME = "sm90_train_s8"
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
#: The forward's sage_core instantiations (``sage_core.has_kernel``).
FORWARD_KERNEL_NAMES: Tuple[str, ...] = tuple(f"attn_sm90_train_s8_hdim{d}_{t}" for d in HEAD_DIMS
                                              for t in ("f16", "bf16"))
#: The backward's instantiations (each launches the dK/dV and the dQ kernel).
BACKWARD_KERNEL_NAMES: Tuple[str, ...] = tuple(f"attn_sm90_train_s8_bwd_hdim{d}_{t}" for d in HEAD_DIMS
                                               for t in ("f16", "bf16"))
#: sage_core kernel instantiations this backend needs (``sage_core.has_kernel``).
KERNEL_NAMES: Tuple[str, ...] = FORWARD_KERNEL_NAMES + BACKWARD_KERNEL_NAMES
#: Whether :func:`forward` / :func:`backward` launch real kernels (False: they raise).
GLUE_WRITTEN = True


def available() -> bool:
    """True when the Python glue is written and every kernel in :data:`KERNEL_NAMES` is in sage_core."""
    if not GLUE_WRITTEN or not KERNEL_NAMES or not torch.cuda.is_available():
        return False
    import sage_core

    return all(bool(sage_core.has_kernel(name)) for name in KERNEL_NAMES)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str, is_causal: bool, scale: float,
             dp_precision: str, smooth_k: bool) -> Optional[str]:
    """None when the kernels can run this call, else why not (the emulation runs it)."""
    if dp_precision != "fp16":
        return f"dp_precision={dp_precision!r} is an emulation-only ablation (the kernel keeps dP in 16 bits)"
    return None


def _has(name: str, head_dim: int, dtype: torch.dtype) -> bool:
    if head_dim not in HEAD_DIMS or dtype not in DTYPES or not torch.cuda.is_available():
        return False
    try:
        import sage_core
    except ImportError:
        return False
    return bool(sage_core.has_kernel(f"{name}_hdim{head_dim}_{'bf16' if dtype == torch.bfloat16 else 'f16'}"))


def forward_kernel_available(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether sage_core holds the forward kernel for ``head_dim`` and ``dtype`` (and a GPU is visible)."""
    return _has("attn_sm90_train_s8", head_dim, dtype)


def backward_kernel_available(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether sage_core holds the backward kernels for ``head_dim`` and ``dtype`` (and a GPU is visible)."""
    return _has("attn_sm90_train_s8_bwd", head_dim, dtype)


def _bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhsd" else x.transpose(1, 2)


_PERM_INDEX: dict = {}  # (s_pad, device) -> the gather index of _t_perm (built once per length)


def _t_perm(x_i8: torch.Tensor, block: int) -> torch.Tensor:
    """INT8 ``(b, h, s, d)`` -> ``(b, h, d, ceil(s/block)*block)``: transposed, zero-padded, the
    tokens of every 32-token chunk in the order an 8-bit wgmma's register A operand needs from its
    B operand (the inference kernel's v_e4m3_t_perm32 order, ``sage_torch.backends.sm90.v_token_permutation``):
    V^T of the forward (block 64), Q^T and dO^T (128) and K^T (64) of the backward. Two kernels: a
    padded transpose and one gather."""
    b, h, s, d = x_i8.shape
    s_pad = -(-s // block) * block
    key = (s_pad, x_i8.device)
    idx = _PERM_INDEX.get(key)
    if idx is None:
        from sage_torch.backends.sm90 import v_token_permutation

        idx = (torch.arange(0, s_pad, 32, device=x_i8.device)[:, None]
               + v_token_permutation(x_i8.device)[None, :]).reshape(-1)
        if len(_PERM_INDEX) > 64:
            _PERM_INDEX.clear()
        _PERM_INDEX[key] = idx
    return torch.nn.functional.pad(x_i8.transpose(-1, -2), (0, s_pad - s)).index_select(-1, idx)


def _quantize_qk(qb: torch.Tensor, kb: torch.Tensor, smooth_k: bool):
    """Per-block INT8 Q (128 tokens) and K - mean(K) (64), bit-exact to the emulation's."""
    from sage_quant import ops
    from sage_quant.emulation.train_s8 import kDefaultBlockKv, kDefaultBlockQ
    from sage_quant.reference import token_mean

    k_mean = token_mean(kb) if smooth_k else None
    q_i8, q_scale = ops.quantize_int(qb, bits=8, granularity="per_block", role="q", block=kDefaultBlockQ)
    k_i8, k_scale = ops.quantize_int(kb, bits=8, granularity="per_block", role="k", block=kDefaultBlockKv,
                                     mean=k_mean)
    return q_i8.contiguous(), q_scale.contiguous(), k_i8.contiguous(), k_scale.contiguous(), k_mean


def quantize_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str,
                     smooth_k: bool) -> dict:
    """The forward kernel's inputs, quantized exactly as ``sage_quant.emulation.train_s8`` does
    (per-block INT8: Q per 128 tokens, K - mean(K) and V per 64; the compiled quantization kernels
    of ``sage_quant.ops``, bit-exact to the reference), plus V^T in the kernel's order."""
    from sage_quant import ops
    from sage_quant.emulation.train_s8 import kDefaultBlockKv

    qb, kb, vb = _bhsd(q, layout), _bhsd(k, layout), _bhsd(v, layout)
    q_i8, q_scale, k_i8, k_scale, k_mean = _quantize_qk(qb, kb, smooth_k)
    v_i8, v_scale = ops.quantize_int(vb, bits=8, granularity="per_block", role="k", block=kDefaultBlockKv)
    return {"q": q_i8, "q_scale": q_scale, "k": k_i8, "k_scale": k_scale, "v_t": _t_perm(v_i8, kDefaultBlockKv),
            "v_scale": v_scale.contiguous(), "k_mean": k_mean}


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str, is_causal: bool, scale: float,
            smooth_k: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Training forward on sm_90a: ``(o, lse_smoothed)`` (module docstring): the per-block
    quantization, then one launch of ``sage_core.attn_fwd_sm90_train_s8``."""
    d = q.shape[-1] if isinstance(q, torch.Tensor) else None
    if d is None or not forward_kernel_available(d, q.dtype):
        raise RuntimeError(f"no sm90 train_s8 forward kernel here for head dim {d}, "
                           f"{getattr(q, 'dtype', None)} (sage_core built with the sm90 family, on a CUDA GPU)")
    import sage_core

    qz = quantize_forward(q, k, v, layout=layout, smooth_k=smooth_k)
    b, h_q, s_q, _ = qz["q"].shape
    s_kv = qz["k"].shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous in layout (the contract)
    lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=q.device)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    sage_core._C.attn_fwd_sm90_train_s8(qz["q"], qz["k"], qz["v_t"], qz["q_scale"], qz["k_scale"], qz["v_scale"],
                                        _bhsd(o, layout), lse, s_kv, float(scale), bool(is_causal), stream)
    return o, lse


def quantize_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, *, layout: str, smooth_k: bool) -> dict:
    """The backward kernels' operands (``sage_core.attn_bwd_sm90_train_s8``'s docstring), quantized as
    ``sage_quant.emulation.train_s8.train_s8_backward`` does: Q, K - mean(K) and dO per-block INT8
    (dO from its finite values; the non-finite ones are zeroed and located by ``do_bad_last``),
    Q^T / K^T / dO^T in the kernels' token order, 16-bit V and dO, D = rowsum(dO o O) and
    LSE * log2(e) (-inf -> 0) padded to the 128-query blocks."""
    from sage_quant import ops
    from sage_quant.emulation.train_s8 import kDefaultBlockKv, kDefaultBlockQ, kLog2e

    qb, kb, vb, ob = _bhsd(q, layout), _bhsd(k, layout), _bhsd(v, layout), _bhsd(o, layout)
    dob = _bhsd(do, layout).to(q.dtype)
    q_i8, q_scale, k_i8, k_scale, _ = _quantize_qk(qb, kb, smooth_k)
    b, h, s_q, d = dob.shape
    finite = torch.isfinite(dob)
    do16 = torch.where(finite, dob, torch.zeros((), dtype=dob.dtype, device=dob.device)).contiguous()
    rows = torch.arange(s_q, device=dob.device, dtype=torch.int32)[:, None]
    do_bad_last = torch.where(finite, torch.full((), -1, dtype=torch.int32, device=dob.device), rows).amax(dim=2)
    do_i8, do_scale = ops.quantize_int(do16, bits=8, granularity="per_block", role="q", block=kDefaultBlockQ)
    s_pad = -(-s_q // kDefaultBlockQ) * kDefaultBlockQ
    delta = torch.zeros((b, h, s_pad), dtype=torch.float32, device=dob.device)
    delta[..., :s_q] = (dob.float() * ob.float()).sum(dim=-1)
    lse2 = torch.zeros((b, h, s_pad), dtype=torch.float32, device=dob.device)
    l2 = lse * kLog2e
    lse2[..., :s_q] = torch.where(torch.isneginf(l2), torch.zeros_like(l2), l2)
    return {"q": q_i8, "q_t": _t_perm(q_i8, kDefaultBlockQ), "k": k_i8, "k_t": _t_perm(k_i8, kDefaultBlockKv),
            "v": vb.contiguous(), "dout": do16, "do_t": _t_perm(do_i8.contiguous(), kDefaultBlockQ),
            "q_scale": q_scale, "k_scale": k_scale, "do_scale": do_scale.contiguous(), "lse2": lse2,
            "delta": delta, "do_bad_last": do_bad_last.contiguous()}


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, *, layout: str, is_causal: bool, scale: float,
             smooth_k: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training backward on sm_90a: ``(dq, dk, dv)`` (module docstring): the operands of
    :func:`quantize_backward`, then ``sage_core.attn_bwd_sm90_train_s8`` (two deterministic
    kernels: dK/dV per 64-key tile, dQ per 128-query block)."""
    d = q.shape[-1] if isinstance(q, torch.Tensor) else None
    if d is None or not backward_kernel_available(d, q.dtype):
        raise RuntimeError(f"no sm90 train_s8 backward kernel here for head dim {d}, "
                           f"{getattr(q, 'dtype', None)} (sage_core built with the sm90 family, on a CUDA GPU)")
    import sage_core

    z = quantize_backward(do, q, k, v, o, lse, layout=layout, smooth_k=smooth_k)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous in layout (the contract)
    dk = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    sage_core._C.attn_bwd_sm90_train_s8(z["q"], z["q_t"], z["k"], z["k_t"], z["v"], z["dout"], z["do_t"],
                                        z["q_scale"], z["k_scale"], z["do_scale"], z["lse2"], z["delta"],
                                        _bhsd(dq, layout), _bhsd(dk, layout), _bhsd(dv, layout), float(scale),
                                        bool(is_causal), stream, do_bad_last=z["do_bad_last"])
    return dq, dk, dv


register_kernel(TrainKernel(
    name=BACKEND_NAME, archs=frozenset({"sm90"}), dtypes=frozenset(DTYPES), head_dims=frozenset(HEAD_DIMS),
    forward=forward, backward=backward, available=available, supports=supports, module=__name__))
