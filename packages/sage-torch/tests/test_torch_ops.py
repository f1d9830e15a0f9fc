"""torch.ops.sage.attention_fwd: fake implementation, opcheck, torch.compile(fullgraph=True) on CPU."""

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sage_quant
import sage_torch
from sage_torch import _dispatch
from sage_torch_testing import make_qkv


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
        yield


def _op_args(q, k, v, layout="bhsd", is_causal=False, scale=None, recipe="auto", return_lse=False,
             options="", emulate=None, strict=None):
    return (q, k, v, layout, is_causal, scale, recipe, return_lse, options, emulate, strict)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_fake_impl_matches_real(layout, return_lse, seed):
    q, k, v = make_qkv(b=2, h_q=4, h_kv=2, s_q=5, s_kv=9, d=64, layout=layout, seed=seed)
    # a strided input: the output is still contiguous in the caller's layout
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    real_o, real_lse = torch.ops.sage.attention_fwd(*_op_args(q, k, v, layout, True, None, "auto", return_lse))
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake_o, fake_lse = torch.ops.sage.attention_fwd(*_op_args(fq, fk, fv, layout, True, None, "auto", return_lse))
    for real, fake in ((real_o, fake_o), (real_lse, fake_lse)):
        assert real.shape == fake.shape and real.dtype == fake.dtype and real.stride() == fake.stride()
    assert real_o.shape == q.shape and real_o.dtype == q.dtype
    b, h = q.shape[0], q.shape[1 if layout == "bhsd" else 2]
    s = q.shape[2 if layout == "bhsd" else 1]
    assert real_lse.shape == ((b, h, s) if return_lse else (0,)) and real_lse.dtype == torch.float32


def test_opcheck(seed):
    q, k, v = make_qkv(b=1, h_q=2, s_q=4, d=64, seed=seed)
    for args in (_op_args(q, k, v), _op_args(q, k, v, is_causal=True, return_lse=True, scale=0.1),
                 _op_args(q, k, v, recipe="qk_s8_pv_e4m3", return_lse=True,
                          options=_dispatch.encode_options({"kv_block": 64}))):
        # the autograd checks do not apply: the op is forward only and rejects grad inputs upstream
        torch.library.opcheck(torch.ops.sage.attention_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_op_routes_to_dispatched_backend(as_arch, fake_backend, seed):
    as_arch("sm90")
    fn = fake_backend("qk_s8_pv_e4m3", marker=3.0)
    q, k, v = make_qkv(seed=seed)
    options = _dispatch.encode_options({"smooth_k": False})
    o, lse = torch.ops.sage.attention_fwd(*_op_args(q, k, v, options=options))
    assert fn.calls[0]["options"] == {"smooth_k": False} and lse.numel() == 0
    torch.testing.assert_close(o, sage_torch.attention(q, k, v, smooth_k=False), rtol=0, atol=0)


def _compile(fn):
    torch._dynamo.reset()
    # aot_eager: dynamo + AOT tracing through the fake impl, without the C++ compile of inductor
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_compile_fullgraph_attention(seed):
    q, k, v = make_qkv(b=1, h_q=4, h_kv=2, s_q=8, s_kv=12, d=64, layout="bshd", seed=seed)

    def f(q, k, v):
        o, lse = sage_torch.attention(q * 1.0, k, v, layout="bshd", is_causal=True, return_lse=True,
                                      recipe="qk_s8_pv_e4m3", kv_block=64)
        return o.float().sum(-1), lse

    compiled = _compile(f)
    o, lse = compiled(q, k, v)
    ref_o, ref_lse = sage_quant.emulate(q, k, v, "qk_s8_pv_e4m3", layout="bshd", is_causal=True,
                                        return_lse=True, kv_block=64)
    torch.testing.assert_close(o, ref_o.float().sum(-1), rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


def test_compile_fullgraph_sdpa_dropin_and_patch(seed):
    """A model calling F.scaled_dot_product_attention compiles with the patch in place."""
    q, k, v = make_qkv(b=1, h_q=2, s_q=8, d=64, seed=seed)

    def model(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    with sage_torch.patch_sdpa():
        compiled = _compile(model)
        out = compiled(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) * 2)


def test_compile_fullgraph_routes_to_kernel_at_run_time(as_arch, fake_backend, monkeypatch, seed):
    """The compiled graph holds the opaque op; the backend is chosen when the graph runs."""
    from sage_torch import api
    as_arch("sm90")
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cuda", "cpu"))
    fn = fake_backend("qk_s8_pv_e4m3", marker=4.0)
    q, k, v = make_qkv(b=1, h_q=4, h_kv=2, s_q=8, d=64, seed=seed)

    def model(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) + 1

    with sage_torch.patch_sdpa():
        out = _compile(model)(q, k, v)
    assert len(fn.calls) == 1
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref + 5.0)
