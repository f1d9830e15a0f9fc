"""CPU checks of the sm90 train_s8 glue (the kernels themselves: tests/gpu/test_train_sm90.py)."""

import pytest
import torch

from sage_train.backends import sm90


def test_backend_stays_unavailable_until_the_backward_exists():
    """The forward kernel alone does not make the backend available: dispatch keeps the emulation
    for both passes rather than claiming a kernel that trains at emulation speed."""
    assert not sm90.GLUE_WRITTEN and sm90.KERNEL_NAMES == () and not sm90.available()
    assert sm90.FORWARD_KERNEL_NAMES == ("attn_sm90_train_s8_hdim64_f16", "attn_sm90_train_s8_hdim64_bf16",
                                         "attn_sm90_train_s8_hdim128_f16", "attn_sm90_train_s8_hdim128_bf16")
    with pytest.raises(NotImplementedError, match="backward"):
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
    got = sm90._v_t_perm(v)
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
    assert torch.equal(qz["v_t"], sm90._v_t_perm(ctx.v_i8))
    assert not sm90.forward_kernel_available(64, torch.bfloat16) or torch.cuda.is_available()
