"""Many bad-input calls in ONE process/test: each must raise TypeError/ValueError, never crash.

Regression for the GPU-machine "Fatal Python error: Segmentation fault" seen inside bad-input
tests (tests/gpu/test_attn_sm80.py::test_binding_rejects_bad_input_before_launch and
test_validation.py::test_input_rank_and_head_dim): a single bad call raises fine standalone, so
the crash needs a long sequence. This test replays a long sequence of wrong ranks (0-D .. 6-D),
sliced / transposed / offset views, numpy arrays and wrong dtypes through every binding of the
build, with garbage collection in between (DLPack capsule / ndarray lifetime), and checks the
exception type each time. CPU tensors only: nothing here may reach a kernel.
"""

import gc

import pytest

import sage_core

torch = pytest.importorskip("torch")

needs_quant = pytest.mark.skipif(
    not sage_core.has_kernel("quant_int8"),
    reason="sage_core built without the quant kernels (SAGE_CUDA_ARCHS=none)",
)

B, H, S, D = 1, 2, 5, 16
ROUNDS = 8  # the whole sequence, repeated: a use-after-free tends to surface after a few rounds


def _f16(*shape):
    return torch.randn(*shape, dtype=torch.float16)


def _qint(x, values, scale, mean=None, **kw):
    args = dict(bits=8, granularity="per_block", role="q", block=128, warp_rows=16, mean_block=128, stream=0)
    args.update(kw)
    return sage_core.quant_int(x, values, scale, mean, **args)


def _quant_cases():
    """(callable, expected exception, message regex) for the quant family."""
    v = torch.empty(B, H, S, D, dtype=torch.int8)
    s = torch.empty(B, H, 1)
    x = _f16(B, H, S, D)
    big = _f16(B, H, S, 2 * D)
    np = pytest.importorskip("numpy")
    cases = []
    # Wrong rank of the input, every rank 0..6 but 4.
    for shape in [(), (D,), (S, D), (H, S, D), (1, B, H, S, D), (1, 1, B, H, S, D)]:
        t = _f16(*shape) if shape else torch.tensor(1.0, dtype=torch.float16)
        cases.append((lambda t=t: _qint(t, v, s), ValueError, r"expected a 4-D logical \(b, h, s, d\) tensor"))
        cases.append((lambda t=t: sage_core.token_mean(t, torch.empty(B, H, D), 0), ValueError, "4-D"))
        cases.append((lambda t=t: sage_core.quant_v_s8(t, v, torch.empty(B, H, D), 0), ValueError, "4-D"))
    # Wrong rank of outputs / scale / mean.
    cases += [
        (lambda: _qint(x, v[0], s), ValueError, r"values: expected shape"),
        (lambda: _qint(x, v, s[0, 0]), ValueError, r"scale: expected shape"),
        (lambda: _qint(x, v, torch.empty(())), ValueError, r"scale: expected shape"),
        (lambda: _qint(x, v, s, mean=torch.zeros(D)), ValueError, r"mean must be"),
        (lambda: _qint(x, v, s, mean=torch.zeros(())), ValueError, r"mean must be"),
        (lambda: _qint(x, v, s, mean=torch.zeros(1, B, H, 1, D)), ValueError, r"mean must be"),
        (lambda: sage_core.token_mean(x, torch.empty(()), 0), ValueError, "out: expected shape"),
        (lambda: sage_core.block_mean(x, torch.empty(B, H, D), 4, 0), ValueError, "out: expected shape"),
    ]
    # Sliced / transposed / offset views (any strides are read; last dim must be contiguous).
    cases += [
        (lambda: _qint(big[..., :D:2], v, s), ValueError, "last dimension must be contiguous"),
        (lambda: _qint(big[..., :12], torch.empty(B, H, S, 12, dtype=torch.int8), s), ValueError,
         "multiple of 8"),
        (lambda: _qint(big[..., :D], v, s), ValueError, "CUDA tensor"),  # valid view: device error
        (lambda: _qint(x.transpose(1, 2), v, s), ValueError, r"values: expected shape"),
        (lambda: _qint(x, torch.empty(B, H, S, 2 * D, dtype=torch.int8)[..., :D], s), ValueError,
         "contiguous"),
        (lambda: _qint(x, v, torch.empty(B, H, 2)[..., 1:]), ValueError, "scale: expected a contiguous"),
        (lambda: _qint(x, torch.empty(2 * B * H * S * D + 1, dtype=torch.int8)[1:1 + B * H * S * D].view(B, H, S, D),
                       s), ValueError, "aligned"),
        (lambda: sage_core.quant_fp4(_f16(4, 64)[:, :32], torch.empty(4, 16, dtype=torch.uint8),
                                     torch.empty(4, 2, dtype=torch.uint8), torch.empty(()), "nvfp4", False, 0),
         ValueError, "CUDA tensor"),
        (lambda: sage_core.quant_fp4(torch.tensor(1.0, dtype=torch.float16), torch.empty(1, dtype=torch.uint8),
                                     torch.empty(1, dtype=torch.uint8), torch.empty(()), "nvfp4", False, 0),
         ValueError, "1 to 4 dimensions"),
        (lambda: sage_core.quant_fp4(_f16(1, 1, 1, 1, 32), torch.empty(1, 16, dtype=torch.uint8),
                                     torch.empty(1, 2, dtype=torch.uint8), torch.empty(1, 1, 1), "nvfp4", False, 0),
         ValueError, "1 to 4 dimensions"),
        (lambda: sage_core.quant_fp4(_f16(3, 32), torch.empty(3, 16, dtype=torch.uint8),
                                     torch.empty(3, 2, dtype=torch.uint8), torch.empty(()), "fp5", False, 0),
         ValueError, "fmt"),
    ]
    # dtypes, numpy inputs, options.
    cases += [
        (lambda: _qint(x.float(), v, s), TypeError, "accepted: float16, bfloat16"),
        (lambda: _qint(x, v.to(torch.uint8), s), TypeError, "accepted: int8"),
        (lambda: _qint(x, v, s, bits=5), ValueError, "bits must be 8 or 4"),
        (lambda: _qint(x, v, s, granularity="per_row"), ValueError, "granularity must be one of"),
        (lambda: _qint(x, v, s, role="v"), ValueError, "role must be"),
        (lambda: sage_core.token_mean(np.zeros((H, S, D), dtype=np.float16), np.zeros((B, H, D), dtype=np.float32), 0),
         ValueError, "4-D"),
        (lambda: sage_core.token_mean(np.zeros((B, H, S, D), dtype=np.float16), np.zeros((B, H, D), dtype=np.float32),
                                      0), ValueError, "CUDA tensor"),
    ]
    return cases


def _family_cases():
    """CPU tensors into the attention bindings of the build: every one must raise (device)."""
    cases = []
    i8 = torch.zeros(1, 2, 16, 64, dtype=torch.int8)
    f16 = torch.zeros(1, 2, 16, 64, dtype=torch.float16)
    sc = torch.ones(1, 2, 1)
    if hasattr(sage_core._C, "attn_fwd_sm80_qk_s8_pv_f16"):
        kw = dict(q_granularity="per_block", q_block=128, k_granularity="per_block", k_block=64,
                  softmax_scale=0.125, is_causal=False, stream=0)
        fn = sage_core._C.attn_fwd_sm80_qk_s8_pv_f16
        cases += [
            (lambda: fn(i8, i8, f16, f16, None, sc, sc, **kw), ValueError, "CUDA"),
            (lambda: fn(i8[..., :32], i8[..., :32], f16[..., :32], f16[..., :32], None, sc, sc, **kw), ValueError,
             "CUDA"),
            (lambda: fn(i8[0], i8[0], f16[0], f16[0], None, sc, sc, **kw), ValueError, "CUDA"),
            (lambda: fn(i8, i8, f16, torch.tensor(0.0, dtype=torch.float16), None, sc, sc, **kw), ValueError, "CUDA"),
        ]
    if hasattr(sage_core._C, "attn_fwd_sm90_qk_s8_pv_e4m3"):
        fn90 = sage_core._C.attn_fwd_sm90_qk_s8_pv_e4m3
        u8 = torch.zeros(1, 2, 64, 128, dtype=torch.uint8)
        cases += [
            (lambda: fn90(i8, i8, u8, sc, sc, sc, f16, None, 16, 0.125, False, 0), ValueError, "CUDA"),
            (lambda: fn90(i8[0], i8[0], u8[0], sc, sc, sc, f16[0], None, 16, 0.125, False, 0), ValueError, "CUDA"),
            (lambda: fn90(i8[..., :32], i8, u8, sc, sc, sc, f16, None, 16, 0.125, False, 0), ValueError, "CUDA"),
        ]
    if hasattr(sage_core._C, "quant_qkv_sm90_fused"):
        fq = sage_core._C.quant_qkv_sm90_fused
        cases += [
            (lambda: fq(f16[0], f16, f16, i8, sc, i8, sc, i8, sc, sc, False, sc, 0), ValueError, "CUDA"),
            (lambda: fq(f16[..., :32], f16[..., :32], f16[..., :32], i8, sc, i8, sc, i8, sc, sc, False, sc, 0),
             ValueError, "CUDA"),
        ]
    return cases


@needs_quant
def test_long_bad_input_sequence_raises_every_time():
    cases = _quant_cases() + _family_cases()
    for rnd in range(ROUNDS):
        for i, (call, exc, pattern) in enumerate(cases):
            with pytest.raises(exc, match=pattern):
                call()
            if i % 20 == 0:
                gc.collect()
        # A valid-up-to-the-device call still raises the device error after all that.
        x = _f16(B, H, S, D)
        with pytest.raises(ValueError, match="CUDA tensor"):
            _qint(x, torch.empty(B, H, S, D, dtype=torch.int8), torch.empty(B, H, 1))
        assert rnd >= 0
