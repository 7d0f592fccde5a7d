"""Context parallelism: exact attention over a sequence sharded across a process group.

Each of N ranks holds a slice of the sequence of q, k and v (and of a key-padding mask).
:func:`context_parallel_attention` all-gathers K and V (and the mask) over the group and
runs the fused op on the rank's own queries against the keys they can see; its backward
sends each rank's dK/dV contributions back to the rank that owns those keys (a
reduce-scatter: NCCL's, or an all-reduce and a slice where the backend has none, as gloo).
No (L, L) score matrix exists anywhere; q, out and their gradients stay local.

Causal attention with **load balancing** (``load_balanced=True``, the default): the
sequence is cut into 2N chunks and rank r holds chunks r and 2N-1-r (a head and a tail:
:func:`shard_sequence` cuts a full tensor that way, :func:`unshard_sequence` puts the
pieces back). Rank r's head queries see (r+1) chunks of keys and its tail queries 2N-r, so
every rank computes (2N+1) chunk pairs: equal work. Each chunk runs as one fused call on
the keys up to its own end with ``causal="bottom_right"`` (a sliding ``window`` works the
same way). With ``load_balanced=False`` rank r holds the r-th contiguous slice (rank N-1
then does N times the work of rank 0).

Why all-gather rather than a ring: with GQA, K and V are Hq/Hkv times smaller than Q, and
gathering them once costs the same volume per rank as passing them around a ring
((N-1)/N of K and V received per rank, per step, forward; the same again as dK/dV in the
backward), with one collective instead of N-1, and without merging partial outputs through
their log-sum-exp. Such a merge would need the op's backward to take the *global* lse and
output of each row (ring attention's backward); several of the CPU paths recompute their
own softmax normaliser in the backward (the blocked and bf16 paths take no lse), so a merge
through the op would give wrong gradients there. The price: each rank holds the whole
K and V (O(L * Hkv * D)) for the step, while everything of size O(L * Hq * D) and the
attention's work are split N ways. The all-gather is not overlapped with compute.

Not supported (``ValueError``): dropout (keep-masks are a function of local indices),
an additive bias; causal attention needs as many queries as keys (self-attention).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["context_parallel_attention", "shard_sequence", "unshard_sequence"]


def _world(group) -> tuple:
    return dist.get_world_size(group), dist.get_rank(group)


def _chunk_owner_order(world: int, load_balanced: bool) -> List[int]:
    """For each position in the concatenation of the ranks' slices (rank 0's pieces, then
    rank 1's...), the index of the natural sequence chunk it holds."""
    if not load_balanced:
        return list(range(world))
    order = []
    for r in range(world):
        order += [r, 2 * world - 1 - r]
    return order


def shard_sequence(x: Tensor, dim: int, rank: int, world: int, load_balanced: bool = True) -> Tensor:
    """Rank ``rank``'s slice of the full tensor ``x`` along ``dim``: with load balancing, the
    chunks ``rank`` and ``2 * world - 1 - rank`` of ``2 * world`` equal chunks, concatenated;
    otherwise the ``rank``-th of ``world`` equal slices. The length must divide evenly."""
    pieces = 2 * world if load_balanced else world
    if x.shape[dim] % pieces:
        raise ValueError(f"sequence length {x.shape[dim]} must be a multiple of {pieces} "
                         f"({'2 * ' if load_balanced else ''}world size)")
    chunks = x.chunk(pieces, dim)
    if not load_balanced:
        return chunks[rank]
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim)


def _natural_order(pieces: List[Tensor], world: int, load_balanced: bool, dim: int) -> Tensor:
    """Concatenate the gathered per-rank slices (each split into its chunks) in sequence order."""
    chunks = []
    for p in pieces:
        chunks += list(p.chunk(2, dim)) if load_balanced else [p]
    order = _chunk_owner_order(world, load_balanced)
    natural = [None] * len(chunks)
    for pos, c in enumerate(order):
        natural[c] = chunks[pos]
    return torch.cat(natural, dim)


def unshard_sequence(x: Tensor, dim: int, group=None, load_balanced: bool = True) -> Tensor:
    """The full tensor from every rank's slice ``x`` (the inverse of :func:`shard_sequence`;
    a collective: every rank of ``group`` calls it). Not differentiable."""
    world, _ = _world(group)
    pieces = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return _natural_order(pieces, world, load_balanced, dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` into sequence order; backward: sum the gradients over ranks
    and keep this rank's slice (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group, load_balanced: bool) -> Tensor:
        world, rank = _world(group)
        ctx.dim, ctx.group, ctx.load_balanced, ctx.world, ctx.rank = dim, group, load_balanced, world, rank
        pieces = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return _natural_order(pieces, world, load_balanced, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        world, rank, dim = ctx.world, ctx.rank, ctx.dim
        # back to rank-slice order: this rank's slice is the same cut shard_sequence makes
        slices = [shard_sequence(grad, dim, r, world, ctx.load_balanced).contiguous() for r in range(world)]
        mine = torch.empty_like(slices[rank])
        if dist.get_backend(ctx.group) == "nccl":
            dist.reduce_scatter(mine, slices, group=ctx.group)
        else:  # gloo has no reduce-scatter
            stacked = torch.stack(slices)
            dist.all_reduce(stacked, group=ctx.group)
            mine = stacked[rank]
        return mine, None, None, None


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None,
                               causal: bool = False, scale: Optional[float] = None,
                               softcap: float = 0.0, window: int = 0,
                               key_mask: Optional[Tensor] = None, load_balanced: bool = True,
                               impl: str = "auto") -> Tensor:
    """Exact attention for this rank's queries over the whole sharded sequence.

    Args:
        q: (B, Hq, Lq/N, D), this rank's slice of the queries; k, v: (B, Hkv, Lk/N, D|Dv)
            this rank's slice of the keys and values, cut the same way (see
            :func:`shard_sequence`: with ``load_balanced`` the head and tail chunks).
        group: the process group the sequence is sharded over (default: the world).
        causal: top-left causal over the *global* positions (needs Lq == Lk); ``window``
            narrows it to a sliding window, as in :func:`attnfuse.flash_attention`.
        key_mask: None or this rank's slice (B|1, Lk/N) of a bool key-padding mask.
        load_balanced: how the slices were cut (must be the same on every rank).
        scale, softcap, impl: as :func:`attnfuse.flash_attention`.

    Returns:
        (B, Hq, Lq/N, Dv): this rank's slice of the output. Differentiable in q, k, v.
    """
    from attnfuse.op import flash_attention

    world, rank = _world(group)
    if window and not causal:
        raise ValueError("window needs causal=True")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (B, H, L_local, D)")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal context parallelism needs self-attention (as many queries as keys "
                         f"on each rank), got {q.shape[2]} queries and {k.shape[2]} keys")
    if causal and load_balanced and q.shape[2] % 2:
        raise ValueError(f"with load balancing each rank holds two equal chunks: its local length "
                         f"{q.shape[2]} must be even")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    k_all = _GatherSequence.apply(k, 2, group, load_balanced)
    v_all = _GatherSequence.apply(v, 2, group, load_balanced)
    mask_all = None
    if key_mask is not None:
        mask_all = unshard_sequence(key_mask.to(torch.uint8), 1, group, load_balanced).bool()
    kw = dict(scale=scale, softcap=softcap, impl=impl)
    if not causal:
        return flash_attention(q, k_all, v_all, key_mask=mask_all, **kw)
    if load_balanced:
        chunk = q.shape[2] // 2
        ends = [(rank + 1) * chunk, (2 * world - rank) * chunk]  # head chunk, tail chunk
        q_parts = q.split(chunk, 2)
    else:
        ends = [(rank + 1) * q.shape[2]]
        q_parts = [q]
    outs = [flash_attention(qp, k_all[:, :, :end], v_all[:, :, :end], causal="bottom_right",
                            window=window,
                            key_mask=None if mask_all is None else mask_all[:, :end], **kw)
            for qp, end in zip(q_parts, ends)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)
