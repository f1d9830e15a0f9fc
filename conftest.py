"""Repository-wide pytest hooks: GPU tests skip with a visible reason where no GPU is present."""
import pytest


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible on this machine"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"GPU test skipped: {reason}")
    for item in items:
        # get_closest_marker: a folder named gpu/ is a keyword too, but not a marker
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
