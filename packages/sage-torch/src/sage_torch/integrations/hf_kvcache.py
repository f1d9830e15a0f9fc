"""transformers: generate with an INT8 KV cache (``SageKVCache``) and ``attn_implementation="sage"``.

    from sage_torch.integrations.hf_kvcache import SageKVCache
    sage_torch.register_hf(); model.set_attn_implementation("sage")
    out = model.generate(ids, past_key_values=SageKVCache(max_cache_len=4096), max_new_tokens=256)

Each layer holds a :class:`sage_torch.QuantizedKVCache` (created on its first update, with the
batch, kv heads, head dim, dtype and device of the keys it sees). The first update (the prompt)
returns the prompt's own K/V, so the prefill attention runs as always (sage's prefill kernel or
PyTorch); every later update appends to the INT8 cache and returns a reference to it, which
sage's attention function reads with the decode kernel (:meth:`QuantizedKVCache.attention`,
bottom-right causal: the queries are the newest tokens). A call the decode path cannot honour (a
padding mask, dropout, soft-capping, ...) gets the cache dequantized and runs as before, warned
once (strict: an error). The reference is a tensor of head dim 0: any other attention
implementation fails on it at once instead of computing something wrong. Beam search and
assisted decoding (crop, reorder, batch repeat) are not supported (clear errors).

transformers is imported when this module is.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..kvcache import QuantizedKVCache

__all__ = ["SageKVCache", "SageKVLayer", "cache_of"]

_REF_ATTR = "_sage_kv_cache"


def cache_of(key: Any) -> Optional[QuantizedKVCache]:
    """The QuantizedKVCache a SageKVLayer handed out in place of keys, or None."""
    return getattr(key, _REF_ATTR, None)


class SageKVLayer(CacheLayerMixin):
    """One layer's INT8 KV cache (see the module docstring)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, max_cache_len: int, strict: Optional[bool] = None) -> None:
        super().__init__()
        self.max_cache_len = max_cache_len
        self.strict = strict
        self.cache: Optional[QuantizedKVCache] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.cache = QuantizedKVCache(b, h, d, self.max_cache_len, device=key_states.device, dtype=key_states.dtype,
                                      strict=self.strict)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.cache.length == 0
        self.cache.append(key_states, value_states)
        if first:  # nothing before the prompt: its own keys are all it attends to
            return key_states, value_states
        ref = key_states.new_empty((self.cache.batch, self.cache.heads_kv, self.cache.length, 0))
        setattr(ref, _REF_ATTR, self.cache)
        return ref, ref

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def get_max_length(self) -> int:
        return -1  # grows like a dynamic layer (up to max_cache_len: append raises past it)

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()

    def _unsupported(self, what: str):
        raise NotImplementedError(f"SageKVCache does not support {what} (beam search / assisted decoding); "
                                  f"use DynamicCache for those")

    def crop(self, *args, **kwargs) -> None:
        self._unsupported("crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unsupported("batch_select_indices")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._unsupported("reorder_cache")


class SageKVCache(Cache):
    """A transformers ``Cache`` whose layers are :class:`SageKVLayer` (INT8 K/V, decode kernel).

    Args:
        max_cache_len: tokens per sequence it can hold (prompt + generated).
        strict: raise instead of warning where the decode path falls back (default ``SAGE_STRICT``).
    """

    def __init__(self, max_cache_len: int, strict: Optional[bool] = None) -> None:
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        self.capacity = max_cache_len  # (Cache.max_cache_len is transformers' property over the layers)
        super().__init__(layer_class_to_replicate=lambda: SageKVLayer(max_cache_len, strict))
