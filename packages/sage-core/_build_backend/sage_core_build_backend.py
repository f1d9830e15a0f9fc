"""PEP 517 backend of sage-core: scikit-build-core's, plus a self-contained sdist.

sage-core's CMakeLists.txt compiles ``kernels/`` and includes ``third_party/`` from the
repository root (two levels up), which an sdist of ``packages/sage-core`` alone would not hold.
``build_sdist`` therefore stages a copy of this folder with the repository's ``kernels/``,
``third_party/`` and ``LICENSE`` copied in (real files, no symlinks) and lets scikit-build-core
pack that. CMakeLists.txt prefers ``./kernels`` and ``./third_party`` when they exist, so the
sdist (and a wheel built from it) needs nothing outside itself. Everything else, wheel and
editable builds included, is scikit-build-core unchanged.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from scikit_build_core.build import *  # noqa: F403  (the whole PEP 517 / 660 interface)
from scikit_build_core.build import build_sdist as _skbuild_build_sdist

_HERE = pathlib.Path(__file__).resolve().parent.parent  # packages/sage-core (or the sdist root)
_ROOT = _HERE.parent.parent  # the repository root when building from a checkout
_FROM_ROOT = ("kernels", "third_party", "LICENSE")
_SKIP = shutil.ignore_patterns("build", "_skbuild", "dist", "__pycache__", "*.so", "*.pyc",
                               "*.egg-info", ".pytest_cache")


def build_sdist(sdist_directory: str, config_settings: dict | None = None) -> str:
    if all((_HERE / name).exists() for name in _FROM_ROOT):
        # Already self-contained (building an sdist from an unpacked sdist).
        return _skbuild_build_sdist(sdist_directory, config_settings)
    missing = [name for name in _FROM_ROOT if not (_ROOT / name).exists()]
    if missing:
        raise RuntimeError(f"sage-core sdist: {', '.join(missing)} not found in {_ROOT} "
                           "(build the sdist from a checkout of the sage repository)")
    out = os.path.abspath(sdist_directory)
    with tempfile.TemporaryDirectory(prefix="sage-core-sdist-") as tmp:
        stage = pathlib.Path(tmp) / "sage-core"
        shutil.copytree(_HERE, stage, ignore=_SKIP, symlinks=False)
        for name in _FROM_ROOT:
            src = _ROOT / name
            if src.is_dir():
                shutil.copytree(src, stage / name, ignore=_SKIP, symlinks=False, dirs_exist_ok=True)
            else:
                shutil.copy2(src, stage / name)
        cwd = os.getcwd()
        os.chdir(stage)  # PEP 517 hooks run in the project folder; scikit-build-core reads cwd
        try:
            return _skbuild_build_sdist(out, config_settings)
        finally:
            os.chdir(cwd)


def get_requires_for_build_sdist(config_settings: dict | None = None) -> list[str]:
    # Packing sources needs no CUTLASS headers (build.requires is for compiling).
    from scikit_build_core.build import get_requires_for_build_sdist as _req

    return [r for r in _req(config_settings) if not r.replace("_", "-").startswith("nvidia-cutlass")]
