"""Recipe emulation (the oracle for every kernel test) and the float64 reference attention.

``train_s8`` (8-bit training forward/backward emulation) lives in ``sage_quant.emulation.train_s8``
and is imported on demand, not here.
"""
from .recipes import RECIPES, emulate, recipe_options, truncate_mantissa
from .reference_attention import causal_allowed, reference_attention, validate_qkv

__all__ = ["RECIPES", "emulate", "recipe_options", "truncate_mantissa", "reference_attention",
           "causal_allowed", "validate_qkv"]
