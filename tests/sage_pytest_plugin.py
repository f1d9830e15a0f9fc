"""The one place that decides which tests skip, plus the seed fixture (a pytest plugin module).

Loaded as ``-p sage_pytest_plugin`` by the configuration file a run uses: pytest.ini at the
repository root (the single session CI runs: all packages/*/tests and tests/) or
packages/<pkg>/pyproject.toml (that package's tests alone, from the root or from inside the package;
its rootdir is the package). Each file puts this folder on ``pythonpath``. One configuration file
per run, so the plugin is registered once per session.

Skipping is by explicit marker only (pytest.ini declares them):
    gpu   needs a CUDA GPU
    sm80  runs the sm80 mma.sync family: needs a GPU of compute capability >= 8.0
    sm90  runs the sm90 wgmma kernels: needs a Hopper (compute capability 9.x) GPU
A test without one of these markers is a CPU test and runs everywhere, wherever its file lives
(a folder named gpu/ is a keyword, not a marker: keywords are never used for skipping). Each
skip says why. sm80/sm90 imply gpu.

Seeds (``seed`` fixture): by default a fixed seed per test, derived from the test id, so a run is
reproducible and every test sees different data; it is printed (shown with -rA or on failure).
``SAGE_TEST_SEED=<n>`` uses n for every test (replay a failure); ``SAGE_TEST_FRESH_SEEDS=1``
draws a fresh seed per test (fuzzing). The fixture also seeds torch's global generator.
"""
from __future__ import annotations

import os
import pathlib
import random
import zlib

import pytest

GPU_MARKERS = ("gpu", "sm80", "sm90")


def _cuda_capability():
    """(reason, capability): reason is None when a CUDA GPU is visible."""
    try:
        import torch
    except ImportError:
        return "torch is not installed", None
    if not torch.cuda.is_available():
        return "no CUDA GPU visible on this machine (torch.cuda.is_available() is False)", None
    return None, torch.cuda.get_device_capability()


def gpu_skip_reason(item, reason, capability) -> str | None:
    """Why ``item`` cannot run here, or None. Only explicit markers count."""
    names = {m for m in GPU_MARKERS if item.get_closest_marker(m) is not None}
    if not names:
        return None
    if reason is not None:
        return f"GPU test skipped: {reason}"
    if "sm90" in names and capability[0] != 9:
        return f"sm90 test skipped: needs a Hopper GPU (compute capability 9.x), found sm_{capability[0]}{capability[1]}"
    if "sm80" in names and tuple(capability) < (8, 0):
        return f"sm80 test skipped: needs compute capability >= 8.0, found sm_{capability[0]}{capability[1]}"
    return None


MARKERS = (
    "gpu: needs a CUDA GPU (skipped with a reason when none is visible)",
    "sm80: runs the sm80 mma.sync kernel family (sm_80+ GPU; implies gpu)",
    "sm90: runs the sm90 wgmma kernels (Hopper GPU; implies gpu)",
)


def pytest_configure(config):
    for line in MARKERS:  # pytest.ini has them; a per-package run reads the package's config instead
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    reason, capability = _cuda_capability()
    for item in items:
        why = gpu_skip_reason(item, reason, capability)
        if why is not None:
            item.add_marker(pytest.mark.skip(reason=why))


REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def repo_test_id(item) -> str:
    """The test id relative to the repository root, the same whichever rootdir the run has
    ("packages/sage-quant/tests/test_x.py::test_y[a]" in the single session and in a package run)."""
    path = pathlib.Path(str(item.path)).resolve()
    try:
        rel = path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        rel = path.as_posix()
    _, sep, rest = item.nodeid.partition("::")
    return rel + sep + rest


def default_seed(test_id: str) -> int:
    """The fixed per-test seed: CRC32 of the repository-relative test id."""
    return zlib.crc32(test_id.encode()) & 0x7FFFFFFF


def choose_seed(test_id: str) -> tuple[int, str]:
    """(seed, how it was chosen) under the SAGE_TEST_SEED / SAGE_TEST_FRESH_SEEDS switches."""
    env = os.environ.get("SAGE_TEST_SEED", "").strip()
    if env:
        return int(env), "SAGE_TEST_SEED"
    if os.environ.get("SAGE_TEST_FRESH_SEEDS", "") not in ("", "0"):
        return random.SystemRandom().randrange(1 << 31), "fresh (SAGE_TEST_FRESH_SEEDS=1)"
    return default_seed(test_id), "fixed per test id"


@pytest.fixture
def seed(request):
    """The test's seed (see the module docstring); replay any run with SAGE_TEST_SEED=<seed>."""
    test_id = repo_test_id(request.node)
    s, how = choose_seed(test_id)
    print(f"[seed] {test_id}: SAGE_TEST_SEED={s} ({how})")
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.manual_seed(s)
    random.seed(s)
    return s
