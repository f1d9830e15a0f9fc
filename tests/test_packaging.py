"""Packaging invariants (CPU, no build): distribution names, sibling pins, licence copies, the
wheel sessions' auditwheel platform (noxfile.py, dry)."""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import sys
import tomllib
import types
from unittest import mock

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
