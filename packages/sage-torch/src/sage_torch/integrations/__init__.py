"""Integrations: patch any model's F.scaled_dot_product_attention, Hugging Face transformers,
diffusers. The libraries themselves are imported lazily (only when you call their helper)."""

from .diffusers import SageAttnProcessor
from .hf import HF_ATTENTION_NAME, hf_attention_forward, register_hf
from .patch import patch_sdpa

__all__ = ["patch_sdpa", "hf_attention_forward", "register_hf", "HF_ATTENTION_NAME", "SageAttnProcessor"]
