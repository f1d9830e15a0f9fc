"""sage_core: the compiled layer of sage (quantized low-bit attention).

Knows no PyTorch. Functions take DLPack arrays (torch tensors pass directly) and a raw
``cudaStream_t`` handle as ``stream: int``; every output is preallocated by the caller.
Which kernels are compiled in: :func:`build_info`, :func:`has_kernel`. What the machine offers:
:func:`runtime_info` (never raises, works without a driver).
"""

from __future__ import annotations

from . import _C
from ._C import build_info, has_kernel, runtime_info

__all__ = ["build_info", "runtime_info", "has_kernel", "kernels", "__version__"]

try:  # written into the wheel by the build (pyproject.toml, tool.scikit-build.generate)
    from ._version import __version__
except ImportError:  # a build tree that did not go through the wheel build
    __version__ = "0+unknown"


def kernels() -> list[str]:
    """Names of the kernel instantiations compiled into this build."""
    return list(build_info()["kernels"])


def __getattr__(name: str):
    # Family functions (quant_int8, attention kernels, ...) live on _C only when their family is
    # in the build; say so instead of a bare AttributeError.
    if not name.startswith("__") and hasattr(_C, name):
        return getattr(_C, name)
    info = build_info()
    raise AttributeError(
        f"sage_core has no attribute {name!r}: not in this build "
        f"(cuda_archs={info['cuda_archs']}, families={info['families']}). "
        "Rebuild with SAGE_CUDA_ARCHS set to include the needed arch."
    )
