"""Integrations: patch any model's F.scaled_dot_product_attention, Hugging Face transformers,
diffusers. The libraries themselves are imported lazily (only when you call their helper)."""

from .diffusers import DIFFUSERS_BACKEND_NAME, SageAttnProcessor, diffusers_attention_backend, register_diffusers
from .hf import HF_ATTENTION_NAME, hf_attention_forward, register_hf
from .patch import patch_sdpa

__all__ = ["patch_sdpa", "hf_attention_forward", "register_hf", "HF_ATTENTION_NAME", "SageAttnProcessor",
           "register_diffusers", "diffusers_attention_backend", "DIFFUSERS_BACKEND_NAME"]
