"""sage-train tests. The ``seed`` fixture (fixed per test, printed, seeds torch) and GPU skipping
come from tests/sage_pytest_plugin.py (also loaded by the repository's conftest.py)."""
import importlib.util
import pathlib
import sys

import pytest
import torch

import sage_train


def _load_plugin():
    """tests/sage_pytest_plugin.py of the repository, the one module for skipping and seeds."""
    name = "sage_pytest_plugin"
    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parents[3] / "tests" / "sage_pytest_plugin.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_plugin = _load_plugin()
pytest_configure = _plugin.pytest_configure
pytest_collection_modifyitems = _plugin.pytest_collection_modifyitems
seed = _plugin.seed


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
