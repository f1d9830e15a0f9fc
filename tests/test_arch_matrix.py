"""The arch lists agree: ci/build-matrix.json (the one build matrix), CMake's release list, the
kernel families in instantiations.cmake, and what sage_torch dispatches per arch.

A GPU the release wheel is meant for must get a kernel by default: its target is built, some
family that auto uses there is built for that target, and the loaded cubin carries the recipe."""

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MATRIX = json.loads((ROOT / "ci" / "build-matrix.json").read_text())
CMAKE = (ROOT / "packages" / "sage-core" / "CMakeLists.txt").read_text()
INSTANTIATIONS = (ROOT / "packages" / "sage-core" / "cmake" / "instantiations.cmake").read_text()


def _archs(text: str) -> list[str]:
    return [a for a in re.split(r"[;, ]+", text) if a]


def _family_archs(family: str) -> list[str]:
    m = re.search(rf"^sage_kernel_family\({family}\s+ARCHS\s+(.*?)\s+DEFINE", INSTANTIATIONS, re.M | re.S)
    assert m, family
    return m.group(1).split()


def test_release_lists_agree():
    release = _archs(MATRIX["release_archs"])
    m = re.search(r'set\(SAGE_RELEASE_CUDA_ARCHS "([^"]+)"\)', CMAKE)
    assert m and _archs(m.group(1)) == release
    for cuda, spec in MATRIX["cuda"].items():
        assert _archs(spec["archs"]) == release, cuda
    assert set(MATRIX["arch_targets"].values()) <= set(release)


def test_ci_default_build_is_still_sm90a_only():
    """CI (2 cores) compiles one arch; the Blackwell targets belong to the wheel/release builds."""
    assert re.search(r'set\(SAGE_DEFAULT_CUDA_ARCHS "90a"\)', CMAKE)
    noxfile = (ROOT / "noxfile.py").read_text()
    assert 'os.environ.get("SAGE_CUDA_ARCHS", "90a")' in noxfile  # nox -s test without a GPU


def test_blackwell_targets_need_cuda_12_9():
    """103a/121a arrived with CUDA 12.9: a cu12 wheel carrying them cannot be built by 12.8."""
    release = set(_archs(MATRIX["release_archs"]))
    if {"103a", "121a"} & release:
        need = tuple(int(x) for x in MATRIX["cuda"]["12"]["min_toolkit"].split("."))
        assert need >= (12, 9)


def test_every_arch_target_gets_a_default_kernel():
    sm80 = pytest.importorskip("sage_torch.backends.sm80")
    from sage_torch._dispatch import ARCH_DEFAULT_RECIPES

    release = tuple(_archs(MATRIX["release_archs"]))
    sm80_family = set(_family_archs("sm80"))
    sm80_archs = {a for archs in sm80._ARCHS.values() for a in archs}
    for arch, target in MATRIX["arch_targets"].items():
        assert arch in ARCH_DEFAULT_RECIPES, arch
        if arch in sm80_archs:
            assert target in sm80_family, f"the sm80 backend serves {arch} but the family is not built for {target}"
        if arch == "sm90":
            continue  # its default is the sm90 family's kernel (tests/test_backend_kernel_names.py)
        served = [r for r in ARCH_DEFAULT_RECIPES[arch]
                  if arch in sm80._ARCHS.get(r, ()) and sm80.arch_build_reason(r, arch, release) is None]
        assert served, f"recipe='auto' on {arch} finds no kernel in the release build"


def test_blackwell_defaults():
    from sage_torch._dispatch import ARCH_DEFAULT_RECIPES

    for arch in ("sm100", "sm103"):  # FP8 mma.sync is emulated there: FP16 P.V first
        assert ARCH_DEFAULT_RECIPES[arch][0] == "qk_s8_pv_f16"
        assert "qk_nvfp4_pv_nvfp4" not in ARCH_DEFAULT_RECIPES[arch]  # no block-scaled mma.sync
    for arch in ("sm120", "sm121"):  # the NVFP4 kernel when it exists, else native FP8 P.V
        assert ARCH_DEFAULT_RECIPES[arch][:2] == ("qk_nvfp4_pv_nvfp4", "qk_s8_pv_e4m3")
