"""sageattn(): the SageAttention-compatible signature maps onto attention()."""

import warnings

import pytest
import torch

import sage_torch
from sage_torch_testing import make_qkv


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
        yield


@pytest.mark.parametrize("tensor_layout, layout", [("HND", "bhsd"), ("NHD", "bshd")])
def test_layout_mapping(as_arch, fake_backend, tensor_layout, layout, seed):
    as_arch("sm90")
    fn = fake_backend("qk_s8_pv_e4m3")
    q, k, v = make_qkv(b=2, h_q=4, h_kv=2, s_q=5, s_kv=9, layout=layout, seed=seed)
    o, lse = sage_torch.sageattn(q, k, v, tensor_layout=tensor_layout, is_causal=True, sm_scale=0.2,
                                 return_lse=True)
    ref_o, ref_lse = sage_torch.attention(q, k, v, layout=layout, is_causal=True, scale=0.2, return_lse=True)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    assert o.shape == q.shape and lse.shape == (2, 4, 5)
    assert fn.calls[0]["layout"] == layout and fn.calls[0]["scale"] == 0.2 and fn.calls[0]["is_causal"]
    single = sage_torch.sageattn(q, k, v, tensor_layout=tensor_layout)
    assert isinstance(single, torch.Tensor)


def test_accepted_kwargs(as_arch, fake_backend, seed):
    as_arch("sm90")
    fn = fake_backend("qk_s8_pv_e4m3")
    q, k, v = make_qkv(seed=seed)
    sage_torch.sageattn(q, k, v, smooth_k=False, smooth_v=False, pv_accum_dtype="fp32+fp32")
    # qk_s8_pv_e4m3 smooths V by default: an explicit smooth_v=False must reach it
    assert fn.calls[0]["options"] == {"smooth_k": False, "smooth_v": False}
    sage_torch.sageattn(q, k, v, smooth_v=True)
    assert fn.calls[1]["options"] == {"smooth_v": True}


def test_smooth_v_on_a_recipe_without_v_smoothing(as_arch, fake_backend, seed):
    as_arch("sm80")
    fn = fake_backend("qk_s8_pv_f16", archs=("sm80",))
    q, k, v = make_qkv(seed=seed)
    sage_torch.sageattn(q, k, v, smooth_v=False)  # qk_s8_pv_f16 never smooths V: honoured as is
    assert fn.calls[0]["options"] == {}
    with pytest.raises(ValueError, match="has no V smoothing"):
        sage_torch.sageattn(q, k, v, smooth_v=True)
    assert len(fn.calls) == 1


@pytest.mark.parametrize("kwargs, err, match", [
    ({"tensor_layout": "BHSD"}, ValueError, "tensor_layout must be 'HND'"),
    ({"qk_quant_gran": "per_warp"}, TypeError, "chooses the Q/K scale granularity"),
    ({"pv_accum_dtype": "fp16"}, ValueError, "accumulates PV in fp32"),
    ({"smooth_v": 1}, TypeError, "smooth_v must be a bool"),
    ({"smooth_k": 1}, TypeError, "smooth_k must be a bool"),
    ({"window_size": 128}, TypeError, "unexpected keyword argument 'window_size'"),
])
def test_rejected_kwargs(kwargs, err, match, seed):
    q, k, v = make_qkv(seed=seed)
    with pytest.raises(err, match=match):
        sage_torch.sageattn(q, k, v, **kwargs)
