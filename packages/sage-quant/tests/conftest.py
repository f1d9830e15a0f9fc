import os
import random

import pytest
import torch


@pytest.fixture
def seed(request):
    """A fresh seed per test (printed, so a failure can be replayed with SAGE_TEST_SEED)."""
    env = os.environ.get("SAGE_TEST_SEED")
    s = int(env) if env else random.SystemRandom().randrange(1 << 31)
    print(f"[seed] {request.node.nodeid}: SAGE_TEST_SEED={s}")
    torch.manual_seed(s)
    return s


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped with a reason when none is present)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
