"""CPU checks of the sm90 train_s8 glue (the kernels themselves: tests/gpu/test_train_sm90.py)."""

import pytest
import torch

from sage_train.backends import sm90


def test_backend_lists_both_kernels_and_needs_a_gpu():
    """Forward and backward instantiations are both required; without a CUDA device (or a build
    without them) the backend is unavailable and its entry points raise instead of launching."""
    assert sm90.GLUE_WRITTEN
    assert sm90.FORWARD_KERNEL_NAMES == ("attn_sm90_train_s8_hdim64_f16", "attn_sm90_train_s8_hdim64_bf16",
                                         "attn_sm90_train_s8_hdim128_f16", "attn_sm90_train_s8_hdim128_bf16")
    assert sm90.BACKWARD_KERNEL_NAMES == tuple(n.replace("train_s8_", "train_s8_bwd_") for n in sm90.FORWARD_KERNEL_NAMES)
    assert sm90.KERNEL_NAMES == sm90.FORWARD_KERNEL_NAMES + sm90.BACKWARD_KERNEL_NAMES
    if torch.cuda.is_available():
        pytest.skip("the CPU-only checks below")
    assert not sm90.available()
    with pytest.raises(RuntimeError, match="no sm90 train_s8 backward kernel here"):
        sm90.backward(*(torch.zeros(1, 1, 1, 64),) * 6, layout="bhsd", is_causal=False, scale=0.125, smooth_k=True)
    with pytest.raises(RuntimeError, match="no sm90 train_s8 forward kernel here"):  # CPU tensors
        sm90.forward(*(torch.zeros(1, 1, 1, 64),) * 3, layout="bhsd", is_causal=False, scale=0.125, smooth_k=True)


def test_v_t_order_is_the_inference_kernels_permutation():
    """V^T INT8 for the PV wgmma: transposed, zero-padded to 64 tokens, tokens of each 32-chunk in
    the inference kernel's v_e4m3_t_perm32 order (the 8-bit A fragment is type-independent)."""
    pytest.importorskip("sage_core", reason="the permutation lives in sage_torch.backends.sm90 (needs sage_core)")
    from sage_torch.backends.sm90 import permute_v_e4m3_t

    g = torch.Generator().manual_seed(0)
    v = torch.randint(-127, 128, (2, 3, 70, 64), dtype=torch.int8, generator=g)
    got = sm90._t_perm(v, 64)
    assert got.shape == (2, 3, 64, 128) and got.dtype == torch.int8 and got.is_contiguous()
    padded = torch.nn.functional.pad(v.transpose(-1, -2).contiguous().view(torch.uint8), (0, 128 - 70))
    assert torch.equal(got.view(torch.uint8), permute_v_e4m3_t(padded))


def test_quantize_forward_is_the_emulations():
    """The kernel's inputs are the emulation's quantized tensors (here through the reference: CPU)."""
    pytest.importorskip("sage_core", reason="the V^T order lives in sage_torch.backends.sm90 (needs sage_core)")
    from sage_quant.emulation import train_s8 as emu
    from sage_quant.inputs import make_qkv

    q, k, v = make_qkv("outlier", b=1, h_q=4, h_kv=2, s_q=130, s_kv=100, d=64, dtype=torch.bfloat16,
                       layout="bshd", seed=0)
    _, _, ctx = emu.train_s8_forward(q, k, v, layout="bshd")
    qz = sm90.quantize_forward(q, k, v, layout="bshd", smooth_k=True)
    for name, ref in (("q", ctx.q_i8), ("q_scale", ctx.q_scale), ("k", ctx.k_i8), ("k_scale", ctx.k_scale),
                      ("v_scale", ctx.v_scale)):
        assert torch.equal(qz[name], ref), name
    assert torch.equal(qz["v_t"], sm90._t_perm(ctx.v_i8, 64))
    assert not sm90.forward_kernel_available(64, torch.bfloat16) or torch.cuda.is_available()


def test_quantize_backward_is_the_emulations():
    """The backward kernels' operands on the CPU: Q, K, dO codes and scales as the emulation's, dO's
    non-finite entries zeroed and located per channel, D and LSE*log2e padded to 128 queries."""
    pytest.importorskip("sage_core", reason="the token order lives in sage_torch.backends.sm90 (needs sage_core)")
    from sage_quant.emulation import train_s8 as emu
    from sage_quant.inputs import make_qkv
    from sage_quant.reference import quant_int

    q, k, v = make_qkv("outlier", b=1, h_q=4, h_kv=2, s_q=130, s_kv=100, d=64, dtype=torch.bfloat16,
                       layout="bshd", seed=0)
    o, lse, ctx = emu.train_s8_forward(q, k, v, layout="bshd", is_causal=True)
    do = torch.randn(q.shape, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    do[0, 7, 1, 3] = float("nan")
    do[0, 99, 1, 3] = float("inf")
    do[0, 5, 2, 0] = float("-inf")
    z = sm90.quantize_backward(do, q, k, v, o, ctx.lse_smoothed, layout="bshd", smooth_k=True)
    assert torch.equal(z["q"], ctx.q_i8) and torch.equal(z["k"], ctx.k_i8) and torch.equal(z["k_scale"], ctx.k_scale)
    dob = do.transpose(1, 2)
    do_fin = dob.masked_fill(~torch.isfinite(dob), 0)
    assert torch.equal(z["dout"], do_fin)
    ref_i8, ref_s = quant_int(do_fin, bits=8, granularity="per_block", role="q", block=128)
    assert torch.equal(z["do_scale"], ref_s) and torch.equal(z["do_t"], sm90._t_perm(ref_i8, 128))
    assert torch.equal(z["q_t"], sm90._t_perm(ctx.q_i8, 128)) and torch.equal(z["k_t"], sm90._t_perm(ctx.k_i8, 64))
    last = torch.full((1, 4, 64), -1, dtype=torch.int32)
    last[0, 1, 3] = 99
    last[0, 2, 0] = 5
    assert torch.equal(z["do_bad_last"], last)
    assert z["delta"].shape == (1, 4, 256) and z["lse2"].shape == (1, 4, 256)
    delta = (dob.float() * o.transpose(1, 2).float()).sum(-1)
    assert torch.equal(z["delta"][..., :130].isfinite(), delta.isfinite())
    assert torch.equal(z["delta"][..., :130][delta.isfinite()], delta[delta.isfinite()])
    l2 = ctx.lse_smoothed * emu.kLog2e
    assert torch.isneginf(l2).any()  # causal rows 0..29 see no key: 0, as the emulation's lse2_safe
    assert torch.equal(z["lse2"][..., :130], l2.masked_fill(torch.isneginf(l2), 0)) and not z["lse2"][..., 130:].any()
