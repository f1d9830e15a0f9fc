"""sage_quant.kernels (torch wrappers over sage_core) on any machine: same signatures as the
references, availability reporting, clear errors before any launch."""

import inspect

import pytest
import torch

sage_quant = pytest.importorskip("sage_quant")
from sage_quant import kernels as K  # noqa: E402
from sage_quant import reference as R  # noqa: E402

FUNCS = ["token_mean", "block_mean", "quant_int", "quant_v_e4m3_t", "quant_v_s8", "quant_fp4"]


@pytest.mark.parametrize("name", FUNCS)
def test_signature_matches_reference(name):
    got = inspect.signature(getattr(K, name))
    want = inspect.signature(getattr(R, name))
    assert list(got.parameters) == list(want.parameters), name
    for p, q in zip(got.parameters.values(), want.parameters.values()):
        assert p.kind == q.kind and p.default == q.default, (name, p, q)


def test_available_contract():
    assert set(K.OPS) == set(FUNCS)
    with pytest.raises(ValueError, match="op must be None or one of"):
        K.available("nope")
    for op in FUNCS:
        assert isinstance(K.available(op), bool)
    if not torch.cuda.is_available():
        assert K.available() is False


def _has_quant_kernels():
    try:
        import sage_core

        return sage_core.has_kernel("quant_int8")
    except ImportError:
        return False


@pytest.mark.skipif(not _has_quant_kernels(), reason="sage_core built without the quant kernels")
def test_errors_before_launch_on_cpu_tensors():
    x16 = torch.randn(1, 2, 5, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        K.quant_int(x16)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        K.token_mean(x16)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        K.quant_v_e4m3_t(x16, "bshd")
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        K.quant_fp4(x16)
    with pytest.raises(TypeError, match="accepted: float16, bfloat16"):
        K.quant_v_s8(x16.float())
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        K.quant_int(x16, bits=2)
    with pytest.raises(ValueError, match="granularity must be one of"):
        K.quant_int(x16, granularity="per_row")
    with pytest.raises(ValueError, match="fmt must be 'nvfp4' or 'mxfp4'"):
        K.quant_fp4(x16, "fp4")
    with pytest.raises(ValueError, match="layout must be one of"):
        K.token_mean(torch.randn(1, 2, 5, 64, dtype=torch.float16), "hsd")
