"""Blackwell dispatch (issue 13 item 4): every sm100/103/120/121 GPU gets a sage kernel by default.

Until their own kernels exist (tcgen05 on sm100/103, NVFP4 block-scaled mma.sync on sm120/121), the
sm80 mma.sync family, built for 100a/103a/120a/121a, serves them. On CPU: the device capability and
sage_core's build targets are mocked; the sm80 module's own registrations (archs, native_archs,
supports) are used, with stand-in kernels in place of the CUDA launches.
"""

import importlib
import warnings

import pytest
import torch

import sage_quant
import sage_torch
from sage_torch import _dispatch, backends
from sage_torch.backends import sm80
from sage_torch_testing import FakeBackend, make_qkv

BLACKWELL = ("sm100", "sm103", "sm120", "sm121")
#: ci/build-matrix.json "release_archs" (tests/test_arch_matrix.py keeps the two equal)
RELEASE_TARGETS = ("80", "86", "89", "90a", "100a", "103a", "120a", "121a")
DEFAULT_ON = {"sm100": "qk_s8_pv_f16", "sm103": "qk_s8_pv_f16",
              "sm120": "qk_s8_pv_e4m3", "sm121": "qk_s8_pv_e4m3"}


@pytest.fixture
def sm80_family(monkeypatch):
    """sm80_family(targets=RELEASE_TARGETS) -> {recipe: FakeBackend}: the sm80 module registers its
    backends again into the test's empty registry (a reload runs its registration code), then each
    one's kernel is replaced by a stand-in and marked available, for a sage_core built for ``targets``."""
    def apply(targets=RELEASE_TARGETS):
        importlib.reload(sm80)
        monkeypatch.setattr(sm80, "_build_targets", lambda: tuple(targets))
        fakes = {}
        for spec in backends.registered_backends():
            if spec.module != sm80.__name__:
                continue
            fakes[spec.recipe] = FakeBackend(marker=1.0)
            backends.register_backend(spec.name, spec.recipe, spec.archs, spec.head_dims, fakes[spec.recipe],
                                      lambda: True, dtypes=spec.dtypes, supports=spec.supports,
                                      native_archs=spec.native_archs, replace=True)
        assert set(fakes) == set(sm80.RECIPES)
        return fakes
    return apply


@pytest.mark.parametrize("capability, arch", [((10, 0), "sm100"), ((10, 3), "sm103"),
                                              ((12, 0), "sm120"), ((12, 1), "sm121")])
def test_device_arch_from_capability(monkeypatch, capability, arch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert _dispatch.device_arch(torch.device("cuda", 0)) == arch
    assert arch in _dispatch.ARCH_DEFAULT_RECIPES


def test_sm80_family_is_registered_for_blackwell_but_not_native_there(sm80_family):
    sm80_family()
    for spec in backends.registered_backends():
        assert set(BLACKWELL) <= spec.archs, spec.name
        assert not set(BLACKWELL) & spec.native_archs, spec.name  # a kernel written for the arch wins


@pytest.mark.parametrize("arch", BLACKWELL)
def test_auto_runs_the_sm80_family(arch, as_arch, sm80_family, seed):
    fakes = sm80_family()
    expected = DEFAULT_ON[arch]
    for dtype in (torch.float16, torch.bfloat16):
        for hd in (64, 128):
            decision = _dispatch.resolve(arch, dtype, hd, "auto")
            assert decision.kind == "kernel" and decision.recipe == expected, decision
            assert decision.backend.name == f"sm80_{expected}"
    as_arch(arch)
    q, k, v = make_qkv(h_q=4, h_kv=2, s_q=33, s_kv=47, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sage_torch.SageFallbackWarning)  # a kernel path: no warning
        sage_torch.attention(q, k, v, is_causal=True)
    assert len(fakes[expected].calls) == 1
    assert sum(len(f.calls) for f in fakes.values()) == 1


def test_auto_on_sm120_is_a_kernel_not_the_nvfp4_emulation(as_arch, sm80_family, seed):
    """qk_nvfp4_pv_nvfp4 heads sm120's list but has no kernel yet: auto takes the next recipe
    that has one (FP8 P.V on the sm80 family), never the emulation and never PyTorch."""
    fakes = sm80_family()
    assert _dispatch.ARCH_DEFAULT_RECIPES["sm120"][0] == "qk_nvfp4_pv_nvfp4"
    as_arch("sm120")
    q, k, v = make_qkv(seed=seed)
    o = sage_torch.attention(q, k, v)
    assert len(fakes["qk_s8_pv_e4m3"].calls) == 1
    ref = sage_torch.attention(q, k, v, recipe="torch")
    torch.testing.assert_close(o, ref + 1.0)  # the stand-in's marker: the kernel path ran


@pytest.mark.parametrize("arch", ("sm120", "sm121"))
def test_explicit_nvfp4_on_sm120_runs_its_emulation_with_a_warning(arch, as_arch, sm80_family, seed):
    fakes = sm80_family()
    as_arch(arch)
    q, k, v = make_qkv(s_q=40, seed=seed)
    decision = _dispatch.resolve(arch, torch.bfloat16, 64, "qk_nvfp4_pv_nvfp4")
    assert decision.kind == "emulation" and decision.warn
    assert f"no registered and available kernel for recipe 'qk_nvfp4_pv_nvfp4' on {arch}" in decision.reason
    with pytest.warns(sage_torch.SageFallbackWarning, match="EMULATION of recipe 'qk_nvfp4_pv_nvfp4'"):
        o = sage_torch.attention(q, k, v, recipe="qk_nvfp4_pv_nvfp4")
    torch.testing.assert_close(o, sage_quant.emulate(q, k, v, "qk_nvfp4_pv_nvfp4").to(q.dtype), rtol=0, atol=0)
    assert not any(f.calls for f in fakes.values())
    with pytest.raises(sage_torch.SageDispatchError, match="qk_nvfp4_pv_nvfp4.*not falling back to the emulation"):
        sage_torch.attention(q, k, v, recipe="qk_nvfp4_pv_nvfp4", strict=True)


@pytest.mark.parametrize("arch", BLACKWELL)
@pytest.mark.parametrize("recipe", sm80.RECIPES)
def test_explicit_sm80_recipes_run_their_kernel(arch, recipe, as_arch, sm80_family, seed):
    fakes = sm80_family()
    as_arch(arch)
    q, k, v = make_qkv(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sage_torch.SageFallbackWarning)
        sage_torch.attention(q, k, v, recipe=recipe)
    assert len(fakes[recipe].calls) == 1


def test_native_blackwell_kernels_take_over(sm80_family, fake_backend):
    """When the sm120 NVFP4 kernel or a kernel written for sm100 registers, it wins: no list or
    registration order to edit (the sm80 family is registered as ported there)."""
    sm80_family()
    fake_backend("qk_nvfp4_pv_nvfp4", archs=("sm120", "sm121"), name="sm120_nvfp4")
    fake_backend("qk_s8_pv_f16", archs=("sm100", "sm103"), name="sm100_f16")
    for arch in ("sm120", "sm121"):
        assert _dispatch.resolve(arch, torch.bfloat16, 128).backend.name == "sm120_nvfp4"
    for arch in ("sm100", "sm103"):
        assert _dispatch.resolve(arch, torch.bfloat16, 128).backend.name == "sm100_f16"
        assert [s.name for s in _dispatch.lookup(arch, "qk_s8_pv_f16", torch.bfloat16, 128)] == \
            ["sm100_f16", "sm80_qk_s8_pv_f16"]


@pytest.mark.parametrize("arch, targets, why", [
    ("sm120", ("90a",), "none of which runs on sm120"),            # the default development build
    ("sm103", ("90a", "100a"), "none of which runs on sm103"),     # a 100a cubin is for B200 only
    ("sm121", ("120a",), "none of which runs on sm121"),
])
def test_a_build_without_the_devices_target_falls_back_instead_of_launching(
        arch, targets, why, as_arch, sm80_family, seed):
    fakes = sm80_family(targets)
    as_arch(arch)
    q, k, v = make_qkv(seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning, match=why):
        sage_torch.attention(q, k, v)
    with pytest.warns(sage_torch.SageFallbackWarning, match="EMULATION of recipe 'qk_s8_pv_f16'"):
        sage_torch.attention(q, k, v, recipe="qk_s8_pv_f16")
    with pytest.raises(sage_torch.SageDispatchError, match=why):
        sage_torch.attention(q, k, v, strict=True)
    assert not any(f.calls for f in fakes.values())


@pytest.mark.parametrize("recipe, arch, targets, ok", [
    ("qk_s8_pv_f16", "sm100", ("100a",), True),
    ("qk_s8_pv_f16", "sm103", ("100a",), False),      # 'a' code runs on its own capability only
    ("qk_s8_pv_f16", "sm103", ("100f",), True),       # family code runs on 10.0 and 10.3
    ("qk_s8_pv_f16", "sm103", ("100",), True),        # plain code: same major, same or higher minor
    ("qk_s8_pv_f16", "sm121", ("120a", "121a"), True),
    ("qk_s8_pv_f16", "sm110", RELEASE_TARGETS, False),
    ("qk_s8_pv_f16", "sm87", ("80", "86"), True),
    ("qk_s8_pv_e4m3", "sm89", ("80", "86"), False),   # the driver loads sm_86 code: empty e4m3 kernel
    ("qk_s8_pv_e4m3", "sm89", ("80", "89"), True),
    ("qk_s8_pv_e4m3", "sm90", ("89",), False),        # 8.9 code does not run on 9.0
    ("qk_s4_pv_e4m3", "sm120", RELEASE_TARGETS, True),
])
def test_arch_build_reason(recipe, arch, targets, ok):
    why = sm80.arch_build_reason(recipe, arch, targets)
    assert (why is None) == ok, why
