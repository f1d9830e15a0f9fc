"""Argument checks of ``sage_train.attention``: the inference API's checks, with its messages.

The checks and their wording are ``sage_torch.api._validate``'s: the same helpers
(``_check_qkv_tensors``, ``_check_qkv_shapes``, the flag and scale readers), so an input with
several faults gets the same first error from both APIs (``tests/test_train_validation.py``
compares the two message by message). Three things differ, because the training path supports them (the
emulation does; a kernel that cannot declines the call in its ``supports`` and the emulation runs):

* ``float32`` inputs are accepted (emulation only: the recipe computes in fp32 anyway);
* ``v`` may have its own head dim ``dv`` (O and dV have ``dv`` channels);
* any strides (the inference API wants a contiguous last dim because its kernels read rows).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from sage_torch._recipes import SUPPORTED_LAYOUTS
from sage_torch.api import _as_bool, _as_scale, _check_qkv_shapes, _check_qkv_tensors, _shape_text

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
    _check_qkv_tensors(q, k, v, ndim=4, shape_text=f"{_shape_text(layout)} for layout={layout!r}",
                       dtypes=TRAIN_DTYPES, dtype_note=" (float32 runs the emulation only)",
                       last_dim_contiguous=False)
    _check_qkv_shapes(q, k, v, layout, v_head_dim_own=True)
    return is_causal, scale
