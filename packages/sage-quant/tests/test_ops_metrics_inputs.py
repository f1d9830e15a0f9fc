"""Dispatch wrappers, metrics and input generators."""
import math

import pytest
import torch

import sage_quant as sq
from sage_quant import reference as R


def test_quantize_wrappers_match_reference_on_cpu(seed):
    x = torch.randn(1, 2, 50, 32, dtype=torch.bfloat16)
    m = R.token_mean(x)
    for kw in ({"granularity": "per_thread", "role": "k", "mean": m}, {"bits": 4, "role": "q"}):
        a, b = sq.quantize_int(x, **kw), R.quant_int(x, **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a, b) for a, b in zip(sq.quantize_v_e4m3_t(x), R.quant_v_e4m3_t(x)))
    assert all(torch.equal(a, b) for a, b in zip(sq.quantize_v_e4m3_t(x, mean=m), R.quant_v_e4m3_t(x, mean=m)))
    assert all(torch.equal(a, b) for a, b in zip(sq.quantize_v_s8(x), R.quant_v_s8(x)))
    assert all(torch.equal(a, b) for a, b in zip(sq.quantize_fp4(x, "mxfp4"), R.quant_fp4(x, "mxfp4")))
    assert torch.equal(sq.quantize_block_mean(x, 16), R.block_mean(x, 16))
    assert torch.equal(sq.quantize_token_mean(x), R.token_mean(x))


def test_kernels_available_is_bool_and_validates():
    assert isinstance(sq.kernels_available(), bool)
    if not torch.cuda.is_available():
        assert sq.kernels_available() is False
    with pytest.raises(ValueError, match="op"):
        sq.kernels_available("quant_everything")


@pytest.mark.gpu
def test_quantize_wrappers_on_cuda_are_bit_exact(seed):
    if not sq.kernels_available():
        pytest.skip("sage_core quantization kernels are not built for this GPU")
    x = torch.randn(2, 3, 333, 128, dtype=torch.bfloat16) * 3
    xc = x.cuda()
    m = R.token_mean(x)
    qm = R.block_mean(x, 128)
    cases = [
        dict(granularity="per_thread", role="k", mean=m),
        dict(granularity="per_thread", role="q"),
        dict(bits=4, granularity="per_thread", role="q", mean=qm, mean_block=128),
        dict(granularity="per_block", role="k"),
        dict(granularity="per_token", role="q"),
    ]
    for kw in cases:
        kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        a, b = sq.quantize_int(xc, **kw_cuda), R.quant_int(x, **kw)
        assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1]), kw
    vm = R.token_mean(x)
    a, b = sq.quantize_v_e4m3_t(xc, mean=vm.cuda()), R.quant_v_e4m3_t(x, mean=vm)
    assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1])
    for fn in (sq.quantize_v_e4m3_t, sq.quantize_v_s8):
        ref_fn = getattr(R, fn.__name__.replace("quantize_", "quant_"))
        assert all(torch.equal(a.cpu(), b) for a, b in zip(fn(xc), ref_fn(x)))
    for fmt in ("nvfp4", "mxfp4"):
        for sw in (False, True):
            a, b = sq.quantize_fp4(xc, fmt, sw), R.quant_fp4(x, fmt, sw)
            assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1]), (fmt, sw)


# ---------------------------------------------------------------- metrics
def test_metrics_values():
    r = torch.tensor([1.0, -2.0, 3.0, 0.0])
    assert sq.cosine(r, r) == pytest.approx(1.0, abs=1e-12)
    assert sq.rel_l1(r, r) == 0.0 and sq.rmse(r, r) == 0.0
    a = r + torch.tensor([0.5, 0.0, -0.5, 0.0])
    assert sq.rel_l1(a, r) == pytest.approx(1.0 / 6.0)
    assert sq.rmse(a, r) == pytest.approx(math.sqrt(0.5 / 4))
    assert sq.cosine(-r, r) == pytest.approx(-1.0)
    acc = sq.accuracy(a.half(), r)
    assert set(acc) == {"cos", "rel_l1", "rmse", "max_abs"} and acc["max_abs"] == 0.5


def test_metrics_nan_is_never_fine():
    r = torch.randn(100, dtype=torch.float64)
    a = r.clone()
    a[17] = float("nan")
    for val in sq.accuracy(a, r).values():
        assert math.isnan(val)
    a[17] = float("inf")
    assert math.isnan(sq.cosine(a, r)) and math.isnan(sq.rel_l1(a, r))
    assert math.isnan(sq.cosine(torch.zeros(3), torch.zeros(3)))
    with pytest.raises(ValueError, match="shape"):
        sq.rel_l1(torch.zeros(3), torch.zeros(4))


# ---------------------------------------------------------------- inputs
def test_make_qkv_shapes_layout_and_seed():
    kw = dict(b=2, h_q=4, h_kv=2, s_q=10, s_kv=12, d=64, dtype=torch.float16, seed=3)
    q, k, v = sq.make_qkv("outlier", **kw)
    assert q.shape == (2, 4, 10, 64) and k.shape == (2, 2, 12, 64) and q.dtype == torch.float16
    q2, k2, v2 = sq.make_qkv("outlier", layout="bshd", **kw)
    assert q2.shape == (2, 10, 4, 64) and torch.equal(q2.transpose(1, 2), q) and torch.equal(v2.transpose(1, 2), v)
    assert not torch.equal(sq.make_qkv("outlier", **{**kw, "seed": 4})[0], q)
    with pytest.raises(ValueError, match="dist"):
        sq.make_qkv("uniform", **kw)
    with pytest.raises(ValueError, match="multiple"):
        sq.make_qkv("randn", **{**kw, "h_kv": 3})


def test_outlier_distribution_properties():
    q, k, v = sq.make_qkv("outlier", b=1, h_q=2, h_kv=2, s_q=4096, s_kv=4096, d=128,
                          dtype=torch.float32, seed=11)
    k_mean = k.mean(2)  # 4 * N(0,1) per channel
    assert 2.0 < float(k_mean.std()) < 6.0
    q_std = q.std(2)[0, 0]
    assert int((q_std > 3).sum()) == 4  # max(2, d // 32) channels x6
    assert 0.5 < float(v.mean(2).std()) < 1.6
    r = sq.make_qkv("randn", b=1, h_q=1, h_kv=1, s_q=4096, s_kv=4096, d=64, dtype=torch.float32, seed=1)
    assert abs(float(r[1].mean())) < 0.05 and abs(float(r[1].std()) - 1) < 0.05
