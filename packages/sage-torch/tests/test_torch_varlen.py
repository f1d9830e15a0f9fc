"""attention_varlen / sageattn_varlen / the flash-attn wrappers and the padded-batch plan, on CPU.

The per-sequence path is checked against attention() of each sequence alone (bit for bit) and
against float64; the emulation against sage_quant.emulate per sequence (bit for bit); validation
before anything runs; the varlen backend entry (the one place a varlen kernel plugs in) with a fake.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import sage_torch
from sage_torch import _dispatch, varlen
from sage_torch.flash_attn import flash_attn_func, flash_attn_varlen_func
from sage_torch.integrations import padding

sage_quant = pytest.importorskip("sage_quant")

RECIPE = "qk_s8_pv_f16"


def _pack(lens_q, lens_k, *, h_q=4, h_kv=2, d=64, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, h_q, d, generator=gen).to(dtype)
    k = torch.randn(tk, h_kv, d, generator=gen).to(dtype)
    v = torch.randn(tk, h_kv, d, generator=gen).to(dtype)
    cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cq, ck


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
        return fn(*args, **kwargs)


# lengths with an empty sequence, single tokens, s_q > s_k (fully masked causal rows), s_k = 0
LENS_Q = [5, 0, 1, 7, 3, 2]
LENS_K = [5, 4, 1, 3, 0, 9]


@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_equals_each_sequence_alone(is_causal, seed):
    q, k, v, cq, ck = _pack(LENS_Q, LENS_K, seed=seed)
    o, lse = _quiet(sage_torch.attention_varlen, q, k, v, cq, ck, max(LENS_Q), max(LENS_K), is_causal=is_causal,
                    return_lse=True)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    for i in range(len(LENS_Q)):
        q0, q1, k0, k1 = int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])
        if q1 == q0:
            continue
        if k1 == k0:  # no keys: every row fully masked
            assert torch.equal(o[q0:q1], torch.zeros_like(o[q0:q1]))
            assert torch.isneginf(lse[:, q0:q1]).all()
            continue
        want, want_lse = _quiet(sage_torch.attention, q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], layout="bshd",
                                is_causal=is_causal, return_lse=True)
        assert torch.equal(o[q0:q1], want[0]), f"sequence {i}"
        assert torch.equal(lse[:, q0:q1], want_lse[0]), f"sequence {i}"
        ref, ref_lse = sage_quant.reference_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], layout="bshd",
                                                      is_causal=is_causal, return_lse=True)
        torch.testing.assert_close(o[q0:q1].double(), ref[0], atol=2e-2, rtol=2e-2)
        finite = torch.isfinite(ref_lse[0])
        torch.testing.assert_close(lse[:, q0:q1][finite].double(), ref_lse[0][finite], atol=1e-4, rtol=1e-4)
        assert torch.isneginf(lse[:, q0:q1][~finite]).all()  # bottom-right: rows i < s_q - s_k see nothing


# runs of equal-length sequences: (4, 4) x 3, an empty one, (6, 6) x 2, (3, 5)
RUN_LENS_Q = [4, 4, 4, 0, 6, 6, 3]
RUN_LENS_K = [4, 4, 4, 2, 6, 6, 5]


@pytest.mark.parametrize("recipe", ["auto", RECIPE])
@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_runs_of_equal_lengths_are_one_batch_each(recipe, is_causal, seed, monkeypatch):
    """Consecutive sequences of one length go to attention() as one (n, s, h, d) batch (one call per
    run; a uniform pack is one call), with the result of each sequence alone, bit for bit."""
    q, k, v, cq, ck = _pack(RUN_LENS_Q, RUN_LENS_K, seed=seed)
    shapes, real = [], sage_torch.attention

    def spy(qs, ks, vs, **kwargs):
        shapes.append(tuple(qs.shape))
        return real(qs, ks, vs, **kwargs)

    monkeypatch.setattr(varlen.api, "attention", spy)
    o, lse = _quiet(sage_torch.attention_varlen, q, k, v, cq, ck, 6, 6, is_causal=is_causal, recipe=recipe,
                    return_lse=True)
    assert shapes == [(3, 4, 4, 64), (2, 6, 4, 64), (1, 3, 4, 64)]
    for i in range(len(RUN_LENS_Q)):
        q0, q1, k0, k1 = int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])
        if q1 == q0:
            continue
        want, want_lse = _quiet(real, q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], layout="bshd",
                                is_causal=is_causal, recipe=recipe, return_lse=True)
        assert torch.equal(o[q0:q1], want[0]), f"sequence {i}"
        assert torch.equal(lse[:, q0:q1], want_lse[0]), f"sequence {i}"
    shapes.clear()
    qu, ku, vu, cqu, cku = _pack([5, 5, 5, 5], [5, 5, 5, 5], seed=seed)
    _quiet(sage_torch.attention_varlen, qu, ku, vu, cqu, cku, 5, 5, is_causal=is_causal, recipe=recipe)
    assert shapes == [(4, 5, 4, 64)]  # a uniform pack: one dense call


def test_varlen_emulation_runs_match_per_sequence(seed):
    """emulate_varlen (the oracle) batches the same runs: equal to sage_quant.emulate per sequence."""
    q, k, v, cq, ck = _pack(RUN_LENS_Q, RUN_LENS_K, seed=seed)
    o, lse = varlen.emulate_varlen(q, k, v, cq, ck, RECIPE, is_causal=True, return_lse=True)
    for i in range(len(RUN_LENS_Q)):
        q0, q1, k0, k1 = int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])
        if q1 == q0:
            continue
        want, want_lse = sage_quant.emulate(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], RECIPE, layout="bshd",
                                            is_causal=True, return_lse=True)
        assert torch.equal(o[q0:q1], want[0].to(o.dtype)), f"sequence {i}"
        assert torch.equal(lse[:, q0:q1], want_lse[0]), f"sequence {i}"


def test_varlen_causal_is_bottom_right_per_sequence(seed):
    # sequence 1 has 7 queries and 3 keys: its first 4 rows see no key, row 4 sees key 0 only
    q, k, v, cq, ck = _pack([2, 7], [2, 3], seed=seed)
    o = _quiet(sage_torch.attention_varlen, q, k, v, cq, ck, 7, 3, is_causal=True)
    assert torch.equal(o[2:6], torch.zeros_like(o[2:6]))
    kv_head = torch.arange(4) // 2
    torch.testing.assert_close(o[6].float(), v[2, kv_head].float(), atol=1e-2, rtol=1e-2)  # softmax over one key


@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_emulation_is_sage_quant_per_sequence(is_causal, seed):
    q, k, v, cq, ck = _pack(LENS_Q, LENS_K, seed=seed)
    o, lse = sage_torch.attention_varlen(q, k, v, cq, ck, 9, 9, is_causal=is_causal, return_lse=True, recipe=RECIPE,
                                         emulate=True)
    o2, lse2 = varlen.emulate_varlen(q, k, v, cq, ck, RECIPE, is_causal=is_causal, return_lse=True)
    assert torch.equal(o, o2) and torch.equal(lse.nan_to_num(), lse2.nan_to_num())
    i = 3  # one sequence by hand: its own quantization groups (K mean, scales) only
    q0, q1, k0, k1 = int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])
    want = sage_quant.emulate(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], RECIPE, layout="bshd",
                              is_causal=is_causal)
    assert torch.equal(o[q0:q1], want[0])


def test_varlen_per_sequence_warns_once_and_not_when_asked(seed):
    q, k, v, cq, ck = _pack([3, 4], [3, 4], seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sage_torch.attention_varlen(q, k, v, cq, ck, 4, 4)
        sage_torch.attention_varlen(q, k, v, cq, ck, 4, 4)
    notes = [str(w.message) for w in caught if "sequence by sequence" in str(w.message)]
    assert len(notes) == 1 and "attention_varlen" in notes[0]
    assert all(w.filename == __file__ for w in caught if "sequence by sequence" in str(w.message))
    _dispatch.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sage_torch.attention_varlen(q, k, v, cq, ck, 4, 4, recipe="torch")
        sage_torch.attention_varlen(q, k, v, cq, ck, 4, 4, recipe=RECIPE, emulate=True)
    assert not [w for w in caught if issubclass(w.category, sage_torch.SageFallbackWarning)]


def test_varlen_strict_on_cpu_raises_like_attention(seed):
    q, k, v, cq, ck = _pack([3, 4], [3, 4], seed=seed)
    with pytest.raises(sage_torch.SageDispatchError, match="strict"):
        sage_torch.attention_varlen(q, k, v, cq, ck, 4, 4, strict=True)


# ----------------------------------------------------------------------------- the varlen entry


class _FakeVarlen:
    def __init__(self, decline=False):
        self.calls, self.decline = [], decline

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal, scale, return_lse, **options):
        self.calls.append(dict(shape=tuple(q.shape), cu_q=cu_q.tolist(), max=(max_q, max_k), is_causal=is_causal,
                               scale=scale, return_lse=return_lse, options=options))
        if self.decline:
            return None
        o, lse = varlen.emulate_varlen(q, k, v, cu_q, cu_k, RECIPE, is_causal=is_causal, scale=scale, return_lse=True)
        return o, (lse if return_lse else None)


def test_varlen_backend_entry_runs_the_whole_pack(as_arch, fake_backend, seed):
    as_arch("sm90")
    fake = _FakeVarlen()
    dense = fake_backend("qk_s8_pv_e4m3", varlen=fake)
    q, k, v, cq, ck = _pack(LENS_Q, LENS_K, seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o, lse = sage_torch.attention_varlen(q, k, v, cq, ck, 12, 12, is_causal=True, return_lse=True, smooth_k=False)
    assert not [w for w in caught if issubclass(w.category, sage_torch.SageFallbackWarning)]
    assert dense.calls == [] and len(fake.calls) == 1
    call = fake.calls[0]
    assert call["shape"] == tuple(q.shape) and call["cu_q"] == cq.tolist() and call["max"] == (12, 12)
    assert call["is_causal"] is True and call["scale"] == pytest.approx(64 ** -0.5)
    assert call["options"] == {"smooth_k": False}
    assert lse.shape == (4, q.shape[0])
    assert sage_torch.info()["backends"][0]["varlen"] is True


def test_varlen_backend_entry_may_decline(as_arch, fake_backend, seed):
    as_arch("sm90")
    fake = _FakeVarlen(decline=True)
    dense = fake_backend("qk_s8_pv_e4m3", varlen=fake)
    q, k, v, cq, ck = _pack([3, 5], [3, 5], seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning, match="declined"):
        sage_torch.attention_varlen(q, k, v, cq, ck, 5, 5)
    assert len(fake.calls) == 1 and len(dense.calls) == 2  # then sequence by sequence on the dense kernel
    assert {c["shapes"] for c in dense.calls} == {((1, 3, 4, 64), (1, 3, 2, 64)), ((1, 5, 4, 64), (1, 5, 2, 64))}


def test_varlen_without_entry_runs_dense_kernel_per_sequence(as_arch, fake_backend, seed):
    as_arch("sm90")
    dense = fake_backend("qk_s8_pv_e4m3")
    q, k, v, cq, ck = _pack([3, 0, 5], [3, 2, 5], seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning, match="has no varlen kernel"):
        sage_torch.attention_varlen(q, k, v, cq, ck, 5, 5, is_causal=True)
    assert [c["layout"] for c in dense.calls] == ["bshd", "bshd"]


def test_varlen_backend_output_is_checked(as_arch, fake_backend, seed):
    as_arch("sm90")
    fake_backend("qk_s8_pv_e4m3", varlen=lambda q, *a, **kw: (q[:-1], None))
    q, k, v, cq, ck = _pack([3, 5], [3, 5], seed=seed)
    with pytest.raises(RuntimeError, match="varlen backend .* returned o"):
        sage_torch.attention_varlen(q, k, v, cq, ck, 5, 5)


def test_register_backend_rejects_non_callable_varlen():
    with pytest.raises(TypeError, match="varlen must be callable"):
        sage_torch.register_backend("bad", "qk_s8_pv_e4m3", ("sm90",), (64,), lambda *a, **k: None, lambda: True,
                                    varlen=3)


# ----------------------------------------------------------------------------- validation


def _good():
    return _pack([3, 5], [4, 2])


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: a.update(cq=torch.tensor([0, 6, 8], dtype=torch.int32)), ValueError, "max_seqlen_q = 5 is smaller"),
    (lambda a: a.update(cq=torch.tensor([0, 6, 2], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda a: a.update(cq=a["cq"].long()), ValueError, "dtype int32.*int64"),
    (lambda a: a.update(cq=a["cq"].float()), ValueError, "dtype int32"),
    (lambda a: a.update(cq=a["cq"].to("meta")), ValueError, "must be on q's device"),
    (lambda a: a.update(cq=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[-1\] = 7 must equal"),
    (lambda a: a.update(ck=torch.tensor([1, 4, 6], dtype=torch.int32)), ValueError, r"cu_seqlens_k\[0\] must be 0"),
    (lambda a: a.update(ck=torch.tensor([0, 6], dtype=torch.int32)), ValueError, "same number of sequences"),
    (lambda a: a.update(cq=torch.tensor([8], dtype=torch.int32)), ValueError, "length batch \\+ 1 >= 2"),
    (lambda a: a.update(cq=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "1-D"),
    (lambda a: a.update(cq=[0, 3, 8]), TypeError, "torch.Tensor of dtype int32"),
    (lambda a: a.update(max_k=3), ValueError, "max_seqlen_k = 3 is smaller.*sequence 0: 4 tokens"),
    (lambda a: a.update(max_q=5.0), TypeError, "max_seqlen_q must be an int"),
    (lambda a: a.update(max_q=True), TypeError, "max_seqlen_q must be an int"),
    (lambda a: a.update(q=a["q"][None]), ValueError, "3-D packed"),
    (lambda a: a.update(q=a["q"].float()), TypeError, "float32"),
    (lambda a: a.update(v=a["v"][:, :1]), ValueError, "same shape"),
    (lambda a: a.update(q=a["q"][:, :3]), ValueError, "multiple of kv heads"),
    (lambda a: a.update(k=a["k"][..., :32], v=a["v"][..., :32]), ValueError, "one head dim"),
])
def test_varlen_validation_before_any_launch(as_arch, fake_backend, mutate, exc, match):
    as_arch("sm90")
    fake = _FakeVarlen()
    dense = fake_backend("qk_s8_pv_e4m3", varlen=fake)
    q, k, v, cq, ck = _good()
    args = dict(q=q, k=k, v=v, cq=cq, ck=ck, max_q=5, max_k=4)
    mutate(args)
    with pytest.raises(exc, match=match):
        sage_torch.attention_varlen(args["q"], args["k"], args["v"], args["cq"], args["ck"], args["max_q"],
                                    args["max_k"])
    assert fake.calls == [] and dense.calls == []


def test_varlen_bad_options_and_grad_before_any_launch(as_arch, fake_backend):
    as_arch("sm90")
    fake = _FakeVarlen()
    fake_backend("qk_s8_pv_e4m3", varlen=fake)
    q, k, v, cq, ck = _good()
    with pytest.raises(TypeError, match="unknown recipe option"):
        sage_torch.attention_varlen(q, k, v, cq, ck, 5, 4, recipe="qk_s8_pv_e4m3", bogus=1)
    with pytest.raises(ValueError, match="kv_block"):
        sage_torch.attention_varlen(q, k, v, cq, ck, 5, 4, recipe="qk_s8_pv_e4m3", kv_block=7)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        sage_torch.attention_varlen(q, k, v, cq, ck, 5, 4, is_causal=1)
    with pytest.raises(RuntimeError, match="inference-only"):
        sage_torch.attention_varlen(q.requires_grad_(), k, v, cq, ck, 5, 4)
    assert fake.calls == []


def test_varlen_larger_max_seqlen_and_empty_pack_are_fine(seed):
    q, k, v, cq, ck = _pack([3, 5], [4, 2], seed=seed)
    o = _quiet(sage_torch.attention_varlen, q, k, v, cq, ck, 64, 64)
    assert o.shape == q.shape
    q0, k0, v0 = q[:0], k[:0], v[:0]
    z = torch.zeros(3, dtype=torch.int32)
    o, lse = sage_torch.attention_varlen(q0, k0, v0, z, z, 0, 0, return_lse=True)
    assert o.shape == (0, 4, 64) and lse.shape == (4, 0)


# ----------------------------------------------------------------------------- sageattn_varlen


def test_sageattn_varlen_signature_matches_sageattention():
    names = list(inspect.signature(sage_torch.sageattn_varlen).parameters)
    assert names == ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "is_causal",
                     "sm_scale", "smooth_k", "kwargs"]


def test_sageattn_varlen_runs_attention_varlen(as_arch, fake_backend, seed):
    as_arch("sm90")
    fake = _FakeVarlen()
    fake_backend("qk_s8_pv_e4m3", varlen=fake)
    q, k, v, cq, ck = _pack([3, 5], [4, 2], seed=seed)
    o = sage_torch.sageattn_varlen(q, k, v, cq.long(), ck.long(), 5, 4, True, 0.1, False)  # int64 accepted
    assert o.shape == q.shape
    assert fake.calls[0]["is_causal"] is True and fake.calls[0]["scale"] == 0.1
    assert fake.calls[0]["options"] == {"smooth_k": False}
    sage_torch.sageattn_varlen(q, k, v, cq, ck, 5, 4, pv_accum_dtype="fp32", smooth_v=False)
    assert fake.calls[1]["options"] == {"smooth_v": False}
    with pytest.raises(TypeError, match="no return_lse"):
        sage_torch.sageattn_varlen(q, k, v, cq, ck, 5, 4, return_lse=True)
    with pytest.raises(TypeError, match="sageattn_varlen\\(\\) does not accept qk_quant_gran"):
        sage_torch.sageattn_varlen(q, k, v, cq, ck, 5, 4, qk_quant_gran="per_warp")
    with pytest.raises(TypeError, match="unexpected keyword argument 'tensor_layout'"):
        sage_torch.sageattn_varlen(q, k, v, cq, ck, 5, 4, tensor_layout="NHD")
    with pytest.raises(ValueError, match="outside"):
        sage_torch.sageattn_varlen(q, k, v, cq.long() - 1, ck.long(), 5, 4)


# ----------------------------------------------------------------------------- flash-attn names


def test_flash_attn_func_bshd_names_and_lse(seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 9, 4, 64, generator=gen).bfloat16()
    k = torch.randn(2, 11, 2, 64, generator=gen).bfloat16()
    v = torch.randn(2, 11, 2, 64, generator=gen).bfloat16()
    out, lse, probs = _quiet(flash_attn_func, q, k, v, softmax_scale=0.2, causal=True, return_attn_probs=True)
    want, want_lse = _quiet(sage_torch.attention, q, k, v, layout="bshd", is_causal=True, scale=0.2, return_lse=True)
    assert probs is None and torch.equal(out, want) and torch.equal(lse, want_lse) and lse.shape == (2, 4, 9)
    plain = _quiet(sage_torch.attention, q, k, v, layout="bshd", is_causal=True, scale=0.2)
    assert torch.equal(_quiet(flash_attn_func, q, k, v, 0.0, 0.2, True, deterministic=True), plain)
    for kwargs, match in ((dict(dropout_p=0.1), "dropout_p"), (dict(window_size=(8, 0)), "window_size"),
                          (dict(softcap=30.0), "softcap"), (dict(alibi_slopes=torch.ones(4)), "alibi_slopes")):
        with pytest.raises(ValueError, match=match):
            flash_attn_func(q, k, v, **kwargs)


def test_flash_attn_varlen_func(seed):
    q, k, v, cq, ck = _pack([3, 5], [4, 2], seed=seed)
    out, lse, probs = _quiet(flash_attn_varlen_func, q, k, v, cq, ck, 5, 4, softmax_scale=0.3, causal=True,
                             return_attn_probs=True)
    want, want_lse = _quiet(sage_torch.attention_varlen, q, k, v, cq, ck, 5, 4, scale=0.3, is_causal=True,
                            return_lse=True)
    assert probs is None and torch.equal(out, want) and torch.equal(lse.nan_to_num(), want_lse.nan_to_num())
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(q, k, v, cq, ck, 5, 4, block_table=torch.zeros(1))


# ----------------------------------------------------------------------------- padded batches


def _sdpa_mask(valid: torch.Tensor, q_len: int, causal: bool) -> torch.Tensor:
    """transformers' sdpa mask: (b, 1, q_len, kv_len) bool; queries are the last q_len positions."""
    b, kv_len = valid.shape
    rows = torch.arange(q_len)[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len)[None, :]
    m = valid[:, None, :].expand(b, q_len, kv_len)
    if causal:
        m = m & (cols <= rows)[None]
    return m[:, None]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len", [10, 1, 4])
def test_padding_plan_matches_sdpa_with_the_mask(causal, q_len, seed):
    kv_len = 10
    valid = torch.ones(3, kv_len, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    valid[2, 7:] = False  # right padding
    if q_len < kv_len and causal:
        valid[2, 7:] = True  # decode / chunked prefill: right padding only at the end of a prompt
    mask = _sdpa_mask(valid, q_len, causal)
    plan = padding.padding_plan(mask, q_len, kv_len)
    assert plan is not None and plan.causal == (causal and q_len > 1)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 4, q_len, 64, generator=gen).bfloat16()
    k = torch.randn(3, 2, kv_len, 64, generator=gen).bfloat16()
    v = torch.randn(3, 2, kv_len, 64, generator=gen).bfloat16()
    out = _quiet(padding.run_padded, plan, q, k, v, scale=None)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                           enable_gqa=True).transpose(1, 2)
    rows = mask[:, 0].any(dim=2) if not plan.causal else valid[:, kv_len - q_len:]
    torch.testing.assert_close(out[rows].float(), ref[rows], atol=2e-2, rtol=2e-2)
    assert torch.equal(out[~rows], torch.zeros_like(out[~rows]))


def test_padding_plan_refuses_what_is_more_than_padding():
    valid = torch.ones(2, 8, dtype=torch.bool)
    causal = _sdpa_mask(valid, 8, True)
    window = causal & (torch.arange(8)[None, :] > torch.arange(8)[:, None] - 3)  # sliding window of 3
    assert padding.padding_plan(window, 8, 8) is None
    packed = causal.clone()
    packed[:, :, 4:, :4] = False  # two documents in one row
    assert padding.padding_plan(packed, 8, 8) is None
    assert padding.padding_plan(causal.float(), 8, 8) is None  # additive masks stay on SDPA
    assert padding.padding_plan(causal.expand(2, 2, 8, 8), 8, 8) is None  # per-head masks
    top_left = torch.ones(8, 12, dtype=torch.bool).tril()[None, None].expand(2, 1, 8, 12)  # static-cache prefill
    assert padding.padding_plan(top_left, 8, 12) is None


def test_cached_padding_plan_reuses_one_mask_object():
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, :2] = False
    mask = _sdpa_mask(valid, 6, True)
    first = padding.cached_padding_plan(mask, 6, 6)
    assert padding.cached_padding_plan(mask, 6, 6) is first
    mask[1, 0, 5, 0] = False  # changed in place: planned again (and now it is not padding)
    assert padding.cached_padding_plan(mask, 6, 6) is None
    assert first.max_seqlen_q == 6 and first.cu_seqlens_q.tolist() == [0, 4, 10]


def test_padded_decode_that_auto_sends_to_sdpa_keeps_one_masked_sdpa_call(as_arch, fake_backend, monkeypatch, seed):
    """recipe="auto" runs decode-shaped calls on PyTorch's SDPA (AUTO_TORCH_RULES): a padded decode
    batch then stays one SDPA call with the mask instead of one call per sequence."""
    from sage_torch import api
    from sage_torch._torch_fallback import TORCH_SDPA
    as_arch("sm90")
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cuda", "cpu"))
    dense = fake_backend("qk_s8_pv_e4m3", name="sm90_qk_s8_pv_e4m3")  # the name auto's rule is for
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 1, 64, generator=gen).bfloat16()
    k = torch.randn(2, 2, 9, 64, generator=gen).bfloat16()
    v = torch.randn(2, 2, 9, 64, generator=gen).bfloat16()
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :3] = False

    class Module(torch.nn.Module):
        is_causal = True
    with pytest.warns(sage_torch.SageFallbackWarning, match="attn_mask is given"):
        out, _ = sage_torch.hf_attention_forward(Module(), q, k, v, mask)
    assert dense.calls == []
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2))
    # a prefill of the same batch is a kernel call: the varlen route
    q = torch.randn(2, 4, 96, 64, generator=gen).bfloat16()
    k = torch.randn(2, 2, 96, 64, generator=gen).bfloat16()
    monkeypatch.setattr(sage_torch._dispatch, "AUTO_TORCH_RULES", {})
    mask = torch.ones(2, 1, 96, 96, dtype=torch.bool).tril()
    mask[1, ..., :3] = False
    _quiet(sage_torch.hf_attention_forward, Module(), q, k, k, mask)
    assert [c["shapes"][0] for c in dense.calls] == [(1, 96, 4, 64), (1, 93, 4, 64)]
