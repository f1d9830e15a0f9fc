"""Every quant binding rejects bad arguments with TypeError/ValueError BEFORE any launch.

Runs on CPU-only machines: dtype/shape/stride checks come before the device check, so CPU
tensors with one thing wrong raise that thing; CPU tensors with everything else right raise the
device error. Nothing here can reach a kernel (there is no GPU), so a missing check would
surface as a RuntimeError (CUDA error) instead of the expected exception.
"""

import pytest

import sage_core

torch = pytest.importorskip("torch")

needs_quant = pytest.mark.skipif(
    not sage_core.has_kernel("quant_int8"),
    reason="sage_core built without the quant kernels (SAGE_CUDA_ARCHS=none)",
)
pytestmark = needs_quant

B, H, S, D = 1, 2, 5, 16


def f16(*shape):
    return torch.randn(*shape, dtype=torch.float16)


def qint(x, values, scale, mean=None, **kw):
    args = dict(bits=8, granularity="per_block", role="q", block=128, warp_rows=16, mean_block=128, stream=0)
    args.update(kw)
    return sage_core.quant_int(x, values, scale, mean, **args)


def good_qint_args():
    return f16(B, H, S, D), torch.empty(B, H, S, D, dtype=torch.int8), torch.empty(B, H, 1)


# ---- device ------------------------------------------------------------------------------------
def test_cpu_tensors_rejected_with_device_message():
    x, v, s = good_qint_args()
    with pytest.raises(ValueError, match=r"quant_int: x: expected a CUDA tensor.*got one on cpu"):
        qint(x, v, s)
    with pytest.raises(ValueError, match="CUDA tensor"):
        sage_core.token_mean(x, torch.empty(B, H, D), 0)
    with pytest.raises(ValueError, match="CUDA tensor"):
        sage_core.block_mean(x, torch.empty(B, H, 1, D), 64, 0)
    with pytest.raises(ValueError, match="CUDA tensor"):
        sage_core.quant_v_e4m3_t(x, torch.empty(B, H, D, 128, dtype=torch.uint8), torch.empty(B, H, D), None, 0)
    with pytest.raises(ValueError, match="CUDA tensor"):
        sage_core.quant_v_s8(x, torch.empty(B, H, S, D, dtype=torch.int8), torch.empty(B, H, D), 0)
    with pytest.raises(ValueError, match="CUDA tensor"):
        sage_core.quant_fp4(f16(4, 32), torch.empty(4, 16, dtype=torch.uint8),
                            torch.empty(4, 2, dtype=torch.uint8), torch.empty(()), "nvfp4", False, 0)


def test_numpy_arrays_rejected():
    np = pytest.importorskip("numpy")
    x = np.zeros((B, H, S, D), dtype=np.float16)
    with pytest.raises(ValueError, match="CUDA tensor"):
        sage_core.token_mean(x, np.zeros((B, H, D), dtype=np.float32), 0)


# ---- dtypes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.float64])
def test_input_dtype_rejected(dtype):
    _, v, s = good_qint_args()
    x = torch.zeros(B, H, S, D, dtype=dtype)
    with pytest.raises(TypeError, match=r"quant_int: x: dtype .* is not accepted; accepted: float16, bfloat16"):
        qint(x, v, s)
    with pytest.raises(TypeError, match="accepted: float16, bfloat16"):
        sage_core.token_mean(x, torch.empty(B, H, D), 0)
    with pytest.raises(TypeError, match="accepted: float16, bfloat16"):
        sage_core.quant_v_s8(x, torch.empty(B, H, S, D, dtype=torch.int8), torch.empty(B, H, D), 0)


def test_bf16_input_accepted_until_device_check():
    x = torch.randn(B, H, S, D, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA tensor"):
        qint(x, torch.empty(B, H, S, D, dtype=torch.int8), torch.empty(B, H, 1))


def test_output_dtype_rejected():
    x, _, s = good_qint_args()
    with pytest.raises(TypeError, match=r"quant_int: values: dtype uint8 is not accepted; accepted: int8"):
        qint(x, torch.empty(B, H, S, D, dtype=torch.uint8), s)
    with pytest.raises(TypeError, match=r"values: dtype int8 is not accepted; accepted: uint8"):
        qint(x, torch.empty(B, H, S, D // 2, dtype=torch.int8), s, bits=4)
    with pytest.raises(TypeError, match=r"scale: dtype float16 .* accepted: float32"):
        qint(x, torch.empty(B, H, S, D, dtype=torch.int8), torch.empty(B, H, 1, dtype=torch.float16))
    with pytest.raises(TypeError, match="accepted: float32"):
        sage_core.token_mean(x, torch.empty(B, H, D, dtype=torch.float64), 0)


def test_mean_dtype_rejected():
    x, v, s = good_qint_args()
    with pytest.raises(TypeError, match=r"mean: dtype float16"):
        qint(x, v, s, mean=torch.zeros(B, H, D, dtype=torch.float16))


# ---- shapes ------------------------------------------------------------------------------------
def test_input_rank_and_head_dim():
    _, v, s = good_qint_args()
    with pytest.raises(ValueError, match=r"expected a 4-D logical \(b, h, s, d\) tensor"):
        qint(f16(H, S, D), v, s)
    with pytest.raises(ValueError, match=r"head dim d must be a multiple of 8, got d=12"):
        qint(f16(B, H, S, 12), torch.empty(B, H, S, 12, dtype=torch.int8), s)
    with pytest.raises(ValueError, match=r"every dimension must be >= 1"):
        qint(f16(B, H, 0, D), torch.empty(B, H, 0, D, dtype=torch.int8), torch.empty(B, H, 0))


@pytest.mark.parametrize(
    "granularity,role,groups",
    [("per_tensor", "q", 1), ("per_block", "q", 1), ("per_warp", "q", 1), ("per_thread", "q", 8),
     ("per_thread", "k", 4), ("per_token", "k", S)],
)
def test_scale_shape_checked_per_granularity(granularity, role, groups):
    x, v, _ = good_qint_args()
    wrong = torch.empty(B, H, groups + 1)
    with pytest.raises(ValueError, match=rf"scale: expected shape \({B}, {H}, {groups}\), got \({B}, {H}, {groups + 1}\)"):
        qint(x, v, wrong, granularity=granularity, role=role)
    # The right shape passes every check up to the device check.
    with pytest.raises(ValueError, match="CUDA tensor"):
        qint(x, v, torch.empty(B, H, groups), granularity=granularity, role=role)


def test_values_shape_checked():
    x, _, s = good_qint_args()
    with pytest.raises(ValueError, match=r"values: expected shape \(1, 2, 5, 8\)"):
        qint(x, torch.empty(B, H, S, D, dtype=torch.uint8), s, bits=4)
    with pytest.raises(ValueError, match=r"values \(b, h, d, s_pad\): expected shape \(1, 2, 16, 128\)"):
        sage_core.quant_v_e4m3_t(x, torch.empty(B, H, D, S, dtype=torch.uint8), torch.empty(B, H, D), None, 0)
    with pytest.raises(ValueError, match=r"mean \(b, h, d\): expected shape \(1, 2, 16\)"):
        sage_core.quant_v_e4m3_t(x, torch.empty(B, H, D, 128, dtype=torch.uint8), torch.empty(B, H, D),
                                 torch.zeros(B, H, 1, D), 0)
    with pytest.raises(TypeError, match=r"quant_v_e4m3_t: mean: dtype float16"):
        sage_core.quant_v_e4m3_t(x, torch.empty(B, H, D, 128, dtype=torch.uint8), torch.empty(B, H, D),
                                 torch.zeros(B, H, D, dtype=torch.float16), 0)


def test_mean_shape_checked():
    x, v, s = good_qint_args()
    with pytest.raises(ValueError, match=r"mean: expected shape \(1, 2, 16\)"):
        qint(x, v, s, mean=torch.zeros(B, H + 1, D))
    with pytest.raises(ValueError, match=r"ceil\(s/mean_block\)"):
        qint(x, v, s, mean=torch.zeros(B, H, 3, D), mean_block=4)  # ceil(5/4) = 2
    with pytest.raises(ValueError, match="CUDA tensor"):
        qint(x, v, s, mean=torch.zeros(B, H, 2, D), mean_block=4)
    with pytest.raises(ValueError, match=r"mean must be \(b, h, d\)"):
        qint(x, v, s, mean=torch.zeros(D))


def test_mean_out_shapes():
    x = f16(B, H, S, D)
    with pytest.raises(ValueError, match=r"token_mean: out: expected shape \(1, 2, 16\)"):
        sage_core.token_mean(x, torch.empty(B, H, 1, D), 0)
    with pytest.raises(ValueError, match=r"block_mean: out: expected shape \(1, 2, 3, 16\)"):
        sage_core.block_mean(x, torch.empty(B, H, 2, D), 2, 0)
    with pytest.raises(ValueError, match="block must be a positive"):
        sage_core.block_mean(x, torch.empty(B, H, 2, D), 0, 0)


# ---- options -----------------------------------------------------------------------------------
def test_bad_options():
    x, v, s = good_qint_args()
    with pytest.raises(ValueError, match="bits must be 8 or 4, got 5"):
        qint(x, v, s, bits=5)
    with pytest.raises(ValueError, match="granularity must be one of"):
        qint(x, v, s, granularity="per_row")
    with pytest.raises(ValueError, match="role must be 'q' or 'k'"):
        qint(x, v, s, role="v")
    with pytest.raises(ValueError, match="per_warp' is defined for role 'q' only"):
        qint(x, v, s, granularity="per_warp", role="k")
    with pytest.raises(ValueError, match="block % 8 == 0"):
        qint(x, v, torch.empty(B, H, 4), granularity="per_thread", role="k", block=12)
    with pytest.raises(ValueError, match="block must be a positive"):
        qint(x, v, s, block=0)


# ---- strides / contiguity / alignment -------------------------------------------------------------
def test_strided_input_accepted_but_last_dim_must_be_contiguous():
    base = f16(B, S, H, D)  # bshd storage viewed as logical bhsd: accepted (device error next)
    _, v, s = good_qint_args()
    with pytest.raises(ValueError, match="CUDA tensor"):
        qint(base.transpose(1, 2), v, s)
    bad = f16(B, H, D, S).transpose(2, 3)  # last dim stride S
    with pytest.raises(ValueError, match=r"last dimension must be contiguous"):
        qint(bad, v, s)


def test_outputs_must_be_contiguous_and_aligned():
    x, _, s = good_qint_args()
    with pytest.raises(ValueError, match=r"values: expected a contiguous"):
        qint(x, torch.empty(B, H, D, S, dtype=torch.int8).transpose(2, 3), s)
    big = torch.empty(B * H * S * D + 1, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"values: data pointer must be 16-byte aligned"):
        qint(x, big[1:].view(B, H, S, D), s)


# ---- FP4 -----------------------------------------------------------------------------------------
def test_fp4_checks():
    x = f16(3, 64)
    p = torch.empty(3, 32, dtype=torch.uint8)
    ts = torch.empty(())  # NVFP4's FP32 tensor scale: one per matrix of the last two dims
    with pytest.raises(ValueError, match="fmt must be 'nvfp4' or 'mxfp4'"):
        sage_core.quant_fp4(x, p, torch.empty(3, 4, dtype=torch.uint8), ts, "fp4", False, 0)
    with pytest.raises(ValueError, match=r"groups of 32 .* n=48"):
        sage_core.quant_fp4(f16(3, 48), torch.empty(3, 24, dtype=torch.uint8),
                            torch.empty(3, 1, dtype=torch.uint8), ts, "mxfp4", False, 0)
    with pytest.raises(ValueError, match=r"scale: expected shape \(3, 4\)"):
        sage_core.quant_fp4(x, p, torch.empty(3, 2, dtype=torch.uint8), ts, "nvfp4", False, 0)
    with pytest.raises(ValueError, match=r"scale \(swizzled, 1-D\): expected shape \(512,\)"):
        sage_core.quant_fp4(x, p, torch.empty(3, 4, dtype=torch.uint8), ts, "nvfp4", True, 0)
    with pytest.raises(ValueError, match="CUDA tensor"):
        sage_core.quant_fp4(x, p, torch.empty(512, dtype=torch.uint8), ts, "nvfp4", True, 0)
    with pytest.raises(ValueError, match="1 to 4 dimensions"):
        sage_core.quant_fp4(torch.zeros(1, 1, 1, 1, 32, dtype=torch.float16),
                            torch.empty(1, 1, 1, 1, 16, dtype=torch.uint8),
                            torch.empty(1, 1, 1, 1, 2, dtype=torch.uint8), torch.empty(1, 1, 1), "nvfp4", False, 0)
    # tensor_scale: float32 of shape x.shape[:-2]
    x4 = f16(2, 3, 5, 32)
    p4, s4 = torch.empty(2, 3, 5, 16, dtype=torch.uint8), torch.empty(2, 3, 5, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"tensor_scale: expected shape \(2, 3\)"):
        sage_core.quant_fp4(x4, p4, s4, torch.empty(2, 3, 5), "nvfp4", False, 0)
    with pytest.raises(TypeError, match=r"tensor_scale.*float32"):
        sage_core.quant_fp4(x4, p4, s4, torch.empty(2, 3, dtype=torch.float16), "nvfp4", False, 0)
    with pytest.raises(ValueError, match="CUDA tensor"):
        sage_core.quant_fp4(x4, p4, s4, torch.empty(2, 3), "nvfp4", False, 0)
    # A transposed view (last dim strided) is accepted: V^T for SageAttention3.
    vt = f16(64, 3).t()
    with pytest.raises(ValueError, match="CUDA tensor"):
        sage_core.quant_fp4(vt, p, torch.empty(3, 4, dtype=torch.uint8), ts, "nvfp4", False, 0)