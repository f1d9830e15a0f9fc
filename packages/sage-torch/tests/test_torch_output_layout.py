"""o's memory order follows q's (sage_torch._layout): a (b, h, s, d) view of (b, s, h, d) memory when
q is one (a packed qkv projection, transformers' view + transpose), else contiguous in the layout.
Every path gives the same strides, and so does the custom op's fake (torch.compile relies on it)."""

import warnings

import pytest
import torch

import sage_torch
from sage_torch import _layout


def _packed_qkv(b, s, h, d, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randn(b, s, 3, h, d, generator=g).to(dtype)
    return packed.permute(2, 0, 3, 1, 4).unbind(0)  # (b, h, s, d) views of (b, s, h, d) memory


@pytest.mark.parametrize("recipe", ["auto", "qk_s8_pv_e4m3", "qk_s8_pv_f16"])
def test_bhsd_views_of_bshd_memory_give_bshd_memory(recipe, seed):
    q, k, v = _packed_qkv(2, 37, 3, 64, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = sage_torch.attention(q, k, v, recipe=recipe)
        o_ref = sage_torch.attention(q.contiguous(), k.contiguous(), v.contiguous(), recipe=recipe)
    b, h, s, d = q.shape
    assert o.shape == q.shape and o.stride() == (s * h * d, d, h * d, 1)
    assert o_ref.is_contiguous()
    assert torch.equal(o, o_ref)  # the memory order changes nothing else
    # the model's way back is now a view, as with PyTorch's SDPA
    assert o.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_contiguous_q_gives_contiguous_o(layout, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 2, 33, 64) if layout == "bhsd" else (1, 33, 2, 64)
    q, k, v = (torch.randn(shape, generator=g).to(torch.float16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = sage_torch.attention(q, k, v, layout=layout, recipe="qk_s8_pv_e4m3")
    assert o.is_contiguous()


def test_bshd_views_of_bhsd_memory_give_bhsd_memory(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 33, 64, generator=g).to(torch.float16).transpose(1, 2) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = sage_torch.attention(q, k, v, layout="bshd", recipe="qk_s8_pv_e4m3")
    assert o.shape == q.shape and o.transpose(1, 2).is_contiguous()


def test_extent_one_dims_use_the_layout_order():
    q = torch.empty(2, 1, 5, 64)  # one head: its stride says nothing
    assert _layout.empty_output(q, "bhsd").is_contiguous()
    q = torch.empty(2, 1, 3, 64)  # bshd, one token
    assert _layout.empty_output(q, "bshd").is_contiguous()


def test_as_output_keeps_a_matching_tensor_and_copies_others():
    q, _, _ = _packed_qkv(1, 9, 2, 64, 0)
    good = _layout.empty_output(q, "bhsd")
    assert _layout.as_output(good, q, "bhsd") is good
    dense = torch.randn(q.shape)
    moved = _layout.as_output(dense, q, "bhsd")
    assert moved.stride() == _layout.output_strides(q, "bhsd") and torch.equal(moved, dense)


def test_empty_output_uses_the_given_allocator():
    q, _, _ = _packed_qkv(1, 9, 2, 64, 0)
    calls = []

    def alloc(shape, *, dtype, device):
        calls.append(shape)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    o = _layout.empty_output(q, "bhsd", alloc=alloc)
    assert calls == [(1, 9, 2, 64)] and o.shape == q.shape and torch.isnan(o).all()


@pytest.mark.parametrize("packed", [True, False])
def test_fake_op_strides_match_the_real_op(packed, seed):
    from torch._subclasses.fake_tensor import FakeTensorMode

    if packed:
        q, k, v = _packed_qkv(1, 21, 2, 64, seed)
    else:
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 2, 21, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    args = ("bhsd", False, None, "qk_s8_pv_e4m3", False, "{}", None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real, _ = torch.ops.sage.attention_fwd(q, k, v, *args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake, _ = torch.ops.sage.attention_fwd(fq, fk, fv, *args)
    assert fake.shape == real.shape and fake.stride() == real.stride()
