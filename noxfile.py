"""Every developer and CI entry point of sage.

    nox -s test                      CPU machine: build sage-core for sm_90a (compile check of the
                                     kernels), run every CPU test, skip GPU tests with a reason.
                                     GPU machine: build for the GPU's arch and run its GPU tests too.
    nox -s "test(arch='sm90')"       build for one arch and run its tests (GPU tests need that GPU)
    nox -s bench                     GPU: benchmark vs PyTorch SDPA; CPU: emulation accuracy demo
    nox -s lint | build | "wheel(cuda='13')"

Set SAGE_NOX_SYSTEM=1 to run in the current interpreter instead of a fresh venv (the GPU machine
has no network: it reuses its own torch and brings the rest as wheels).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import nox

ROOT = pathlib.Path(__file__).parent.resolve()
MATRIX = json.loads((ROOT / "ci" / "build-matrix.json").read_text())
ARCH_TARGETS: dict[str, str] = MATRIX["arch_targets"]  # "sm90" -> "90a"
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"
CPU_TORCH_PIN = "torch==2.13.0"  # the CPU build on the dev/CI machines; the GPU machine has its own
PURE_PACKAGES = ["sage-quant", "sage-torch", "sage-train"]
SYSTEM = os.environ.get("SAGE_NOX_SYSTEM", "") not in ("", "0")

nox.options.sessions = ["test"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"
VENV = False if SYSTEM else None  # False: run in the current interpreter


def _pip(session: nox.Session, *args: str) -> None:
    session.run("python", "-m", "pip", "install", "--disable-pip-version-check", *args,
                external=True)


def _install_deps(session: nox.Session) -> None:
    if SYSTEM:
        session.log("SAGE_NOX_SYSTEM=1: reusing the current interpreter's packages")
        return
    _pip(session, CPU_TORCH_PIN, "-r", "ci/requirements-build.txt", "-r", "ci/requirements-test.txt")
    # The cutlass wheel's declared dependencies (~330 MB) are not needed for its headers.
    _pip(session, "--no-deps", CUTLASS_PIN)


def _gpu_arch(session: nox.Session) -> str | None:
    """'sm90' etc. for the first visible GPU of the session's interpreter, None when there is none."""
    probe = ("import torch;print('sm%d%d' % torch.cuda.get_device_capability() "
             "if torch.cuda.is_available() else '')")
    out = session.run("python", "-c", probe, silent=True, external=True, success_codes=[0, 1])
    out = (out or "").strip().splitlines()
    return out[-1] if out and out[-1].startswith("sm") else None


def _build_core(session: nox.Session, cuda_archs: str) -> None:
    build_dir = ROOT / "build" / f"sage-core-{cuda_archs.replace(';', '_')}"
    _pip(session, "--no-build-isolation", "--no-deps", "-v" if os.environ.get("SAGE_VERBOSE") else "-q",
         f"--config-settings=cmake.define.SAGE_CUDA_ARCHS={cuda_archs}",
         f"--config-settings=build-dir={build_dir}",
         "./packages/sage-core")


def _install_pure(session: nox.Session) -> None:
    args: list[str] = ["--no-deps", "--no-build-isolation", "-q"]
    for pkg in PURE_PACKAGES:
        args += ["-e", f"./packages/{pkg}"]
    _pip(session, *args)


def _run_tests(session: nox.Session, arch: str | None) -> None:
    env = {"SAGE_TEST_ARCH": arch or ""}
    paths = [str(p) for p in sorted((ROOT / "packages").glob("*/tests"))] + ["tests"]
    session.run("python", "-m", "pytest", "-q", "-rs", *paths, *session.posargs, env=env,
                external=True)


def _test(session: nox.Session, arch: str | None) -> None:
    _install_deps(session)
    gpu = _gpu_arch(session)
    if arch is None:
        arch = gpu
        # No GPU: still compile the kernels for one arch, so a build break cannot land.
        target = ARCH_TARGETS.get(gpu or "", "90a") if gpu else os.environ.get("SAGE_CUDA_ARCHS", "90a")
    else:
        target = ARCH_TARGETS[arch]
    if gpu is None:
        session.log("no GPU visible: GPU tests will be skipped (each skip prints its reason)")
    elif arch != gpu:
        session.log(f"built for {arch} but the GPU is {gpu}: its GPU tests are skipped")
    _build_core(session, target)
    _install_pure(session)
    _run_tests(session, arch)


@nox.session(python=VENV)
def test(session: nox.Session) -> None:
    """Build for the local GPU's arch (sm_90a without a GPU) and run all tests that can run."""
    _test(session, None)


def _make_arch_session(arch: str) -> None:
    def session_fn(session: nox.Session) -> None:
        _test(session, arch)

    session_fn.__doc__ = f"Build sage-core for {arch} ({ARCH_TARGETS[arch]}) and run its tests."
    nox.session(python=VENV, name=f"test(arch='{arch}')")(session_fn)


for _arch in ARCH_TARGETS:
    _make_arch_session(_arch)


@nox.session(python=VENV)
def bench(session: nox.Session) -> None:
    """GPU: TOPS and accuracy vs SDPA flash/cuDNN (JSON + plot). CPU: emulation accuracy only."""
    _install_deps(session)
    gpu = _gpu_arch(session)
    _build_core(session, ARCH_TARGETS.get(gpu or "", "none") if gpu else "none")
    _install_pure(session)
    session.run("python", "-m", "sage_torch.bench", *session.posargs, external=True)


@nox.session(python=VENV)
def lint(session: nox.Session) -> None:
    if not SYSTEM:
        _pip(session, "ruff")
    session.run("ruff", "check", "noxfile.py", "packages", "tests", "tools", external=True)


@nox.session(python=VENV)
def build(session: nox.Session) -> None:
    """Build all wheels into dist/ for SAGE_CUDA_ARCHS (default: the release set)."""
    _install_deps(session)
    archs = os.environ.get("SAGE_CUDA_ARCHS", MATRIX["release_archs"])
    _pip(session, "build")
    for pkg in PURE_PACKAGES:
        session.run("python", "-m", "build", "--wheel", "--no-isolation", "-o", "dist",
                    f"packages/{pkg}", external=True)
    session.run("python", "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", "dist",
                f"--config-settings=cmake.define.SAGE_CUDA_ARCHS={archs}", "./packages/sage-core",
                external=True)


def _make_wheel_session(cuda: str) -> None:
    def session_fn(session: nox.Session) -> None:
        """sage-core-cuXX wheel with the matrix's arch list (needs that CUDA toolkit's nvcc)."""
        _install_deps(session)
        spec = MATRIX["cuda"][cuda]
        stage = ROOT / "build" / f"wheel-cu{cuda}"
        if stage.exists():
            shutil.rmtree(stage)
        # Same sources, distribution renamed per CUDA major; the import name stays sage_core.
        shutil.copytree(ROOT / "packages" / "sage-core", stage / "packages" / "sage-core")
        shutil.copytree(ROOT / "kernels", stage / "kernels")
        shutil.copytree(ROOT / "third_party", stage / "third_party")
        pyproject = stage / "packages" / "sage-core" / "pyproject.toml"
        text = pyproject.read_text().replace('name = "sage-core"', f'name = "{spec["distribution"]}"', 1)
        pyproject.write_text(text)
        archs = os.environ.get("SAGE_CUDA_ARCHS", spec["archs"])  # override: quick local checks
        session.run("python", "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                    str(ROOT / "dist"), f"--config-settings=cmake.define.SAGE_CUDA_ARCHS={archs}",
                    str(stage / "packages" / "sage-core"), external=True)

    nox.session(python=VENV, name=f"wheel(cuda='{cuda}')")(session_fn)


for _cuda in MATRIX["cuda"]:
    _make_wheel_session(_cuda)
