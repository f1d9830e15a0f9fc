"""Packaging invariants (CPU, no build): distribution names, sibling pins, licence copies."""

from __future__ import annotations

import json
import pathlib
import tomllib

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
