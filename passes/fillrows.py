"""Rows that a finite mask fill covers entirely, when the fill stays a tensor.

Owns :func:`plan` (whether a fusion needs the fix, or must be declined) and :func:`apply`
(the nodes it emits). A ``masked_fill(s, c, finfo.min)`` (or ``where``) that is not proven
structure is passed to the op as the added bias ``c · fill``: on a row that keeps some key
that is exact, forward and backward (a filled key has weight 0, so no gradient). On a row
that ``c`` covers entirely it is exact in the forward only: eager's fill *replaces* the
scores, so the row is a uniform average of V with no gradient to the scores, while
``s + fill`` passes the uniform softmax's gradient on to q and k (DeBERTa-v2's padded
queries in training). The fix, for a fill that is the last score op before the softmax::

    out = where(c covers the row, mean_j v_j, out)

which is eager's value there, and whose gradient reaches V only (1/Lk per key, as eager's
uniform row) and zeroes the op's output gradient on those rows (so no dS, hence nothing to
q or k). With dropout eager's row is a dropped-out uniform average, not the mean, and with
terms added after the fill the row is not uniform: those are declined as near misses.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import fx

from attnfuse.passes import ops as O
from attnfuse.passes.emit import Emitter
from attnfuse.passes.shift import row_max
from attnfuse.passes.types import AttentionMatch, NearMiss, Term

aten = torch.ops.aten

_INFO = "full_fill_rows"   # m.info key: the kept finite-fill term whose full rows need eager's mean


def _finite_fills(m: AttentionMatch):
    return [t for t in m.terms if t.kind == "fill" and t.coef > float("-inf")]


def _last_fill_cond(m: AttentionMatch, gm) -> Optional[fx.Node]:
    """The condition of the masked_fill/where that feeds the softmax (through casts, views and
    a row-max shift), or None when the last score op is something else."""
    n = m.softmax.args[0] if m.softmax.args else None
    for _ in range(8):
        op = O.classify(n, gm) if isinstance(n, fx.Node) else None
        if op is None:
            return None
        if op.kind in (O.CAST, O.LAYOUT):
            n = n.args[0] if n.args else None
            continue
        if op.kind == O.MASK:
            return op.get("mask") if op.sub == "masked_fill" else op.get("cond")
        a, b = (n.args + (None, None))[:2]
        if op.kind == O.ADD and isinstance(a, fx.Node) and row_max(b, a, gm) is not None:
            n = a   # s - rowmax(s): a filled row stays uniform (0 everywhere), no gradient through the fill
            continue
        return None
    return None


def _is_cond_of(t: Term, cond: Optional[fx.Node]) -> bool:
    if not isinstance(cond, fx.Node):
        return False
    return cond is t.view.base or t.view.base in cond.all_input_nodes and len(cond.all_input_nodes) == 1


def plan(m: AttentionMatch, gm) -> Union[AttentionMatch, NearMiss]:
    """``m`` marked for :func:`apply` when it keeps a finite fill as a bias; a near miss when the
    fix cannot be exact (dropout, several fills, or terms after the fill)."""
    fills = _finite_fills(m)
    if not fills:
        return m
    name = fills[0].view.base.name
    why = None
    if len(fills) > 1:
        why = "several finite mask fills kept as tensors"
    elif m.dropout_p:
        why = "with dropout (eager's row is a dropped-out uniform average, not the mean of V)"
    elif not _is_cond_of(fills[0], _last_fill_cond(m, gm)):
        why = "with score terms after the fill (eager's row is then not uniform)"
    if why is not None:
        return NearMiss("mask_fill_value",
                        f"{name}: a finite mask fill kept as a tensor may cover whole rows, where eager "
                        f"replaces the scores (no gradient to q, k) but an added bias does not; not exact {why}",
                        m.location, m.softmax.name, softmax=m.softmax.name)
    info = dict(m.info)
    info[_INFO] = fills[0]
    note = (f"{name}: rows the fill covers entirely get eager's mean of V (no gradient to q, k), "
            "checked at run time")
    return dataclasses.replace(m, info=info, mask_notes=list(m.mask_notes) + [note])


def apply(em: Emitter, m: AttentionMatch, q: fx.Node, k: fx.Node, v: fx.Node, out: fx.Node) -> fx.Node:
    """``out`` with eager's value on the rows :func:`plan`'s fill covers entirely."""
    t = m.info.get(_INFO)
    if t is None:
        return out
    c = em.view4(t.view, t.pre)                           # (B, H, Lq, Lk) as the op sees it
    filled = em.logical_not(c) if t.invert else c
    full = em.g.call_function(aten.all.dim if em.aten else torch.all, (filled, 3, True))   # (.., Lq, 1)
    reps = em.floordiv(em.size(q, 1, symbolic=True), em.size(k, 1, symbolic=True))
    vbar = em.repeat_heads(em.mean_keys(v), reps)                                        # (B, Hq, 1, Dv)
    return em.where(full, vbar, out)
