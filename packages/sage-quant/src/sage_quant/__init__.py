"""sage_quant: quantization references, recipe emulation and accuracy metrics."""
from . import reference
from .reference import (token_mean, block_mean, quant_int, dequant_int, scale_group_index, pack_int4,
                        unpack_int4, quant_v_e4m3_t, quant_v_s8, quant_fp4, dequant_fp4, e4m3_to_float,
                        float_to_e2m1_code)
__version__ = "0.1.0"
