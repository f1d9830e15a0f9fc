"""sage_core imports and reports itself on a machine with no GPU and no driver."""

import re

import pytest

import sage_core

KNOWN_ARCHS = {"80", "86", "87", "89", "90", "90a", "100a", "100f", "103a", "110a", "120a", "120f", "121a"}


def test_import_and_api():
    for name in ("build_info", "runtime_info", "has_kernel", "kernels"):
        assert callable(getattr(sage_core, name)), name
    assert isinstance(sage_core.__version__, str)


def test_build_info_contents():
    info = sage_core.build_info()
    for key in ("cuda_archs", "cuda_archs_setting", "families", "kernels", "cuda_version",
                "cutlass_version", "nanobind_version", "build_type", "stable_abi", "cudart"):
        assert key in info, key
    assert isinstance(info["cuda_archs"], list)
    assert set(info["cuda_archs"]) <= KNOWN_ARCHS, info["cuda_archs"]
    assert isinstance(info["kernels"], list) and all(isinstance(k, str) for k in info["kernels"])
    assert len(set(info["kernels"])) == len(info["kernels"]), "kernel names must be unique"
    for k in info["kernels"]:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", k), k
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["nanobind_version"])
    assert info["build_type"] == "Release"
    if info["cuda_archs"]:
        # A kernel build: compiled with nvcc, cudart linked statically, CUTLASS pinned.
        assert re.match(r"\d+\.\d+", info["cuda_version"])
        assert info["cudart"] == "static"
        assert info["cutlass_version"] == "4.2.0"
        assert "quant" in info["families"]
    else:
        assert info["families"] == [] and info["kernels"] == []


def test_families_follow_archs():
    info = sage_core.build_info()
    archs = set(info["cuda_archs"])
    fams = set(info["families"])
    if "sm90" in fams:
        assert "90a" in archs
    if "sm80" in fams:
        assert archs & {"80", "86", "89", "90a"}
    if "sm100" in fams:
        assert "100a" in archs
    if "sm120" in fams:
        assert "120a" in archs


def test_has_kernel_matches_build_info():
    info = sage_core.build_info()
    for k in info["kernels"]:
        assert sage_core.has_kernel(k)
    assert sage_core.kernels() == info["kernels"]
    assert not sage_core.has_kernel("no_such_kernel")
    assert not sage_core.has_kernel("")


def test_runtime_info_never_raises():
    info = sage_core.runtime_info()
    for key in ("cuda_runtime_version", "driver_version", "device_count", "error", "devices"):
        assert key in info, key
    assert isinstance(info["device_count"], int) and info["device_count"] >= 0
    assert len(info["devices"]) == info["device_count"]
    if info["device_count"] == 0:
        assert info["error"] is None or isinstance(info["error"], str)
    for dev in info["devices"]:
        assert dev["sm"] == dev["capability"][0] * 10 + dev["capability"][1]
    if sage_core.build_info()["cudart"] == "static":
        assert re.match(r"\d+\.\d+", info["cuda_runtime_version"])
    # Twice: no sticky state from the first call.
    assert sage_core.runtime_info()["device_count"] == info["device_count"]


def test_missing_family_attribute_error_is_clear():
    with pytest.raises(AttributeError, match="not in this build"):
        sage_core.attn_sm90_no_such_function  # noqa: B018
