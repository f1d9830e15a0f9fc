"""An explicit recipe without a kernel runs sage_quant's emulation of exactly that recipe."""

import pytest
import torch

import sage_quant
import sage_torch
from sage_torch_testing import make_qkv


@pytest.mark.parametrize("recipe", list(sage_quant.RECIPES))
def test_forced_recipe_is_the_emulation(recipe, seed):
    q, k, v = make_qkv(b=1, h_q=4, h_kv=2, s_q=20, s_kv=33, d=64, seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning, match=f"EMULATION of recipe '{recipe}'"):
        o, lse = sage_torch.attention(q, k, v, recipe=recipe, is_causal=True, return_lse=True)
    ref_o, ref_lse = sage_quant.emulate(q, k, v, recipe, is_causal=True, return_lse=True)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    assert o.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (1, 4, 20)
    # and it is attention: close to float64 within a recipe-sized budget
    exact = sage_quant.reference_attention(q, k, v, is_causal=True)
    assert sage_quant.cosine(o, exact) > 0.95


def test_forced_recipe_bshd_and_options(seed):
    q, k, v = make_qkv(b=1, h_q=2, s_q=17, d=128, layout="bshd", dtype=torch.float16, seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning):
        o = sage_torch.attention(q, k, v, layout="bshd", recipe="qk_s8_pv_e4m3", smooth_k=False, kv_block=64)
    ref = sage_quant.emulate(q, k, v, "qk_s8_pv_e4m3", layout="bshd", smooth_k=False, kv_block=64)
    torch.testing.assert_close(o, ref, rtol=0, atol=0)
    assert o.shape == q.shape and o.is_contiguous()
    with pytest.raises(ValueError, match="kv_block"):
        sage_torch.attention(q, k, v, layout="bshd", recipe="qk_s8_pv_e4m3", kv_block=7)
