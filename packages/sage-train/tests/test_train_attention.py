"""sage_train.attention: the autograd Function against float64 autograd and the emulation."""

import math
import warnings

import pytest
import torch

import sage_train
from sage_quant.emulation.train_s8 import train_s8_backward, train_s8_forward
from sage_quant.metrics import cosine, rel_l1


def sdpa_f64(q, k, v, *, is_causal=False, scale=None):
    """Float64 SDPA math (bhsd, GQA by repetition, bottom-right causal), differentiable."""
    rep = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    if is_causal:
        sq, skv = s.shape[-2:]
        allowed = torch.arange(skv)[None, :] <= torch.arange(sq)[:, None] + (skv - sq)
        s = s.masked_fill(~allowed, -math.inf)
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v.repeat_interleave(rep, 1)


def _cos(a, b):
    return cosine(a, b)


@pytest.mark.parametrize(
    "b,h,hkv,sq,skv,d,causal,layout,dtype",
    [
        (1, 2, 2, 64, 64, 64, False, "bhsd", torch.bfloat16),
        (2, 4, 2, 37, 53, 64, True, "bshd", torch.float16),
        (1, 2, 1, 70, 40, 128, True, "bhsd", torch.bfloat16),  # rows that see no key
        (1, 2, 2, 33, 33, 32, True, "bhsd", torch.float32),
    ],
)
def test_gradients_vs_float64_autograd(seed, b, h, hkv, sq, skv, d, causal, layout, dtype):
    """Gradcheck-style: the same loss through sage_train.attention and through float64 SDPA."""
    g = torch.Generator().manual_seed(seed)
    shp = lambda hh, s: (b, hh, s, d) if layout == "bhsd" else (b, s, hh, d)  # noqa: E731
    q = torch.randn(shp(h, sq), generator=g).to(dtype).requires_grad_()
    k = torch.randn(shp(hkv, skv), generator=g).to(dtype).requires_grad_()
    v = torch.randn(shp(hkv, skv), generator=g).to(dtype).requires_grad_()
    w = torch.randn(shp(h, sq), generator=g)  # loss = <O, w>: dO = w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_train.SageTrainFallbackWarning)
        o = sage_train.attention(q, k, v, is_causal=causal, layout=layout)
    assert o.dtype == dtype and o.shape == q.shape and o.requires_grad
    (o.float() * w).sum().backward()

    t = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(1, 2))
    q64, k64, v64 = (t(x.detach()).double().requires_grad_() for x in (q, k, v))
    o64 = sdpa_f64(q64, k64, v64, is_causal=causal)
    (o64 * t(w).double()).sum().backward()
    assert _cos(t(o.detach()), o64) > 0.999, f"seed={seed}"
    for name, x, x64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
        c, r = _cos(t(x.grad), x64.grad), rel_l1(t(x.grad), x64.grad)
        assert c > 0.99 and r < 0.15, f"seed={seed}: {name} cos={c:.5f} rel_l1={r:.4f}"


def test_function_equals_emulation_bit_for_bit(seed):
    q, k, v = (torch.randn(1, 4, 50, 64).bfloat16() for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    do = torch.randn(1, 4, 50, 64).bfloat16()
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = sage_train.attention(qa, ka, va, is_causal=True, dp_precision="int8")
    o.backward(do)
    o_e, _, ctx = train_s8_forward(q, k, v, is_causal=True, dp_precision="int8")
    grads = train_s8_backward(do, ctx)
    assert torch.equal(o.detach(), o_e)
    for x, gx in zip((qa, ka, va), grads):
        assert torch.equal(x.grad, gx)


def test_emulation_warning_is_issued_once():
    q = torch.randn(1, 1, 8, 16, requires_grad=True)
    with pytest.warns(sage_train.SageTrainFallbackWarning, match="emulation"):
        sage_train.attention(q, q, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        sage_train.attention(q, q, q).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_only_some_inputs_require_grad(seed):
    q = torch.randn(1, 2, 20, 32, requires_grad=True)
    k, v = torch.randn(1, 2, 20, 32), torch.randn(1, 2, 20, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sage_train.attention(q * 2, k, v).sum().backward()  # non-leaf q
    assert q.grad is not None and k.grad is None and v.grad is None


def test_bad_arguments_raise():
    q = torch.randn(1, 2, 8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="unexpected keyword"):
            sage_train.attention(q, q, q, recipe="qk_s8_pv_f16")
        with pytest.raises(ValueError, match="dp_precision"):
            sage_train.attention(q, q, q, dp_precision="fp8")
        with pytest.raises(TypeError, match="torch.Tensor"):
            sage_train.attention(q, q, [1.0])
        with pytest.raises(ValueError, match="layout"):
            sage_train.attention(q, q, q, layout="sbhd")
        with pytest.raises(TypeError, match="is_causal"):
            sage_train.attention(q, q, q, is_causal=1)
    assert sage_train.kernel_available(torch.device("cpu")) is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
def test_cuda_matches_cpu_emulation(seed):
    """The emulation is device independent: CUDA and CPU agree up to fp32 summation order."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 8, 300, 128, generator=g).bfloat16()
    k = torch.randn(2, 2, 300, 128, generator=g).bfloat16()
    v = torch.randn(2, 2, 300, 128, generator=g).bfloat16()
    do = torch.randn(2, 8, 300, 128, generator=g).bfloat16()
    outs = {}
    for dev in ("cpu", "cuda"):
        # detach: q.to('cpu') is q itself, so without it the CPU pass would make q require grad
        # and q.to('cuda') a non-leaf whose .grad stays None
        xs = [x.detach().to(dev).requires_grad_() for x in (q, k, v)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o = sage_train.attention(*xs, is_causal=True)
        o.backward(do.to(dev))
        outs[dev] = [o.detach().cpu()] + [x.grad.cpu() for x in xs]
    for name, a, b in zip(("o", "dq", "dk", "dv"), outs["cpu"], outs["cuda"]):
        assert rel_l1(b, a) < 2e-3, f"seed={seed}: {name} cuda vs cpu rel_l1 {rel_l1(b, a):.2e}"
