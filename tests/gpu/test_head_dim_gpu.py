"""Head dims 32, 80, 96, 112 on the GPU kernels, zero-padded to 64/128 (sage_torch._head_dim).

sm90 with a sage_core that announces ``SM90_HEAD_DIM_ZERO_FILL``: the zero-fill path (the backend's
``pads_head_dim``: the quantizer zero-fills channels d..D-1 as it loads, the epilogue stores d
columns; the dispatcher must build no ``PaddedCall``, checked by making it raise). The sm80 family
runs on the dispatcher's zero-padded copies.

Through the front end (``sage_torch.attention``, strict: the kernel, never the emulation or SDPA):

* sm90 (``qk_s8_pv_e4m3`` on the wgmma kernel) and the sm80 mma.sync family (``qk_s8_pv_f16``,
  ``qk_s8_pv_s8``, and where FP8 mma.sync exists ``qk_s4_pv_e4m3`` / ``qk_s8_pv_e4m3``) vs the
  recipe's emulation at the call's d (rel-L1 <= 2e-3, every row, LSE) and vs float64 (same range
  as d=128 on the same kind of inputs);
* causal and not, GQA/MQA, odd lengths, s_q != s_kv (fully masked rows), both layouts and a
  (b, h, s, d) view of (b, s, h, d) memory (o keeps q's memory order), fp16/bf16;
* outputs poisoned: the caching allocator's next blocks are NaN before every call (the padded
  copies, the kernel's padded o and the returned o all come from it), and the sm80 backend's
  allocator writes NaN;
* the padded path is bit for bit the kernel at the padded head dim on hand-padded inputs with
  the scale of d; CUDA-graph capture of a padded call.

Skips with the reason without the GPU / kernels. Seeds: the ``seed`` fixture (tests/sage_pytest_plugin.py).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

sage_quant = pytest.importorskip("sage_quant")
sage_torch = pytest.importorskip("sage_torch")
from sage_quant.testing import assert_rows_close  # noqa: E402
from sage_torch import _dispatch, _head_dim, _layout  # noqa: E402

kRelL1VsEmulation = 2e-3  # docs/design/NUMERICS.md: kernel vs emulation of the same recipe
kRowRelL1VsEmulation = 5e-2  # as tests/gpu/test_attn_sm90.py: a flipped K code moves a few-key row ~1%
kLseAtol, kLseRtol = 2e-3, 1e-4
# float64 accuracy at d vs at d=128, same shape and distribution (CPU emulation, outlier, n=1024,
# e4m3: d=32 0.0046 / 0.0062 causal, d=128 0.0040 / 0.0059; the other d in between)
kF64RatioToD128 = 1.35
kPoisonElements = 1 << 26
HEAD_DIMS = [32, 80, 96, 112]
SHAPES = [  # b, h_q, h_kv, s_q, s_kv
    (1, 2, 2, 1, 1),
    (2, 4, 2, 127, 1000),  # GQA, s_q < s_kv
    (1, 2, 2, 300, 100),   # s_q > s_kv: causal rows < 200 fully masked
    (1, 4, 1, 1031, 1031),  # MQA, odd length
]


def _arch() -> str:
    return _dispatch.device_arch(torch.device("cuda"))


def _poison_allocator() -> None:
    """NaN into the caching allocator's next blocks, so an element nobody wrote shows up."""
    junk = torch.full((kPoisonElements,), float("nan"), device="cuda", dtype=torch.float16)
    del junk


def _decision_or_skip(recipe: str, dtype: torch.dtype, d: int, family: str) -> _dispatch.Decision:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        decision = _dispatch.resolve(_arch(), dtype, d, recipe, strict=True)
    except _dispatch.SageDispatchError as exc:
        pytest.skip(f"no {recipe} kernel here: {exc}")
    name = decision.backend.name
    if not name.startswith(family):
        pytest.skip(f"{recipe} runs on {name} here, not on the {family} family")
    assert decision.pad_to == _head_dim.kernel_head_dim(d), decision
    return decision


def _sm90_zero_fill(decision: _dispatch.Decision, monkeypatch) -> None:
    """The sm90 call must take the zero-fill path: the backend pads itself, and the dispatcher
    builds no PaddedCall (made to raise for the rest of the test)."""
    from sage_torch.backends import sm90
    assert sm90.ZERO_FILL, ("sage_core lacks SM90_HEAD_DIM_ZERO_FILL: rebuild it from this checkout "
                            "(bind_attn_sm90.cpp) to test the zero-fill path")
    assert decision.backend.pads_head_dim, decision.backend

    def refuse(*args, **kwargs):
        raise AssertionError("the dispatcher built a PaddedCall for the zero-filling sm90 backend")

    monkeypatch.setattr(_dispatch, "PaddedCall", refuse)


def _backend_options(decision: _dispatch.Decision) -> dict:
    """The options the backend really runs with (the sm80 kernels fix kv_block=64, smooth_v=False)."""
    if decision.backend.name.startswith("sm80_"):
        from sage_torch.backends import sm80
        return dict(sm80.resolve_options(decision.recipe, {}))
    return {}


def _inputs(dist, shape, d, dtype, layout, seed):
    b, h_q, h_kv, s_q, s_kv = shape
    return sage_quant.make_qkv(dist, b=b, h_q=h_q, h_kv=h_kv, s_q=s_q, s_kv=s_kv, d=d, dtype=dtype, layout=layout,
                               seed=seed, device="cuda")


def _lse_slack(q, k, layout, scale):
    """What the kernel's LSE may differ from the emulation's by construction (as in
    test_attn_sm90._run_kernel_poisoned): one int8 code of K - k_mean flipped by the fp32 order of
    the mean moves a score by <= max|q_i| * k_scale * scale (bounded by the largest scale here)."""
    qb = _layout_bhsd(q, layout).float()
    kb = _layout_bhsd(k, layout).float()
    k_step = (kb - kb.mean(dim=2, keepdim=True)).abs().amax() / 127
    return qb.abs().amax(dim=-1) * k_step * scale


def _layout_bhsd(x, layout):
    return x if layout == "bhsd" else x.transpose(1, 2)


def _check_vs_emulation(decision, q, k, v, o, lse, *, layout, is_causal, msg):
    d = q.shape[-1]
    assert o.shape == q.shape and o.dtype == q.dtype, msg
    assert o.stride() == _layout.output_strides(q, layout), f"o lost q's memory order: {o.stride()} {msg}"
    assert torch.isfinite(o).all(), f"non-finite output (poison left or NaN): {msg}"
    o_ref, lse_ref = sage_quant.emulate(q, k, v, decision.recipe, layout=layout, is_causal=is_causal,
                                        return_lse=True, **_backend_options(decision))
    assert_rows_close(o, o_ref, rel_l1=kRelL1VsEmulation, row_rel_l1_max=kRowRelL1VsEmulation, msg=msg)
    masked = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), masked), f"-inf LSE rows differ: {msg}"
    if masked.any():
        assert (_layout_bhsd(o, layout)[masked] == 0).all(), f"fully masked rows must be 0: {msg}"
    live = ~masked
    slack = _lse_slack(q, k, layout, d ** -0.5)
    err = ((lse - lse_ref).abs() - kLseRtol * lse_ref.abs() - slack)[live]
    assert err.numel() == 0 or err.max().item() <= kLseAtol, f"LSE vs emulation: {err.max().item()} {msg}"


def _run_padded(recipe, q, k, v, *, layout, is_causal):
    _poison_allocator()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sage_torch.SageFallbackWarning)  # padding is the kernel path
        o, lse = sage_torch.attention(q, k, v, layout=layout, is_causal=is_causal, recipe=recipe, return_lse=True,
                                      strict=True)
    torch.cuda.synchronize()
    return o, lse


def _check_equals_hand_padded_kernel(recipe, q, k, v, o, *, layout, is_causal, msg):
    """The padded path is the kernel at the padded head dim on zero-padded inputs, scale of d."""
    d = q.shape[-1]
    pad = _head_dim.kernel_head_dim(d) - d
    qp, kp, vp = (torch.nn.functional.pad(x, (0, pad)) for x in (q, k, v))
    o_hand = sage_torch.attention(qp, kp, vp, layout=layout, is_causal=is_causal, recipe=recipe, strict=True,
                                  scale=d ** -0.5)
    assert torch.equal(o, o_hand[..., :d]), f"padded path differs from the hand-padded kernel call: {msg}"


# ------------------------------------------------------------------------------------------------
# sm90: qk_s8_pv_e4m3 on the wgmma kernel
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_sm90_padded_vs_emulation(d, shape, is_causal, layout, seed, monkeypatch):
    dtype = torch.bfloat16 if (shape[3] + d) % 2 else torch.float16  # both dtypes across the grid
    decision = _decision_or_skip("qk_s8_pv_e4m3", dtype, d, "sm90_")
    _sm90_zero_fill(decision, monkeypatch)
    dist = "outlier" if seed % 2 else "randn"
    q, k, v = _inputs(dist, shape, d, dtype, layout, seed)
    msg = f"seed={seed} dist={dist} d={d} shape={shape} causal={is_causal} {layout} {dtype}"
    o, lse = _run_padded("qk_s8_pv_e4m3", q, k, v, layout=layout, is_causal=is_causal)
    _check_vs_emulation(decision, q, k, v, o, lse, layout=layout, is_causal=is_causal, msg=msg)
    _check_equals_hand_padded_kernel("qk_s8_pv_e4m3", q, k, v, o, layout=layout, is_causal=is_causal, msg=msg)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_sm90_padded_view_of_bshd_memory_and_auto(d, seed, monkeypatch):
    """q, k, v as (b, h, s, d) views of (b, s, h, d) memory (a packed projection): o is such a view
    too. recipe="auto" (its small-shape SDPA rule off) runs the same padded kernel, no warning."""
    decision = _decision_or_skip("qk_s8_pv_e4m3", torch.bfloat16, d, "sm90_")
    _sm90_zero_fill(decision, monkeypatch)
    q, k, v = (x.transpose(1, 2) for x in _inputs("outlier", (2, 6, 2, 333, 517), d, torch.bfloat16, "bshd", seed))
    msg = f"seed={seed} d={d} bhsd view of bshd memory"
    o, lse = _run_padded("qk_s8_pv_e4m3", q, k, v, layout="bhsd", is_causal=True)
    assert not o.is_contiguous(), msg
    _check_vs_emulation(decision, q, k, v, o, lse, layout="bhsd", is_causal=True, msg=msg)
    monkeypatch.setattr(_dispatch, "AUTO_TORCH_RULES", {})
    _dispatch.refresh()
    assert _dispatch.resolve(_arch(), q.dtype, d, "auto").pad_to == _head_dim.kernel_head_dim(d)
    o_auto, lse_auto = _run_padded("auto", q, k, v, layout="bhsd", is_causal=True)
    assert torch.equal(o_auto, o) and torch.equal(lse_auto, lse), msg
    assert torch.equal(sage_torch.attention(q, k, v, is_causal=True), o), f"plain call (fast path): {msg}"


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_sm90_padded_vs_float64(d, is_causal, seed, monkeypatch):
    """Accuracy vs float64 in the range of d=128 (outlier, b=1, h=8, n=2048, bf16)."""
    _sm90_zero_fill(_decision_or_skip("qk_s8_pv_e4m3", torch.bfloat16, d, "sm90_"), monkeypatch)
    err = {}
    for dd in (d, 128):
        q, k, v = _inputs("outlier", (1, 8, 8, 2048, 2048), dd, torch.bfloat16, "bhsd", seed)
        o = sage_torch.attention(q, k, v, is_causal=is_causal, recipe="qk_s8_pv_e4m3", strict=True)
        ref = sage_quant.reference_attention(q, k, v, is_causal=is_causal)
        err[dd] = sage_quant.accuracy(o, ref)
        if dd == d:
            emu = sage_quant.emulate(q, k, v, "qk_s8_pv_e4m3", is_causal=is_causal)
            err["emulation"] = sage_quant.accuracy(emu, ref)
    msg = f"seed={seed} causal={is_causal} d={d}: {err}"
    print(msg)
    assert err[d]["rel_l1"] <= err["emulation"]["rel_l1"] * 1.1 + 1e-4, msg
    assert err[d]["rel_l1"] <= kF64RatioToD128 * err[128]["rel_l1"], msg


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_sm90_zero_fill_reads_only_d_channels(d, layout, seed, monkeypatch):
    """q, k, v as views of wider rows whose channels past d are NaN: the zero-fill path reads only
    the first d (a read past d would poison amax, means and scales), o is bit for bit that of
    contiguous inputs (the LSE up to the fp32 order of its q·k_mean term)."""
    decision = _decision_or_skip("qk_s8_pv_e4m3", torch.float16, d, "sm90_")
    _sm90_zero_fill(decision, monkeypatch)
    q, k, v = _inputs("outlier", (2, 4, 2, 300, 700), d, torch.float16, layout, seed)

    def nan_tail(x):
        buf = torch.full((*x.shape[:-1], d + 24), math.nan, dtype=x.dtype, device=x.device)
        buf[..., :d].copy_(x)
        return buf[..., :d]

    qn, kn, vn = (nan_tail(x) for x in (q, k, v))
    msg = f"seed={seed} d={d} {layout}"
    o, lse = _run_padded("qk_s8_pv_e4m3", q, k, v, layout=layout, is_causal=True)
    o_n, lse_n = _run_padded("qk_s8_pv_e4m3", qn, kn, vn, layout=layout, is_causal=True)
    assert torch.isfinite(o_n).all(), f"channels past d were read: {msg}"
    assert torch.equal(o_n, o), msg
    # the LSE's q·k_mean term is evaluated by torch on q's strides: equal up to fp32 summation order
    torch.testing.assert_close(lse_n, lse, rtol=1e-6, atol=1e-5, msg=lambda m: f"{m}\n{msg}")


@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_padded_cuda_graph_capture(seed, monkeypatch):
    _sm90_zero_fill(_decision_or_skip("qk_s8_pv_e4m3", torch.float16, 80, "sm90_"), monkeypatch)
    q, k, v = _inputs("randn", (1, 4, 2, 500, 700), 80, torch.float16, "bshd", seed)

    def run():
        return sage_torch.attention(q, k, v, layout="bshd", is_causal=True, recipe="qk_s8_pv_e4m3",
                                    return_lse=True, strict=True)

    run()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up on the side stream (allocator pools)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        o_g, lse_g = run()
    q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(q))
    g.replay()
    torch.cuda.synchronize()
    o_new, lse_new = run()
    assert torch.equal(o_g, o_new), f"seed={seed}"
    assert torch.allclose(lse_g, lse_new, rtol=1e-6, atol=1e-5), f"seed={seed}"


# ------------------------------------------------------------------------------------------------
# sm80 mma.sync family (also built for sm_90a)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def _poison_sm80(monkeypatch):
    try:
        from sage_torch.backends import sm80
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"sage_torch.backends.sm80 does not import: {exc}")
    monkeypatch.setattr(sm80, "_alloc", lambda shape, *, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                                    device=device))


@pytest.mark.gpu
@pytest.mark.sm80
@pytest.mark.parametrize("recipe", ["qk_s8_pv_f16", "qk_s8_pv_s8", "qk_s8_pv_e4m3", "qk_s4_pv_e4m3"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_sm80_padded_vs_emulation(recipe, d, shape, is_causal, seed, _poison_sm80):
    dtype = torch.bfloat16 if (shape[3] + d) % 2 else torch.float16
    layout = "bshd" if (shape[4] + int(is_causal)) % 2 else "bhsd"  # both layouts across the grid
    decision = _decision_or_skip(recipe, dtype, d, "sm80_")
    q, k, v = _inputs("randn", shape, d, dtype, layout, seed)
    msg = f"{recipe} seed={seed} d={d} shape={shape} causal={is_causal} {layout} {dtype}"
    o, lse = _run_padded(recipe, q, k, v, layout=layout, is_causal=is_causal)
    _check_vs_emulation(decision, q, k, v, o, lse, layout=layout, is_causal=is_causal, msg=msg)
    _check_equals_hand_padded_kernel(recipe, q, k, v, o, layout=layout, is_causal=is_causal, msg=msg)


@pytest.mark.gpu
@pytest.mark.sm80
@pytest.mark.parametrize("recipe", ["qk_s8_pv_f16", "qk_s8_pv_e4m3"])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_sm80_padded_vs_float64(recipe, d, seed, _poison_sm80):
    """Outlier inputs, b=1, h=8, n=2048, bf16: in the range of d=128 and of the emulation at d."""
    decision = _decision_or_skip(recipe, torch.bfloat16, d, "sm80_")
    err = {}
    for dd in (d, 128):
        q, k, v = _inputs("outlier", (1, 8, 8, 2048, 2048), dd, torch.bfloat16, "bhsd", seed)
        o = sage_torch.attention(q, k, v, recipe=recipe, strict=True)
        ref = sage_quant.reference_attention(q, k, v)
        err[dd] = sage_quant.accuracy(o, ref)
        if dd == d:
            emu = sage_quant.emulate(q, k, v, recipe, **_backend_options(decision))
            err["emulation"] = sage_quant.accuracy(emu, ref)
    msg = f"{recipe} seed={seed} d={d}: {err}"
    print(msg)
    assert err[d]["rel_l1"] <= err["emulation"]["rel_l1"] * 1.1 + 1e-4, msg
    assert err[d]["rel_l1"] <= kF64RatioToD128 * err[128]["rel_l1"], msg
