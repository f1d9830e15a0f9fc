"""Recipe names and the front end's fixed limits (docs/design/NUMERICS.md defines the recipes)."""

from __future__ import annotations

import functools

import torch

#: Forward recipes of docs/design/NUMERICS.md. sage_quant.RECIPES is the authority when it is importable;
#: this list keeps validation working (and messages readable) without it.
FORWARD_RECIPES: tuple[str, ...] = (
    "qk_s8_pv_f16",
    "qk_s8_pv_e4m3",
    "qk_s4_pv_e4m3",
    "qk_s8_pv_s8",
    "qk_nvfp4_pv_nvfp4",
)

#: ``recipe=`` values that are not recipes.
RECIPE_AUTO = "auto"
#: SAGE_FORCE_RECIPE=torch: PyTorch's own SDPA (for A/B comparisons of a whole model).
RECIPE_TORCH = "torch"

#: Head dims the kernels are compiled for. Other multiples of 8 below 128 run them zero-padded,
#: multiples of 8 up to 256 have the emulation: the whole rule is in sage_torch._head_dim.
SUPPORTED_HEAD_DIMS: tuple[int, ...] = (64, 128)
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
SUPPORTED_LAYOUTS: tuple[str, ...] = ("bhsd", "bshd")

#: Keywords attention() understands itself; everything else in **recipe_options goes to the recipe.
FRONT_END_OPTIONS: tuple[str, ...] = ("emulate", "strict")


@functools.lru_cache(maxsize=None)
def known_recipes() -> tuple[str, ...]:
    """Recipe names accepted by ``recipe=``: sage_quant's list when importable, else ours."""
    try:
        import sage_quant
        names = tuple(getattr(sage_quant, "RECIPES", ()))
    except ImportError:
        names = ()
    seen = dict.fromkeys(names + FORWARD_RECIPES)
    return tuple(seen)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
