"""attention(): every bad input is a clear TypeError/ValueError naming what was given."""

import pytest
import torch

import sage_torch
from sage_torch_testing import make_qkv, randn


@pytest.fixture
def qkv(seed):
    return make_qkv(b=2, h_q=4, h_kv=2, s_q=8, s_kv=12, d=64, seed=seed)


def test_valid_call_runs(qkv):
    q, k, v = qkv
    with pytest.warns(sage_torch.SageFallbackWarning):
        o = sage_torch.attention(q, k, v)
    assert o.shape == q.shape and o.dtype == q.dtype and torch.isfinite(o).all()


@pytest.mark.parametrize("bad, match", [
    ("q3d", "q must be 4-D"),
    ("not_tensor", "k must be a torch.Tensor"),
    ("fp32", "dtype float32; accepted: float16, bfloat16"),
    ("mixed", "share one dtype"),
    ("batch", "batch size of k"),
    ("headdim", "head_dim of v"),
    ("kv_len", "same heads and length"),
    ("gqa", r"multiple of kv heads"),
    ("strided", "contiguous last dim"),
    ("empty", "must be >= 1"),
])
def test_bad_tensors(qkv, bad, match, seed):
    q, k, v = qkv
    err = ValueError
    if bad == "q3d":
        q = q[0]
    elif bad == "not_tensor":
        k = k.tolist()
        err = TypeError
    elif bad == "fp32":
        q, k, v = q.float(), k.float(), v.float()
        err = TypeError
    elif bad == "mixed":
        v = v.half()
        err = TypeError
    elif bad == "batch":
        k = k[:1]
    elif bad == "headdim":
        v = randn((2, 2, 12, 32), seed=seed)
    elif bad == "kv_len":
        v = v[:, :, :5]
    elif bad == "gqa":
        k, v = randn((2, 3, 12, 64), seed=seed), randn((2, 3, 12, 64), seed=seed + 1)
    elif bad == "strided":
        q = randn((2, 4, 8, 128), seed=seed)[..., ::2]
    elif bad == "empty":
        q = q[:, :, :0]
    with pytest.raises(err, match=match):
        sage_torch.attention(q, k, v)


def test_bad_arguments(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="layout must be one of"):
        sage_torch.attention(q, k, v, layout="bsd")
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        sage_torch.attention(q, k, v, is_causal=1)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        sage_torch.attention(q, k, v, return_lse="yes")
    with pytest.raises(ValueError, match="scale must be None or a positive finite real number"):
        sage_torch.attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="recipe must be a str"):
        sage_torch.attention(q, k, v, recipe=None)
    with pytest.raises(ValueError, match="unknown recipe='qk_s9'.*accepted: 'auto', 'torch' or one of"):
        sage_torch.attention(q, k, v, recipe="qk_s9")
    with pytest.raises(TypeError, match="emulate must be a bool"):
        sage_torch.attention(q, k, v, emulate="no")


def test_unknown_keyword_is_type_error(qkv):
    q, k, v = qkv
    # on the fallback path (CPU), under an explicit recipe, and with a value of the wrong kind
    with pytest.raises(TypeError, match=r"unknown recipe option\(s\) \['smoth_k'\]"):
        sage_torch.attention(q, k, v, smoth_k=False)
    with pytest.raises(TypeError, match="got unexpected option|unknown recipe option"):
        sage_torch.attention(q, k, v, recipe="qk_s8_pv_e4m3", kv_blok=64)
    with pytest.raises(TypeError, match="only bool, int, float, str or None"):
        sage_torch.attention(q, k, v, recipe="qk_s8_pv_e4m3", kv_block=[64])


def test_layout_bshd_shapes(seed):
    q, k, v = make_qkv(b=1, h_q=4, h_kv=1, s_q=5, s_kv=7, d=64, layout="bshd", seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning):
        o, lse = sage_torch.attention(q, k, v, layout="bshd", return_lse=True)
    assert o.shape == (1, 5, 4, 64) and o.is_contiguous()
    assert lse.shape == (1, 4, 5) and lse.dtype == torch.float32
    # A wrong-layout reading of the same tensors is caught by the head/length checks.
    with pytest.raises(ValueError, match="multiple of kv heads|same heads and length"):
        sage_torch.attention(q, k, v, layout="bhsd")


@pytest.mark.parametrize("d", [100, 264])  # not a multiple of 8; above 256 (sage_torch._head_dim)
def test_unsupported_head_dim(d, seed):
    q, k, v = make_qkv(d=d, s_q=4, seed=seed)
    with pytest.raises(ValueError, match=f"head_dim={d} is not supported; supported: multiples of 8 up to 256"):
        sage_torch.attention(q, k, v, recipe="qk_s8_pv_e4m3")
    with pytest.warns(sage_torch.SageFallbackWarning, match=f"head_dim={d} is not supported by sage kernels"):
        o = sage_torch.attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(o, ref, rtol=0, atol=0)


def test_requires_grad_is_rejected(qkv):
    q, k, v = qkv
    q = q.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        sage_torch.attention(q, k, v)
    with torch.no_grad(), pytest.warns(sage_torch.SageFallbackWarning):
        assert sage_torch.attention(q, k, v).requires_grad is False
