"""Head dims other than the kernels' 64/128 (sage_torch._head_dim), on CPU with the arch mocked.

* the rule (which d pads to which kernel, which fall back, which raise) and where it is decided;
* the padded kernel path: the backend sees zero-padded q, k, v (also in ``supports``), the scale of
  the call's d, o sliced back in q's memory order, the LSE exact; recipe options and return_lse
  pass through; the fast path leaves padded head dims to the validated path; varlen entries too;
* the semantics: zero-padding then the recipe's quantization groups give the codes and scales of
  the unpadded tensors (bit for bit, given one smoothing mean), so a kernel on the padded call
  computes the recipe's emulation at d (a fake "kernel" that emulates the padded call agrees with
  ``sage_quant.emulate`` at d within fp32 summation order), and both are close to float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import sage_torch
from sage_torch import _dispatch, _head_dim, _layout, api, varlen
from sage_torch._torch_fallback import torch_attention
from sage_torch_testing import make_qkv

sage_quant = pytest.importorskip("sage_quant")
from sage_quant import reference as R  # noqa: E402
from sage_quant.testing import assert_rows_close  # noqa: E402

BF16 = torch.bfloat16


@pytest.mark.parametrize("d, expected", [
    (8, 64), (32, 64), (48, 64), (56, 64), (64, 64), (72, 128), (80, 128), (96, 128), (112, 128),
    (120, 128), (128, 128), (136, None), (256, None), (100, None), (33, None), (264, None),
])
def test_kernel_head_dim_rule(d, expected):
    assert _head_dim.kernel_head_dim(d) == expected
    recipes_take = d % 8 == 0 and d <= 256
    assert (_head_dim.unsupported_head_dim_reason(d) is None) == recipes_take


class _Recorder:
    """A CPU stand-in kernel: records what it was given (shapes, strides, the zero tail) and
    returns exact attention of its inputs, with NaN written into o's padded channels (they must
    never reach the caller)."""

    def __init__(self, d_call: int):
        self.d_call = d_call
        self.calls = []

    def __call__(self, q, k, v, *, layout, is_causal, scale, return_lse, **options):
        tails = [bool((x[..., self.d_call:] == 0).all()) for x in (q, k, v)]
        self.calls.append(dict(d=q.shape[-1], scale=scale, options=options, zero_tails=tails,
                               q_stride=q.stride(), layout=layout))
        o, lse = torch_attention(q, k, v, layout=layout, is_causal=is_causal, scale=scale, return_lse=return_lse)
        o = o.clone()
        o[..., self.d_call:] = math.nan
        return o, lse


def _register(fn, recipe="qk_s8_pv_e4m3", archs=("sm90",), **kwargs):
    sage_torch.register_backend(f"rec_{recipe}_{archs[0]}", recipe, archs, (64, 128), fn, lambda: True, **kwargs)


@pytest.mark.parametrize("d, padded", [(32, 64), (80, 128), (96, 128)])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_padded_kernel_path(as_arch, d, padded, layout, is_causal, seed):
    as_arch("sm90")
    rec = _Recorder(d)
    _register(rec)
    q, k, v = make_qkv(b=2, h_q=4, h_kv=2, s_q=13, s_kv=29, d=d, layout=layout, seed=seed)  # GQA, odd lengths
    with warnings.catch_warnings():
        warnings.simplefilter("error", sage_torch.SageFallbackWarning)  # padding is the kernel path: no warning
        o, lse = sage_torch.attention(q, k, v, layout=layout, is_causal=is_causal, return_lse=True)
    assert len(rec.calls) == 1 and rec.calls[0]["d"] == padded and rec.calls[0]["zero_tails"] == [True] * 3
    assert rec.calls[0]["scale"] == pytest.approx(d ** -0.5)  # the call's d, not the kernel's
    assert o.shape == q.shape and o.dtype == q.dtype and o.stride() == _layout.output_strides(q, layout)
    assert torch.isfinite(o).all(), "padded output channels leaked"
    ref_o, ref_lse = torch_attention(q, k, v, layout=layout, is_causal=is_causal, scale=d ** -0.5, return_lse=True)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=1e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)  # zero channels add exactly 0
    # float64 attention at d (not at the padded d): the result is attention of the call
    f64, f64_lse = sage_quant.reference_attention(q, k, v, layout=layout, is_causal=is_causal, return_lse=True)
    assert sage_quant.rel_l1(o, f64) < 1e-2
    live = torch.isfinite(f64_lse)
    torch.testing.assert_close(lse[live].double(), f64_lse[live], rtol=0, atol=1e-4)


def test_padded_output_keeps_q_memory_order(as_arch, seed):
    """q as a (b, h, s, d) view of (b, s, h, d) memory (a packed projection): the padded copies and
    the kernel's o keep that order, and the returned o is such a view too (sage_torch._layout)."""
    as_arch("sm90")
    rec = _Recorder(80)
    _register(rec)
    q, k, v = (x.transpose(1, 2) for x in make_qkv(b=2, h_q=3, s_q=11, d=80, layout="bshd", seed=seed))
    o = sage_torch.attention(q, k, v)
    assert o.stride() == _layout.output_strides(q, "bhsd") and not o.is_contiguous()
    qs = rec.calls[0]["q_stride"]
    assert qs[1] < qs[2], f"padded q lost q's memory order: strides {qs}"
    torch.testing.assert_close(o, torch_attention(q, k, v, layout="bhsd", is_causal=False, scale=80 ** -0.5,
                                                  return_lse=False)[0], rtol=0, atol=1e-2)


def test_explicit_recipe_options_and_scale_reach_the_padded_backend(as_arch, seed):
    as_arch("sm90")
    rec = _Recorder(48)
    _register(rec)
    q, k, v = make_qkv(d=48, seed=seed)
    o = sage_torch.attention(q, k, v, recipe="qk_s8_pv_e4m3", scale=0.25, smooth_k=False)
    assert rec.calls[0]["d"] == 64 and rec.calls[0]["scale"] == 0.25 and rec.calls[0]["options"] == {"smooth_k": False}
    assert o.shape == q.shape
    decision = _dispatch.resolve("sm90", BF16, 48, "qk_s8_pv_e4m3")
    assert decision.kind == "kernel" and decision.pad_to == 64 and decision.describe()["pad_to"] == 64
    assert _dispatch.resolve("sm90", BF16, 64, "qk_s8_pv_e4m3").pad_to is None


def test_supports_sees_the_padded_call(as_arch, seed):
    as_arch("sm90")
    seen = []

    def supports(q, k, v, *, layout, is_causal, scale, return_lse, **options):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return "vetoed for the test"

    _register(_Recorder(80), supports=supports)
    q, k, v = make_qkv(d=80, seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning, match=r"head_dim=80 \(padded to 128\).*vetoed for the test"):
        sage_torch.attention(q, k, v)
    assert seen == [(128, 128, 128)]


def test_native_backend_for_a_head_dim_wins_over_padding(as_arch, seed):
    """A backend registered for the call's own head dim runs it as is (no padding)."""
    as_arch("sm90")
    padded, native = _Recorder(32), _Recorder(32)
    _register(padded)
    sage_torch.register_backend("native32", "qk_s8_pv_e4m3", ("sm90",), (32,), native, lambda: True)
    q, k, v = make_qkv(d=32, seed=seed)
    sage_torch.attention(q, k, v)
    assert padded.calls == [] and native.calls[0]["d"] == 32


def test_fast_path_leaves_padded_head_dims_to_the_validated_path(as_arch, seed):
    as_arch("sm90")
    _register(_Recorder(80), fast=lambda *a: None)
    for d, has_fast in ((80, False), (64, True)):
        q = make_qkv(d=d, seed=seed)[0]
        fast, _, _ = _dispatch._fast_entry(("test", d), q, "auto")
        assert (fast is not None) == has_fast, d


def test_head_dims_above_128(as_arch, seed):
    """136..256: no kernel. auto -> PyTorch SDPA, warned once, strict raises; an explicit recipe ->
    its emulation, warned, strict raises; emulate=True runs it."""
    as_arch("sm90")
    _register(_Recorder(160))
    q, k, v = make_qkv(d=160, s_q=9, seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o = sage_torch.attention(q, k, v)
        sage_torch.attention(q, k, v)
    notes = [str(w.message) for w in caught if issubclass(w.category, sage_torch.SageFallbackWarning)]
    assert len(notes) == 1 and "head_dim=160 is not supported by sage kernels" in notes[0], notes
    torch.testing.assert_close(o, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    with pytest.raises(sage_torch.SageDispatchError, match="head_dim=160"):
        sage_torch.attention(q, k, v, strict=True)
    recipe = "qk_s8_pv_e4m3"
    with pytest.warns(sage_torch.SageFallbackWarning, match="EMULATION.*head_dim=160"):
        o = sage_torch.attention(q, k, v, recipe=recipe)
    assert torch.equal(o, sage_quant.emulate(q, k, v, recipe))
    with pytest.raises(sage_torch.SageDispatchError, match="head_dim=160"):
        sage_torch.attention(q, k, v, recipe=recipe, strict=True)
    assert torch.equal(sage_torch.attention(q, k, v, emulate=True), o)


def test_sdpa_drop_in_uses_the_same_rule(monkeypatch, seed):
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cpu",))  # reach the head-dim check on CPU tensors
    for d, runs_sage in ((80, True), (64, True), (160, False), (100, False)):
        q, k, v = make_qkv(d=d, seed=seed)
        why, warn = api._sdpa_fallback_reason(q, k, v, None, 0.0, False, None, False)
        assert (why is None) == runs_sage, (d, why)
        if not runs_sage:
            assert warn and f"head_dim={d}" in why


def test_varlen_entry_gets_the_padded_pack(as_arch, seed):
    as_arch("sm90")
    calls = []

    def fn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal, scale, return_lse, **options):
        calls.append((q.shape[-1], bool((q[..., 48:] == 0).all()), scale))
        o, lse = varlen.emulate_varlen(q, k, v, cu_q, cu_k, "qk_s8_pv_e4m3", is_causal=is_causal, scale=scale,
                                       return_lse=True)
        o = o.clone()
        o[..., 48:] = math.nan
        return o, (lse if return_lse else None)

    _register(_Recorder(48), varlen=fn_varlen)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(9, 2, 48, generator=gen).to(BF16) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    o, lse = sage_torch.attention_varlen(q, k, v, cu, cu, 5, 5, is_causal=True, return_lse=True)
    assert calls == [(64, True, pytest.approx(48 ** -0.5))]
    assert o.shape == q.shape and o.is_contiguous() and torch.isfinite(o).all()
    want, want_lse = varlen.emulate_varlen(q, k, v, cu, cu, "qk_s8_pv_e4m3", is_causal=True, return_lse=True)
    assert_rows_close(o, want, rel_l1=1e-3, row_rel_l1_max=2e-2)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("d, padded", [(32, 64), (80, 128)])
def test_padding_then_quantization_groups_equal_the_unpadded_ones(d, padded, seed):
    """Every scale group of every granularity runs along tokens over all channels: zero channels
    change no amax, code or scale (bit for bit, given one smoothing mean); the padded channels'
    codes are 0 (V: scale 1). The token mean of the padded tensor is the zero-padded mean up to
    fp32 summation order (CPU reductions vectorize across channels)."""
    x = (torch.randn(1, 2, 160, d, generator=torch.Generator().manual_seed(seed)) * 3).to(BF16)  # 2 K tiles
    xp = torch.nn.functional.pad(x, (0, padded - d))
    mean = R.token_mean(x)
    mean_p = torch.nn.functional.pad(mean, (0, padded - d))
    torch.testing.assert_close(R.token_mean(xp), mean_p, rtol=1e-6, atol=1e-7)
    for granularity in R.GRANULARITIES:
        for role in ("q", "k"):
            if granularity == "per_warp" and role == "k":
                continue
            for bits in (8, 4):
                m, mp = (mean, mean_p) if role == "k" else (None, None)
                codes, scale = R.quant_int(x, bits=bits, granularity=granularity, role=role, mean=m)
                codes_p, scale_p = R.quant_int(xp, bits=bits, granularity=granularity, role=role, mean=mp)
                width = d if bits == 8 else d // 2  # INT4: two codes per byte
                where = f"{granularity} {role} int{bits} d={d}"
                assert torch.equal(scale_p, scale), where
                assert torch.equal(codes_p[..., :width], codes) and not codes_p[..., width:].any(), where
    v_t, v_scale = R.quant_v_e4m3_t(x, mean=mean)
    v_t_p, v_scale_p = R.quant_v_e4m3_t(xp, mean=mean_p)
    assert torch.equal(v_t_p[:, :, :d], v_t) and not v_t_p[:, :, d:].any()
    assert torch.equal(v_scale_p[..., :d], v_scale) and (v_scale_p[..., d:] == 1).all()


class _EmulatingKernel:
    """A stand-in kernel that computes the recipe's emulation of exactly what it is given."""

    def __init__(self, recipe: str):
        self.recipe, self.dims = recipe, []

    def __call__(self, q, k, v, *, layout, is_causal, scale, return_lse, **options):
        self.dims.append(q.shape[-1])
        o, lse = sage_quant.emulate(q, k, v, self.recipe, layout=layout, is_causal=is_causal, scale=scale,
                                    return_lse=True, **options)
        return o, (lse if return_lse else None)


@pytest.mark.parametrize("arch, recipe, d, layout", [
    ("sm90", "qk_s8_pv_e4m3", 80, "bhsd"),
    ("sm90", "qk_s8_pv_e4m3", 32, "bshd"),
    ("sm80", "qk_s8_pv_f16", 96, "bshd"),
    ("sm89", "qk_s4_pv_e4m3", 48, "bhsd"),
])
def test_padded_kernel_path_computes_the_emulation_at_d(as_arch, arch, recipe, d, layout, seed):
    """What a kernel computes on the padded call (its emulation at the padded d) is the recipe's
    emulation at the call's d, which runs d directly (no padding in sage_quant): equal up to fp32
    summation order (the smoothing mean, the LSE's q·mean(K) term), and as close to float64."""
    as_arch(arch)
    kernel = _EmulatingKernel(recipe)
    _register(kernel, recipe=recipe, archs=(arch,))
    q, k, v = sage_quant.make_qkv("outlier", b=1, h_q=4, h_kv=2, s_q=70, s_kv=150, d=d, dtype=BF16, layout=layout,
                                  seed=seed)
    o, lse = sage_torch.attention(q, k, v, layout=layout, is_causal=True, recipe=recipe, return_lse=True)
    assert kernel.dims == [_head_dim.kernel_head_dim(d)]
    o_ref, lse_ref = sage_quant.emulate(q, k, v, recipe, layout=layout, is_causal=True, return_lse=True)
    msg = f"{recipe} d={d} {layout} seed={seed}"
    assert_rows_close(o, o_ref, rel_l1=1e-3, row_rel_l1_max=2e-2, msg=msg)
    live = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), live), msg
    torch.testing.assert_close(lse[live], lse_ref[live], rtol=1e-5, atol=1e-4, msg=lambda m: f"{m}\n{msg}")
    f64 = sage_quant.reference_attention(q, k, v, layout=layout, is_causal=True)
    err, err_ref = sage_quant.rel_l1(o, f64), sage_quant.rel_l1(o_ref, f64)
    assert err <= err_ref * 1.05 + 1e-4, f"{msg}: padded path rel-L1 {err} vs emulation at d {err_ref}"


# ----------------------------------------------------------------------------- the benchmark


def test_bench_cpu_demo_at_a_padded_head_dim(capsys):
    """python -m sage_torch.bench --d 80 without a GPU: the emulation at d and the emulation of the
    zero-padded call (what the kernel computes) agree to fp32 summation order."""
    from sage_torch import bench

    rows = bench.cpu_demo([80], n=32)
    out = capsys.readouterr().out
    assert "d=80" in out and "zero-padded to d=128" in out
    assert {r["recipe"] for r in rows} == set(sage_quant.RECIPES)
    for r in rows:
        assert r["padded_to"] == 128 and r["padded_vs_d_rel_l1"] < 1e-3, r


def test_bench_table_shows_the_padding_share():
    from sage_torch import bench

    rows = [{"impl": "sdpa_flash", "d": 80, "causal": False, "n": 1024, "ms": 1.0, "tops": 100.0, "rel_l1": 0.001},
            {"impl": "sage", "d": 80, "causal": False, "n": 1024, "padded_to": 128, "ms": 2.0, "tops": 50.0,
             "kernel_tops": 80.0, "pad_ms": 0.5, "rel_l1": 0.004}]
    text = bench.print_table(rows)
    assert "sage zero-padded to d=128" in text
    assert "| sage | 50 [80] | 0.0040 | 25.0 |" in text
    assert "| sdpa_flash | 100 | 0.0010 | - |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, bench.main runs the timing benchmark")
def test_bench_main_takes_head_dims_on_cpu(capsys):
    from sage_torch import bench

    assert bench.main(["--d", "32", "--n", "16", "--causal", "no"]) == 0
    assert "zero-padded to d=64" in capsys.readouterr().out
