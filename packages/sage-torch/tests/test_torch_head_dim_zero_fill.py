"""Head dims zero-filled inside a backend's kernel (``BackendSpec.pads_head_dim``), on CPU with the
arch mocked: the dispatcher hands such a backend the call's own tensors (``fn``, ``supports`` and
``fast``; no ``PaddedCall``), a backend without it still gets zero-padded copies; and the sm90
backend module over a fake sage_core: ``SM90_HEAD_DIM_ZERO_FILL`` turns it on (d=80 reaches the
one-call binding unpadded, the LSE correction uses q at d and the first d channels of k_mean), an
older sage_core without the flag keeps the copies.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
import warnings

import pytest
import torch

import sage_torch
from sage_torch import _dispatch, _layout, backends
from sage_torch._torch_fallback import torch_attention
from sage_torch_testing import make_qkv

BF16 = torch.bfloat16
RECIPE = "qk_s8_pv_e4m3"


class _Recorder:
    """A CPU stand-in kernel: records the head dims and zero tails it was given, returns exact
    attention of its inputs; with ``nan_tail`` it writes NaN into o's channels >= d_call (a padded
    o's channels that must never reach the caller)."""

    def __init__(self, d_call: int, nan_tail: bool = True):
        self.d_call, self.nan_tail = d_call, nan_tail
        self.calls = []

    def __call__(self, q, k, v, *, layout, is_causal, scale, return_lse, **options):
        self.calls.append(dict(d=(q.shape[-1], k.shape[-1], v.shape[-1]), scale=scale, options=options,
                               zero_tails=[bool((x[..., self.d_call:] == 0).all()) for x in (q, k, v)],
                               q_ptr=q.data_ptr(), layout=layout))
        o, lse = torch_attention(q, k, v, layout=layout, is_causal=is_causal, scale=scale, return_lse=return_lse)
        if self.nan_tail and q.shape[-1] > self.d_call:
            o = o.clone()
            o[..., self.d_call:] = math.nan
        return o, lse


def _no_padded_call(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the dispatcher built a PaddedCall for a backend that zero-fills itself")

    monkeypatch.setattr(_dispatch, "PaddedCall", refuse)


@pytest.mark.parametrize("d, kernel_d", [(32, 64), (80, 128), (112, 128)])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_zero_filling_backend_gets_the_unpadded_call(as_arch, monkeypatch, d, kernel_d, layout, seed):
    as_arch("sm90")
    _no_padded_call(monkeypatch)
    rec, seen = _Recorder(d), []

    def supports(q, k, v, *, layout, is_causal, scale, return_lse, **options):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return None

    spec = sage_torch.register_backend("zero_fill", RECIPE, ("sm90",), (64, 128), rec, lambda: True,
                                       supports=supports, pads_head_dim=True)
    assert spec.pads_head_dim and spec.describe()["pads_head_dim"] is True
    q, k, v = make_qkv(b=2, h_q=4, h_kv=2, s_q=13, s_kv=29, d=d, layout=layout, seed=seed)
    for recipe in ("auto", RECIPE):
        decision = _dispatch.resolve("sm90", BF16, d, recipe)
        assert decision.kind == "kernel" and decision.backend is spec and decision.pad_to == kernel_d
    with warnings.catch_warnings():
        warnings.simplefilter("error", sage_torch.SageFallbackWarning)
        o, lse = sage_torch.attention(q, k, v, layout=layout, is_causal=True, recipe=RECIPE, return_lse=True)
    assert seen == [(d, d, d)]
    assert len(rec.calls) == 1 and rec.calls[0]["d"] == (d, d, d)
    assert rec.calls[0]["q_ptr"] == q.data_ptr(), "the backend got a copy of q, not q"
    assert rec.calls[0]["scale"] == pytest.approx(d ** -0.5)  # the call's d, not the kernel's
    assert o.shape == q.shape and o.stride() == _layout.output_strides(q, layout)
    ref_o, ref_lse = torch_attention(q, k, v, layout=layout, is_causal=True, scale=d ** -0.5, return_lse=True)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


def test_backend_without_pads_head_dim_still_gets_padded_copies(as_arch, seed):
    as_arch("sm90")
    rec = _Recorder(80)
    spec = sage_torch.register_backend("copies", RECIPE, ("sm90",), (64, 128), rec, lambda: True)
    assert spec.pads_head_dim is False and spec.describe()["pads_head_dim"] is False
    q, k, v = make_qkv(d=80, s_q=9, seed=seed)
    o = sage_torch.attention(q, k, v, recipe=RECIPE)
    assert rec.calls[0]["d"] == (128, 128, 128) and rec.calls[0]["zero_tails"] == [True] * 3
    assert rec.calls[0]["q_ptr"] != q.data_ptr()
    assert o.shape == q.shape and torch.isfinite(o).all()


def test_fast_entry_takes_a_zero_filled_head_dim(as_arch, seed):
    """The fast path (one cached decision per signature) accepts a padded decision only for a
    backend that zero-fills itself; the others leave it to the validated path, which copies."""
    as_arch("sm90")

    def fast(*args):
        return None

    sage_torch.register_backend("zf", RECIPE, ("sm90",), (128,), _Recorder(80), lambda: True, fast=fast,
                                pads_head_dim=True)
    sage_torch.register_backend("cp", RECIPE, ("sm90",), (64,), _Recorder(32), lambda: True, fast=fast)
    for d, has_fast in ((80, True), (128, True), (32, False), (64, True)):
        q = make_qkv(d=d, seed=seed)[0]
        entry = _dispatch._fast_entry(("test", d), q, RECIPE)
        assert (entry[0] is fast) == has_fast, d


def test_register_backend_checks_pads_head_dim():
    with pytest.raises(TypeError, match="pads_head_dim must be True or False"):
        sage_torch.register_backend("bad", RECIPE, ("sm90",), (64,), _Recorder(64), lambda: True, pads_head_dim=1)


def test_zero_filling_backend_gets_the_mixed_head_dim_call_rejected_before(as_arch, seed):
    """A head dim no kernel takes (136, 100) never reaches a zero-filling backend."""
    as_arch("sm90")
    rec = _Recorder(64)
    sage_torch.register_backend("zf", RECIPE, ("sm90",), (64, 128), rec, lambda: True, pads_head_dim=True)
    for d in (136, 100):
        assert _dispatch.resolve("sm90", BF16, d, "auto").kind == "torch"
    assert rec.calls == []


# ----------------------------------------------------------------------------- the sm90 module


def _fake_sage_core(zero_fill: bool, calls: list):
    """A stand-in for sage_core's sm90 bindings on CPU tensors: the one-call entry computes exact
    attention of what it is given, writes k_mean's first d channels (NaN beyond: they must not be
    read; the real kernel writes 0 there) at the workspace's start, and the LSE of the smoothed
    scores (the kernel's: without the per-row constant q·k_mean·scale)."""

    def kernel_d(d):
        return (64 if d <= 64 else 128) if zero_fill and d % 8 == 0 and 8 <= d <= 128 else d

    def ws_size(b, h_q, s_q, h_kv, s_kv, d):
        return 4 * b * h_kv * kernel_d(d) + 256

    def one_call(q, k, v, o, lse, ws, scale, is_causal, smooth_k, smooth_v, stream, **kw):
        b, h_q, s_q, d = q.shape
        h_kv = k.shape[1]
        D = kernel_d(d)
        calls.append(dict(d=d, o_d=o.shape[-1], kernel_d=D))
        if o.shape[-1] != d:
            raise ValueError(f"fake: out's head dim {o.shape[-1]} != q's {d}")
        km = k.float().mean(dim=2) if smooth_k else torch.zeros(b, h_kv, d)
        km_ws = ws[:4 * b * h_kv * D].view(torch.float32).view(b, h_kv, D)
        km_ws[..., :d] = km
        km_ws[..., d:] = math.nan
        out, out_lse = torch_attention(q, k, v, layout="bhsd", is_causal=is_causal, scale=scale,
                                       return_lse=lse is not None)
        o.copy_(out)
        if lse is not None:
            kmq = km.repeat_interleave(h_q // h_kv, dim=1)
            lse.copy_(out_lse - torch.einsum("bhsd,bhd->bhs", q.float(), kmq) * scale)

    def not_here(*args, **kwargs):
        raise AssertionError("the fake sage_core runs the one-call path only")

    ns = dict(attn_fwd_sm90_qk_s8_pv_e4m3=not_here, quant_qkv_sm90_fused=not_here,
              quant_attn_fwd_sm90_qk_s8_pv_e4m3=one_call, quant_attn_fwd_sm90_workspace_size=ws_size)
    if zero_fill:
        ns["SM90_HEAD_DIM_ZERO_FILL"] = True
    fake = types.ModuleType("sage_core")
    fake._C = types.SimpleNamespace(**ns)
    fake.has_kernel = lambda name: True
    for name, fn in ns.items():
        setattr(fake, name, fn)
    return fake


@pytest.fixture
def fake_sm90(monkeypatch):
    """fake_sm90(zero_fill) -> a fresh import of sage_torch.backends.sm90 over a fake sage_core (its
    backend registered into the test's registry), and the list of one-call calls."""

    def make(zero_fill: bool):
        calls = []
        monkeypatch.setitem(sys.modules, "sage_core", _fake_sage_core(zero_fill, calls))
        monkeypatch.delitem(sys.modules, "sage_torch.backends.sm90", raising=False)
        monkeypatch.setattr(backends, "sm90", getattr(backends, "sm90", None), raising=False)
        backends.unregister_backend("sm90_qk_s8_pv_e4m3")
        mod = importlib.import_module("sage_torch.backends.sm90")
        monkeypatch.setattr(mod, "_stream", lambda device: 0)
        monkeypatch.setattr(mod, "_to_dlpack", lambda t: t)  # the fake binding takes tensors
        return mod, calls

    return make


@pytest.mark.parametrize("d, kernel_d", [(80, 128), (32, 64), (128, 128)])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_sm90_zero_fill_capability_runs_head_dims_unpadded(as_arch, monkeypatch, fake_sm90, d, kernel_d, layout,
                                                          seed):
    as_arch("sm90")
    sm90, calls = fake_sm90(True)
    assert sm90.ZERO_FILL is True and sm90.kernel_head_dim(d) == kernel_d
    assert sm90.kernel_head_dim(100) is None and sm90.kernel_head_dim(136) is None
    spec = next(s for s in backends.registered_backends() if s.name == sm90.BACKEND_NAME)
    assert spec.pads_head_dim is True
    _no_padded_call(monkeypatch)
    q, k, v = make_qkv(b=1, h_q=4, h_kv=2, s_q=21, s_kv=37, d=d, layout=layout, seed=seed)
    o, lse = sage_torch.attention(q, k, v, layout=layout, is_causal=True, recipe=RECIPE, return_lse=True)
    assert calls == [dict(d=d, o_d=d, kernel_d=kernel_d)]
    ref_o, ref_lse = torch_attention(q, k, v, layout=layout, is_causal=True, scale=d ** -0.5, return_lse=True)
    assert o.shape == q.shape and o.stride() == _layout.output_strides(q, layout)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=0)
    # the LSE correction: q at d and k_mean[..., :d] (the NaN tail of the workspace's k_mean unread)
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_sm90_without_the_capability_keeps_the_copies(as_arch, fake_sm90, seed):
    as_arch("sm90")
    sm90, calls = fake_sm90(False)
    assert sm90.ZERO_FILL is False and sm90.kernel_head_dim(80) is None and sm90.kernel_head_dim(64) == 64
    spec = next(s for s in backends.registered_backends() if s.name == sm90.BACKEND_NAME)
    assert spec.pads_head_dim is False
    assert not sm90.kernels_available(80) and sm90.kernels_available(128)
    q, k, v = make_qkv(b=1, h_q=2, s_q=9, d=80, seed=seed)
    with pytest.raises(ValueError, match="head dim 80 is not supported by the sm90 kernel"):
        sm90.attention_sm90_qk_s8_pv_e4m3(q, k, v, layout="bhsd", is_causal=False, scale=0.1, return_lse=False)
    o, lse = sage_torch.attention(q, k, v, recipe=RECIPE, return_lse=True)
    assert calls == [dict(d=128, o_d=128, kernel_d=128)]  # the dispatcher's padded copies
    ref_o, ref_lse = torch_attention(q, k, v, layout="bhsd", is_causal=False, scale=80 ** -0.5, return_lse=True)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=1e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
