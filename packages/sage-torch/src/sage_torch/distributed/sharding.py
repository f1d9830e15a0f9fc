"""How a sequence is split across the ranks of a context-parallel group.

``contiguous``: rank ``r`` holds tokens ``[r * s / W, (r + 1) * s / W)``. Ulysses and the non-causal
ring use it.

``zigzag`` (the causal ring's load balance): the sequence is cut into ``2 W`` equal chunks and rank
``r`` holds chunks ``r`` and ``2 W - 1 - r``, concatenated in that order. Under a causal mask every
rank then owns one early and one late chunk, so every ring step costs every rank the same
(``ring.py`` explains the per-step blocks).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["SHARDINGS", "shard_sequence", "unshard_sequence", "zigzag_chunk_ids"]

SHARDINGS: tuple[str, ...] = ("contiguous", "zigzag")


def _check(x: torch.Tensor, world_size: int, rank: int, dim: int, sharding: str) -> int:
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    parts = world_size * (2 if sharding == "zigzag" else 1)
    s = x.shape[dim]
    if s % parts:
        raise ValueError(f"{sharding} sharding over {world_size} ranks cuts the sequence into {parts} equal "
                         f"chunks: its length along dim {dim} must be a multiple of {parts}, got {s}")
    return parts


def zigzag_chunk_ids(world_size: int, rank: int) -> tuple[int, int]:
    """The two chunks (of ``2 * world_size``) rank ``rank`` holds under zigzag sharding."""
    return rank, 2 * world_size - 1 - rank


def shard_sequence(x: torch.Tensor, world_size: int, rank: int, *, dim: int, sharding: str = "contiguous"
                   ) -> torch.Tensor:
    """Rank ``rank``'s part of the full sequence ``x`` along ``dim`` (contiguous copy)."""
    parts = _check(x, world_size, rank, dim, sharding)
    chunks = x.chunk(parts, dim=dim)
    if sharding == "contiguous":
        return chunks[rank].contiguous()
    a, b = zigzag_chunk_ids(world_size, rank)
    return torch.cat([chunks[a], chunks[b]], dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], *, dim: int, sharding: str = "contiguous") -> torch.Tensor:
    """The full sequence from every rank's part (``shards[r]`` = rank r's), inverse of :func:`shard_sequence`."""
    world_size = len(shards)
    if world_size < 1:
        raise ValueError("unshard_sequence needs at least one shard")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if sharding == "contiguous":
        return torch.cat(list(shards), dim=dim)
    chunks: list[torch.Tensor | None] = [None] * (2 * world_size)
    for r, shard in enumerate(shards):
        if shard.shape[dim] % 2:
            raise ValueError(f"a zigzag shard holds two equal chunks: its length along dim {dim} must be even, "
                             f"got {shard.shape[dim]} (rank {r})")
        a, b = zigzag_chunk_ids(world_size, r)
        chunks[a], chunks[b] = shard.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)
