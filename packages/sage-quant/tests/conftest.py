"""sage-quant tests: GPU skipping (explicit gpu/sm80/sm90 markers only) and the ``seed`` fixture (fixed per
test id, printed; SAGE_TEST_SEED / SAGE_TEST_FRESH_SEEDS) come from tests/sage_pytest_plugin.py."""
import importlib.util
import pathlib
import sys


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
