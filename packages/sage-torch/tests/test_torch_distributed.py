"""Context parallelism on CPU: the out/LSE merge, the sequence splits, and ring / Ulysses attention
over torch.distributed with the gloo backend (world size 1 in this process, world size 2 in two
spawned processes), each against single-process attention of the whole sequence.

On CPU sage's attention runs PyTorch's math with sage semantics (recipe "auto") or a recipe's
exact emulation (``emulate=True``); the same code runs sage's kernels on GPUs
(tests/gpu/test_context_parallel_gpu.py, ci/context_parallel.sh).
"""

from __future__ import annotations

import datetime
import math
import os
import warnings

import pytest
import torch

import sage_torch
from sage_torch.distributed import (LseAccumulator, merge_attention, ring_attention, shard_sequence,
                                    ulysses_attention, unshard_sequence)

sage_quant = pytest.importorskip("sage_quant")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this torch build", allow_module_level=True)

RECIPE = "qk_s8_pv_f16"


def _attn(q, k, v, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
        return sage_torch.attention(q, k, v, **kw)


def _qkv(b=1, s=32, s_kv=None, h_q=4, h_kv=2, d=64, layout="bshd", dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s_kv = s if s_kv is None else s_kv

    def make(h, n):
        x = torch.randn(b, n, h, d, generator=gen).to(dtype)
        return x if layout == "bshd" else x.transpose(1, 2).contiguous()
    return make(h_q, s), make(h_kv, s_kv), make(h_kv, s_kv)


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_merge_of_key_blocks_is_attention_over_all_keys(layout, seed):
    q, k, v = _qkv(s=16, s_kv=40, layout=layout, seed=seed)
    dim = 1 if layout == "bshd" else 2
    parts = [(k.narrow(dim, a, n), v.narrow(dim, a, n)) for a, n in ((0, 7), (7, 20), (27, 13))]
    outs, lses = zip(*[_attn(q, kb, vb, layout=layout, return_lse=True) for kb, vb in parts])
    o, lse = merge_attention(outs, lses, layout=layout)
    want, want_lse = _attn(q, k, v, layout=layout, return_lse=True)
    assert o.dtype == q.dtype and lse.dtype == torch.float32 and o.is_contiguous()
    torch.testing.assert_close(o, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    acc = LseAccumulator(tuple(q.shape), tuple(want_lse.shape), layout=layout, device=q.device)
    for o_i, lse_i in zip(outs, lses):
        acc.add(o_i, lse_i)
    o2, lse2 = acc.result(q.dtype)
    torch.testing.assert_close(o2, o, atol=1e-3, rtol=0)
    torch.testing.assert_close(lse2, lse, atol=1e-6, rtol=0)


def test_merge_handles_neg_inf_and_large_lse():
    o1 = torch.randn(1, 3, 2, 4)
    o2 = torch.randn(1, 3, 2, 4)
    lse1 = torch.tensor([[[-math.inf, 1000.0, -math.inf], [5.0, -math.inf, float("nan")]]])  # (b, h, s)
    lse2 = torch.tensor([[[-math.inf, 1000.0, 3.0], [5.0, -math.inf, 0.0]]])
    o, lse = merge_attention([o1, o2], [lse1, lse2], layout="bshd")
    assert torch.isneginf(lse[0, 0, 0]) and torch.equal(o[0, 0, 0], torch.zeros(4))  # no block sees row 0
    assert lse[0, 0, 1] == pytest.approx(1000.0 + math.log(2.0))  # no overflow
    torch.testing.assert_close(o[0, 1, 0], (o1[0, 1, 0] + o2[0, 1, 0]) / 2)
    torch.testing.assert_close(o[0, 2, 0], o2[0, 2, 0])  # one block sees it: that block's output
    assert torch.isneginf(lse[0, 1, 1]) and torch.equal(o[0, 1, 1], torch.zeros(4))
    assert torch.isnan(lse[0, 1, 2]) and torch.isnan(o[0, 2, 1]).all()  # NaN stays visible
    acc = LseAccumulator((1, 3, 2, 4), (1, 2, 3), layout="bshd", device=torch.device("cpu"))
    acc.add(o1, lse1)
    acc.add(o2, lse2)
    o_acc, lse_acc = acc.result(torch.float32)
    torch.testing.assert_close(o_acc.nan_to_num(), o.nan_to_num())
    torch.testing.assert_close(lse_acc.nan_to_num(), lse.nan_to_num())


def test_merge_thd_layout_and_errors():
    o = torch.randn(5, 2, 4)
    lse = torch.randn(2, 5)
    merged, merged_lse = merge_attention([o, o], [lse, lse], layout="thd")
    torch.testing.assert_close(merged, o)
    torch.testing.assert_close(merged_lse, lse + math.log(2.0))
    with pytest.raises(ValueError, match="shape \\(2, 5\\)"):
        merge_attention([o], [lse.t()], layout="thd")
    with pytest.raises(ValueError, match="layout must be one of"):
        merge_attention([o], [lse], layout="sbhd")
    with pytest.raises(ValueError, match="as many outputs as LSEs"):
        merge_attention([o, o], [lse], layout="thd")


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("sharding", ["contiguous", "zigzag"])
def test_shard_unshard_round_trip(sharding):
    x = torch.arange(2 * 24).reshape(2, 24)
    shards = [shard_sequence(x, 3, r, dim=1, sharding=sharding) for r in range(3)]
    assert torch.equal(unshard_sequence(shards, dim=1, sharding=sharding), x)
    if sharding == "zigzag":  # rank 0 holds chunks 0 and 5 of 6
        assert shards[0][0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]
    with pytest.raises(ValueError, match="multiple of"):
        shard_sequence(x[:, :23], 3, 0, dim=1, sharding=sharding)


def test_context_parallel_needs_an_initialised_group():
    q, k, v = _qkv(s=8)
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, k, v)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ulysses_attention(q, k, v)


# ----------------------------------------------------------------------------- ring and Ulysses under gloo


def _check_world(rank: int, world: int) -> None:
    """Every case, on this rank, against single-process attention of the whole sequence."""
    s = 8 * world * 2  # zigzag needs 2 * world chunks
    for layout in ("bshd", "bhsd"):
        dim = 1 if layout == "bshd" else 2
        for is_causal in (False, True):
            for sharding in (("zigzag", "contiguous") if is_causal else ("contiguous",)):
                q, k, v = _qkv(s=s, layout=layout, seed=11)
                want, want_lse = _attn(q, k, v, layout=layout, is_causal=is_causal, return_lse=True)
                mine = [shard_sequence(t, world, rank, dim=dim, sharding=sharding) for t in (q, k, v)]
                o, lse = ring_attention(*mine, is_causal=is_causal, layout=layout, sharding=sharding, return_lse=True)
                case = f"ring {layout} causal={is_causal} {sharding} rank {rank}/{world}"
                torch.testing.assert_close(o, shard_sequence(want, world, rank, dim=dim, sharding=sharding),
                                           atol=2e-3, rtol=2e-3, msg=lambda m, case=case: f"{case}: {m}")
                torch.testing.assert_close(lse, shard_sequence(want_lse, world, rank, dim=2, sharding=sharding),
                                           atol=1e-4, rtol=1e-4, msg=lambda m, case=case: f"{case} lse: {m}")
            for h_kv in (2, 1):  # GQA (kv heads split) and MQA (kv head repeated per rank)
                q, k, v = _qkv(s=s, h_kv=h_kv, layout=layout, seed=12)
                want, want_lse = _attn(q, k, v, layout=layout, is_causal=is_causal, return_lse=True)
                mine = [shard_sequence(t, world, rank, dim=dim) for t in (q, k, v)]
                o, lse = ulysses_attention(*mine, is_causal=is_causal, layout=layout, return_lse=True)
                case = f"ulysses {layout} causal={is_causal} h_kv={h_kv} rank {rank}/{world}"
                torch.testing.assert_close(o, shard_sequence(want, world, rank, dim=dim), atol=2e-3, rtol=2e-3,
                                           msg=lambda m, case=case: f"{case}: {m}")
                torch.testing.assert_close(lse, shard_sequence(want_lse, world, rank, dim=2), atol=1e-4, rtol=1e-4,
                                           msg=lambda m, case=case: f"{case} lse: {m}")
                plain = ulysses_attention(*mine, is_causal=is_causal, layout=layout)
                assert plain.shape == mine[0].shape and plain.is_contiguous()

    # non-causal cross-attention: K/V shards of another length
    q, k, v = _qkv(s=4 * world, s_kv=6 * world, seed=13)
    want = _attn(q, k, v, layout="bshd", return_lse=True)[0]
    mine = [shard_sequence(t, world, rank, dim=1) for t in (q, k, v)]
    torch.testing.assert_close(ring_attention(*mine), shard_sequence(want, world, rank, dim=1), atol=2e-3, rtol=2e-3)

    # the recipe's emulation per block: within the recipe's error of float64, like single-process
    q, k, v = _qkv(s=s, seed=14, dtype=torch.bfloat16)
    ref = sage_quant.reference_attention(q, k, v, layout="bshd", is_causal=True)
    single = sage_torch.attention(q, k, v, layout="bshd", is_causal=True, recipe=RECIPE, emulate=True)
    single_err = sage_quant.rel_l1(shard_sequence(single, world, rank, dim=1, sharding="zigzag"),
                                   shard_sequence(ref, world, rank, dim=1, sharding="zigzag"))
    mine = [shard_sequence(t, world, rank, dim=1, sharding="zigzag") for t in (q, k, v)]
    o = ring_attention(*mine, is_causal=True, recipe=RECIPE, emulate=True)
    ring_err = sage_quant.rel_l1(o, shard_sequence(ref, world, rank, dim=1, sharding="zigzag"))
    assert ring_err < 1.5 * single_err + 2e-3, (ring_err, single_err)
    # Ulysses runs one call on the whole sequence: the emulation's groups are per head, so bit for bit
    mine = [shard_sequence(t, world, rank, dim=1) for t in (q, k, v)]
    o = ulysses_attention(*mine, is_causal=True, recipe=RECIPE, emulate=True)
    assert torch.equal(o, shard_sequence(single, world, rank, dim=1)), f"ulysses emulation rank {rank}"

    # a per-block function of one's own (what the benchmark uses for the SDPA baseline)
    calls = []

    def block(q_, k_, v_, *, layout, is_causal, scale, return_lse):
        calls.append(is_causal)
        return _attn(q_, k_, v_, layout=layout, is_causal=is_causal, scale=scale, recipe="torch", return_lse=return_lse)
    q, k, v = _qkv(s=s, seed=15)
    mine = [shard_sequence(t, world, rank, dim=1, sharding="zigzag") for t in (q, k, v)]
    o = ring_attention(*mine, is_causal=True, attention_fn=block)
    assert calls == [True] + [False] * (world - 1)  # zigzag: one causal step, then full blocks
    want = _attn(q, k, v, layout="bshd", is_causal=True, recipe="torch", return_lse=True)[0]
    torch.testing.assert_close(o, shard_sequence(want, world, rank, dim=1, sharding="zigzag"), atol=2e-3, rtol=2e-3)


def _worker(rank: int, world: int, store_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _check_world(rank, world)
    finally:
        dist.destroy_process_group()


def test_ring_and_ulysses_world_size_1_in_process(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _check_world(0, 1)
        q, k, v = _qkv(s=16, seed=3)  # one rank: exactly sage's attention
        assert torch.equal(ring_attention(q, k, v, is_causal=True), _attn(q, k, v, layout="bshd", is_causal=True,
                                                                         return_lse=True)[0])
        assert torch.equal(ulysses_attention(q, k, v, is_causal=True), _attn(q, k, v, layout="bshd", is_causal=True))
        with pytest.raises(ValueError, match="zigzag shard is two equal chunks"):
            ring_attention(q[:, :15], k[:, :15], v[:, :15], is_causal=True)
        with pytest.raises(ValueError, match="one length"):
            ring_attention(q, k[:, :8], v[:, :8], is_causal=True)
        with pytest.raises(TypeError, match="either attention_fn or recipe"):
            ring_attention(q, k, v, attention_fn=lambda *a, **kw: None, recipe=RECIPE)
        with pytest.raises(ValueError, match="layout must be one of"):
            ulysses_attention(q, k, v, layout="sbhd")
    finally:
        dist.destroy_process_group()


def test_ring_and_ulysses_world_size_2_gloo(tmp_path):
    import torch.multiprocessing as mp
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def test_ulysses_head_count_errors(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        q, k, v = _qkv(s=8, h_q=6, h_kv=4)
        with pytest.raises(ValueError, match="multiple of kv heads"):
            ulysses_attention(q, k, v)
    finally:
        dist.destroy_process_group()
