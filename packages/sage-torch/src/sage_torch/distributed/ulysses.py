"""Ulysses (all-to-all) attention over torch.distributed.

Each rank holds a contiguous sequence shard with all heads, ``(b, s / W, h, d)``. One all-to-all
per tensor trades the split: afterwards each rank holds the *whole* sequence for ``h / W`` heads,
``(b, s, h / W, d)``, runs one ordinary sage attention call on it (causal or not: the full
sequence is local, in order, so there is nothing to balance), and a second all-to-all brings the
output (and the LSE) back to the sequence split. Ranks hold head groups in rank order: rank ``r``
computes query heads ``[r h_q / W, (r + 1) h_q / W)``.

GQA: with ``h_kv`` divisible by ``W`` the K/V heads split the same way; with ``W`` divisible by
``h_kv`` each K/V head is repeated ``W / h_kv`` times first (every rank then gets the one K/V head
its query heads use). The result equals single-process sage attention of the gathered sequence
exactly when the recipe's quantization groups do not cross head boundaries (all of sage's do not:
scales and means are per head), i.e. bit for bit with the same kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import AttentionFn, block_attention_fn, check_qkv, group_rank_size, split_result

__all__ = ["ulysses_attention", "seq_to_heads", "heads_to_seq"]


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    import torch.distributed as dist
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor, world: int, group: Any = None) -> torch.Tensor:
    """``(b, s_local, h, d)`` sequence shards -> ``(b, world * s_local, h / world, d)`` head groups (bshd)."""
    b, s_local, h, d = x.shape
    if world == 1:
        return x
    send = x.reshape(b, s_local, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = _all_to_all(send, group)  # recv[i] = rank i's sequence shard of our head group
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * s_local, h // world, d)


def heads_to_seq(x: torch.Tensor, world: int, group: Any = None) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: ``(b, s, h_local, d)`` -> ``(b, s / world, world * h_local, d)``."""
    b, s, h_local, d = x.shape
    if world == 1:
        return x
    send = x.reshape(b, world, s // world, h_local, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = _all_to_all(send, group)  # recv[i] = head group i of our sequence shard
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // world, world * h_local, d)


def _lse_heads_to_seq(lse: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    """LSE ``(b, h_local, s)`` -> ``(b, world * h_local, s / world)``."""
    b, h_local, s = lse.shape
    if world == 1:
        return lse
    send = lse.reshape(b, h_local, world, s // world).permute(2, 0, 1, 3).contiguous()
    recv = _all_to_all(send, group)
    return recv.permute(1, 0, 2, 3).reshape(b, world * h_local, s // world)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None,
                      is_causal: bool = False, scale: float | None = None, layout: str = "bshd",
                      return_lse: bool = False, recipe: str = "auto", attention_fn: AttentionFn | None = None,
                      **recipe_options: Any):
    """Attention over a sequence split contiguously across the ranks of ``group`` (forward only).

    Args:
        q: this rank's shard, ``(b, s_local, h_q, d)`` (``layout="bshd"``, default) or
            ``(b, h_q, s_local, d)`` (``"bhsd"``); rank ``r`` holds tokens ``[r s_local, (r+1) s_local)``
            (``sharding.shard_sequence(..., sharding="contiguous")``). ``h_q`` divisible by the
            group size ``W``.
        k, v: K/V shards, same layout, ``h_kv`` heads with ``h_kv % W == 0`` or ``W % h_kv == 0``.
            Every rank passes the same shapes.
        is_causal: causal over the global sequence (bottom-right aligned, as sage's).
        scale, return_lse, recipe, **recipe_options, attention_fn: as :func:`ring_attention`.

    Returns:
        This rank's output shard (q's shape, layout, dtype; contiguous) or ``(o, lse)`` with the
        LSE float32 ``(b, h_q, s_local)``.
    """
    fn_name = "ulysses_attention"
    seq_dim, head_dim = check_qkv(fn_name, q, k, v, layout)
    block = block_attention_fn(recipe, attention_fn, **recipe_options)
    _, world = group_rank_size(fn_name, group)
    h_q, h_kv = q.shape[head_dim], k.shape[head_dim]
    if h_q % world:
        raise ValueError(f"{fn_name}: query heads ({h_q}) must be divisible by the group size ({world})")
    if h_kv < 1 or h_q % h_kv:
        raise ValueError(f"{fn_name}: query heads ({h_q}) must be a multiple of kv heads ({h_kv}) (GQA/MQA)")
    if h_kv % world and world % h_kv:
        raise ValueError(f"{fn_name}: kv heads ({h_kv}) must divide or be divisible by the group size ({world})")
    if layout == "bhsd":  # the all-to-all works on bshd views
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if h_kv % world:
        rep = world // h_kv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    q_h, k_h, v_h = seq_to_heads(q, world, group), seq_to_heads(k, world, group), seq_to_heads(v, world, group)
    result = block(q_h, k_h, v_h, layout="bshd", is_causal=bool(is_causal), scale=scale, return_lse=bool(return_lse))
    if return_lse:
        o_h, lse_h = split_result(result, fn_name)
    else:
        o_h, lse_h = result, None
    o = heads_to_seq(o_h, world, group)
    o = (o.transpose(1, 2) if layout == "bhsd" else o).contiguous()
    if not return_lse:
        return o
    return o, _lse_heads_to_seq(lse_h, world, group).contiguous()
