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
terms added after the fill the row is not uniform. Those two take a second fix, exact when no
other score term comes before the fill (HF GPT-2's ``where(causal, s, min) + attention_mask``,
BLOOM with dropout)::

    q' = where(c covers the row, 0, q)          (the op gets q')

so on such a row the op's logits are the fill plus the terms after it, eager's row exactly
(the scores it replaced are gone, softcap(0) = 0), dropout included; dq reaches q' only (the
where sends nothing to q there), and dK gets ``dS · q' = 0`` from the row. With a term
before the fill (eager replaced it, the op would add it), or several fills, the fusion is
declined as a near miss.
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
_ZERO_Q = "full_fill_rows_zero_q"   # m.info key: the fill term whose full rows get q = 0


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


def _fill_node(m: AttentionMatch, t: Term, gm) -> Optional[fx.Node]:
    """The masked_fill/where on the score chain (softmax input upwards) whose condition is ``t``'s."""
    seen, todo = set(), [m.softmax.args[0]] if m.softmax.args else []
    while todo and len(seen) < 64:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen or n is m.qk:
            continue
        seen.add(n)
        op = O.classify(n, gm)
        if op is not None and op.kind == O.MASK:
            cond = op.get("mask") if op.sub == "masked_fill" else op.get("cond")
            if _is_cond_of(t, cond):
                return n
        todo.extend(n.all_input_nodes)
    return None


def _ancestors(n: fx.Node, stop: fx.Node, limit: int = 256) -> set:
    out, todo = set(), [n]
    while todo and len(out) < limit:
        x = todo.pop()
        if x in out or x is stop:
            continue
        out.add(x)
        todo.extend(x.all_input_nodes)
    return out


def _terms_before(m: AttentionMatch, fill: Term, node: fx.Node) -> bool:
    """Whether a term other than ``fill`` feeds the scores that ``node`` fills (it was added
    before the fill, so eager replaced it on the filled positions); unsure counts as yes."""
    scores = node.args[0] if node.args else None
    if not isinstance(scores, fx.Node):
        return True
    before = _ancestors(scores, m.qk)
    if len(before) >= 256:
        return True
    return any(t.view.base in before for t in m.terms if t is not fill)


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
    if why is not None and len(fills) == 1:
        node = _fill_node(m, fills[0], gm)
        if node is not None and not _terms_before(m, fills[0], node):
            info = dict(m.info)
            info[_ZERO_Q] = fills[0]
            note = (f"{name}: rows the fill covers entirely get q = 0 (their logits are the fill and "
                    "the terms after it, as eager's; no gradient to q, k), checked at run time")
            return dataclasses.replace(m, info=info, mask_notes=list(m.mask_notes) + [note])
        why += "; a score term comes before the fill (or the fill is not on the score chain)"
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


def _full_rows(em: Emitter, t: Term) -> fx.Node:
    """(B|1, H|1, Lq, 1) bool: the rows the fill term ``t`` covers entirely."""
    c = em.view4(t.view, t.pre)                           # (B, H, Lq, Lk) as the op sees it
    filled = em.logical_not(c) if t.invert else c
    return em.g.call_function(aten.all.dim if em.aten else torch.all, (filled, 3, True))


def zero_q(em: Emitter, m: AttentionMatch, q: fx.Node) -> fx.Node:
    """The q the op gets: ``q`` with 0 on the rows :func:`plan`'s q-zeroing fill covers entirely."""
    t = m.info.get(_ZERO_Q)
    return q if t is None else em.zero_where(q, _full_rows(em, t))


def apply(em: Emitter, m: AttentionMatch, q: fx.Node, k: fx.Node, v: fx.Node, out: fx.Node) -> fx.Node:
    """``out`` with eager's value on the rows :func:`plan`'s fill covers entirely."""
    t = m.info.get(_INFO)
    if t is None:
        return out
    full = _full_rows(em, t)                                                             # (.., Lq, 1)
    reps = em.floordiv(em.size(q, 1, symbolic=True), em.size(k, 1, symbolic=True))
    vbar = em.repeat_heads(em.mean_keys(v), reps)                                        # (B, Hq, 1, Dv)
    return em.where(full, vbar, out)
