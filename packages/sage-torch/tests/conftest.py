"""Shared fixtures: a clean dispatcher per test. GPU skipping (explicit markers) and the ``seed``
fixture (fixed per test, printed) come from tests/sage_pytest_plugin.py (``-p`` in pytest.ini and
in this package's pyproject.toml)."""

from __future__ import annotations

import pytest

from sage_torch import _dispatch, backends
from sage_torch_testing import FakeBackend


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch, request):
    """Each test starts with no SAGE_* variables and no remembered warnings, and gets the backend
    registry back as it found it. CPU tests start from an EMPTY registry (they register fakes;
    a real kernel backend must never receive their CPU tensors); GPU tests see the real one."""
    for name in ("SAGE_FORCE_RECIPE", "SAGE_FORCE_EMULATION", "SAGE_STRICT"):
        monkeypatch.delenv(name, raising=False)
    backends.load_backend_modules()
    saved = dict(backends._registry)
    if request.node.get_closest_marker("gpu") is None:
        with backends._lock:
            backends._registry.clear()
            backends._generation += 1
    _dispatch.reset_warnings()
    yield
    with backends._lock:
        backends._registry.clear()
        backends._registry.update(saved)
        backends._generation += 1
    _dispatch.reset_warnings()


@pytest.fixture
def as_arch(monkeypatch):
    """as_arch("sm90"): make CPU tensors look like they live on that GPU arch."""
    def apply(arch: str):
        monkeypatch.setattr(_dispatch, "device_arch", lambda device: arch)
    return apply


@pytest.fixture
def fake_backend():
    """fake_backend(recipe, archs=("sm90",), head_dims=(64, 128), ...) -> FakeBackend registered."""
    made = []

    def register(recipe="qk_s8_pv_e4m3", archs=("sm90",), head_dims=(64, 128), *, name=None, marker=0.0,
                 available=True, **kwargs):
        fn = FakeBackend(marker)
        name = name or f"fake_{recipe}_{'_'.join(archs)}_{len(made)}"
        backends.register_backend(name, recipe, archs, head_dims, fn,
                                  available if callable(available) else (lambda: available), **kwargs)
        made.append(name)
        return fn
    return register


