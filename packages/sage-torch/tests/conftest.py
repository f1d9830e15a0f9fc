"""Shared fixtures: a clean dispatcher per test, fresh random inputs with printed seeds."""

from __future__ import annotations

import os
import random

import pytest
import torch

from sage_torch import _dispatch, backends
from sage_torch_testing import FakeBackend


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped with a reason when none is present)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if "gpu" in item.keywords and str(item.path).startswith(here):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch, request):
    """Each test starts with no SAGE_* variables and no remembered warnings, and gets the backend
    registry back as it found it. CPU tests start from an EMPTY registry (they register fakes;
    a real kernel backend must never receive their CPU tensors); GPU tests see the real one."""
    for name in ("SAGE_FORCE_RECIPE", "SAGE_FORCE_EMULATION", "SAGE_STRICT"):
        monkeypatch.delenv(name, raising=False)
    backends.load_backend_modules()
    saved = dict(backends._registry)
    if "gpu" not in request.node.keywords:
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
def seed(request):
    value = random.SystemRandom().randrange(1 << 31)
    print(f"[{request.node.name}] seed={value}")
    return value


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


