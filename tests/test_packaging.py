"""Packaging invariants (CPU, no build): distribution names, sibling pins, licence copies, the
wheel sessions' auditwheel platform (noxfile.py, dry)."""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import shutil
import sys
import tomllib
import types
from unittest import mock

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKGS = ROOT / "packages"


def _project(folder: str) -> dict:
    return tomllib.loads((PKGS / folder / "pyproject.toml").read_text())["project"]


def test_distribution_names_cannot_collide():
    # PyPI's "sage-quant" is an unrelated project: ours must not be named (or depend on) it.
    names = {f: _project(f)["name"] for f in ("sage-core", "sage-quant", "sage-torch", "sage-train")}
    assert names == {"sage-core": "sage-core", "sage-quant": "sage-attn-quant",
                     "sage-torch": "sage-torch", "sage-train": "sage-train"}
    for folder in names:
        proj = _project(folder)
        reqs = list(proj.get("dependencies", []))
        for extra in proj.get("optional-dependencies", {}).values():
            reqs += extra
        assert not any(r.split("=")[0].split("[")[0].strip() == "sage-quant" for r in reqs), folder


def test_siblings_pinned_to_the_same_version():
    version = _project("sage-core")["version"]
    for folder in ("sage-quant", "sage-torch", "sage-train"):
        proj = _project(folder)
        assert proj["version"] == version
        sibs = [r for r in proj["dependencies"] if r.startswith("sage-")]
        for extra in proj.get("optional-dependencies", {}).values():
            sibs += [r for r in extra if r.startswith("sage-")]
        for r in sibs:
            assert f"=={version}" in r, (folder, r)
        assert "torch>=2.5" in proj["dependencies"], folder  # SDPA enable_gqa


def test_cuda_extras_match_the_wheel_sessions_labels():
    matrix = json.loads((ROOT / "ci" / "build-matrix.json").read_text())
    version = _project("sage-core")["version"]
    for folder in ("sage-quant", "sage-torch"):
        extras = _project(folder)["optional-dependencies"]
        for cuda, spec in matrix["cuda"].items():
            assert extras[f"cu{cuda}"] == [f"sage-core=={version}+{spec['local_version']}"]


def test_license_copies_are_the_root_license():
    root = (ROOT / "LICENSE").read_bytes()
    assert b"Apache License" in root and b"Version 2.0" in root
    for folder in ("sage-core", "sage-quant", "sage-torch", "sage-train"):
        assert (PKGS / folder / "LICENSE").read_bytes() == root, folder
        assert _project(folder)["license"] == "Apache-2.0"


@functools.cache
def _noxfile():
    """noxfile.py as a module, loaded once with a stub for nox (not a test requirement; the
    session decorators would only register the functions, twice with the real nox)."""
    stub = types.ModuleType("nox")
    stub.options = types.SimpleNamespace()
    stub.Session = object
    stub.session = lambda *args, **kwargs: (lambda fn: fn)
    spec = importlib.util.spec_from_file_location("sage_noxfile", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, {"nox": stub}):
        spec.loader.exec_module(module)
    return module


def test_wheel_platform_default_is_manylinux_2_28_on_x86_64():
    nf = _noxfile()
    assert nf._wheel_plat({}, "x86_64") == "manylinux_2_28_x86_64"
    assert nf._wheel_plat({"SAGE_WHEEL_PLAT": ""}, "x86_64") == "manylinux_2_28_x86_64"
    assert nf._wheel_plat({"SAGE_WHEEL_PLAT": "manylinux_2_34_x86_64"}, "x86_64") == "manylinux_2_34_x86_64"
    assert nf._wheel_plat({"SAGE_WHEEL_PLAT": "auto"}, "x86_64") is None
    assert nf._wheel_plat({}, "aarch64") is None  # no default there: whatever the symbols allow
    assert nf._wheel_plat({"SAGE_WHEEL_PLAT": "manylinux_2_28_aarch64"}, "aarch64") == "manylinux_2_28_aarch64"


def test_wheel_session_retags_with_the_default_platform(monkeypatch, tmp_path):
    """_wheel_core's commands, dry: pip wheel 'builds' an empty file, auditwheel is only recorded."""
    nf = _noxfile()
    monkeypatch.setattr(nf, "ROOT", tmp_path)
    monkeypatch.setattr(nf, "_pip", lambda session, *args: None)
    monkeypatch.setattr(nf.platform, "machine", lambda: "x86_64")

    class Session:
        def __init__(self):
            self.runs = []

        def log(self, *args):
            pass

        def run(self, *args, **kwargs):
            self.runs.append(args)
            if args[:4] == ("python", "-m", "pip", "wheel"):
                raw = pathlib.Path(args[args.index("-w") + 1])
                raw.mkdir(parents=True, exist_ok=True)
                (raw / "sage_core-0.1.0-cp311-cp311-linux_x86_64.whl").touch()

    def repair_args(env_value):
        if env_value is None:
            monkeypatch.delenv("SAGE_WHEEL_PLAT", raising=False)
        else:
            monkeypatch.setenv("SAGE_WHEEL_PLAT", env_value)
        session = Session()
        nf._wheel_core(session, tmp_path / "src", "none", [])
        (repair,) = [r for r in session.runs if r[:2] == ("auditwheel", "repair")]
        return repair[2:repair.index("-w")]

    assert repair_args(None) == ("--plat", "manylinux_2_28_x86_64", "--only-plat")
    assert repair_args("manylinux_2_34_x86_64") == ("--plat", "manylinux_2_34_x86_64", "--only-plat")
    assert repair_args("auto") == ()


# ---- wheel(cuda='12'): the toolkit from a local nvcc or the package registry, or a refusal ----------

# The members that matter of PyPI's CUDA 12.9 wheels (REGISTRY_TOOLKITS["12"]; full listings in
# docs/packaging.md, "cu12"): nvidia-cuda-nvcc-cu12 12.9.86 carries ptxas, libnvvm, libdevice and
# the crt headers, but no nvcc, cudafe++, cicc or fatbinary.
CU12_REGISTRY_LAYOUT = {
    "nvidia-cuda-nvcc-cu12": ["nvidia/__init__.py", "nvidia/cuda_nvcc/bin/ptxas",
                              "nvidia/cuda_nvcc/include/crt/host_config.h",
                              "nvidia/cuda_nvcc/nvvm/include/nvvm.h",
                              "nvidia/cuda_nvcc/nvvm/lib64/libnvvm.so",
                              "nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc"],
    "nvidia-cuda-runtime-cu12": ["nvidia/cuda_runtime/include/cuda_runtime.h",
                                 "nvidia/cuda_runtime/lib/libcudart.so.12",
                                 "nvidia/cuda_runtime/lib/libcudart_static.a",
                                 "nvidia/cuda_runtime/lib/libcudadevrt.a"],
    "nvidia-cuda-cccl-cu12": ["nvidia/cuda_cccl/include/__init__.py",
                              "nvidia/cuda_cccl/include/cuda/std/type_traits",
                              "nvidia/cuda_cccl/include/cub/cub.cuh"],
}
# What the nvcc wheel would need to carry in addition for a complete toolkit.
COMPILER_MEMBERS = ["nvidia/cuda_nvcc/bin/nvcc", "nvidia/cuda_nvcc/bin/nvcc.profile",
                    "nvidia/cuda_nvcc/bin/cudafe++", "nvidia/cuda_nvcc/bin/fatbinary",
                    "nvidia/cuda_nvcc/nvvm/bin/cicc"]
FAKE_NVCC = "#!/bin/sh\necho 'Cuda compilation tools, release 12.9, V12.9.86'\n"


def test_toolkit_source_registry_only_for_cu12_without_a_fitting_nvcc():
    nf = _noxfile()
    assert set(nf.REGISTRY_TOOLKITS) == {"12"}  # cu13: the local toolkit only
    assert nf._toolkit_source("12", (12, 9), (12, 9)) == "local"
    assert nf._toolkit_source("12", (12, 9), (12, 8)) == "registry"  # too old
    assert nf._toolkit_source("12", (12, 9), (13, 0)) == "registry"  # this machine's nvcc
    assert nf._toolkit_source("12", (12, 9), None) == "registry"  # no nvcc at all
    assert nf._toolkit_source("13", (13, 0), (13, 0)) == "local"
    assert nf._toolkit_source("13", (13, 0), (12, 9)) == "refuse"
    assert nf._toolkit_source("13", (13, 0), None) == "refuse"


def test_registry_cuda12_wheels_lack_the_compiler():
    nf = _noxfile()
    assert set(CU12_REGISTRY_LAYOUT) == set(nf.REGISTRY_TOOLKITS["12"])
    paths = [nf._wheel_member_path(m) for names in CU12_REGISTRY_LAYOUT.values() for m in names]
    assert None in paths  # the nvidia/__init__.py markers are not toolkit files
    assert "lib/libcudart_static.a" in paths and "bin/ptxas" in paths
    assert nf._toolkit_missing(p for p in paths if p) == [
        "bin/nvcc", "bin/nvcc.profile", "bin/cudafe++", "nvvm/bin/cicc", "bin/fatbinary"]
    complete = paths + [nf._wheel_member_path(m) for m in COMPILER_MEMBERS]
    assert nf._toolkit_missing(p for p in complete if p) == []
    # CUDA 13's one-tree layout (nvidia/cu13/...) maps the same way.
    assert nf._wheel_member_path("nvidia/cu13/bin/nvcc") == "bin/nvcc"
    assert nf._wheel_member_path("nvidia_cuda_nvcc_cu12-12.9.86.dist-info/RECORD") is None


def _fake_wheel(folder: pathlib.Path, dist: str, version: str, members: list[str]) -> pathlib.Path:
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist.replace('-', '_')}-{version}-py3-none-manylinux_2_17_x86_64.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if "/bin/" in name else 0o644) << 16
            zf.writestr(info, FAKE_NVCC if name.endswith("bin/nvcc") else "x")
        zf.writestr(f"{dist.replace('-', '_')}-{version}.dist-info/RECORD", "")
    return path


class _Refused(Exception):
    pass


class _WheelSession:
    """Stand-in for nox.Session: `pip download` copies from a fake registry folder (None: offline)."""

    def __init__(self, registry: pathlib.Path | None):
        self.registry = registry
        self.runs: list[tuple] = []
        self.logs: list[str] = []

    def log(self, *args):
        self.logs.append(" ".join(map(str, args)))

    def error(self, msg):
        raise _Refused(msg)

    def run(self, *args, **kwargs):
        self.runs.append(args)
        if args[:4] == ("python", "-m", "pip", "download") and self.registry is not None:
            dest = pathlib.Path(args[args.index("-d") + 1])
            dist, version = args[-1].split("==")
            for whl in self.registry.glob(f"{dist.replace('-', '_')}-{version}-*.whl"):
                shutil.copy2(whl, dest / whl.name)

    def downloads(self):
        return [r[-1] for r in self.runs if r[:4] == ("python", "-m", "pip", "download")]


def _wheel_session(nf, monkeypatch, tmp_path, cuda: str, local_nvcc):
    """wheel(cuda=...)'s function with the build stubbed: returns (run, calls of _wheel_core)."""
    for sub in ("packages/sage-core", "kernels", "third_party"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    (tmp_path / "packages/sage-core/pyproject.toml").write_text('version = "0.1.0"\n')
    (tmp_path / "LICENSE").write_text("x")
    monkeypatch.setattr(nf, "ROOT", tmp_path)
    monkeypatch.setattr(nf, "_install_deps", lambda session: None)
    monkeypatch.setattr(nf, "_nvcc_candidate", lambda: "/opt/local-cuda/bin/nvcc")
    real_probe = nf._probe_nvcc
    monkeypatch.setattr(nf, "_probe_nvcc", lambda cand: (
        (local_nvcc, "local") if cand == "/opt/local-cuda/bin/nvcc" else real_probe(cand)))
    builds: list[tuple] = []
    monkeypatch.setattr(nf, "_wheel_core", lambda session, src, archs, extra: builds.append((src, extra)))
    fns = {}
    monkeypatch.setattr(nf.nox, "session", lambda *a, **k: (lambda fn: fns.setdefault(k["name"], fn)))
    nf._make_wheel_session(cuda)
    return fns[f"wheel(cuda='{cuda}')"], builds


def _registry(tmp_path: pathlib.Path, complete: bool) -> pathlib.Path:
    nf = _noxfile()
    folder = tmp_path / "registry"
    for dist, version in nf.REGISTRY_TOOLKITS["12"].items():
        members = list(CU12_REGISTRY_LAYOUT[dist])
        if complete and dist == "nvidia-cuda-nvcc-cu12":
            members += COMPILER_MEMBERS
        _fake_wheel(folder, dist, version, members)
    return folder


def test_cu12_session_refuses_with_what_the_registry_wheels_lack(monkeypatch, tmp_path):
    nf = _noxfile()
    fn, builds = _wheel_session(nf, monkeypatch, tmp_path, "12", (13, 0))
    session = _WheelSession(_registry(tmp_path, complete=False))
    with pytest.raises(_Refused) as exc:
        fn(session)
    msg = str(exc.value)
    assert "= CUDA 13.0" in msg and "cannot compile" in msg and "labelled +cu12" in msg
    for req in ("bin/nvcc (the compiler driver)", "bin/cudafe++", "nvvm/bin/cicc", "bin/fatbinary"):
        assert req in msg
    assert "lib/libcudart_static.a" in msg  # listed among what they do carry
    assert session.downloads() == [f"{d}=={v}" for d, v in nf.REGISTRY_TOOLKITS["12"].items()]
    assert builds == []
    assert not (tmp_path / "build/cuda-registry/cu12/toolkit").exists()  # nothing unpacked


def test_cu12_session_refuses_when_the_registry_cannot_be_reached(monkeypatch, tmp_path):
    nf = _noxfile()
    fn, builds = _wheel_session(nf, monkeypatch, tmp_path, "12", None)
    with pytest.raises(_Refused) as exc:
        fn(_WheelSession(None))
    msg = str(exc.value)
    assert "could not download nvidia-cuda-nvcc-cu12==12.9.86" in msg and "labelled +cu12" in msg
    assert builds == []


def test_cu12_session_builds_with_a_complete_registry_toolkit(monkeypatch, tmp_path):
    """The path a registry with an nvcc in its CUDA 12 wheel would take: assemble, check, build."""
    nf = _noxfile()
    fn, builds = _wheel_session(nf, monkeypatch, tmp_path, "12", (13, 0))
    registry = _registry(tmp_path, complete=True)
    fn(_WheelSession(registry))
    root = tmp_path / "build/cuda-registry/cu12/toolkit"
    ((src, extra),) = builds
    assert f"--config-settings=cmake.define.CMAKE_CUDA_COMPILER={root}/bin/nvcc" in extra
    assert f"--config-settings=cmake.define.CUDAToolkit_ROOT={root}" in extra
    assert (src / "pyproject.toml").read_text() == 'version = "0.1.0+cu12"\n'
    assert (root / "lib64").resolve() == (root / "lib").resolve()
    assert (root / "lib/libcudart.so").resolve() == (root / "lib/libcudart.so.12").resolve()
    assert (root / "lib/libcudart_static.a").is_file() and (root / "nvvm/bin/cicc").is_file()
    assert not (root / "__init__.py").exists() and not (root / "include/__init__.py").exists()
    # A second run reuses the downloaded wheels and the unpacked root: no network needed.
    builds.clear()
    again = _WheelSession(None)
    fn(again)
    assert again.downloads() == [] and len(builds) == 1


def test_cu12_session_prefers_a_fitting_local_nvcc(monkeypatch, tmp_path):
    nf = _noxfile()
    fn, builds = _wheel_session(nf, monkeypatch, tmp_path, "12", (12, 9))
    session = _WheelSession(None)
    fn(session)
    ((_, extra),) = builds
    assert extra == [f"--config-settings=cmake.define.CMAKE_CUDA_COMPILER={pathlib.Path('/opt/local-cuda/bin/nvcc').resolve()}"]
    assert session.downloads() == []


def test_cu13_session_unchanged_never_asks_the_registry(monkeypatch, tmp_path):
    nf = _noxfile()
    fn, builds = _wheel_session(nf, monkeypatch, tmp_path, "13", (12, 9))
    monkeypatch.setattr(nf, "_nvcc", lambda session: ("/opt/local-cuda/bin/nvcc", (12, 9)))
    session = _WheelSession(_registry(tmp_path, complete=True))
    with pytest.raises(_Refused) as exc:
        fn(session)
    assert "= CUDA 12.9: refusing to build a wheel labelled +cu13" in str(exc.value)
    assert session.downloads() == [] and builds == []
