"""Context parallelism: exact attention over a sequence sharded across a process group.

Each of N ranks holds a slice of the sequence of q, k and v (and of a key-padding mask),
cut as :mod:`.layout` says (with **load balancing**, ``load_balanced=True``, the default:
of 2N chunks rank r holds chunks r and 2N-1-r, a head and a tail, so under a causal mask
every rank does the same work; :func:`shard_sequence` cuts a full tensor that way,
:func:`unshard_sequence` puts the pieces back). :func:`context_parallel_attention` returns
this rank's slice of the exact output, differentiable in q, k, v, by one of two strategies:

- ``"ring"`` (:mod:`.ring`): K/V slices travel around a ring of ranks, each step's
  partial output is merged through the op's log-sum-exp, the transfer of the next slice
  overlapping the current step's compute; the backward passes K/V around again while the
  dK/dV accumulators travel with them back to their owner. Each rank holds at most two
  K/V slices: memory O(L/N) per rank.
- ``"allgather"`` (this module): K and V (and the mask) are all-gathered, the fused op
  runs once per query chunk on the keys it can see (``causal="bottom_right"``), and the
  backward sends each rank's dK/dV contributions to their owners (a reduce-scatter:
  NCCL's, or an all-reduce and a slice on gloo, which has none). One collective instead of
  N-1 steps, and it takes a sliding ``window``; but every rank holds the whole K and V
  (and dK, dV) during the step, O(L * Hkv * D), and nothing overlaps.

``strategy="auto"`` (the default) takes the ring unless a ``window`` is given (the ring
does not run windows): the point of context parallelism is memory per rank falling with
N, which only the ring gives. The volume on the wire is the same in the forward (each
rank receives (N-1)/N of K and V either way); see README "Distributed".

Not supported (``ValueError``): dropout (keep-masks are a function of local indices), an
additive bias; causal attention needs as many queries as keys (self-attention).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import natural_order, shard_sequence, unshard_sequence, world_and_rank
from .ring import ring_attention

__all__ = ["context_parallel_attention", "shard_sequence", "unshard_sequence", "STRATEGIES"]

STRATEGIES = ("auto", "ring", "allgather")


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` into sequence order; backward: sum the gradients over ranks
    and keep this rank's slice (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group, load_balanced: bool) -> Tensor:
        world, rank = world_and_rank(group)
        ctx.dim, ctx.group, ctx.load_balanced, ctx.world, ctx.rank = dim, group, load_balanced, world, rank
        pieces = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return natural_order(pieces, world, load_balanced, dim)

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
                               impl: str = "auto", strategy: str = "auto") -> Tensor:
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
        strategy: ``"ring"`` (K/V passed around the ranks; memory per rank O(L/N)),
            ``"allgather"`` (K/V gathered; takes a ``window``) or ``"auto"``: the ring,
            unless ``window`` is set.

    Returns:
        (B, Hq, Lq/N, Dv): this rank's slice of the output. Differentiable in q, k, v.
    """
    from attnfuse.op import flash_attention

    world, rank = world_and_rank(group)
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
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "ring" and window:
        raise ValueError("the ring strategy does not run a sliding window: use "
                         "strategy='allgather' (or 'auto')")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.dim() != 2
                                 or key_mask.shape[1] != k.shape[2]):
        raise ValueError(f"key_mask must be this rank's bool (B|1, {k.shape[2]}) slice, got "
                         f"{key_mask.dtype} of shape {tuple(key_mask.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if strategy == "ring" or (strategy == "auto" and not window):
        return ring_attention(q, k, v, group=group, causal=causal, scale=scale, softcap=softcap,
                              key_mask=key_mask, load_balanced=load_balanced, impl=impl)
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
