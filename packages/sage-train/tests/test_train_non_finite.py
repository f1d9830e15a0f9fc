"""A NaN/Inf in dO stays where exact attention's gradient has it (sage_quant.emulation.train_s8,
"Non-finite values"): dQ row r, dK rows of the keys query r sees, dV channel c of those keys.

Before the fix one NaN at dO[r, c] made all 128 rows of r's query block of dQ NaN (the per-tile dS
scale) and every channel of every key of dV and dK NaN (the per-block dO scale, and masked tiles
multiplying that NaN by zero)."""

import math
import warnings

import pytest
import torch

import sage_train
from sage_quant.metrics import cosine

B, H, SQ, SKV, D = 1, 4, 200, 150, 32  # two query blocks, three KV blocks, partial tiles


def _grads_f64(q, k, v, do, causal):
    """float64 autograd (bhsd); a masked score gets no gradient (masked_fill), as in FlashAttention."""
    rep = q.shape[1] // k.shape[1]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = q64 @ k64.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        allowed = torch.arange(SKV)[None, :] <= torch.arange(SQ)[:, None] + (SKV - SQ)
        s = s.masked_fill(~allowed, -math.inf)
    o = torch.softmax(s, -1).nan_to_num(0.0) @ v64.repeat_interleave(rep, 1)  # rows that see no key: 0
    return torch.autograd.grad(o, (q64, k64, v64), do.double())


@pytest.mark.parametrize(
    "causal,layout,hkv,dp_precision,bad,row,chan",
    [
        (False, "bhsd", 4, "fp16", float("nan"), 70, 5),
        (True, "bshd", 2, "fp16", float("inf"), 70, 5),  # GQA: the kv head sums two q heads
        (True, "bhsd", 1, "int8", float("nan"), 130, 31),  # MQA, second query block, INT8 dP
        (True, "bhsd", 2, "fp16", float("-inf"), 49, 0),  # causal: row 49 sees no key (SQ > SKV)
    ],
)
def test_non_finite_do_stays_in_its_rows_and_channels(seed, causal, layout, hkv, dp_precision, bad, row, chan):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, SQ, D, generator=g).bfloat16()
    k = torch.randn(B, hkv, SKV, D, generator=g).bfloat16()
    v = torch.randn(B, hkv, SKV, D, generator=g).bfloat16()
    do = torch.randn(B, H, SQ, D, generator=g).bfloat16()
    head = 1
    do[0, head, row, chan] = bad
    t = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(1, 2).contiguous())
    xs = [t(x).requires_grad_() for x in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_train.SageTrainFallbackWarning)
        o = sage_train.attention(*xs, is_causal=causal, layout=layout, dp_precision=dp_precision)
    assert torch.isfinite(o).all()
    o.backward(t(do))
    dq, dk, dv = (t(x.grad) for x in xs)  # back to bhsd

    kv_head = head // (H // hkv)
    last_key = row + SKV - SQ if causal else SKV - 1  # query `row` sees keys 0..last_key
    want_dq = torch.zeros(dq.shape, dtype=torch.bool)
    want_dk = torch.zeros(dk.shape, dtype=torch.bool)
    want_dv = torch.zeros(dv.shape, dtype=torch.bool)
    if last_key >= 0:
        want_dq[0, head, row] = True
        want_dk[0, kv_head, : last_key + 1] = True
        want_dv[0, kv_head, : last_key + 1, chan] = True
    for name, grad, want in (("dq", dq, want_dq), ("dk", dk, want_dk), ("dv", dv, want_dv)):
        got = ~torch.isfinite(grad)
        assert torch.equal(got, want), (f"seed={seed}: {name} non-finite at {got.nonzero().tolist()[:8]}... "
                                        f"({int(got.sum())} entries), expected {int(want.sum())}")
        assert not torch.isinf(grad).any(), f"{name}: non-finite entries must be NaN"

    # Everything else keeps the recipe's accuracy: compare with exact gradients of the same dO
    # with the bad entry set to 0, which changes none of the finite entries' exact values.
    do0 = do.clone()
    do0[0, head, row, chan] = 0
    for name, grad, want, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), (want_dq, want_dk, want_dv),
                                     _grads_f64(q, k, v, do0, causal)):
        c = cosine(grad[~want], ref[~want])
        assert c > 0.99, f"seed={seed}: {name} cos of the finite entries {c:.5f}"


def test_finite_do_is_unchanged_by_the_rule(seed):
    """The same call with one NaN elsewhere (another head) leaves this head's gradients as they were,
    except that the NaN head's block and tile scales see finite values only."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, 2, 96, D, generator=g).bfloat16() for _ in range(4))
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    ys = [x.clone().requires_grad_() for x in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_train.SageTrainFallbackWarning)
        sage_train.attention(*xs, is_causal=True).backward(do)
        do_bad = do.clone()
        do_bad[0, 1, 3, 3] = float("nan")
        sage_train.attention(*ys, is_causal=True).backward(do_bad)
    for x, y in zip(xs, ys):
        assert torch.equal(x.grad[:, 0], y.grad[:, 0])  # head 0 never sees the NaN
