"""The custom ops behind sage_train.attention: torch.library checks, torch.compile of a training
step, repeated and double backward, and the place where kernels plug in (a stand-in kernel on CPU)."""

import warnings

import pytest
import torch

import sage_train
import sage_train._ops as ops_mod
from sage_quant.emulation.train_s8 import train_s8_backward, train_s8_context, train_s8_forward
from sage_torch import SageDispatchError

FWD = torch.ops.sage_train.attention_fwd.default
BWD = torch.ops.sage_train.attention_bwd.default


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_train.SageTrainFallbackWarning)
        yield


def _qkv(seed, *, b=1, h=4, hkv=2, sq=40, skv=56, d=32, layout="bhsd", dtype=torch.bfloat16, grad=True):
    g = torch.Generator().manual_seed(seed)
    shp = (lambda hh, s: (b, hh, s, d)) if layout == "bhsd" else (lambda hh, s: (b, s, hh, d))
    xs = [torch.randn(shp(hh, s), generator=g).to(dtype) for hh, s in ((h, sq), (hkv, skv), (hkv, skv))]
    do = torch.randn(shp(h, sq), generator=g).to(dtype)
    return [x.requires_grad_(grad) for x in xs] + [do]


@pytest.fixture
def emulation_calls(monkeypatch):
    """Counts the emulation's forward and backward as the ops run them (at run time, not at trace time)."""
    calls = {"fwd": 0, "bwd": 0}
    real_f, real_b = ops_mod.train_s8_forward, ops_mod.train_s8_backward

    def fwd(*a, **kw):
        calls["fwd"] += 1
        return real_f(*a, **kw)

    def bwd(*a, **kw):
        calls["bwd"] += 1
        return real_b(*a, **kw)

    monkeypatch.setattr(ops_mod, "train_s8_forward", fwd)
    monkeypatch.setattr(ops_mod, "train_s8_backward", bwd)
    return calls


# ----------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("layout,causal", [("bhsd", True), ("bshd", False)])
def test_opcheck(seed, layout, causal):
    """Schema, fake (meta) implementations, autograd registration, AOT dispatch (dynamic shapes)."""
    q, k, v, do = _qkv(seed, layout=layout)
    args = (q, k, v, causal, None, layout, "fp16", True, None, None)
    torch.library.opcheck(FWD, args)
    o, lse = FWD(*(x.detach() for x in (q, k, v)), *args[3:])
    # the backward op: its autograd formula only raises, so AOT's gradient check is left out
    torch.library.opcheck(BWD, (do, q.detach(), k.detach(), v.detach(), o, lse) + args[3:],
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_ops_equal_the_emulation_and_save_the_smoothed_lse(seed):
    q, k, v, do = _qkv(seed, grad=False, sq=70, skv=45)
    o, lse = FWD(q, k, v, True, None, "bhsd", "fp16", True, None, None)
    o_e, _lse_user, ctx = train_s8_forward(q, k, v, is_causal=True)
    assert torch.equal(o, o_e) and torch.equal(lse, ctx.lse_smoothed)
    grads = BWD(do, q, k, v, o, lse, True, None, "bhsd", "fp16", True, None, None)
    for a, e in zip(grads, train_s8_backward(do, ctx)):
        assert torch.equal(a, e) and a.is_contiguous()


# ----------------------------------------------------------------------------- torch.compile


class _Block(torch.nn.Module):
    """qkv projection -> sage_train.attention (bshd views of the packed projection) -> projection."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, dim // self.heads).unbind(2)
        o = sage_train.attention(q, k, v, is_causal=True, layout="bshd")
        return self.out(o.reshape(b, n, dim))


def test_compiled_training_step_fullgraph_equals_eager(seed, emulation_calls):
    """torch.compile(fullgraph=True, aot_eager) of loss(model(x)): one graph with the forward op,
    AOTAutograd's backward graph with the backward op; two optimizer steps equal eager exactly."""
    torch.manual_seed(seed)
    model = _Block()
    ref = _Block()
    ref.load_state_dict(model.state_dict())
    xs = [torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(seed + i)) for i in range(2)]

    def loss_fn(m, x):
        return m(x).square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    losses = {}
    for name, m, fn in (("compiled", model, compiled), ("eager", ref, loss_fn)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        losses[name] = []
        for x in xs:
            opt.zero_grad()
            loss = fn(m, x)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert emulation_calls == {"fwd": 4, "bwd": 4}
    assert losses["compiled"] == losses["eager"], f"seed={seed}: {losses}"
    for p, r in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, r)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- repeated / double backward


def test_retain_graph_backward_twice(seed):
    """Was: TypeError about the context on the second call. Now the saved tensors are kept."""
    q, k, v, do = _qkv(seed)
    o = sage_train.attention(q, k, v, is_causal=True)
    o.backward(do, retain_graph=True)
    first = [x.grad.clone() for x in (q, k, v)]
    o.backward(do)
    for x, g in zip((q, k, v), first):
        assert torch.equal(x.grad, 2 * g)


def test_create_graph_first_order_works_and_double_backward_raises(seed):
    q, k, v, do = _qkv(seed)
    o = sage_train.attention(q, k, v)
    plain = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), plain))
    assert dq.requires_grad
    with pytest.raises(RuntimeError, match="does not support double backward"):
        (dq.float().square().sum() + dk.float().sum()).backward()
    with pytest.raises(TypeError, match="float64"):  # gradcheck's float64 inputs: the dtype error
        torch.autograd.gradcheck(lambda a: sage_train.attention(a, a, a),
                                 (torch.randn(1, 1, 4, 8, dtype=torch.float64, requires_grad=True),))


def test_gradient_only_for_inputs_that_need_it(seed):
    q, k, v, do = _qkv(seed)
    k.requires_grad_(False)
    sage_train.attention(q * 2, k, v).backward(do)
    assert q.grad is not None and v.grad is not None and k.grad is None


# ----------------------------------------------------------------------------- the kernel plug point


@pytest.fixture
def stand_in_kernel():
    """A 'kernel' for arch "cpu", bf16, head dim 32 that runs the emulation and counts its calls."""
    calls = {"fwd": 0, "bwd": 0}

    def forward(q, k, v, *, layout, is_causal, scale, smooth_k):
        calls["fwd"] += 1
        o, _, ctx = train_s8_forward(q, k, v, is_causal=is_causal, scale=scale, layout=layout, smooth_k=smooth_k)
        return o, ctx.lse_smoothed

    def backward(do, q, k, v, o, lse, *, layout, is_causal, scale, smooth_k):
        calls["bwd"] += 1
        return train_s8_backward(do, train_s8_context(
            q, k, v, o, lse, is_causal=is_causal, scale=scale, layout=layout, smooth_k=smooth_k))

    def supports(q, k, v, *, layout, is_causal, scale, dp_precision, smooth_k):
        return None if dp_precision == "fp16" else "only the recipe's 16-bit dP"

    spec = sage_train.TrainKernel(name="test_cpu_stand_in", archs=frozenset({"cpu"}),
                                  dtypes=frozenset({torch.bfloat16}), head_dims=frozenset({32}),
                                  forward=forward, backward=backward, available=lambda: True,
                                  supports=supports, module=__name__)
    sage_train.register_kernel(spec)
    try:
        yield calls
    finally:
        sage_train.unregister_kernel("test_cpu_stand_in")


def test_registered_kernel_runs_forward_and_backward(seed, stand_in_kernel, emulation_calls, monkeypatch):
    q, k, v, do = _qkv(seed)
    assert sage_train.kernel_available(torch.device("cpu"), torch.bfloat16, 32)
    assert not sage_train.kernel_available("cpu", torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel path warns about nothing
        o = sage_train.attention(q, k, v, is_causal=True, strict=True)
        o.backward(do)
    assert stand_in_kernel == {"fwd": 1, "bwd": 1} and emulation_calls == {"fwd": 0, "bwd": 0}
    got = [o.detach()] + [x.grad for x in (q, k, v)]

    # the oracle: emulate=True (or SAGE_FORCE_EMULATION=1) never calls the kernel
    for kwargs, env in (({"emulate": True}, None), ({}, "1")):
        if env:
            monkeypatch.setenv("SAGE_FORCE_EMULATION", env)
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o_e = sage_train.attention(*xs, is_causal=True, **kwargs)
        o_e.backward(do)
        for a, b in zip(got, [o_e.detach()] + [x.grad for x in xs]):
            assert torch.equal(a, b)
    assert stand_in_kernel == {"fwd": 1, "bwd": 1} and emulation_calls == {"fwd": 2, "bwd": 2}
    monkeypatch.delenv("SAGE_FORCE_EMULATION")

    # a call the kernel declines runs the emulation, with the kernel's reason in the warning
    sage_train.reset_warnings()
    with pytest.warns(sage_train.SageTrainFallbackWarning, match="only the recipe's 16-bit dP"):
        sage_train.attention(q, k, v, dp_precision="int8").backward(do)
    assert stand_in_kernel == {"fwd": 1, "bwd": 1}


def test_kernel_path_under_compile(seed, stand_in_kernel):
    torch.manual_seed(seed)
    model = _Block(dim=64, heads=2)  # head dim 32, bf16 below
    model.to(torch.bfloat16)
    x = torch.randn(1, 24, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    loss = torch.compile(lambda x: model(x).float().sum(), backend="aot_eager", fullgraph=True)(x)
    loss.backward()
    assert stand_in_kernel == {"fwd": 1, "bwd": 1}
    torch._dynamo.reset()


def test_strict_mode_without_a_kernel_raises(monkeypatch):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(SageDispatchError, match="no train_s8 kernel for cpu, float32, head_dim=16"):
        sage_train.attention(q, q, q, strict=True)
    monkeypatch.setenv("SAGE_STRICT", "1")
    with pytest.raises(SageDispatchError, match="strict mode"):
        sage_train.attention(q, q, q)
    sage_train.attention(q, q, q, strict=False)  # the argument wins over the environment


def test_sm90_module_is_the_plug_point():
    from sage_train.backends import sm90

    assert sage_train.kernel_module_status()["sage_train.backends.sm90"] == "imported"
    (spec,) = [s for s in sage_train.registered_kernels() if s.name == sm90.BACKEND_NAME]
    assert spec.archs == {"sm90"} and spec.head_dims == {64, 128}
    # both kernels' glue is written; on this CPU-only machine (or a build without them) not available
    assert sm90.GLUE_WRITTEN and set(sm90.FORWARD_KERNEL_NAMES + sm90.BACKWARD_KERNEL_NAMES) == set(sm90.KERNEL_NAMES)
    assert spec.available() is torch.cuda.is_available() and spec.available() is sm90.available()
    assert sm90.supports(None, None, None, layout="bhsd", is_causal=False, scale=1.0, dp_precision="int8",
                         smooth_k=True) is not None
    with pytest.raises(RuntimeError, match="no sm90 train_s8 forward kernel here"):
        sm90.forward(None, None, None, layout="bhsd", is_causal=False, scale=1.0, smooth_k=True)
    with pytest.raises(RuntimeError, match="no sm90 train_s8 backward kernel here"):
        sm90.backward(None, None, None, None, None, None, layout="bhsd", is_causal=False, scale=1.0, smooth_k=True)
    assert not sage_train.kernel_available("cpu")


def test_a_misbehaving_kernel_is_named(seed, stand_in_kernel, monkeypatch):
    spec = next(s for s in sage_train.registered_kernels() if s.name == "test_cpu_stand_in")
    import dataclasses

    def bad_forward(q, k, v, **kw):
        o, lse = spec.forward(q, k, v, **kw)
        return o.float(), lse

    sage_train.register_kernel(dataclasses.replace(spec, forward=bad_forward))
    q, k, v, _ = _qkv(seed)
    with pytest.raises(RuntimeError, match="kernel 'test_cpu_stand_in' forward output 0 is .* torch.float32"):
        sage_train.attention(q, k, v)
