"""Repository-wide pytest hooks: GPU skipping by explicit marker and the ``seed`` fixture.

The logic lives in tests/sage_pytest_plugin.py, shared with every packages/*/tests/conftest.py
(a per-package run has the package as its rootdir and does not see this file).
"""
import importlib.util
import pathlib
import sys


def _load_plugin():
    name = "sage_pytest_plugin"
    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parent / "tests" / "sage_pytest_plugin.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_plugin = _load_plugin()
pytest_configure = _plugin.pytest_configure
pytest_collection_modifyitems = _plugin.pytest_collection_modifyitems
seed = _plugin.seed
