"""Hopper (sm_90a) kernels of train_s8: where the SageBwd forward/backward kernels plug in.

Status (issue 10): the **forward kernel** exists (``sage_core.attn_fwd_sm90_train_s8``,
instantiations :data:`FORWARD_KERNEL_NAMES`; compiled, its GPU test against the emulation is
``tests/gpu/test_train_sm90.py``) and :func:`forward` runs it; the **backward kernel does not**,
so :func:`available` stays False and dispatch runs the exact emulation for both passes (a
forward kernel with an emulated backward would claim a kernel while training at emulation
speed). Everything around the kernels (custom ops, fake implementations, autograd, dispatch,
validation, the benchmark) is in place and tested on CPU with a stand-in kernel
(``tests/test_train_ops.py``). To finish: write :func:`backward`, list every sage_core kernel
name in :data:`KERNEL_NAMES` and set :data:`GLUE_WRITTEN`; nothing else in sage_train changes.

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

__all__ = ["BACKEND_NAME", "HEAD_DIMS", "DTYPES", "KERNEL_NAMES", "FORWARD_KERNEL_NAMES", "GLUE_WRITTEN",
           "available", "supports", "forward", "forward_kernel_available", "quantize_forward", "backward"]

BACKEND_NAME = "sm90_train_s8"
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
#: The forward's sage_core instantiations (``sage_core.has_kernel``).
FORWARD_KERNEL_NAMES: Tuple[str, ...] = tuple(f"attn_sm90_train_s8_hdim{d}_{t}" for d in HEAD_DIMS
                                              for t in ("f16", "bf16"))
#: sage_core kernel instantiations this backend needs (``sage_core.has_kernel``); empty until the
#: backward exists (then the forward's and the backward's).
KERNEL_NAMES: Tuple[str, ...] = ()
#: Whether :func:`forward` / :func:`backward` launch real kernels (False: they raise).
GLUE_WRITTEN = False


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


def forward_kernel_available(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether sage_core holds the forward kernel for ``head_dim`` and ``dtype`` (and a GPU is visible)."""
    if head_dim not in HEAD_DIMS or dtype not in DTYPES or not torch.cuda.is_available():
        return False
    try:
        import sage_core
    except ImportError:
        return False
    return bool(sage_core.has_kernel(f"attn_sm90_train_s8_hdim{head_dim}_{'bf16' if dtype == torch.bfloat16 else 'f16'}"))


def _bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhsd" else x.transpose(1, 2)


def _v_t_perm(v_i8: torch.Tensor) -> torch.Tensor:
    """INT8 V ``(b, h, s, d)`` -> ``(b, h, d, ceil(s/64)*64)``: transposed, zero-padded, the tokens of
    every 32-token chunk in the order the PV wgmma's register A operand needs (the inference
    kernel's v_e4m3_t_perm32 order, ``sage_torch.backends.sm90.v_token_permutation``)."""
    from sage_torch.backends.sm90 import v_token_permutation

    b, h, s, d = v_i8.shape
    s_pad = -(-s // 64) * 64
    v_t = torch.zeros((b, h, d, s_pad), dtype=torch.int8, device=v_i8.device)
    v_t[..., :s] = v_i8.transpose(-1, -2)
    idx = (torch.arange(0, s_pad, 32, device=v_i8.device)[:, None] + v_token_permutation(v_i8.device)[None, :])
    return v_t.index_select(-1, idx.reshape(-1)).contiguous()


def quantize_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str,
                     smooth_k: bool) -> dict:
    """The forward kernel's inputs, quantized exactly as ``sage_quant.emulation.train_s8`` does
    (per-block INT8: Q per 128 tokens, K - mean(K) and V per 64; the compiled quantization kernels
    of ``sage_quant.ops``, bit-exact to the reference), plus V^T in the kernel's order."""
    from sage_quant import ops
    from sage_quant.emulation.train_s8 import kDefaultBlockKv, kDefaultBlockQ
    from sage_quant.reference import token_mean

    qb, kb, vb = _bhsd(q, layout), _bhsd(k, layout), _bhsd(v, layout)
    k_mean = token_mean(kb) if smooth_k else None
    q_i8, q_scale = ops.quantize_int(qb, bits=8, granularity="per_block", role="q", block=kDefaultBlockQ)
    k_i8, k_scale = ops.quantize_int(kb, bits=8, granularity="per_block", role="k", block=kDefaultBlockKv,
                                     mean=k_mean)
    v_i8, v_scale = ops.quantize_int(vb, bits=8, granularity="per_block", role="k", block=kDefaultBlockKv)
    return {"q": q_i8.contiguous(), "q_scale": q_scale.contiguous(), "k": k_i8.contiguous(),
            "k_scale": k_scale.contiguous(), "v_t": _v_t_perm(v_i8), "v_scale": v_scale.contiguous(),
            "k_mean": k_mean}


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


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, *, layout: str, is_causal: bool, scale: float,
             smooth_k: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training backward on sm_90a: ``(dq, dk, dv)`` (module docstring)."""
    raise NotImplementedError("sage_train.backends.sm90.backward: the sm_90a train_s8 backward kernel is not "
                              "written yet (issue 10); available() is False so dispatch never calls this")


register_kernel(TrainKernel(
    name=BACKEND_NAME, archs=frozenset({"sm90"}), dtypes=frozenset(DTYPES), head_dims=frozenset(HEAD_DIMS),
    forward=forward, backward=backward, available=available, supports=supports, module=__name__))
