"""Argument checks of ``sage_train.attention``: the inference API's checks, with its messages.

The checks and their wording are ``sage_torch.api._validate``'s (same order, so an input with
several faults gets the same first error from both APIs; ``tests/test_train_validation.py``
compares the two message by message). The helpers that read flags and the scale are imported from
sage_torch, not rewritten. Three things differ, because the training path supports them (the
emulation does; a kernel that cannot declines the call in its ``supports`` and the emulation runs):

* ``float32`` inputs are accepted (emulation only: the recipe computes in fp32 anyway);
* ``v`` may have its own head dim ``dv`` (O and dV have ``dv`` channels);
* any strides (the inference API wants a contiguous last dim because its kernels read rows).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from sage_torch._recipes import SUPPORTED_LAYOUTS, dtype_name
from sage_torch.api import _as_bool, _as_scale, _shape_text

__all__ = ["TRAIN_DTYPES", "validate"]

#: dtypes sage_train.attention accepts (the inference API: float16, bfloat16).
TRAIN_DTYPES: Tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def validate(q: Any, k: Any, v: Any, *, layout: Any, is_causal: Any, scale: Any) -> Tuple[bool, Optional[float]]:
    """Check one call; returns ``(is_causal, scale)`` as a Python bool and a float (or None).

    Raises TypeError / ValueError naming what was given and what is accepted.
    """
    if not isinstance(layout, str) or layout not in SUPPORTED_LAYOUTS:
        raise ValueError(f"layout must be one of {SUPPORTED_LAYOUTS}, got {layout!r}")
    is_causal = _as_bool("is_causal", is_causal)
    scale = _as_scale(scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {_shape_text(layout)} for layout={layout!r}, "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in TRAIN_DTYPES:
            raise TypeError(f"{name} has dtype {dtype_name(t.dtype)}; accepted: "
                            f"{', '.join(dtype_name(d) for d in TRAIN_DTYPES)} (float32 runs the emulation only)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {dtype_name(q.dtype)}, "
                        f"{dtype_name(k.dtype)}, {dtype_name(v.dtype)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    h_axis, s_axis = (1, 2) if layout == "bhsd" else (2, 1)
    b, h_q, s_q, d = q.shape[0], q.shape[h_axis], q.shape[s_axis], q.shape[3]
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != b:
            raise ValueError(f"batch size of {name} ({t.shape[0]}) differs from q's ({b})")
    if k.shape[3] != d:
        raise ValueError(f"head_dim of k ({k.shape[3]}) differs from q's ({d}); "
                         f"q and k must share one head dim (v may have its own)")
    h_kv, s_kv = k.shape[h_axis], k.shape[s_axis]
    if v.shape[h_axis] != h_kv or v.shape[s_axis] != s_kv:
        raise ValueError(f"k and v must have the same heads and length, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (layout {layout!r})")
    for name, size in (("batch", b), ("q heads", h_q), ("kv heads", h_kv), ("q length", s_q),
                       ("kv length", s_kv), ("head_dim", d), ("v head_dim", v.shape[3])):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if h_q % h_kv:
        raise ValueError(f"q heads ({h_q}) must be a multiple of kv heads ({h_kv}) (GQA/MQA)")
    return is_causal, scale
