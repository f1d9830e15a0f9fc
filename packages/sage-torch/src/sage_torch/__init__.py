"""sage_torch: PyTorch front end of sage (quantized low-bit attention).

* :func:`attention`: quantized attention, ``recipe="auto"`` picks the device's kernel.
* :func:`scaled_dot_product_attention`: drop-in for ``F.scaled_dot_product_attention``.
* :func:`sageattn`: SageAttention-compatible signature.
* :func:`attention_varlen` / :func:`sageattn_varlen`: packed variable-length sequences
  (``sage_torch.flash_attn``: flash-attn-compatible ``flash_attn_func`` / ``flash_attn_varlen_func``).
* ``sage_torch.distributed``: context parallelism (ring, Ulysses, the out/LSE merge).
* :class:`QuantizedKVCache`: an INT8 KV cache and the decode attention that reads it.
* :func:`patch_sdpa`, :mod:`sage_torch.integrations` (transformers, diffusers).
* :func:`info`: what is installed and what each call would run.
* ``torch.ops.sage.attention_fwd``: the custom op (torch.compile, CUDA graphs).

Dispatch policy and environment switches: ``sage_torch._dispatch`` / README.md.
"""

__version__ = "0.1.0"

from ._dispatch import ARCH_DEFAULT_RECIPES, SageDispatchError, SageFallbackWarning
from ._info import info
from ._recipes import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, SUPPORTED_LAYOUTS
from .api import attention, sageattn, scaled_dot_product_attention
from .backends import register_backend
from .kvcache import QuantizedKVCache
from .integrations import SageAttnProcessor, hf_attention_forward, patch_sdpa, register_diffusers, register_hf
from .varlen import attention_varlen, sageattn_varlen

__all__ = [
    "attention", "scaled_dot_product_attention", "sageattn", "attention_varlen", "sageattn_varlen",
    "patch_sdpa", "info", "QuantizedKVCache",
    "register_backend", "hf_attention_forward", "register_hf", "register_diffusers", "SageAttnProcessor",
    "SageDispatchError", "SageFallbackWarning", "ARCH_DEFAULT_RECIPES",
    "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "SUPPORTED_LAYOUTS", "__version__",
]
