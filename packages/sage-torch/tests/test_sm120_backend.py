"""sm120 NVFP4 backend glue on the CPU: option filter, the operands it hands the kernel (through
sage_quant's reference quantizers here; the CUDA ones are bit-exact to them, tests/gpu) are the
emulation's operands, and the backend registers for sm120/sm121 (the twin never registers)."""

from __future__ import annotations

import importlib

import pytest
import torch

import sage_quant
from sage_quant import reference as R
from sage_torch import _dispatch, backends
from sage_torch.backends import registered_backends
from sage_torch.backends import sm120


def test_options_filter():
    opts = sm120.resolve_options({})
    assert sm120.unsupported_reason(opts) is None
    assert "kv_block" in sm120.unsupported_reason(sm120.resolve_options({"kv_block": 64}))
    assert "fmt" in sm120.unsupported_reason(sm120.resolve_options({"fmt": "mxfp4"}))
    assert "p_fp4" in sm120.unsupported_reason(sm120.resolve_options({"p_fp4": "direct"}))
    assert "q_block" in sm120.unsupported_reason(sm120.resolve_options({"q_block": 96}))
    assert "delta_s" in sm120.unsupported_reason(sm120.resolve_options({"delta_s": "exact_k"}))
    assert sm120.unsupported_reason(sm120.resolve_options({"smooth_q": False, "q_block": 96})) is None
    with pytest.raises(TypeError):
        sm120.resolve_options({"no_such_option": 1})


def test_registered_for_sm120_sm121_and_auto_picks_it():
    importlib.reload(sm120)  # the test's registry starts empty: run the module's registration again
    specs = [s for s in registered_backends() if s.recipe == sm120.RECIPE]
    assert [s.name for s in specs] == ["sm120_qk_nvfp4_pv_nvfp4"]
    assert specs[0].archs == frozenset({"sm120", "sm121"})
    assert sorted(specs[0].head_dims) == [64, 128]
    backends.register_backend(specs[0].name, specs[0].recipe, specs[0].archs, specs[0].head_dims, specs[0].fn,
                              lambda: True, dtypes=specs[0].dtypes, supports=specs[0].supports, replace=True)
    assert _dispatch.resolve("sm120", torch.bfloat16, 128).backend.name == "sm120_qk_nvfp4_pv_nvfp4"
    assert _dispatch.resolve("sm121", torch.bfloat16, 128).backend.name == "sm120_qk_nvfp4_pv_nvfp4"
    assert _dispatch.resolve("sm90", torch.bfloat16, 128).backend is None or \
        _dispatch.resolve("sm90", torch.bfloat16, 128).backend.recipe != sm120.RECIPE  # the twin: explicit only


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_operands_are_the_emulations(layout, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 150, 64, generator=g).to(torch.bfloat16)
    k = (torch.randn(1, 2, 77, 64, generator=g) + 2).to(torch.bfloat16)
    v = torch.randn(1, 2, 77, 64, generator=g).to(torch.bfloat16)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    opts = sm120.resolve_options({})
    ops = sm120.quantize_operands(q, k, v, layout, opts)
    qb, kb, vb = (R.to_bhsd(t, layout) for t in (q, k, v))
    # emulation: fake_quant_fp4_parts of (Q - q_mean), (K - k_mean), V^T zero-padded
    row_block = torch.arange(150) // opts["q_block"]
    q_blk, g_q = R.fake_quant_fp4_parts(qb.float() - R.block_mean(qb, opts["q_block"])[:, :, row_block])
    k_blk, g_k = R.fake_quant_fp4_parts(kb.float() - R.token_mean(kb)[:, :, None, :])
    vt = torch.nn.functional.pad(vb.float().transpose(2, 3), (0, 128 - 77))
    v_blk, g_v = R.fake_quant_fp4_parts(vt)
    assert ops["v_t"].shape == (1, 2, 64, 64) and ops["v_sf"].shape == (1, 2, 64, 8)
    for codes, sf, gs, blk, g_ref in ((ops["q"], ops["q_sf"], ops["q_gs"], q_blk, g_q),
                                      (ops["k"], ops["k_sf"], ops["k_gs"], k_blk, g_k),
                                      (ops["v_t"], ops["v_sf"], ops["v_gs"], v_blk, g_v)):
        assert torch.equal(gs, g_ref), f"seed={seed}"
        assert torch.equal(R.dequant_fp4(codes, sf, None), blk), f"seed={seed}"


def test_twin_checks_before_anything_runs():
    q = torch.zeros(1, 1, 8, 64, dtype=torch.float16)
    try:
        import sage_core
    except ImportError:
        sage_core = None
    if sage_core is None or not hasattr(sage_core, "attn_fwd_sm120_twin_qk_nvfp4_pv_nvfp4"):
        with pytest.raises(RuntimeError):
            sm120.attention_twin(q, q, q)
    else:
        q32 = torch.zeros(1, 1, 8, 32, dtype=torch.float16)
        with pytest.raises(ValueError, match="head dim"):
            sm120.attention_twin(q32, q32, q32)
        with pytest.raises(ValueError, match="kv_block"):
            sm120.attention_twin(q, q, q, kv_block=64)
