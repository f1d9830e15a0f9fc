"""sage-train tests. The ``seed`` fixture (fixed per test, printed, seeds torch) and GPU skipping
come from tests/sage_pytest_plugin.py (``-p`` in pytest.ini and in this package's pyproject.toml)."""
import pytest
import torch

import sage_train


@pytest.fixture(autouse=True)
def _fresh_warnings():
    sage_train.reset_warnings()
    yield
    sage_train.reset_warnings()


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and on a shared 2-core CI box
    several threads spinning against each other made a step 50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
