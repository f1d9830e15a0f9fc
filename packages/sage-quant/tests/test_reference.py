"""Properties of the bit-exact quantization references (docs/design/quant-formats.md)."""
import math

import pytest
import torch

from sage_quant import reference as R


def _rand(shape, seed, dtype=torch.bfloat16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ---------------------------------------------------------------- group index tables
def test_per_thread_q_group_index_table():
    idx = R.scale_group_index(40, "per_thread", "q")
    # rows r and r+8 of each 16-row tile share a group; tiles advance by 8 groups
    expected = [(t // 16) * 8 + t % 8 for t in range(40)]
    assert idx.tolist() == expected
    assert idx[0] == idx[8] == 0 and idx[7] == idx[15] == 7 and idx[16] == 8 and idx[24] == 8
    assert R.num_scale_groups(40, "per_thread", "q") == 24


def test_per_thread_k_group_index_table():
    idx = R.scale_group_index(200, "per_thread", "k", block=64)
    # keys 8j + 2(lane%4) + {0,1}: within a 64-key tile keys t and t+8 share, pairs share
    assert idx[:8].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert idx[8:16].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert idx[64:72].tolist() == [4, 4, 5, 5, 6, 6, 7, 7]
    assert idx[199] == 3 * 4 + (199 % 8) // 2
    assert R.num_scale_groups(200, "per_thread", "k", block=64) == 16
    assert R.num_scale_groups(200, "per_thread", "k") == 8  # default K tile 128


@pytest.mark.parametrize("gran,role,block,expected_groups", [
    ("per_tensor", "q", None, 1), ("per_block", "q", None, 3), ("per_block", "k", None, 5),
    ("per_warp", "q", None, 19), ("per_token", "k", None, 300), ("per_block", "q", 100, 3),
])
def test_group_counts(gran, role, block, expected_groups):
    assert R.num_scale_groups(300, gran, role, block) == expected_groups
    idx = R.scale_group_index(300, gran, role, block)
    assert int(idx.max()) == expected_groups - 1


# ---------------------------------------------------------------- integer quantization
GRANS = [("per_tensor", "q"), ("per_block", "q"), ("per_block", "k"), ("per_warp", "q"),
         ("per_thread", "q"), ("per_thread", "k"), ("per_token", "q"), ("per_token", "k")]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gran,role", GRANS)
def test_quant_int_scales_and_values_exact(seed, bits, gran, role):
    s = 150  # not a multiple of any tile
    x = _rand((2, 3, s, 32), seed)
    vals, scale = R.quant_int(x, bits=bits, granularity=gran, role=role)
    qmax = 127 if bits == 8 else 7
    assert scale.dtype == torch.float32 and scale.is_contiguous() and vals.is_contiguous()
    assert scale.shape == (2, 3, R.num_scale_groups(s, gran, role))
    q = vals if bits == 8 else R.unpack_int4(vals)
    assert q.shape == (2, 3, s, 32)
    idx = R.scale_group_index(s, gran, role)
    xf = x.float()
    for g in range(scale.shape[-1]):
        rows = (idx == g).nonzero().flatten()
        if rows.numel() == 0:
            assert torch.all(scale[..., g] == 1.0)  # empty group (tail tile): amax 0 -> 1
            continue
        amax = xf[:, :, rows].abs().amax(dim=(2, 3))
        assert torch.equal(scale[..., g], amax / qmax)  # IEEE fp32 division, bit exact
        expect = torch.round(xf[:, :, rows] / scale[..., g, None, None]).clamp(-qmax, qmax)
        assert torch.equal(q[:, :, rows].float(), expect)
        # the group's amax element reaches qmax
        assert torch.all(q[:, :, rows].abs().amax(dim=(2, 3)) == qmax)
    deq = R.dequant_int(vals, scale, bits=bits, granularity=gran, role=role, seq_len=s)
    bound = scale[:, :, idx, None] * 0.5 + xf.abs() * 2 ** -22  # half a step + fp32 rounding of q*s
    assert torch.all((deq - xf).abs() <= bound)


def test_quant_int_round_half_even_and_zero_group():
    # group amax 127 -> scale 1: x/s = 2.5 -> 2, 3.5 -> 4, -2.5 -> -2
    x = torch.zeros(1, 1, 16, 4)
    x[0, 0, 0, :] = torch.tensor([127.0, 2.5, 3.5, -2.5])
    x[0, 0, 8, :] = 0.0
    v, s = R.quant_int(x, bits=8, granularity="per_token", role="q")
    assert v[0, 0, 0].tolist() == [127, 2, 4, -2]
    assert s[0, 0, 0] == 1.0
    assert s[0, 0, 1] == 1.0 and torch.all(v[0, 0, 1] == 0)  # all-zero token: scale 1.0


def test_quant_int_layouts_agree(seed):
    x = _rand((2, 70, 3, 64), seed, torch.float16)  # bshd
    a = R.quant_int(x, layout="bshd", granularity="per_thread", role="k")
    b = R.quant_int(x.transpose(1, 2).contiguous(), layout="bhsd", granularity="per_thread", role="k")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (2, 3, 70, 64) and a[0].is_contiguous()


def test_quant_int_mean_subtraction_is_one_fp32_sub(seed):
    x = _rand((1, 2, 200, 64), seed, scale=3.0)
    km = R.token_mean(x)
    a = R.quant_int(x, granularity="per_thread", role="k", mean=km)
    b = R.quant_int(x.float() - km[:, :, None, :], granularity="per_thread", role="k")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    qm = R.block_mean(x, 128)
    c = R.quant_int(x, bits=4, granularity="per_thread", role="q", mean=qm, mean_block=128)
    rows = torch.arange(200) // 128
    d = R.quant_int(x.float() - qm[:, :, rows], bits=4, granularity="per_thread", role="q")
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


def test_block_mean_partial_last_block(seed):
    x = _rand((1, 2, 130, 8), seed)
    m = R.block_mean(x, 128)
    assert m.shape == (1, 2, 2, 8)
    torch.testing.assert_close(m[:, :, 0], x[:, :, :128].float().mean(2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m[:, :, 1], x[:, :, 128:].float().mean(2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(R.token_mean(x), x.float().mean(2), rtol=1e-6, atol=1e-6)


def test_pack_unpack_int4_all_values():
    vals = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(vals, vals).to(torch.int8).reshape(-1)  # (512,)
    packed = R.pack_int4(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (256,)
    assert torch.equal(R.unpack_int4(packed), pairs)
    # element 0 in the low nibble, two's complement
    assert R.pack_int4(torch.tensor([-1, 2], dtype=torch.int8)).item() == 0x2F
    assert R.pack_int4(torch.tensor([3, -8], dtype=torch.int8)).item() == 0x83


# ---------------------------------------------------------------- V formats
def test_quant_v_e4m3_t_layout_and_padding(seed):
    v = _rand((1, 2, 130, 16), seed, scale=5.0)
    vt, vs = R.quant_v_e4m3_t(v)
    assert vt.shape == (1, 2, 16, 256) and vt.dtype == torch.uint8 and vs.shape == (1, 2, 16)
    assert torch.all(vt[..., 130:] == 0)
    vf = v.float()
    assert torch.equal(vs, vf.abs().amax(2) / 448.0)
    expect = (vf / vs[:, :, None, :]).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(vt[..., :130], expect.transpose(2, 3))
    # the amax element of each channel maps to 448 exactly (0x7E or 0xFE)
    assert torch.all((vt[..., :130] & 0x7F).amax(-1) == 0x7E)
    deq = R.dequant_v_e4m3_t(vt, vs, 130)
    assert torch.all((deq - vf).abs() <= vf.abs() * 2 ** -4 + vs[:, :, None, :] * 2 ** -9)


def test_quant_v_e4m3_zero_channel_and_bshd(seed):
    v = _rand((1, 20, 2, 8), seed)  # bshd
    v[:, :, 1, 3] = 0
    vt, vs = R.quant_v_e4m3_t(v, layout="bshd")
    assert vs[0, 1, 3] == 1.0 and torch.all(vt[0, 1, 3] == 0)
    vt2, vs2 = R.quant_v_e4m3_t(v.transpose(1, 2).contiguous())
    assert torch.equal(vt, vt2) and torch.equal(vs, vs2)


def test_quant_v_s8(seed):
    v = _rand((2, 1, 33, 8), seed)
    q, s = R.quant_v_s8(v)
    assert q.dtype == torch.int8 and s.shape == (2, 1, 8)
    assert torch.equal(s, v.float().abs().amax(2) / 127)
    assert torch.equal(q.float(), torch.round(v.float() / s[:, :, None]).clamp(-127, 127))


def test_e4m3_saturates_and_rounds_even():
    x = torch.tensor([500.0, -1e9, 448.0, 17.0, 19.0, 0.0])
    f = R.e4m3_to_float(R.float_to_e4m3(x))
    # 17 is halfway between 16 and 18 -> even mantissa 16; 19 between 18 and 20 -> 20
    assert f.tolist() == [448.0, -448.0, 448.0, 16.0, 20.0, 0.0]


# ---------------------------------------------------------------- FP4
def test_e2m1_grid_ties_saturation_sign():
    x = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, 1e30,
                      -0.1, -0.0, -0.75, -6.0, -100.0])
    codes = R.float_to_e2m1_code(x)
    assert codes.tolist() == [0, 0, 1, 2, 2, 4, 4, 6, 6, 7, 7, 7, 8, 8, 0xA, 0xF, 0xF]
    grid = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6])
    assert torch.equal(R.e2m1_code_to_float(torch.arange(8, dtype=torch.uint8)), grid)
    assert torch.equal(R.e2m1_code_to_float(torch.arange(8, 16, dtype=torch.uint8)), -grid)
    # every grid point round-trips
    assert torch.equal(R.e2m1_code_to_float(R.float_to_e2m1_code(grid)), grid)


def test_nvfp4_scales_and_roundtrip(seed):
    x = _rand((3, 5, 64), seed, scale=2.0)
    packed, scales, ts = R.quant_fp4(x, "nvfp4")
    assert packed.shape == (3, 5, 32) and scales.shape == (3, 5, 4) and ts.shape == (3,)
    assert ts.dtype == torch.float32
    xf = x.float()
    # second level: one FP32 scale per matrix (last two dims) = finite amax / (448 * 6)
    assert torch.equal(ts, xf.abs().amax(dim=(1, 2)) / torch.full((3,), 2688.0))
    g = (xf / ts[:, None, None]).reshape(3, 5, 4, 16)
    s_expect = R.float_to_e4m3(g.abs().amax(-1) / 6.0)
    assert torch.equal(scales, s_expect)
    assert (scales.reshape(3, -1).amax(-1) == 0x7E).all()  # each matrix's max group scale is 448
    s = R.e4m3_to_float(scales)
    codes = R.float_to_e2m1_code(g / s[..., None]).reshape(3, 5, 64)
    assert torch.equal(packed, codes[..., 0::2] | (codes[..., 1::2] << 4))
    deq = R.dequant_fp4(packed, scales, ts, "nvfp4").reshape(3, 5, 4, 16)
    xg = xf.reshape(3, 5, 4, 16)
    # E2M1 relative spacing is at most 1/2 between grid points above 1 -> error <= s * 1 (step 2 at 4..6)
    assert torch.all((deq - xg).abs() <= s[..., None] * ts[:, None, None, None] * 1.0 + 1e-6)
    assert float((deq - xg).abs().mean() / xg.abs().mean()) < 0.15


@pytest.mark.parametrize("factor", [1e-6, 1e-3, 1e4, 1e30])
def test_nvfp4_tensor_scale_keeps_tiny_and_huge_tensors(seed, factor):
    """Without the FP32 second level, E4M3 group scales (2**-9 .. 448) flush |x| < ~1e-3 to zero
    and saturate |x| > 2688; with it the error relative to amax is the same at every magnitude."""
    x = _rand((2, 4, 32, 64), seed)
    xs = (x.float() * factor).to(torch.bfloat16)
    packed, scales, ts = R.quant_fp4(xs, "nvfp4")
    assert ts.shape == (2, 4)
    deq = R.dequant_fp4(packed, scales, ts, "nvfp4")
    rel = float((deq - xs.float()).abs().sum() / xs.float().abs().sum())
    base = R.fake_quant_fp4(x, "nvfp4")
    rel_base = float((base - x.float()).abs().sum() / x.float().abs().sum())
    assert rel < 0.2 and abs(rel - rel_base) < 0.01, (factor, rel, rel_base)
    assert torch.equal(R.fake_quant_fp4(xs, "nvfp4"), deq)


def test_nvfp4_tensor_scale_guards():
    z = torch.zeros(2, 3, 16)
    assert torch.equal(R.fp4_tensor_scale(z), torch.ones(2))  # all zero -> 1
    t = torch.full((1, 16), 1e-40)  # amax / 2688 would be subnormal: raised to 2**-126
    assert float(R.fp4_tensor_scale(t)) == 2.0 ** -126
    x = torch.randn(4, 32)
    x[1, 3] = math.inf
    x[2, 7] = math.nan
    finite = x.clone()
    finite[1, 3] = 0
    finite[2, 7] = 0
    assert torch.equal(R.fp4_tensor_scale(x), R.fp4_tensor_scale(finite))  # non-finite skipped
    assert R.fp4_tensor_scale(torch.randn(32)).shape == ()  # 1-D: one matrix
    assert torch.equal(R.fp4_tensor_scale(torch.randn(2, 3, 4, 32), "mxfp4"), torch.ones(2, 3))


def test_nvfp4_zero_group_and_tiny_group():
    x = torch.zeros(2, 32)
    x[0, 16:] = 1e-12  # alone in its matrix: the tensor scale maps it to 448 (one level: flushed)
    packed, scales, _ = R.quant_fp4(x[:1], "nvfp4")
    assert scales.tolist() == [[0, 0x7E]] and torch.all(packed[0, :8] == 0)
    x[1, :16] = 1.0  # next to a group 1e12 larger, the E4M3 scale underflows -> s == 0 -> codes 0
    packed, scales, _ = R.quant_fp4(x, "nvfp4")
    assert scales[:, 1].tolist() == [0, 0] and torch.all(packed[:, 8:] == 0)


def test_mxfp4_exponent(seed):
    x = _rand((4, 64), seed, dtype=torch.float32, scale=10.0)
    x[0, :32] = 0
    x[1, :32] = 0
    x[1, 0] = 6.0  # floor(log2 6) = 2 -> e = 0 -> stored 127
    packed, scales, ts = R.quant_fp4(x, "mxfp4")
    assert scales.shape == (4, 2) and torch.equal(ts, torch.ones(()))
    assert scales[0, 0] == 0  # amax 0 -> e = -127
    assert scales[1, 0] == 127
    amax = x.reshape(4, 2, 32).abs().amax(-1)
    nz = amax > 0
    e = torch.floor(torch.log2(amax[nz])) - 2
    assert torch.equal(scales[nz].float() - 127, e)
    deq = R.dequant_fp4(packed, scales, ts, "mxfp4")
    assert deq[1, 0] == 6.0
    rel = (deq - x).abs().sum() / x.abs().sum()
    assert rel < 0.2


def test_swizzle_offsets_and_roundtrip(seed):
    off = R.swizzle_scale_offsets(300, 6)
    r, c = 37, 5  # tile row 0, tile col 1; inner (37%32)*16 + (37//32)*4 + 1
    assert off[r, c] == 1 * 512 + 5 * 16 + 1 * 4 + 1
    r, c = 130, 2  # tile row 1 (of 2 column tiles)
    assert off[r, c] == (1 * 2 + 0) * 512 + 2 * 16 + 0 * 4 + 2
    assert off.unique().numel() == off.numel()  # a permutation into the padded buffer
    x = _rand((3, 100, 96), seed)
    packed, sw, ts = R.quant_fp4(x, "nvfp4", swizzled=True)
    assert sw.shape == (384 * 8,)
    _, lin, ts_lin = R.quant_fp4(x, "nvfp4")
    assert torch.equal(ts, ts_lin)
    assert torch.equal(R.unswizzle_scales(sw, 300, 6), lin.reshape(300, 6))
    assert torch.equal(R.dequant_fp4(packed, sw, ts, "nvfp4", swizzled=True), R.dequant_fp4(packed, lin, ts, "nvfp4"))
    mask = torch.ones(384 * 8, dtype=torch.bool)
    mask[off.reshape(-1)] = False
    assert torch.all(sw[mask] == 0)  # padding is zero


# ---------------------------------------------------------------- validation
def test_input_validation():
    x = torch.randn(1, 2, 16, 8, dtype=torch.float16)
    with pytest.raises(TypeError, match="float16"):
        R.quant_int(x.to(torch.int32))
    with pytest.raises(ValueError, match="4-D"):
        R.quant_int(x[0])
    with pytest.raises(ValueError, match="layout"):
        R.quant_int(x, layout="bsdh")
    with pytest.raises(ValueError, match="even"):
        R.quant_int(x[..., :7], bits=4)
    with pytest.raises(ValueError, match="bits"):
        R.quant_int(x, bits=6)
    with pytest.raises(ValueError, match="granularity"):
        R.quant_int(x, granularity="per_row")
    with pytest.raises(ValueError, match="per_warp"):
        R.quant_int(x, granularity="per_warp", role="k")
    with pytest.raises(ValueError, match="mean"):
        R.quant_int(x, mean=torch.zeros(1, 2, 7))
    with pytest.raises(ValueError, match="multiple"):
        R.quant_fp4(torch.randn(4, 24), "nvfp4")
    with pytest.raises(ValueError, match="fmt"):
        R.quant_fp4(torch.randn(4, 32), "fp4")
    with pytest.raises(TypeError):
        R.quant_v_e4m3_t(x.to(torch.int8))
    p, sc, ts = R.quant_fp4(torch.randn(2, 4, 32), "nvfp4")
    with pytest.raises(TypeError, match="tensor_scale"):
        R.dequant_fp4(p, sc, "nvfp4")  # the pre-two-level call: fmt where tensor_scale goes
    with pytest.raises(ValueError, match="tensor_scale must have shape"):
        R.dequant_fp4(p, sc, ts[None])


def test_nonfinite_group_gives_nonfinite_scale():
    x = torch.randn(1, 1, 32, 8)
    x[0, 0, 3, 2] = math.nan
    v, s = R.quant_int(x, granularity="per_thread", role="q")
    g = int(R.scale_group_index(32, "per_thread", "q")[3])
    assert torch.isnan(s[0, 0, g]) and torch.isfinite(s[0, 0, torch.arange(16) != g]).all()
    _, sc, ts = R.quant_fp4(x.reshape(-1, 16), "nvfp4")
    assert (sc == 0x7F).sum() == 1  # E4M3 NaN for the one group holding the NaN
    assert torch.isfinite(ts)  # the tensor scale skips it: other groups keep their scales
    _, sc, _ = R.quant_fp4(x.reshape(-1, 32), "mxfp4")
    assert (sc == 0xFF).sum() == 1
    y = x.reshape(-1, 16).clone()
    y[y.isnan()] = -math.inf  # Inf would saturate to 448 under satfinite: NaN scale instead
    _, sc, _ = R.quant_fp4(y, "nvfp4")
    assert (sc == 0x7F).sum() == 1
    assert torch.isnan(R.fake_quant_fp4(y, "nvfp4")).sum() == 16


def test_e2m1_round_matches_codes_on_dense_grid():
    # every multiple of 1/64 in [-8, 8] (all ties included) plus random values
    y = torch.cat([torch.arange(-512, 513) / 64.0, torch.randn(10000) * 3])
    assert torch.equal(R.e2m1_round(y), R.e2m1_code_to_float(R.float_to_e2m1_code(y)))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fake_quant_fp4_equals_quant_dequant(seed, fmt):
    x = _rand((3, 7, 128), seed, dtype=torch.float32, scale=4.0)
    x[0, 0, :32] = 0.0
    x[1, 1, :32] = 1e-30  # underflowing scales
    x[2, 3, 5] = math.inf
    x[2, 4, 9] = math.nan
    fq, dq = R.fake_quant_fp4(x, fmt), R.dequant_fp4(*R.quant_fp4(x, fmt), fmt)
    assert torch.equal(fq.isnan(), dq.isnan()) and fq.isnan().sum() == 2 * (16 if fmt == "nvfp4" else 32)
    assert torch.equal(fq.nan_to_num(), dq.nan_to_num())
    blocks, ts = R.fake_quant_fp4_parts(x, fmt)
    assert torch.equal((blocks * ts[:, None, None]).nan_to_num(), fq.nan_to_num())
