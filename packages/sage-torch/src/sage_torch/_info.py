"""sage_torch.info(): what is installed, what the device is, and what each call would run."""

from __future__ import annotations

import json
from typing import Any

import torch

from . import _dispatch, _env
from ._head_dim import HEAD_DIM_RULE
from ._recipes import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, dtype_name, known_recipes
from .backends import backend_module_status, load_backend_modules, registered_backends


def _sage_core_info() -> dict[str, Any]:
    try:
        import sage_core
    except Exception as exc:  # noqa: BLE001 - report why, never fail info()
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {"importable": True, "version": getattr(sage_core, "__version__", None)}
    for name in ("build_info", "runtime_info"):
        fn = getattr(sage_core, name, None)
        if fn is None:
            out[name] = "not provided by this sage_core"
            continue
        try:
            out[name] = json.loads(json.dumps(fn(), default=str))  # keep info() JSON-serializable
        except Exception as exc:  # noqa: BLE001
            out[name] = f"failed: {type(exc).__name__}: {exc}"
    return out


def _sage_quant_info() -> dict[str, Any]:
    try:
        import sage_quant
    except Exception as exc:  # noqa: BLE001
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"importable": True, "version": getattr(sage_quant, "__version__", None),
            "recipes": list(getattr(sage_quant, "RECIPES", ()))}


def _device_info(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"device": str(device), "cuda_available": torch.cuda.is_available(),
                           "torch_cuda": torch.version.cuda}
    if device.type == "cuda":
        out["name"] = torch.cuda.get_device_name(device)
        out["capability"] = list(torch.cuda.get_device_capability(device))
    out["arch"] = _dispatch.device_arch(device)
    out["default_recipes"] = list(_dispatch.ARCH_DEFAULT_RECIPES.get(out["arch"], ()))
    return out


def info(device: torch.device | str | None = None) -> dict[str, Any]:
    """A JSON-serializable report: versions, sage_core build/runtime, the device, backends, and
    the decision ``recipe="auto"`` takes per dtype and head dim on ``device`` (default: the
    current CUDA device, else CPU). Never raises for a missing component; it says why instead.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    modules = load_backend_modules()
    arch = _dispatch.device_arch(device)
    unavailable = _dispatch.unavailable_backends()
    backends = []
    for spec in registered_backends():
        row = spec.describe()
        row["available"] = spec.name not in unavailable
        if spec.name in unavailable:
            row["unavailable_reason"] = unavailable[spec.name]
        backends.append(row)
    decisions: dict[str, dict[str, Any]] = {}
    for dtype in SUPPORTED_DTYPES:
        per_dim = {}
        for hd in SUPPORTED_HEAD_DIMS:
            try:
                per_dim[f"head_dim={hd}"] = _dispatch.resolve(arch, dtype, hd, "auto", strict=False).describe()
            except Exception as exc:  # noqa: BLE001 - e.g. a bad SAGE_FORCE_RECIPE value
                per_dim[f"head_dim={hd}"] = {"error": f"{type(exc).__name__}: {exc}"}
        decisions[dtype_name(dtype)] = per_dim
    from . import __version__
    return {
        "sage_torch": __version__,
        "torch": torch.__version__,
        "sage_core": _sage_core_info(),
        "sage_quant": _sage_quant_info(),
        "device": _device_info(device),
        "recipes": list(known_recipes()),
        "backend_modules": modules or backend_module_status(),
        "backends": backends,
        "auto_dispatch": decisions,
        "head_dims": HEAD_DIM_RULE,
        "env": _env.env_snapshot(),
    }
