"""Context parallelism on GPUs with NCCL (issue 11 item 4, issue 14; not run on the CPU machines).

* one GPU, world size 1 (in this process): ring and Ulysses through sage's kernels equal sage's
  attention of the whole sequence (one block: bit for bit), causal and not, GQA;
* every visible GPU (needs >= 2; spawned processes, NVLink multicast off): each rank's shard vs
  float32 attention of the whole sequence, within the recipe's error (rel-L1 at most 1.5x that of
  single-GPU sage plus 2e-3), ring (zigzag causal and non-causal) and Ulysses;
* the benchmark of ci/context_parallel.sh on one GPU with small sizes (its flash-SDPA LSE check,
  the reference checks and the JSON).
"""

from __future__ import annotations

import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist

import sage_torch
from sage_torch import _dispatch
from sage_torch.distributed import ring_attention, shard_sequence, ulysses_attention

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _qkv(s, *, h_q=8, h_kv=2, d=128, seed=0, device="cuda"):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(torch.randn(1, s, h, d, generator=gen).to(device, torch.bfloat16) for h in (h_q, h_kv, h_kv))


def _rel_l1(a, ref):
    return float((a.double() - ref.double()).abs().sum() / ref.double().abs().sum())


@pytest.fixture
def nccl_world_of_one(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.update(MULTICAST_OFF)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True])
def test_world_of_one_is_sage_attention(nccl_world_of_one, monkeypatch, is_causal):
    monkeypatch.setattr(_dispatch, "AUTO_TORCH_RULES", {})  # sage's kernel for every block, however small
    q, k, v = _qkv(8192, h_q=32, h_kv=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
        want, want_lse = sage_torch.attention(q, k, v, layout="bshd", is_causal=is_causal, return_lse=True)
        o, lse = ring_attention(q, k, v, is_causal=is_causal, return_lse=True)
        assert torch.equal(o, want) and torch.equal(lse, want_lse)
        plain = sage_torch.attention(q, k, v, layout="bshd", is_causal=is_causal)
        assert torch.equal(ulysses_attention(q, k, v, is_causal=is_causal), plain)


def _worker(rank: int, world: int, store: str, result_dir: str) -> None:
    os.environ.update(MULTICAST_OFF)
    _dispatch.AUTO_TORCH_RULES.clear()  # this process only: sage's kernel for every block
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    try:
        s = 8192 * world
        q, k, v = _qkv(s, seed=5)
        lines = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
            for is_causal in (False, True):
                from sage_torch._torch_fallback import torch_attention
                ref, _ = torch_attention(q.float(), k.float(), v.float(), layout="bshd", is_causal=is_causal,
                                         scale=128 ** -0.5, return_lse=True)
                single = sage_torch.attention(q, k, v, layout="bshd", is_causal=is_causal)
                for scheme, sharding in (("ring", "zigzag" if is_causal else "contiguous"), ("ring", "contiguous"),
                                         ("ulysses", "contiguous")):
                    mine = [shard_sequence(t, world, rank, dim=1, sharding=sharding) for t in (q, k, v)]
                    if scheme == "ring":
                        o = ring_attention(*mine, is_causal=is_causal, sharding=sharding)
                    else:
                        o = ulysses_attention(*mine, is_causal=is_causal)
                    ref_mine = shard_sequence(ref, world, rank, dim=1, sharding=sharding)
                    err = _rel_l1(o, ref_mine)
                    single_mine = shard_sequence(single, world, rank, dim=1, sharding=sharding)
                    bound = 1.5 * _rel_l1(single_mine, ref_mine) + 2e-3
                    lines.append(f"{scheme} {sharding} causal={is_causal} rank {rank}: rel-L1 {err:.3e} "
                                 f"bound {bound:.3e}")
                    assert err <= bound, lines[-1]
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as fh:
            fh.write("\n".join(lines))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_every_visible_gpu_matches_single_gpu(tmp_path):
    world = torch.cuda.device_count()
    if world < 2:
        pytest.skip(f"needs >= 2 visible GPUs for a multi-GPU world, found {world} (the world of one runs above)")
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    assert len(list(tmp_path.glob("rank*.txt"))) == world


@pytest.mark.gpu
def test_benchmark_world_of_one_small(tmp_path, monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from sage_torch import bench_context_parallel as bench
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    result = bench.main(["--tokens", "8192", "16384", "--ref-tokens", "4096", "--heads", "8", "--warmup", "1",
                         "--iters", "2", "--out", str(tmp_path)])
    assert result["meta"]["backend"] == "nccl" and result["meta"]["sdpa_lse_check_max_abs"] < 1e-2
    assert all(c["ok"] for c in result["checks"]), result["checks"]
    assert (tmp_path / "context_parallel.json").exists()
    assert {(t["scheme"], t["impl"]) for t in result["timings"]} == {("ring", "sage"), ("ring", "sdpa"),
                                                                    ("ulysses", "sage"), ("ulysses", "sdpa")}
