import os
import random

import pytest
import torch

import sage_train


@pytest.fixture
def seed():
    """A fresh seed per test (printed; set SAGE_TEST_SEED to reproduce a failure)."""
    s = int(os.environ.get("SAGE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={s}")
    torch.manual_seed(s)
    return s


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
