"""The sm120 NVFP4 attention bindings (native and twin) and quant_fp4's mean / n_pad options reject
bad arguments with ValueError/TypeError before any launch (CPU tensors: every check but the device
one runs first, so one thing wrong raises that thing)."""

import pytest

import sage_core

torch = pytest.importorskip("torch")

FNS = [n for n in ("attn_fwd_sm120_qk_nvfp4_pv_nvfp4", "attn_fwd_sm120_twin_qk_nvfp4_pv_nvfp4") if hasattr(sage_core, n)]
B, H, HKV, S, SKV, D = 1, 4, 2, 100, 130, 128


def u8(*s):
    return torch.zeros(*s, dtype=torch.uint8)


def f32(*s):
    return torch.zeros(*s, dtype=torch.float32)


def good(d=D):
    return dict(q=u8(B, H, S, d // 2), q_sf=u8(B, H, S, d // 16), q_gs=f32(B, H),
                k=u8(B, HKV, SKV, d // 2), k_sf=u8(B, HKV, SKV, d // 16), k_gs=f32(B, HKV),
                v_t=u8(B, HKV, d, 128), v_sf=u8(B, HKV, d, 16), v_gs=f32(B, HKV),
                o=torch.zeros(B, H, S, d, dtype=torch.float16), lse=None, q_mean=f32(B, H, 1, d))


def call(fn, a, **kw):
    opts = dict(q_mean_block=128, softmax_scale=0.1, is_causal=True, stream=0)
    opts.update(kw)
    getattr(sage_core, fn)(*a.values(), **opts)


@pytest.mark.skipif(not FNS, reason="sage_core built without the sm120 / sm120twin families")
@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("change, match", [
    (dict(), "CUDA"),  # everything right: the device check
    (dict(o=torch.zeros(B, H, S, 96, dtype=torch.float16)), "head dim 96"),
    (dict(o=torch.zeros(B, H, S, D, dtype=torch.float32)), "o"),
    (dict(q=u8(B, H, S, D)), "q"),
    (dict(k=u8(B, 3, SKV, D // 2)), "multiple of kv heads"),
    (dict(k_sf=u8(B, HKV, SKV, 4)), "k_sf"),
    (dict(v_t=u8(B, HKV, D, 64), v_sf=u8(B, HKV, D, 8)), "multiple of 128"),
    (dict(v_sf=u8(B, HKV, D, 8)), "v_sf"),
    (dict(q_gs=f32(B, HKV)), "q_gs"),
    (dict(lse=f32(B, H, S + 1)), "lse"),
    (dict(q_mean=f32(B, H, 2, D)), "q_mean"),
], ids=["device", "head_dim", "o_dtype", "q_shape", "gqa", "k_sf", "v_t_pad", "v_sf", "q_gs", "lse", "q_mean"])
def test_attention_checks(fn, change, match):
    a = good()
    a.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        call(fn, a)


@pytest.mark.skipif(not FNS, reason="sage_core built without the sm120 / sm120twin families")
@pytest.mark.parametrize("fn", FNS)
def test_attention_option_checks(fn):
    with pytest.raises(ValueError, match="q_mean_block"):
        call(fn, good(), q_mean_block=96)
    with pytest.raises(ValueError, match="softmax_scale"):
        call(fn, good(), softmax_scale=-1.0)


@pytest.mark.skipif(not sage_core.has_kernel("quant_fp4"), reason="sage_core built without the quant kernels")
def test_quant_fp4_mean_and_n_pad_checks():
    x = torch.zeros(1, 2, 100, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="n_pad"):
        sage_core.quant_fp4(x.transpose(2, 3), u8(1, 2, 64, 60), u8(1, 2, 64, 7), f32(1, 2), "nvfp4", False, 0, n_pad=120)
    with pytest.raises(ValueError, match="mean"):
        sage_core.quant_fp4(x, u8(1, 2, 100, 32), u8(1, 2, 100, 4), f32(1, 2), "nvfp4", False, 0, mean=f32(1, 2, 63))
    with pytest.raises(ValueError, match="mean_block"):
        sage_core.quant_fp4(x, u8(1, 2, 100, 32), u8(1, 2, 100, 4), f32(1, 2), "nvfp4", False, 0,
                            mean=f32(1, 2, 1, 64), mean_block=0)
    with pytest.raises(ValueError, match="CUDA"):  # all right but the device
        sage_core.quant_fp4(x.transpose(2, 3), u8(1, 2, 64, 64), u8(1, 2, 64, 8), f32(1, 2), "nvfp4", False, 0, n_pad=128)
