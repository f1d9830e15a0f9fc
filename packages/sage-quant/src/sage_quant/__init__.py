"""sage_quant: bit-exact quantization references, recipe emulation, metrics and test inputs.

* ``sage_quant.reference``: PyTorch references of every quantized format
  (contract: ``docs/design/quant-formats.md``).
* ``sage_quant.ops``: ``quantize_*`` (CUDA kernel when available, else the reference).
* ``sage_quant.emulate`` / ``sage_quant.RECIPES``: exact emulation of the docs/design/NUMERICS.md recipes;
  ``sage_quant.reference_attention``: float64 attention.
* ``sage_quant.metrics``: cosine, relative L1, RMSE; ``sage_quant.inputs.make_qkv``.
"""

from . import emulation, inputs, metrics, ops, reference
from .emulation import RECIPES, emulate, recipe_options, reference_attention
from .inputs import DISTRIBUTIONS, make_qkv
from .metrics import accuracy, cosine, max_abs, rel_l1, rmse
from .ops import (
    kernels_available,
    quantize_block_mean,
    quantize_fp4,
    quantize_int,
    quantize_token_mean,
    quantize_v_e4m3_t,
    quantize_v_s8,
)
from .reference import (
    GRANULARITIES,
    block_mean,
    dequant_fp4,
    dequant_int,
    dequant_v_e4m3_t,
    e2m1_code_to_float,
    e4m3_to_float,
    float_to_e2m1_code,
    float_to_e4m3,
    fp4_tensor_scale,
    num_scale_groups,
    pack_int4,
    quant_fp4,
    quant_int,
    quant_v_e4m3_t,
    quant_v_s8,
    scale_group_index,
    swizzle_scales,
    token_mean,
    unpack_int4,
    unswizzle_scales,
)

__version__ = "0.1.0"

__all__ = [
    "emulation", "inputs", "metrics", "ops", "reference",
    "RECIPES", "emulate", "recipe_options", "reference_attention",
    "DISTRIBUTIONS", "make_qkv",
    "accuracy", "cosine", "max_abs", "rel_l1", "rmse",
    "kernels_available", "quantize_block_mean", "quantize_fp4", "quantize_int",
    "quantize_token_mean", "quantize_v_e4m3_t", "quantize_v_s8",
    "GRANULARITIES", "block_mean", "dequant_fp4", "dequant_int", "dequant_v_e4m3_t",
    "e2m1_code_to_float", "e4m3_to_float", "float_to_e2m1_code", "float_to_e4m3", "fp4_tensor_scale",
    "num_scale_groups", "pack_int4", "quant_fp4", "quant_int", "quant_v_e4m3_t", "quant_v_s8",
    "scale_group_index", "swizzle_scales", "token_mean", "unpack_int4", "unswizzle_scales",
]
