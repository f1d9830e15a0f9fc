"""Once-per-reason warnings of sage_train."""

from __future__ import annotations

import threading
import warnings

try:  # one warning family for the whole project when the front end is installed
    from sage_torch import SageFallbackWarning as _FallbackBase
except ImportError:  # sage_torch absent (or not importable yet): plain UserWarning
    _FallbackBase = UserWarning

__all__ = ["SageTrainFallbackWarning", "warn_once", "reset_warnings"]


class SageTrainFallbackWarning(_FallbackBase):
    """sage_train ran something other than a train_s8 GPU kernel (the emulation, or PyTorch SDPA)."""


_lock = threading.Lock()
_warned: set = set()


def warn_once(key: str, message: str) -> None:
    """Issue ``message`` the first time ``key`` is seen in this process."""
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, SageTrainFallbackWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which warnings were issued (tests use this to see them again)."""
    with _lock:
        _warned.clear()
