"""Accuracy metrics against a reference (docs/design/NUMERICS.md, "Accuracy: how it is measured").

All metrics flatten both tensors and compute in float64. A NaN anywhere in either tensor makes
every metric NaN: a broken output must never look fine. An infinite element makes the
comparison NaN as well (inf - inf, inf / inf).
"""

from __future__ import annotations

import math
from typing import Dict

import torch

__all__ = ["cosine", "rel_l1", "rmse", "max_abs", "accuracy"]


def _pair(a: torch.Tensor, ref: torch.Tensor):
    if not isinstance(a, torch.Tensor) or not isinstance(ref, torch.Tensor):
        raise TypeError(f"a and ref must be torch.Tensors, got {type(a).__name__} and {type(ref).__name__}")
    if a.shape != ref.shape:
        raise ValueError(f"shape mismatch: a {tuple(a.shape)} vs ref {tuple(ref.shape)}")
    if a.numel() == 0:
        raise ValueError("cannot compare empty tensors")
    a64 = a.detach().reshape(-1).to(device=ref.device, dtype=torch.float64)
    r64 = ref.detach().reshape(-1).to(torch.float64)
    return a64, r64


def _nan_if_nonfinite(value: float, a64: torch.Tensor, r64: torch.Tensor) -> float:
    if not (torch.isfinite(a64).all() and torch.isfinite(r64).all()):
        return math.nan
    return value


def cosine(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (NaN if either has a NaN/Inf or is all zero)."""
    a64, r64 = _pair(a, ref)
    den = torch.linalg.vector_norm(a64) * torch.linalg.vector_norm(r64)
    val = float((a64 @ r64) / den) if float(den) > 0 else math.nan
    return _nan_if_nonfinite(val, a64, r64)


def rel_l1(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``sum|a - ref| / sum|ref|`` (NaN if ref is all zero and a is not)."""
    a64, r64 = _pair(a, ref)
    num = float((a64 - r64).abs().sum())
    den = float(r64.abs().sum())
    val = num / den if den > 0 else (0.0 if num == 0 else math.nan)
    return _nan_if_nonfinite(val, a64, r64)


def rmse(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean square error."""
    a64, r64 = _pair(a, ref)
    return _nan_if_nonfinite(float(((a64 - r64) ** 2).mean().sqrt()), a64, r64)


def max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference."""
    a64, r64 = _pair(a, ref)
    return _nan_if_nonfinite(float((a64 - r64).abs().max()), a64, r64)


def accuracy(a: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """``{"cos", "rel_l1", "rmse", "max_abs"}`` of ``a`` against ``ref``."""
    return {"cos": cosine(a, ref), "rel_l1": rel_l1(a, ref), "rmse": rmse(a, ref), "max_abs": max_abs(a, ref)}
