"""sage_core quantization kernels (through ``sage_quant.kernels``) vs ``sage_quant.reference``.

Bit for bit on values and scales (docs/design/quant-formats.md); means, whose fp32 summation
order is the one documented exception, within a tight tolerance, and then passed in to both
sides. Covers odd lengths (1, 7, 127, 1000, 1031), several head counts (GQA/MQA K/V heads are
just the h of the tensor quantized), both layouts, fp16/bf16, d 64/128, strided and unaligned
inputs, outliers, all-zero groups, NaN/Inf groups, non-default streams and CUDA graph capture.

Every output is allocated inside a guarded buffer: the run is done twice with two poison bytes
(0x00 and 0xFF): an element the kernel did not write would equal the poison in one of the runs
and differ from the reference; the guard bytes before and after must be untouched (no
out-of-bounds writes). Seeded inputs (the ``seed`` fixture of tests/sage_pytest_plugin.py: fixed per
test id, printed and in every failure message; SAGE_TEST_SEED=<seed> replays, SAGE_TEST_FRESH_SEEDS=1
draws fresh ones).
"""

from __future__ import annotations

import pytest
import torch

sage_quant = pytest.importorskip("sage_quant", reason="sage_quant is not installed")
R = sage_quant.reference
try:
    from sage_quant import kernels as K

    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001
    K = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _skip_reason(op=None):
    if K is None:
        return f"sage_quant.kernels does not import ({_IMPORT_ERROR})"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not K.available(op):
        return f"sage_core lacks the kernels of {op or 'the quant family'} (SAGE_CUDA_ARCHS=none?)"
    return None


# Every test is a GPU test; each also skips at run time with the reason from _skip_reason(op).
pytestmark = pytest.mark.gpu


SEQS = [1, 7, 127, 1000, 1031]
DTYPES = [torch.float16, torch.bfloat16]
LAYOUTS = ["bhsd", "bshd"]
HEAD_DIMS = [64, 128]
# (b, h): 1 head (MQA K/V), 2 (GQA K/V of 8 Q heads), 3 (odd), 8 (Q heads)
HEADS = [(1, 1), (2, 2), (1, 3), (1, 8)]
GUARD = 256  # bytes of guard before and after every output
POISONS = (0x00, 0xFF)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def make_input(b, h, s, d, dtype, layout, seed, dist="normal", offset=0, pad=0):
    """Physical tensor in `layout` ((b,h,s,d) or (b,s,h,d)); `offset`/`pad` > 0 make it a strided
    slice (offset 1 element: misaligned base, the kernels' scalar-load path)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
    x = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)
    if dist == "outlier":
        # K-like channel bias, a few huge spikes and one all-zero token (zero rows/groups).
        bias = torch.randn(d, generator=g, device="cuda") * 20.0
        x = x + bias
        spikes = torch.rand(shape, generator=g, device="cuda") < 1e-3
        x = torch.where(spikes, x.sign() * 3000.0, x)
        if s > 3:
            if layout == "bhsd":
                x[:, :, 3, :] = 0.0
            else:
                x[:, 3, :, :] = 0.0
    x = x.to(dtype)
    if offset or pad:
        big_shape = (*shape[:-1], d + offset + pad)
        big = torch.empty(big_shape, dtype=dtype, device="cuda").normal_(generator=g)
        big[..., offset:offset + d] = x
        x = big[..., offset:offset + d]
        assert x.stride(-1) == 1
    return x


class Poisoned:
    """Replaces sage_quant.kernels._alloc: outputs live inside guarded, poisoned buffers."""

    def __init__(self, byte):
        self.byte = byte
        self.buffers = []

    def __call__(self, shape, *, dtype, device):
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buf = torch.full((nbytes + 2 * GUARD,), self.byte, dtype=torch.uint8, device=device)
        self.buffers.append((buf, nbytes))
        return buf[GUARD:GUARD + nbytes].view(dtype).view(shape)

    def check_guards(self, msg):
        torch.cuda.synchronize()
        for buf, nbytes in self.buffers:
            head, tail = buf[:GUARD], buf[GUARD + nbytes:]
            assert bool((head == self.byte).all()) and bool((tail == self.byte).all()), (
                f"out-of-bounds write next to an output of {nbytes} bytes: {msg}")


def run_poisoned(monkeypatch, fn, *args, msg="", **kwargs):
    """fn(*args, **kwargs) with outputs poisoned by each byte of POISONS; returns both results."""
    results = []
    for byte in POISONS:
        alloc = Poisoned(byte)
        monkeypatch.setattr(K, "_alloc", alloc)
        out = fn(*args, **kwargs)
        alloc.check_guards(f"{msg} poison=0x{byte:02x}")
        results.append(out)
    monkeypatch.undo()
    return results


def bits_of(t):
    """Integer view for bit-exact comparison (float32 -> int32, others as is)."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


def assert_bitwise(got, want, what, msg):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}; {msg}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}; {msg}"
    assert got.is_contiguous(), f"{what}: not contiguous; {msg}"
    g, w = bits_of(got), bits_of(want)
    bad = g != w
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        n = int(bad.sum())
        samples = [(i, got[tuple(i)].item(), want[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{what}: {n}/{g.numel()} elements differ (index, kernel, reference): "
                             f"{samples}; {msg}")


def assert_results_bitwise(results, want, names, msg):
    for k, got in enumerate(results):
        for g, w, name in zip(got, want, names):
            assert_bitwise(g, w, name, f"{msg} poison=0x{POISONS[k]:02x}")


def _case(**kw):
    return ", ".join(f"{k}={v}" for k, v in kw.items())


# ------------------------------------------------------------------------------------------------
# means (tolerance: fp32 summation order), then passed in
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", SEQS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dist", ["normal", "outlier"])
@pytest.mark.parametrize("block", [None, 16, 128])
def test_means(monkeypatch, seed, s, dtype, layout, dist, block):
    reason = _skip_reason("block_mean")
    if reason:
        pytest.skip(reason)
    b, h = HEADS[(s + len(layout)) % len(HEADS)]
    d = HEAD_DIMS[s % 2]
    x = make_input(b, h, s, d, dtype, layout, seed, dist)
    msg = _case(seed=seed, s=s, b=b, h=h, d=d, dtype=dtype, layout=layout, dist=dist, block=block)
    if block is None:
        results = run_poisoned(monkeypatch, K.token_mean, x, layout, msg=msg)
        want = R.token_mean(x, layout)
    else:
        results = run_poisoned(monkeypatch, K.block_mean, x, block, layout, msg=msg)
        want = R.block_mean(x, block, layout)
    amax = R.to_bhsd(x, layout).float().abs().max().item()
    for got in results:
        assert got.shape == want.shape and got.dtype == torch.float32, msg
        # |error| <= (tokens summed) * eps32 * amax; a tighter relative+absolute bound in practice.
        # fp32 sums in another order: a few dozen ulps of amax, far below one token's share
        # (amax / s) that a dropped or doubled token would shift the mean by.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=64 * 2**-24 * max(amax, 1.0), msg=msg)


# ------------------------------------------------------------------------------------------------
# INT8 / INT4 Q/K
# ------------------------------------------------------------------------------------------------
GRANULARITIES = [
    ("per_tensor", "q"),
    ("per_block", "q"),
    ("per_block", "k"),
    ("per_warp", "q"),
    ("per_thread", "q"),
    ("per_thread", "k"),
    ("per_token", "q"),
    ("per_token", "k"),
]


def _mean_for(x, layout, role, bits, s, mean_block, seed):
    """K: token mean (b,h,d); Q with INT4: block means (b,h,ceil(s/mean_block),d); else None.
    The reference computes it (the kernel's mean differs only in summation order)."""
    if role == "k":
        return R.token_mean(x, layout)
    if bits == 4:
        return R.block_mean(x, mean_block, layout)
    return None


@pytest.mark.parametrize("s", SEQS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("granularity,role", GRANULARITIES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_quant_int(monkeypatch, seed, s, dtype, layout, granularity, role, bits, d):
    reason = _skip_reason("quant_int")
    if reason:
        pytest.skip(reason)
    b, h = HEADS[(s + bits + len(granularity)) % len(HEADS)]
    dist = "outlier" if (s + d) % 3 else "normal"
    x = make_input(b, h, s, d, dtype, layout, seed, dist)
    block = R.default_block(granularity, role)
    mean_block = block if block is not None else 128
    mean = _mean_for(x, layout, role, bits, s, mean_block, seed)
    kw = dict(bits=bits, granularity=granularity, role=role, mean=mean, layout=layout)
    msg = _case(seed=seed, s=s, b=b, h=h, d=d, dtype=dtype, dist=dist, **{k: v for k, v in kw.items() if k != "mean"},
                mean=None if mean is None else tuple(mean.shape))
    results = run_poisoned(monkeypatch, K.quant_int, x, msg=msg, **kw)
    want = R.quant_int(x, **kw)
    assert_results_bitwise(results, want, ("values", "scale"), msg)


@pytest.mark.parametrize(
    "granularity,role,block,warp_rows,mean_block",
    [
        ("per_block", "q", 64, 16, 64),
        ("per_block", "k", 128, 16, 128),
        ("per_block", "k", 1000, 16, 128),   # one block longer than some sequences
        ("per_thread", "k", 64, 16, 64),
        ("per_thread", "k", 8, 16, 8),
        ("per_thread", "q", 128, 16, 16),    # Q block means of 16 tokens
        ("per_thread", "q", 128, 16, 1),     # per-token means
        ("per_warp", "q", None, 32, 128),
        ("per_warp", "q", None, 8, 128),
        ("per_warp", "q", None, 24, 100),    # warp rows not dividing the 64-token tile
        ("per_token", "k", None, 16, 128),
    ],
)
@pytest.mark.parametrize("s", [1, 127, 1031])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mean_kind", ["none", "token", "block"])
def test_quant_int_blocks_and_means(monkeypatch, seed, granularity, role, block, warp_rows, mean_block, s, bits,
                                    mean_kind):
    reason = _skip_reason("quant_int")
    if reason:
        pytest.skip(reason)
    b, h, d = 2, 3, 128
    dtype = torch.bfloat16 if (s + bits) % 2 else torch.float16
    layout = "bshd" if s % 2 else "bhsd"
    x = make_input(b, h, s, d, dtype, layout, seed, "outlier")
    mean = None
    if mean_kind == "token":
        mean = R.token_mean(x, layout)
    elif mean_kind == "block":
        mean = R.block_mean(x, mean_block, layout)
    kw = dict(bits=bits, granularity=granularity, role=role, block=block, warp_rows=warp_rows, mean=mean,
              mean_block=mean_block if mean_kind == "block" else None, layout=layout)
    msg = _case(seed=seed, s=s, dtype=dtype, layout=layout, granularity=granularity, role=role, block=block,
                warp_rows=warp_rows, mean_kind=mean_kind, mean_block=mean_block, bits=bits)
    results = run_poisoned(monkeypatch, K.quant_int, x, msg=msg, **kw)
    want = R.quant_int(x, **kw)
    assert_results_bitwise(results, want, ("values", "scale"), msg)


def test_quant_int_kernel_mean_passed_to_both(monkeypatch, seed):
    """The kernel's own mean (not the reference's), passed to both sides: still bit-exact."""
    reason = _skip_reason("quant_int")
    if reason:
        pytest.skip(reason)
    x = make_input(2, 2, 1000, 128, torch.float16, "bhsd", seed, "outlier")
    for role, mean in (("k", K.token_mean(x)), ("q", K.block_mean(x, 128))):
        kw = dict(bits=4 if role == "q" else 8, granularity="per_thread", role=role, mean=mean)
        msg = _case(seed=seed, role=role)
        results = run_poisoned(monkeypatch, K.quant_int, x, msg=msg, **kw)
        assert_results_bitwise(results, R.quant_int(x, **kw), ("values", "scale"), msg)


@pytest.mark.parametrize("offset,pad", [(1, 0), (0, 8), (8, 8), (3, 5)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quant_int_strided_and_unaligned_inputs(monkeypatch, seed, offset, pad, layout):
    """Slices of wider tensors (packed qkv-like strides); offset 1/3 misaligns the base (scalar loads)."""
    reason = _skip_reason("quant_int")
    if reason:
        pytest.skip(reason)
    x = make_input(2, 3, 127, 64, torch.bfloat16, layout, seed, "outlier", offset=offset, pad=pad)
    mean = R.token_mean(x, layout)
    for bits, gran, role in ((8, "per_thread", "k"), (4, "per_thread", "q"), (8, "per_token", "q")):
        kw = dict(bits=bits, granularity=gran, role=role, mean=mean if role == "k" else None, layout=layout)
        msg = _case(seed=seed, offset=offset, pad=pad, layout=layout, bits=bits, gran=gran, role=role)
        results = run_poisoned(monkeypatch, K.quant_int, x, msg=msg, **kw)
        assert_results_bitwise(results, R.quant_int(x, **kw), ("values", "scale"), msg)
    # means through the scalar path too
    got = K.token_mean(x, layout)
    torch.testing.assert_close(got, mean, rtol=1e-5, atol=1e-4)


def test_quant_int_non_finite_groups(seed):
    """A NaN/Inf group: NaN/Inf scale, no crash, no out-of-bounds write; other groups bit-exact."""
    reason = _skip_reason("quant_int")
    if reason:
        pytest.skip(reason)
    x = make_input(1, 2, 300, 64, torch.float16, "bhsd", seed)
    x[0, 0, 5, 7] = float("nan")
    x[0, 1, 200, 3] = float("inf")
    for gran in ("per_block", "per_token", "per_thread"):
        kw = dict(bits=8, granularity=gran, role="q")
        vals, scale = K.quant_int(x, **kw)
        torch.cuda.synchronize()
        rv, rs = R.quant_int(x, **kw)
        finite = torch.isfinite(rs)
        assert bool((~torch.isfinite(scale) == ~finite).all()), f"non-finite scales differ: gran={gran} seed={seed}"
        assert torch.equal(bits_of(scale)[finite], bits_of(rs)[finite]), f"gran={gran} seed={seed}"
        idx = R.scale_group_index(300, gran, "q", device="cuda")
        tok_ok = finite[:, :, idx]  # (b, h, s)
        assert torch.equal(vals[tok_ok], rv[tok_ok]), f"gran={gran} seed={seed}"


# ------------------------------------------------------------------------------------------------
# V: E4M3 transposed and INT8
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", SEQS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("fmt", ["e4m3_t", "e4m3_t_smooth", "e4m3_t_vmax2.25", "s8"])
def test_quant_v(monkeypatch, seed, s, dtype, layout, d, fmt):
    op = "quant_v_s8" if fmt == "s8" else "quant_v_e4m3_t"
    reason = _skip_reason(op)
    if reason:
        pytest.skip(reason)
    b, h = HEADS[(s + d // 64) % len(HEADS)]
    dist = "outlier" if s % 2 else "normal"
    v = make_input(b, h, s, d, dtype, layout, seed, dist)
    # one all-zero channel -> scale 1.0
    v[..., 5] = 0  # channel is the last dim in both layouts
    msg = _case(seed=seed, s=s, b=b, h=h, d=d, dtype=dtype, layout=layout, dist=dist, fmt=fmt)
    fn_k, fn_r = getattr(K, op), getattr(R, op)
    extra = {}
    if fmt == "e4m3_t_smooth":
        # V smoothing: the (reference) token mean, subtracted before amax and division.
        extra["mean"] = R.token_mean(v, layout)
    if fmt == "e4m3_t_vmax2.25":
        # the V range of the FP16-accumulate kernels (pv_accum="f16_buffer"): amax -> 2.25
        extra["v_max"] = 2.25
    results = run_poisoned(monkeypatch, fn_k, v, layout, msg=msg, **extra)
    want = fn_r(v, layout, **extra)
    assert_results_bitwise(results, want, ("values", "scale"), msg)
    assert bool((want[1][:, :, 5] == 1.0).all()), msg
    if fmt != "s8":
        assert bool((results[0][0][..., s:] == 0).all()), f"padding not zero; {msg}"


@pytest.mark.parametrize("offset,pad", [(1, 0), (8, 8)])
def test_quant_v_strided_inputs(monkeypatch, seed, offset, pad):
    reason = _skip_reason("quant_v_e4m3_t")
    if reason:
        pytest.skip(reason)
    v = make_input(1, 2, 1031, 128, torch.float16, "bshd", seed, "outlier", offset=offset, pad=pad)
    mean = K.token_mean(v, "bshd")  # the kernel's own mean, passed to both sides
    for op, extra in (("quant_v_e4m3_t", {}), ("quant_v_e4m3_t", {"mean": mean}), ("quant_v_s8", {})):
        msg = _case(seed=seed, offset=offset, pad=pad, op=op, smooth=bool(extra))
        results = run_poisoned(monkeypatch, getattr(K, op), v, "bshd", msg=msg, **extra)
        assert_results_bitwise(results, getattr(R, op)(v, "bshd", **extra), ("values", "scale"), msg)


def test_quant_v_non_finite_channel(seed):
    reason = _skip_reason("quant_v_e4m3_t")
    if reason:
        pytest.skip(reason)
    v = make_input(1, 1, 200, 64, torch.bfloat16, "bhsd", seed)
    v[0, 0, 17, 9] = float("nan")
    for op in ("quant_v_e4m3_t", "quant_v_s8"):
        vals, scale = getattr(K, op)(v)
        torch.cuda.synchronize()
        rv, rs = getattr(R, op)(v)
        assert bool(torch.isnan(scale[0, 0, 9])), f"{op}: NaN channel must give a NaN scale; seed={seed}"
        keep = torch.ones(64, dtype=torch.bool, device="cuda")
        keep[9] = False
        assert torch.equal(bits_of(scale)[..., keep], bits_of(rs)[..., keep]), f"{op} seed={seed}"
        if op == "quant_v_e4m3_t":
            assert torch.equal(vals[:, :, keep], rv[:, :, keep]), f"{op} seed={seed}"
        else:
            assert torch.equal(vals[..., keep], rv[..., keep]), f"{op} seed={seed}"


# ------------------------------------------------------------------------------------------------
# FP4: NVFP4 / MXFP4, linear and swizzled scales
# ------------------------------------------------------------------------------------------------
# Many one-row matrices (3x700x1x16, 257x2x32): one NVFP4 tensor scale each, so a warp of the
# amax pass covers up to 32 matrices.
FP4_SHAPES = [(16,), (3, 64), (1031, 32), (2, 5, 7, 128), (1, 2, 3, 4, 64), (130, 96), (3, 700, 1, 16),
              (257, 2, 32)]
FP4_OUT = ("packed", "scale", "tensor_scale")


@pytest.mark.parametrize("shape", FP4_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("swizzled", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", ["normal", "outlier", "scaled"])
def test_quant_fp4(monkeypatch, seed, shape, fmt, swizzled, dtype, dist):
    """``scaled``: every matrix of the last two dims (one NVFP4 tensor scale each) at its own
    magnitude, 2**-24 .. 2**11 (fp16 subnormals included), so per-matrix amax mix-ups show."""
    reason = _skip_reason("quant_fp4")
    if reason:
        pytest.skip(reason)
    if shape[-1] % (16 if fmt == "nvfp4" else 32):
        pytest.skip(f"n={shape[-1]} is not a multiple of the {fmt} group")
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda")
    if dist == "outlier":
        x = x * torch.exp2(torch.randint(-20, 12, shape, generator=g, device="cuda").float())
        x.view(-1)[:: 17] = 0.0  # zeros and all-zero-ish groups
    elif dist == "scaled":
        lead = shape[:-2] if len(shape) > 2 else ()
        e = torch.randint(-24, 12, lead, generator=g, device="cuda").float()
        x = x * torch.exp2(e).reshape(*lead, *([1] * min(len(shape), 2)))
    x = x.to(dtype)
    msg = _case(seed=seed, shape=shape, fmt=fmt, swizzled=swizzled, dtype=dtype, dist=dist)
    results = run_poisoned(monkeypatch, K.quant_fp4, x, fmt, swizzled, msg=msg)
    assert_results_bitwise(results, R.quant_fp4(x, fmt, swizzled), FP4_OUT, msg)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("swizzled", [False, True])
@pytest.mark.parametrize("s", [128, 1024])
def test_quant_fp4_transposed_v(monkeypatch, seed, fmt, swizzled, s):
    """SageAttention3 V: groups along tokens, quantize the transposed view (last dim strided)."""
    reason = _skip_reason("quant_fp4")
    if reason:
        pytest.skip(reason)
    v = make_input(2, 3, s, 64, torch.bfloat16, "bhsd", seed, "outlier")
    vt = v.transpose(-1, -2)  # (b, h, d, s), stride(-1) = 64
    msg = _case(seed=seed, fmt=fmt, swizzled=swizzled, s=s)
    results = run_poisoned(monkeypatch, K.quant_fp4, vt, fmt, swizzled, msg=msg)
    assert_results_bitwise(results, R.quant_fp4(vt, fmt, swizzled), FP4_OUT, msg)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_fp4_rounding_ties_and_signs(seed, fmt, dtype):
    """Exact E2M1 ties (0.25, 0.75, ..., 5) and signed zeros: a group amax of 6 makes the scale
    exactly 1 (MXFP4), or with NVFP4's tensor scale 21 / 2688 = 2**-7 (exact, from the row of 21)
    exactly 128 on x * 128 (exact), so the ties stay ties."""
    reason = _skip_reason("quant_fp4")
    if reason:
        pytest.skip(reason)
    group = 16 if fmt == "nvfp4" else 32
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.1, 0.3, 5.5, -0.0, -0.1, -0.25, -2.5, -5.0]
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for sign in (1.0, -1.0):
        row = torch.tensor([6.0 * sign] + [sign * t for t in ties], device="cuda")
        row = torch.cat([row, torch.rand(group - row.numel(), generator=g, device="cuda") * 6.0 - 3.0])
        rows.append(row)
    top = torch.zeros(1, 2 * group, device="cuda")
    top[0, 0] = 21.0  # the matrix amax: NVFP4 tensor scale 2**-7
    x = torch.cat([torch.stack(rows).repeat(3, 2), top]).to(dtype)  # (7, 2*group)
    got = K.quant_fp4(x, fmt)
    want = R.quant_fp4(x, fmt)
    assert float(want[2]) == (2.0 ** -7 if fmt == "nvfp4" else 1.0)
    for gg, ww, name in zip(got, want, FP4_OUT):
        assert_bitwise(gg, ww, name, _case(seed=seed, fmt=fmt, dtype=dtype))


def test_quant_fp4_non_finite_group(seed):
    reason = _skip_reason("quant_fp4")
    if reason:
        pytest.skip(reason)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.float16)
    x[1, 3] = float("nan")
    x[2, 40] = float("inf")
    # NVFP4: the E4M3 NaN for Inf as for NaN (satfinite would store 448); the tensor scale skips them
    for fmt, group, nan_byte in (("nvfp4", 16, 0x7F), ("mxfp4", 32, 0xFF)):
        p, sc, ts = K.quant_fp4(x, fmt)
        torch.cuda.synchronize()
        rp, rs, rts = R.quant_fp4(x, fmt)
        assert_bitwise(ts, rts, "tensor_scale", f"{fmt} seed={seed}")
        bad = torch.zeros(4, 64 // group, dtype=torch.bool, device="cuda")
        bad[1, 3 // group] = True
        bad[2, 40 // group] = True
        assert torch.equal(sc[~bad], rs[~bad]), f"{fmt} seed={seed}"
        if nan_byte is not None:
            assert bool((sc[bad] == nan_byte).all()), f"{fmt}: non-finite group scale must be 0x{nan_byte:02X}"
        ok_bytes = (~bad).repeat_interleave(group // 2, dim=1)
        assert torch.equal(p[ok_bytes], rp[ok_bytes]), f"{fmt} seed={seed}"


# ------------------------------------------------------------------------------------------------
# streams and CUDA graphs
# ------------------------------------------------------------------------------------------------
def test_runs_on_the_current_stream(seed):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    x = make_input(2, 2, 1000, 128, torch.float16, "bhsd", seed, "outlier")
    want = R.quant_v_e4m3_t(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = K.quant_v_e4m3_t(x)
        got_int = K.quant_int(x, bits=8, granularity="per_thread", role="k", mean=K.token_mean(x))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for g, w, name in zip(got, want, ("values", "scale")):
        assert_bitwise(g, w, name, f"seed={seed}")
    assert got_int[0].shape == (2, 2, 1000, 128)


def test_cuda_graph_capture(seed):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    x = make_input(1, 2, 1031, 64, torch.bfloat16, "bshd", seed, "outlier")
    mean = R.token_mean(x, "bshd")

    def step():
        return (K.quant_int(x, bits=8, granularity="per_thread", role="k", mean=mean, layout="bshd"),
                K.quant_v_e4m3_t(x, "bshd"), K.quant_fp4(x, "nvfp4", True))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    x.copy_(make_input(1, 2, 1031, 64, torch.bfloat16, "bshd", seed + 1, "outlier"))
    mean.copy_(R.token_mean(x, "bshd"))
    graph.replay()
    torch.cuda.synchronize()
    wants = (R.quant_int(x, bits=8, granularity="per_thread", role="k", mean=mean, layout="bshd"),
             R.quant_v_e4m3_t(x, "bshd"), R.quant_fp4(x, "nvfp4", True))
    for got, want in zip(outs, wants):
        for g, w in zip(got, want):
            assert_bitwise(g, w, "graph replay", f"seed={seed}")


def test_wrapper_errors_before_launch():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    x = torch.zeros(1, 2, 8, 64, device="cuda", dtype=torch.float32)  # values do not matter: errors
    with pytest.raises(TypeError, match="accepted: float16, bfloat16"):
        K.quant_int(x)
    with pytest.raises(ValueError, match="d % 8 == 0"):
        K.quant_v_s8(torch.zeros(1, 2, 8, 60, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="CUDA tensor"):
        K.token_mean(torch.zeros(1, 2, 8, 64, dtype=torch.float16))


@pytest.mark.parametrize("block", [2**31 - 1, 2**31 - 64])
def test_huge_user_block_tile_counts_do_not_overflow(seed, block):
    """Tile counts come from s + block - 1, computed in int64 (int32 overflowed for a block near
    2^31: a negative grid or a refused launch). One block then covers every token."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    x = make_input(1, 2, 300, 64, torch.float16, "bhsd", seed, "outlier")
    got = K.block_mean(x, block)
    assert got.shape == (1, 2, 1, 64), f"seed={seed}"
    torch.testing.assert_close(got[:, :, 0], K.token_mean(x), rtol=0, atol=0, msg=f"seed={seed}")
    for gran, role in (("per_block", "k"), ("per_thread", "k")):
        b = block - block % 8 if gran == "per_thread" else block
        vals, scale = K.quant_int(x, bits=8, granularity=gran, role=role, block=b)
        rv, rs = R.quant_int(x, bits=8, granularity=gran, role=role, block=304)  # same groups: block >= s
        assert torch.equal(vals, rv) and torch.equal(scale, rs), f"{gran} block={b} seed={seed}"
