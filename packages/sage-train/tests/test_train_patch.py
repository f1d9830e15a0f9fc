"""patch_model / unpatch_model / patched(): routing of F.scaled_dot_product_attention."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import sage_train
import sage_train._patch as patch_mod

ORIGINAL = F.scaled_dot_product_attention


class TwoHeadAttention(torch.nn.Module):
    """Calls F.scaled_dot_product_attention through the module attribute, as most models do."""

    def __init__(self, dim=32, heads=2, **sdpa_kwargs):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.sdpa_kwargs = sdpa_kwargs
        self.fail = False

    def forward(self, x):
        b, s, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if self.fail:
            raise RuntimeError("boom")
        o = F.scaled_dot_product_attention(q, k, v, **self.sdpa_kwargs)
        return self.out(o.transpose(1, 2).reshape(b, s, dim))


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = sage_train._function.attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(patch_mod._function, "attention", counting)
    return calls


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore", sage_train.SageTrainFallbackWarning)
    return ctx


def test_patch_routes_only_during_forward_and_unpatch_restores(spy, seed):
    model = TwoHeadAttention(is_causal=True)
    x = torch.randn(2, 10, 32)
    ref = model(x)
    assert spy == []
    assert sage_train.patch_model(model) is model and sage_train.is_patched(model)
    assert sage_train.patch_model(model) is model  # idempotent
    q = _quiet()
    y = model(x)
    q.__exit__(None, None, None)
    assert len(spy) == 1 and spy[0]["is_causal"] is True
    assert F.scaled_dot_product_attention is ORIGINAL  # swapped back after the forward
    assert not torch.equal(y, ref) and torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), 0) > 0.999
    y.sum().backward()  # the train_s8 backward runs outside the forward
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    sage_train.unpatch_model(model)
    assert not sage_train.is_patched(model) and "forward" not in model.__dict__
    assert torch.equal(model(x), ref) and len(spy) == 1
    with pytest.raises(ValueError, match="not patched"):
        sage_train.unpatch_model(model)
    with pytest.raises(TypeError, match="nn.Module"):
        sage_train.patch_model(lambda x: x)


def test_exception_in_forward_restores_sdpa():
    model = sage_train.patch_model(TwoHeadAttention())
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(1, 4, 32))
    assert F.scaled_dot_product_attention is ORIGINAL
    sage_train.unpatch_model(model)


def test_context_manager(spy):
    model = TwoHeadAttention()
    x = torch.randn(1, 6, 32)
    q = _quiet()
    with sage_train.patched(model) as m:
        assert m is model and sage_train.is_patched(model)
        model(x)
    assert not sage_train.is_patched(model) and len(spy) == 1
    with sage_train.patched():  # global: every SDPA call in the block
        assert F.scaled_dot_product_attention is sage_train.scaled_dot_product_attention
        t = torch.randn(1, 2, 5, 16)
        F.scaled_dot_product_attention(t, t, t)
        with sage_train.patched(model):  # nesting keeps the outer routing alive
            model(x)
        assert F.scaled_dot_product_attention is sage_train.scaled_dot_product_attention
    q.__exit__(None, None, None)
    assert F.scaled_dot_product_attention is ORIGINAL and len(spy) == 3
    sage_train.patch_model(model)
    with sage_train.patched(model):
        pass
    assert sage_train.is_patched(model)  # was patched before: stays patched
    sage_train.unpatch_model(model)


@pytest.mark.parametrize(
    "kwargs,shape_kv,match",
    [
        (dict(attn_mask=torch.ones(7, 7, dtype=torch.bool).tril()), 7, "attn_mask"),
        (dict(dropout_p=0.5), 7, "dropout"),
        (dict(is_causal=True), 9, "top-left"),
    ],
)
def test_fallback_to_torch_is_exact_and_warned_once(spy, kwargs, shape_kv, match, seed):
    q = torch.randn(1, 2, 7, 16)
    k, v = torch.randn(1, 2, shape_kv, 16), torch.randn(1, 2, shape_kv, 16)
    torch.manual_seed(seed)
    ref = ORIGINAL(q, k, v, **kwargs)
    with pytest.warns(sage_train.SageTrainFallbackWarning, match=match):
        torch.manual_seed(seed)
        out = sage_train.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(out, ref) and spy == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sage_train.scaled_dot_product_attention(q, k, v, **kwargs)


def test_gqa_needs_enable_gqa_like_torch(spy):
    q, kv = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError):
            sage_train.scaled_dot_product_attention(q, kv, kv)  # torch raises: heads differ
        out = sage_train.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    assert len(spy) == 1 and out.shape == q.shape


def test_drop_in_and_patch_run_the_custom_op(monkeypatch, seed):
    """The SDPA drop-in and patch_model reach torch.ops.sage_train.attention_fwd / attention_bwd."""
    import sage_train._ops as ops_mod

    seen = []
    for name in ("attention_fwd", "attention_bwd"):
        real = getattr(torch.ops.sage_train, name)

        def spy(*a, _real=real, _name=name):
            seen.append(_name)
            return _real(*a)

        monkeypatch.setattr(torch.ops.sage_train, name, spy)
    q = _quiet()
    t = torch.randn(1, 2, 9, 16, requires_grad=True)
    sage_train.scaled_dot_product_attention(t, t, t, is_causal=True).sum().backward()
    model = sage_train.patch_model(TwoHeadAttention(is_causal=True))
    model(torch.randn(1, 5, 32)).sum().backward()
    q.__exit__(None, None, None)
    sage_train.unpatch_model(model)
    assert seen == ["attention_fwd", "attention_bwd"] * 2
    assert ops_mod.FWD_NAME == "sage_train::attention_fwd"


def test_patched_model_compiles_fullgraph(seed, monkeypatch):
    """torch.compile(fullgraph=True) of a patched model's training step: the routing hooks are traced
    (no lock, no swap at run time), the SDPA call becomes sage_train's op; eager and compiled agree."""
    import sage_train._ops as ops_mod

    runs = []
    real = ops_mod.train_s8_backward
    monkeypatch.setattr(ops_mod, "train_s8_backward", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    torch.manual_seed(seed)
    model = sage_train.patch_model(TwoHeadAttention(is_causal=True))
    x = torch.randn(2, 10, 32)
    q = _quiet()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: model(x).square().mean(), backend="aot_eager", fullgraph=True)
    loss = compiled(x)
    loss.backward()
    assert F.scaled_dot_product_attention is ORIGINAL and patch_mod._depth == 0
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x).square().mean()
    eager.backward()
    q.__exit__(None, None, None)
    assert len(runs) == 2 and loss.item() == eager.item()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    sage_train.unpatch_model(model)
    torch._dynamo.reset()
