"""Ring attention: exact attention over a sequence sharded across a process group, with
K and V passed around a ring of ranks instead of gathered.

**Forward.** In N steps, rank r holds the K/V (and key-padding mask) slice of rank
(r - s) mod N at step s: its own first, then each neighbour's as it arrives from rank r-1
(and is passed on to rank r+1). Each step runs the fused op on this rank's queries
against the slice's keys they can see and merges the partial output into a running one
through the op's log-sum-exp::

    lse = logaddexp(lse, lse_s);  out = out * exp(lse_old - lse) + out_s * exp(lse_s - lse)

(in float32). The next slice's send/receive (``isend`` /
``irecv``) is posted before the step's compute and waited on after it, so communication
overlaps compute (gloo runs point-to-point transfers on its own threads; the transfers
of a step are posted as one ``batch_isend_irecv``, which NCCL needs where two ranks send
to each other).

**Causal, load balanced** (:mod:`.layout`: rank r holds chunks r and 2N-1-r of 2N).
:func:`step_calls` plans each step in chunk units: a query chunk sees the key chunks
before it in full, its own chunk causally (the diagonal) and nothing after it. In the
load-balanced layout the visible key chunks of a slice are always a prefix of it, ending
at the diagonal if present: one unmasked call per query chunk over the chunks before it,
and one top-left causal call for the diagonal (step 0: the head chunk's diagonal, the tail
chunk against the head chunk, the tail chunk's diagonal); a step from a lower rank runs
both query chunks against its head chunk in one call; from a higher rank, the tail chunk
against both. Every step after the first is two chunk pairs on every rank: equal work.

**Backward** (flash attention's, over the same ring). With the global ``out`` and ``lse``
of each row, a chunk's share of the gradient is ``dS = P_glob * (dP - rowsum(dout *
out))``, ``P_glob = P_chunk * w``, ``w = exp(lse_chunk - lse)``. The op's backward
(``attnfuse::flash_attention_backward``) is called per chunk with ``w * dout``, the
chunk's *own* lse (saved from the forward) and the *global* out: it then computes
``P_chunk * (w*dP - rowsum(w*dout * out)) = dS`` exactly, whether the path normalises P
by the given lse (the fused/banded/runs CPU paths, the Triton kernels) or recomputes the
chunk's own softmax (the blocked and bf16 CPU paths, which ignore the given lse: the
usual ring contract of passing the *global* lse would be wrong there). What it needs is
that the path takes ``rowsum(dout * out)`` from the given ``out``: every Triton and CPU
path does for a float32/float64 ``out`` (tests/test_ring_contract.py checks it per CPU
path); on CPU, half-precision chunks' backward is therefore run in float32. dQ
accumulates locally; dK/dV accumulators travel with their K/V around the ring (each
step's partial sum is added to the accumulator received from the previous rank, whose
transfer overlaps the step's compute) and reach their owner after one more hop.

Per step and rank: the forward receives one K/V slice (B * Hkv * L/N * (D + Dv)); the
backward receives one K/V slice and one dK/dV slice. Each rank holds at most two K/V
slices (the current and the incoming) and, in the backward, two dK/dV slices: memory
O(L/N) per rank, where the all-gather holds the whole K and V.

Not supported here (the caller, :func:`attnfuse.distributed.context_parallel_attention`,
routes them to the all-gather or refuses them): a sliding window, dropout, a bias.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import local_chunks, world_and_rank

__all__ = ["ChunkCall", "step_calls", "ring_attention"]


class ChunkCall(NamedTuple):
    """One fused call of a ring step, in chunk units of the local slices: queries
    ``[q0, q1)`` against keys ``[k0, k1)``; ``diagonal``: one query chunk against itself
    (run causally, top-left); otherwise every key is visible to every query."""

    q0: int
    q1: int
    k0: int
    k1: int
    diagonal: bool


def step_calls(q_chunks: Sequence[int], k_chunks: Sequence[int], causal: bool) -> List[ChunkCall]:
    """The calls one ring step needs, for a rank holding the query chunks ``q_chunks`` and
    a K/V slice of the key chunks ``k_chunks`` (natural-order chunk indices, ascending
    within each slice, all chunks one size). Under ``causal``, a query chunk sees the key
    chunks before it in full (one call over them: they are a prefix of the slice), its own
    chunk causally (a call of its own, so that every call is square-causal or unmasked:
    the CPU op's cheapest paths) and nothing after it. Adjacent query chunks with the same
    full key prefix share one call."""
    if not causal:
        return [ChunkCall(0, len(q_chunks), 0, len(k_chunks), False)]
    calls: List[ChunkCall] = []
    for i, a in enumerate(q_chunks):
        full = sum(b < a for b in k_chunks)
        if not all(b < a for b in k_chunks[:full]):
            raise AssertionError(f"key chunks {k_chunks} seen by query chunk {a} are not a prefix")
        if full:
            last = calls[-1] if calls else None
            if last is not None and not last.diagonal and last.q1 == i and last.k1 == full:
                calls[-1] = last._replace(q1=i + 1)
            else:
                calls.append(ChunkCall(i, i + 1, 0, full, False))
        if full < len(k_chunks) and k_chunks[full] == a:
            calls.append(ChunkCall(i, i + 1, full, full + 1, True))
    return calls


def _plan(rank: int, src: int, world: int, load_balanced: bool, causal: bool):
    """(calls, chunks per local slice) of the step that holds rank ``src``'s K/V slice;
    without causality the whole slices are one chunk (their lengths may then differ)."""
    if not causal:
        return step_calls([0], [0], False), 1
    mine = local_chunks(rank, world, load_balanced)
    return step_calls(mine, local_chunks(src, world, load_balanced), True), len(mine)


# ------------------------------------------------------------------------------ comm
class _Ring:
    """Point-to-point transfers to the next rank and from the previous one (group ranks
    translated to global ones, as ``isend``/``irecv`` take)."""

    def __init__(self, group, world: int, rank: int):
        self.group, self.world = group, world
        self.next = self._global((rank + 1) % world)
        self.prev = self._global((rank - 1) % world)

    def _global(self, r: int) -> int:
        if self.group is None:
            return r
        return dist.get_global_rank(self.group, r)

    def exchange(self, send: Sequence[Optional[Tensor]], recv_like: Sequence[Optional[Tensor]],
                 tag: int):
        """Post sends of ``send`` to the next rank and receives (buffers shaped like
        ``recv_like``) from the previous; returns (received buffers, requests). A group
        of one rank passes ``send`` back as received."""
        if self.world == 1:
            return list(send), []
        ops, bufs = [], []
        for i, (s, like) in enumerate(zip(send, recv_like)):
            if s is None:
                bufs.append(None)
                continue
            buf = torch.empty_like(like, memory_format=torch.contiguous_format)
            ops.append(dist.P2POp(dist.irecv, buf, self.prev, self.group, tag + i))
            ops.append(dist.P2POp(dist.isend, s, self.next, self.group, tag + i))
            bufs.append(buf)
        # one batch (not loose isend/irecv): NCCL needs it where two ranks send to each other
        return bufs, dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


# ------------------------------------------------------------------------------ math
def _merge_into(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Merge one call's (``out``, ``lse``) into the running (``acc_out``, ``acc_lse``) in
    place (views of the running tensors; ``out`` is consumed): the softmax over the union
    of two disjoint key sets, from each one's normalised output and log-sum-exp. Rows
    that see no key in either stay (0, -inf)."""
    lse = lse.to(acc_lse.dtype)
    new = torch.logaddexp(acc_lse, lse)
    dead = new == float("-inf")
    safe = new.masked_fill(dead, 0.0)
    w_acc = torch.exp(acc_lse - safe).masked_fill_(dead, 0.0)
    w_new = torch.exp(lse - safe).masked_fill_(dead, 0.0)
    out = out.to(acc_out.dtype)
    acc_out.mul_(w_acc[..., None]).add_(out.mul_(w_new[..., None]))
    acc_lse.copy_(new)


def _rows(t: Tensor, rows: slice) -> Tensor:
    """Rows ``rows`` of ``t`` along the sequence, contiguous: the CPU op's fused path folds
    a GQA query group into the row axis only through a view, which a row slice of a
    longer tensor does not allow (it would fall back to the blocked path)."""
    return t[:, :, rows].contiguous()


def _chunk_weight(lse_chunk: Tensor, lse: Tensor) -> Tensor:
    """``exp(lse_chunk - lse)``: the share of a row's softmax mass in one call's keys
    (0 where the row or the call sees no key)."""
    lse_chunk = lse_chunk.to(lse.dtype)
    dead = (lse == float("-inf")) | (lse_chunk == float("-inf"))
    return torch.exp(lse_chunk - lse.masked_fill(dead, 0.0)).masked_fill(dead, 0.0)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, group, causal, load_balanced, scale, softcap, impl):
        world, rank = world_and_rank(group)
        ring = _Ring(group, world, rank)
        acc_dt = torch.float32
        out = q.new_zeros(q.shape[:3] + v.shape[3:], dtype=acc_dt)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=acc_dt)
        cur = [k.contiguous(), v.contiguous(),
               None if key_mask is None else key_mask.contiguous().to(torch.uint8)]
        saved_lse: List[List[Tensor]] = []
        for s in range(world):
            src = (rank - s) % world
            nxt, reqs = (ring.exchange(cur, cur, tag=4 * s) if s < world - 1 else (None, []))
            step = []
            calls, n = _plan(rank, src, world, load_balanced, causal)
            cq, ck = q.shape[2] // n, k.shape[2] // n
            for c in calls:
                rows, keys = slice(c.q0 * cq, c.q1 * cq), slice(c.k0 * ck, c.k1 * ck)
                km = None if cur[2] is None else cur[2][:, keys].bool()
                o, l = torch.ops.attnfuse.flash_attention(
                    _rows(q, rows), cur[0][:, :, keys], cur[1][:, :, keys], None, scale,
                    "top_left" if c.diagonal else "none", 0.0, softcap, None, impl, 0, km)
                _merge_into(out[:, :, rows], lse[:, :, rows], o, l)
                step.append(l)
            saved_lse.append(step)
            _wait(reqs)
            if nxt is not None:
                cur = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, key_mask, out, lse)
        ctx.saved_lse = saved_lse
        ctx.args = (group, causal, load_balanced, scale, softcap, impl)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, key_mask, out, lse = ctx.saved_tensors
        group, causal, load_balanced, scale, softcap, impl = ctx.args
        world, rank = world_and_rank(group)
        ring = _Ring(group, world, rank)
        cdt = _backward_dtype(q, impl)
        acc_dt = torch.float32
        qc, outc = q.to(cdt), out.to(cdt)
        dq = torch.zeros(q.shape, dtype=acc_dt, device=q.device)
        cur = [k.contiguous(), v.contiguous(),
               None if key_mask is None else key_mask.contiguous().to(torch.uint8)]
        acc = None  # the dK/dV accumulators of the slice in hand, received from rank-1
        acc_reqs: list = []
        base_tag = 4 * world
        for s in range(world):
            src = (rank - s) % world
            nxt, reqs = (ring.exchange(cur, cur, tag=base_tag + 4 * s) if s < world - 1 else (None, []))
            dk = torch.zeros(k.shape, dtype=acc_dt, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc_dt, device=v.device)
            kc, vc = cur[0].to(cdt), cur[1].to(cdt)
            calls, n = _plan(rank, src, world, load_balanced, causal)
            cq, ck = q.shape[2] // n, k.shape[2] // n
            for c, l in zip(calls, ctx.saved_lse[s]):
                rows, keys = slice(c.q0 * cq, c.q1 * cq), slice(c.k0 * ck, c.k1 * ck)
                w = _chunk_weight(l, lse[:, :, rows])
                dout_w = (dout[:, :, rows].to(acc_dt) * w[..., None]).to(cdt)
                km = None if cur[2] is None else cur[2][:, keys].bool()
                gq, gk, gv = torch.ops.attnfuse.flash_attention_backward(
                    dout_w, _rows(qc, rows), kc[:, :, keys], vc[:, :, keys], None,
                    _rows(outc, rows), l, scale, "top_left" if c.diagonal else "none", 0.0,
                    softcap, None, impl, False, 0, km)[:3]
                dq[:, :, rows] += gq
                dk[:, :, keys] += gk
                dv[:, :, keys] += gv
            _wait(acc_reqs)
            if acc is not None:
                dk += acc[0]
                dv += acc[1]
            acc, acc_reqs = ring.exchange([dk, dv], [dk, dv], tag=base_tag + 4 * world + 2 * s)
            _wait(reqs)
            if nxt is not None:
                cur = nxt
        _wait(acc_reqs)
        dk, dv = acc
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)) + (None,) * 7


def _backward_dtype(q: Tensor, impl: str) -> torch.dtype:
    """The dtype the chunk backward runs in: q's, except half types on the CPU paths,
    which take ``rowsum(dout * out)`` from the given out only when it is float32/float64
    (the blocked and bf16 paths recompute it from their own half-precision block)."""
    from attnfuse.op import _resolved_impl

    if q.dtype in (torch.float16, torch.bfloat16) and _resolved_impl(impl, q.device) == "torch":
        return torch.float32
    return q.dtype


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False,
                   scale: float, softcap: float = 0.0, key_mask: Optional[Tensor] = None,
                   load_balanced: bool = True, impl: str = "auto") -> Tensor:
    """This rank's slice of exact attention over the sequence sharded across ``group``,
    with K/V passed around the ring (arguments as
    :func:`attnfuse.distributed.context_parallel_attention`, already validated there;
    ``causal`` is top-left over the global positions)."""
    return _RingAttention.apply(q, k, v, key_mask, group, causal, load_balanced, scale, softcap, impl)
