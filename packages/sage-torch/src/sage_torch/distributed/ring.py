"""Ring attention over torch.distributed: each rank keeps its query shard and passes its K/V shard
around the ring; every step runs sage's attention on (local queries, one K/V block) with the LSE
and merges the result (``merge.LseAccumulator``).

Step ``t`` of ``W`` on rank ``r`` holds the K/V shard of rank ``src = (r - t) mod W``; the shard for
step ``t + 1`` is in flight (one batched isend/irecv: send to ``r + 1``, receive from ``r - 1``)
while step ``t`` computes.

Which block each step computes (``c`` = half the local length, chunks as in ``sharding.py``):

=================  ===================  =========================================================
mask / sharding    step                 block
=================  ===================  =========================================================
non-causal         every step           all local queries x all of src's keys
causal, zigzag     ``src == r``         all local queries x local keys, causal (chunk order is
                                        global order, so the square causal mask is exact)
causal, zigzag     ``src < r``          all local queries x src's *first* chunk (earlier than both
                                        of ours; its second chunk is later than both), full
causal, zigzag     ``src > r``          our *second* chunk x all of src's keys (both earlier than
                                        it; our first chunk is earlier than both), full
causal, contiguous ``src == r``         causal; ``src < r``: full; ``src > r``: nothing (unbalanced:
                                        rank ``W - 1`` works ``W`` steps, rank 0 one)
=================  ===================  =========================================================

With zigzag every step of every rank costs ``2c x 2c / 2`` scores (the causal diagonal step
``(2c)^2 / 2``): the causal ring is load balanced. Every block is quantized on its own (the K
smoothing mean, the scales), so ring attention over sage agrees with single-process sage within
the recipe's error, not bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import AttentionFn, block_attention_fn, check_qkv, group_rank_size, split_result
from .merge import LseAccumulator
from .sharding import SHARDINGS

__all__ = ["ring_attention", "RingComm", "NoCommRing"]


class RingComm:
    """Moves one tensor a step along the ring of ``group``: send to rank ``r + 1``, receive from
    ``r - 1`` (group ranks), both in one ``batch_isend_irecv`` (NCCL needs them grouped; gloo
    takes the same call)."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        to_global = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
        self.next_rank = to_global((self.rank + 1) % self.world_size)
        self.prev_rank = to_global((self.rank - 1) % self.world_size)

    def start(self, send: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Post the exchange of ``send`` (contiguous); returns (receive buffer, requests)."""
        recv = torch.empty_like(send)
        ops = [self._dist.P2POp(self._dist.isend, send, self.next_rank, self.group),
               self._dist.P2POp(self._dist.irecv, recv, self.prev_rank, self.group)]
        return recv, self._dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(pending: tuple[torch.Tensor, list]) -> torch.Tensor:
        recv, requests = pending
        for request in requests:
            request.wait()
        return recv


class NoCommRing:
    """A stand-in for :class:`RingComm` that moves nothing: every step sees the local K/V block.
    ``ring_attention(..., comm=NoCommRing(rank, world_size))`` runs rank ``rank``'s schedule of a
    ``world_size`` ring with the same block shapes and no communication (benchmarks: the ring's
    compute alone, and its balance across ranks). The result is not attention of anything."""

    def __init__(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"NoCommRing: need 0 <= rank < world_size, got {rank}, {world_size}")
        self.rank, self.world_size = rank, world_size

    def start(self, send: torch.Tensor) -> tuple[torch.Tensor, list]:
        return send, []

    @staticmethod
    def wait(pending: tuple[torch.Tensor, list]) -> torch.Tensor:
        return pending[0]


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None, is_causal: bool = False,
                   scale: float | None = None, layout: str = "bshd", sharding: str | None = None,
                   return_lse: bool = False, recipe: str = "auto", attention_fn: AttentionFn | None = None,
                   comm: RingComm | NoCommRing | None = None, **recipe_options: Any):
    """Attention over a sequence split across the ranks of ``group`` (forward only).

    Args:
        q: this rank's query shard, ``(b, s_local, h_q, d)`` for ``layout="bshd"`` (default) or
            ``(b, h_q, s_local, d)`` for ``"bhsd"``.
        k, v: this rank's K/V shard, same layout, ``h_kv`` heads (GQA/MQA as in
            :func:`sage_torch.attention`). Every rank passes the same shapes.
        group: the context-parallel process group (default: the world).
        is_causal: causal over the *global* sequence (q and K/V shards of one length).
        sharding: how the global sequence was split (``sharding.shard_sequence``): ``"zigzag"``
            (the default for causal: load balanced, shard length even) or ``"contiguous"`` (the
            default otherwise; for non-causal attention any split works).
        scale: softmax scale (default ``1/sqrt(d)``).
        return_lse: also return this shard's natural-log LSE, float32 ``(b, h_q, s_local)``.
        recipe, **recipe_options: the per-block :func:`sage_torch.attention` call's recipe.
        attention_fn: instead of sage's attention, this per-block function
            (``fn(q, k, v, *, layout, is_causal, scale, return_lse)``), e.g. a PyTorch SDPA one to
            compare against.
        comm: the ring's transport (default ``RingComm(group)``; ``group`` is then unused).

    Returns:
        This rank's output shard (q's shape, layout and dtype, contiguous), or ``(o, lse)``.
    """
    fn_name = "ring_attention"
    seq_dim, _ = check_qkv(fn_name, q, k, v, layout)
    block = block_attention_fn(recipe, attention_fn, **recipe_options)
    is_causal = bool(is_causal)
    if sharding is None:
        sharding = "zigzag" if is_causal else "contiguous"
    if sharding not in SHARDINGS:
        raise ValueError(f"{fn_name}: sharding must be one of {SHARDINGS}, got {sharding!r}")
    s_local, s_kv_local = q.shape[seq_dim], k.shape[seq_dim]
    if is_causal and s_local != s_kv_local:
        raise ValueError(f"{fn_name}: causal ring attention needs query and K/V shards of one length, got "
                         f"{s_local} and {s_kv_local}")
    if is_causal and sharding == "zigzag" and s_local % 2:
        raise ValueError(f"{fn_name}: a zigzag shard is two equal chunks: its length must be even, got {s_local}")
    if comm is None:
        rank, world = group_rank_size(fn_name, group)
        comm = RingComm(group) if world > 1 else None
    else:
        rank, world = comm.rank, comm.world_size

    b = q.shape[0]
    h_q = q.shape[2] if layout == "bshd" else q.shape[1]
    acc = LseAccumulator(tuple(q.shape), (b, h_q, s_local), layout=layout, device=q.device)
    half = s_local // 2
    kv = torch.stack([k, v]) if world > 1 else None  # one contiguous buffer per hop
    k_blk, v_blk = k, v
    for step in range(world):
        src = (rank - step) % world
        pending = comm.start(kv) if comm is not None and step + 1 < world else None
        if step == 0:
            o, lse = split_result(block(q, k_blk, v_blk, layout=layout, is_causal=is_causal, scale=scale,
                                        return_lse=True), fn_name)
            acc.add(o, lse)
        elif not is_causal:
            o, lse = split_result(block(q, k_blk, v_blk, layout=layout, is_causal=False, scale=scale,
                                        return_lse=True), fn_name)
            acc.add(o, lse)
        elif sharding == "zigzag" and src < rank:
            o, lse = split_result(block(q, k_blk.narrow(seq_dim, 0, half), v_blk.narrow(seq_dim, 0, half),
                                        layout=layout, is_causal=False, scale=scale, return_lse=True), fn_name)
            acc.add(o, lse)
        elif sharding == "zigzag":  # src > rank
            o, lse = split_result(block(q.narrow(seq_dim, half, s_local - half), k_blk, v_blk, layout=layout,
                                        is_causal=False, scale=scale, return_lse=True), fn_name)
            acc.add(o, lse, start=half)
        elif src < rank:  # contiguous causal: an earlier shard is seen whole, a later one not at all
            o, lse = split_result(block(q, k_blk, v_blk, layout=layout, is_causal=False, scale=scale,
                                        return_lse=True), fn_name)
            acc.add(o, lse)
        if pending is not None:
            kv = comm.wait(pending)
            k_blk, v_blk = kv[0], kv[1]
    o, lse = acc.result(q.dtype)
    return (o, lse) if return_lse else o
