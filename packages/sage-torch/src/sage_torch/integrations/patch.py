"""patch_sdpa(): route every ``F.scaled_dot_product_attention`` call through sage_torch."""

from __future__ import annotations

import functools

import torch.nn.functional as F

from .. import api

_stack: list["patch_sdpa"] = []  # active patches, innermost last


class patch_sdpa:  # noqa: N801 - used like a function: `with sage_torch.patch_sdpa(): ...`
    """Replace ``torch.nn.functional.scaled_dot_product_attention`` with sage's drop-in.

    Patches on construction; restores the previous function on ``restore()`` or on leaving a
    ``with`` block (nesting restores in reverse order)::

        with sage_torch.patch_sdpa():
            model(x)
        handle = sage_torch.patch_sdpa(strict=True); ...; handle.restore()

    Code that imported the function by name before patching (``from torch.nn.functional import
    scaled_dot_product_attention``) keeps PyTorch's; use the integration for that library
    instead. ``strict=True`` raises where the drop-in would fall back to PyTorch's SDPA
    (default: ``SAGE_STRICT``).
    """

    def __init__(self, *, strict: bool | None = None) -> None:
        if strict is not None and not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool or None, got {type(strict).__name__}")
        self._previous = F.scaled_dot_product_attention
        if strict is None:
            replacement = api.scaled_dot_product_attention
        else:
            @functools.wraps(api.scaled_dot_product_attention)
            def replacement(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False):
                return api._sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 strict=strict)
        self._replacement = replacement
        F.scaled_dot_product_attention = replacement
        self._active = True
        _stack.append(self)

    @property
    def active(self) -> bool:
        return self._active

    def restore(self) -> None:
        """Put back the function that was there before this patch (idempotent)."""
        if not self._active:
            return
        if _stack[-1] is not self or F.scaled_dot_product_attention is not self._replacement:
            raise RuntimeError("patch_sdpa: F.scaled_dot_product_attention was replaced again after this "
                               "patch; restore the later patch first (patches nest like a stack)")
        F.scaled_dot_product_attention = self._previous
        self._active = False
        _stack.pop()

    def __enter__(self) -> "patch_sdpa":
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()
