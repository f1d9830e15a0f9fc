"""The names the sage_torch backends ask sage_core for are the names the build compiles.

Three lists must agree: packages/sage-core/cmake/instantiations.cmake (what is compiled and what
build_info() reports), the config lists in the kernel headers (what the bindings dispatch over)
and the backends' kernel_names(). A rename in one of them would make a backend silently report
itself unavailable; this CPU test catches it wherever the family is built (CI builds sm_90a,
which includes the sm80 and sm90 families)."""

import pytest

sage_core = pytest.importorskip("sage_core")
sm80 = pytest.importorskip("sage_torch.backends.sm80")
sm90 = pytest.importorskip("sage_torch.backends.sm90")


def _families():
    return set(sage_core.build_info()["families"])


def test_sm80_kernel_names_are_built():
    if "sm80" not in _families():
        pytest.skip(f"sage_core was built without the sm80 family (families: {sorted(_families())})")
    built = set(sage_core.kernels())
    for recipe in sm80.RECIPES:
        assert set(sm80.kernel_names(recipe)) <= built, recipe
        assert callable(getattr(sage_core, f"attn_fwd_sm80_{recipe}")), recipe
    for recipe in ("qk_s8_pv_f16", "qk_s8_pv_e4m3"):
        names = set(sm80.kernel_names(recipe, "f16_buffer"))
        assert names <= built, sorted(names - built)
        assert "pv_accum" in getattr(sage_core, f"attn_fwd_sm80_{recipe}").__doc__
    sm80_built = {k for k in built if k.startswith("attn_sm80_")}
    named = {n for r in sm80.RECIPES for n in sm80.kernel_names(r)}
    named |= {n for r in ("qk_s8_pv_f16", "qk_s8_pv_e4m3") for n in sm80.kernel_names(r, "f16_buffer")}
    assert sm80_built == named, f"built but unknown to the backend: {sorted(sm80_built - named)}"


def test_sm90_kernel_names_are_built():
    if "sm90" not in _families():
        pytest.skip(f"sage_core was built without the sm90 family (families: {sorted(_families())})")
    built = set(sage_core.kernels())
    assert set(sm90._KERNEL_NAMES.values()) <= built
    assert set(sm90._KERNEL_NAMES_ONE_LEVEL.values()) <= built
    assert sm90._QUANT_KERNEL_NAME in built
    assert sm90.kernels_available(), "the sm90 backend must see its kernels"
