"""How a sequence is cut across the ranks of a context-parallel group.

Owns the layout every context-parallel strategy shares (:mod:`.context`'s all-gather,
:mod:`.ring`'s ring): with **load balancing** the sequence is cut into 2N equal chunks and
rank r holds chunks r and 2N-1-r (a head and a tail, concatenated); without it, rank r
holds the r-th of N contiguous slices. :func:`local_chunks` names a rank's chunks,
:func:`shard_sequence` cuts a full tensor that way, :func:`unshard_sequence` puts the
pieces back (a collective).
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world_and_rank", "local_chunks", "shard_sequence", "unshard_sequence",
           "natural_order"]


def world_and_rank(group) -> tuple:
    """(world size, this process's rank) in ``group`` (None: the default group)."""
    return dist.get_world_size(group), dist.get_rank(group)


def local_chunks(rank: int, world: int, load_balanced: bool) -> List[int]:
    """The natural-order indices of the sequence chunks rank ``rank`` holds, in the order
    they are concatenated: ``[rank, 2 * world - 1 - rank]`` of 2N chunks with load
    balancing, ``[rank]`` of N without."""
    return [rank, 2 * world - 1 - rank] if load_balanced else [rank]


def shard_sequence(x: Tensor, dim: int, rank: int, world: int, load_balanced: bool = True) -> Tensor:
    """Rank ``rank``'s slice of the full tensor ``x`` along ``dim``: with load balancing, the
    chunks ``rank`` and ``2 * world - 1 - rank`` of ``2 * world`` equal chunks, concatenated;
    otherwise the ``rank``-th of ``world`` equal slices. The length must divide evenly."""
    pieces = 2 * world if load_balanced else world
    if x.shape[dim] % pieces:
        raise ValueError(f"sequence length {x.shape[dim]} must be a multiple of {pieces} "
                         f"({'2 * ' if load_balanced else ''}world size)")
    chunks = x.chunk(pieces, dim)
    return torch.cat([chunks[c] for c in local_chunks(rank, world, load_balanced)], dim)


def natural_order(pieces: List[Tensor], world: int, load_balanced: bool, dim: int) -> Tensor:
    """Concatenate every rank's slice (``pieces[r]`` is rank r's) in sequence order."""
    natural = {}
    for r, p in enumerate(pieces):
        ids = local_chunks(r, world, load_balanced)
        for c, part in zip(ids, p.chunk(len(ids), dim)):
            natural[c] = part
    return torch.cat([natural[c] for c in sorted(natural)], dim)


def unshard_sequence(x: Tensor, dim: int, group=None, load_balanced: bool = True) -> Tensor:
    """The full tensor from every rank's slice ``x`` (the inverse of :func:`shard_sequence`;
    a collective: every rank of ``group`` calls it). Not differentiable."""
    world, _ = world_and_rank(group)
    pieces = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return natural_order(pieces, world, load_balanced, dim)
