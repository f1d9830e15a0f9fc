"""Bad input gets the inference API's errors: sage_train.attention vs sage_torch.attention, case by case."""

import warnings

import pytest
import torch

import sage_torch
import sage_train
from sage_quant.emulation.train_s8 import train_s8_forward

Q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
KV1 = torch.randn(1, 1, 8, 16, dtype=torch.bfloat16)

# name -> (q, k, v, keywords); every one is rejected by both APIs
BAD = {
    "layout": (Q, Q, Q, dict(layout="sbhd")),
    "layout-not-str": (Q, Q, Q, dict(layout=None)),
    "is_causal-int": (Q, Q, Q, dict(is_causal=1)),
    "is_causal-str": (Q, Q, Q, dict(is_causal="yes")),
    "scale-negative": (Q, Q, Q, dict(scale=-0.5)),
    "scale-nan": (Q, Q, Q, dict(scale=float("nan"))),
    "scale-str": (Q, Q, Q, dict(scale="0.1")),
    "scale-bool": (Q, Q, Q, dict(scale=True)),
    "v-not-tensor": (Q, Q, [1.0], {}),
    "q-3d": (Q[0], Q, Q, {}),
    "k-5d": (Q, Q[None], Q, {}),
    "dtype-float64": (Q.double(), Q.double(), Q.double(), {}),
    "dtype-int": (Q.int(), Q.int(), Q.int(), {}),
    "dtypes-differ": (Q, Q.half(), Q, {}),
    "batch-differs": (Q, torch.cat([Q, Q]), torch.cat([Q, Q]), {}),
    "k-head-dim": (Q, Q[..., :8], Q, {}),
    "kv-lengths-differ": (Q, Q, Q[:, :, :5], {}),
    "kv-heads-differ": (Q, Q, KV1, {}),
    "empty-q": (Q[:, :, :0], Q, Q, {}),
    "empty-kv": (Q, Q[:, :, :0], Q[:, :, :0], {}),
    "gqa-not-a-multiple": (torch.randn(1, 3, 8, 16, dtype=torch.bfloat16), Q, Q, {}),
    "bshd-gqa": (Q.transpose(1, 2), torch.randn(1, 8, 4, 16, dtype=torch.bfloat16),
                 torch.randn(1, 8, 4, 16, dtype=torch.bfloat16), dict(layout="bshd")),
}
# The accepted-dtype list differs (sage_train also takes float32), and so does the head-dim rule
# (v may have its own head dim in training): there the message matches up to that part.
DIFFERENT_TAIL = {"dtype-float64": "; accepted:", "dtype-int": "; accepted:", "k-head-dim": ";"}


def _error(fn, q, k, v, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn(q, k, v, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the exception is what is compared
            return exc
    return None


@pytest.mark.parametrize("case", sorted(BAD))
def test_same_error_as_the_inference_api(case):
    q, k, v, kwargs = BAD[case]
    with torch.no_grad():
        inference = _error(sage_torch.attention, q, k, v, kwargs)
    training = _error(sage_train.attention, q, k, v, kwargs)
    assert inference is not None and training is not None, (inference, training)
    assert type(training) is type(inference), (training, inference)
    a, b = str(training), str(inference)
    if case in DIFFERENT_TAIL:
        cut = DIFFERENT_TAIL[case]
        a, b = a.split(cut)[0], b.split(cut)[0]
    assert a == b


def test_what_training_accepts_beyond_the_inference_api(seed):
    """float32, a v head dim of its own, a non-contiguous last dim: the emulation runs them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 20, 16, generator=g)
    k = torch.randn(1, 2, 20, 16, generator=g)
    v = torch.randn(1, 2, 20, 24, generator=g)
    strided = torch.randn(1, 2, 16, 20, generator=g).transpose(-1, -2)  # last-dim stride 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for args in ((q, k, v), (q.bfloat16(), strided.bfloat16(), k.bfloat16())):
            with torch.no_grad(), pytest.raises((TypeError, ValueError)):
                sage_torch.attention(*args)
            o = sage_train.attention(*args)
            assert torch.equal(o, train_s8_forward(*(x.contiguous() for x in args))[0])
    assert o.shape == (1, 2, 20, 16)


def test_train_only_arguments():
    with pytest.raises(ValueError, match=r"dp_precision must be one of \('fp16', 'int8'\), got 'bf16'"):
        sage_train.attention(Q, Q, Q, dp_precision="bf16")
    with pytest.raises(TypeError, match="smooth_k must be True or False, got 1"):
        sage_train.attention(Q, Q, Q, smooth_k=1)
    with pytest.raises(TypeError, match="emulate must be True, False or None"):
        sage_train.attention(Q, Q, Q, emulate="yes")
    with pytest.raises(TypeError, match="unexpected keyword argument 'recipe'"):
        sage_train.attention(Q, Q, Q, recipe="train_s8")
