"""Key-run path of the CPU implementation: a key_mask whose visible keys form one
contiguous run per batch row (a right- or left-padded batch, or no padding at all),
through PyTorch's fused CPU flash attention on exactly that run.

Folded into a (B, 1, 1, Lk) additive mask (the fused path of
:mod:`attnfuse.kernels.torch_fused`), a padding mask still costs the fused kernel every
padded key: it computes their scores, adds -inf and exponentiates them. Here each batch
row calls the kernel on its run [s, e) of visible keys with no mask at all, so padded
keys cost nothing:

- no causal mask: all query rows against keys [s, e);
- top-left causal (row i sees keys j <= i): rows [0, s) see no key (out 0, lse -inf);
  rows [s, e) against keys [s, e) with the kernel's own top-left ``is_causal`` (row
  i - s of the slice sees keys j - s <= i - s of the slice: the same keys); rows
  [e, Lq) see the whole run, so they run without a causal mask.

The price is one or two kernel calls per batch row, so the path is taken only where a
batch row has at least :data:`RUNS_MIN_SCORES` scores (heads x Lq x Lk, per dtype);
below that, the calls' overhead outweighs the padding saved and one call with the
folded mask is cheaper (``benchmarks/key_runs.py``). Per-row calls also parallelise over
fewer tasks than one call over the batch (:func:`kernel_tasks`): with more torch threads
than one row's call has tasks, the folded mask is kept (the backward has fewer tasks than
the forward, so a forward on runs may have its backward on the folded mask; both give
the same out / lse conventions). The backward walks the same segments through the
kernel's backward; rows that see no key get zero dQ and keys outside the run zero dK / dV.

Used for: a key_mask with no bias, window, softcap or dropout, no causal mask or a
top-left one (after :func:`~attnfuse.kernels.base.effective_causal`), and a
run per row (checked on the mask's values: an O(B * Lk) read).
"""
from __future__ import annotations

import weakref
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from . import base
from . import torch_base as TS

__all__ = ["RUNS_MIN_SCORES", "key_runs", "kernel_tasks", "runs_applicable", "runs_forward",
           "runs_backward"]

#: Fewest scores per batch row (heads x Lq x Lk) for which per-row calls on the runs beat
#: one call with a folded mask, per dtype (benchmarks/key_runs.py, 4 heads: in fp32, 128
#: tokens lost at any batch, 0.81-0.98x, and 256 was at parity or won; in bf16, causal
#: training still lost at 256 tokens, 0.84-0.94x, and was at parity or won from 512).
RUNS_MIN_SCORES: dict = {torch.float32: 4 * 256 * 256, torch.bfloat16: 4 * 512 * 512,
                         torch.float16: 4 * 512 * 512}


def key_runs(key_mask: Tensor) -> Optional[list[tuple[int, int]]]:
    """Per batch row, the run [s, e) of its visible keys (s == e: none visible), or
    None when some row's visible keys are not one contiguous run.

    The last answer is remembered for the same tensor object at the same version (the
    path choice, the forward and the backward all ask about one mask). An inference
    tensor (made under ``torch.inference_mode()``) has no version counter, so an
    in-place change could not be told from the remembered one: its runs are found anew
    at each ask."""
    global _last_runs
    if key_mask.is_inference():
        return _find_runs(key_mask)
    ref, version, runs = _last_runs
    if ref is not None and ref() is key_mask and version == key_mask._version:
        return runs
    runs = _find_runs(key_mask)
    _last_runs = (weakref.ref(key_mask), key_mask._version, runs)
    return runs


def _find_runs(key_mask: Tensor) -> Optional[list[tuple[int, int]]]:
    km = key_mask.to(torch.bool)
    bounds = base.key_bounds(km)
    runs = []
    for n, (s, e) in zip(km.sum(-1).tolist(), bounds.tolist()):
        if n == 0:
            runs.append((0, 0))
        elif e - s != n:  # fewer visible keys than [first, last] holds: a hole
            return None
        else:
            runs.append((s, e))
    return runs


_last_runs: tuple = (None, None, None)  # (weakref to the mask, its version, its runs)


def kernel_tasks(heads: int, rows: int, backward: bool) -> int:
    """Parallel tasks of one batch row's call of PyTorch's fused CPU kernel (torch 2.13
    and 2.14): the forward splits its work over (batch, head, block of 32, 64 or 256
    query rows, by the query length), the backward over (batch, head) only."""
    if backward:
        return heads
    split = 256 if rows >= 768 else 64 if rows >= 192 else 32
    return heads * -(-rows // split)


def runs_applicable(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, causal: str,
                    window: int, dropout_p: float, softcap: float,
                    key_mask: Optional[Tensor], backward: bool = False) -> bool:
    """Whether the key-run path computes exactly the op's semantics here, and is worth it:
    besides the size gate, one batch row's call must give every torch thread a task (the
    masked call has B times as many), else the padding saved is lost to idle threads."""
    if key_mask is None or bias is not None or window or softcap or dropout_p:
        return False
    if not (TS.fused_kernel_available()) or q.device.type != "cpu":
        return False
    if q.dtype not in TS.FUSED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    scores = q.shape[1] * q.shape[2] * k.shape[2]  # per batch row
    if q.shape[-1] != v.shape[-1] or scores < RUNS_MIN_SCORES[q.dtype]:
        return False
    eff = base.effective_causal(causal, q.shape[2], k.shape[2])
    if eff == "bottom_right":
        return False
    heads, rows = q.shape[1], q.shape[2]
    if eff == "none" and k.shape[1] != heads:  # GQA folded into the kv heads' rows
        heads, rows = k.shape[1], rows * (heads // k.shape[1])
    if q.shape[0] > 1 and kernel_tasks(heads, rows, backward) < torch.get_num_threads():
        return False
    return key_runs(key_mask) is not None


class Segment(NamedTuple):
    """Query rows [i0, i1) of batch row ``b`` against its keys [s, e)."""

    b: int
    i0: int
    i1: int
    s: int
    e: int
    is_causal: bool


def _segments(key_mask: Tensor, batch: int, causal: str, lq: int) -> Iterator[Segment]:
    runs = key_runs(key_mask)
    if len(runs) == 1:  # a (1, Lk) mask: the same keys for every batch row
        runs = runs * batch
    for b, (s, e) in enumerate(runs):
        if s == e:
            continue  # no visible key: every row is dead
        if causal == "none":
            yield Segment(b, 0, lq, s, e, False)
            continue
        if s < min(e, lq):
            yield Segment(b, s, min(e, lq), s, e, True)
        if e < lq:
            yield Segment(b, e, lq, s, e, False)


def _plan(qs: Tensor, ks: Tensor, vs: Tensor, is_causal: bool) -> tuple[Tensor, TS.FusedPlan]:
    """The fused plan for one segment; a row slice of a GQA query that cannot be merged
    into the kv heads' rows as a view is copied first (O(rows * D))."""
    causal = "top_left" if is_causal else "none"
    plan = TS.fused_sdpa_plan(qs, ks, vs, None, causal=causal, dropout_p=0.0, softcap=0.0)
    if plan is None:
        qs = qs.contiguous()
        plan = TS.fused_sdpa_plan(qs, ks, vs, None, causal=causal, dropout_p=0.0, softcap=0.0)
    assert plan is not None, "runs_applicable admitted a segment the fused kernel rejects"
    return qs, plan


def runs_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: str,
                 key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) as :func:`attnfuse.kernels.torch_impl.forward`."""
    b, hq, lq, _ = q.shape
    causal = base.effective_causal(causal, lq, k.shape[2])
    segments = list(_segments(key_mask, b, causal, lq))
    if b == 1 and segments == [Segment(0, 0, lq, 0, k.shape[2], causal == "top_left")]:
        qs, plan = _plan(q, k, v, causal == "top_left")  # every key visible: one plain call
        return TS.sdpa_forward(qs, k, v, None, plan, scale)
    out = torch.zeros((b, hq, lq, v.shape[-1]), dtype=q.dtype)
    lse = torch.full((b, hq, lq), base.NEG_INF, dtype=torch.float32)
    for sg in segments:
        rows, keys = slice(sg.i0, sg.i1), slice(sg.s, sg.e)
        qs, plan = _plan(q[sg.b:sg.b + 1, :, rows], k[sg.b:sg.b + 1, :, keys],
                         v[sg.b:sg.b + 1, :, keys], sg.is_causal)
        o, l = TS.sdpa_forward(qs, k[sg.b:sg.b + 1, :, keys], v[sg.b:sg.b + 1, :, keys],
                                None, plan, scale)
        out[sg.b, :, rows] = o[0]
        lse[sg.b, :, rows] = l[0]
    return out, lse


def runs_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                  scale: float, causal: str,
                  key_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for :func:`runs_forward`'s out and lse."""
    lq = q.shape[2]
    causal = base.effective_causal(causal, lq, k.shape[2])
    cdt = base.compute_dtype(q.dtype)
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    # two segments of a causal row add into the same keys: accumulate in fp32
    dk = torch.zeros(k.shape, dtype=cdt)
    dv = torch.zeros(v.shape, dtype=cdt)
    for sg in _segments(key_mask, q.shape[0], causal, lq):
        rows, keys = slice(sg.i0, sg.i1), slice(sg.s, sg.e)
        bs = slice(sg.b, sg.b + 1)
        ks, vs = k[bs, :, keys], v[bs, :, keys]
        qs, plan = _plan(q[bs, :, rows], ks, vs, sg.is_causal)
        gq, gk, gv = TS.sdpa_backward(dout[bs, :, rows], qs, ks, vs, None, out[bs, :, rows],
                                       lse[bs, :, rows], plan, scale)
        dq[sg.b, :, rows] = gq[0]
        dk[sg.b, :, keys] += gk[0].to(cdt)
        dv[sg.b, :, keys] += gv[0].to(cdt)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
