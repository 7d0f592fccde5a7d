"""Attention sinks: a per-head logit concatenated to the scores and sliced off after the softmax.

Owns the reading of gpt-oss's eager attention (and x-transformers' learned sink, whose
column comes first)::

    col      = sinks.reshape(1, -1, 1, 1).expand(B, -1, Lq, -1)     # one logit per head
    combined = torch.cat([scores, col], dim=-1)                     # or [col, scores]
    combined = combined - combined.max(dim=-1, keepdim=True).values  # optional, a no-op
    probs    = softmax(combined, dim=-1)[..., :-1]                  # or [..., 1:]
    out      = dropout(probs) @ v

as the fused op's ``sinks`` argument: the column joins each row's softmax denominator
and has no value row, exactly what the op computes. This module reads the spelling
only (the shapes, the cat, the max shift over the concatenated axis, the slice that
drops exactly the sink column, in the torch-level and aten dialects):

- :func:`sink_cat` reads, from a softmax's input, the cat of the scores and a sink column
  (through casts and a max shift over the concatenated axis) and peels the column back
  to its source through expands and casts (:class:`SinkCat`);
- :func:`drops_sink_column` says whether a node between the softmax and P·V slices off
  exactly the sink column; :func:`is_slice` / :func:`is_full_slice` recognise slices and
  make_fx's no-op slices.

What the matcher still proves (:mod:`.match`, :mod:`.assemble`): that the concatenated
axis is the key axis of the scores (the softmax's axis), that the source varies along
the op's head axis only (constant along the batch and the queries: one logit per head),
and that every removed node has no other reader. Nothing here changes a graph.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import ops as O
from attnfuse.passes.shift import row_max
from attnfuse.passes.types import Miss

aten = torch.ops.aten

_CATS = (torch.cat, torch.concat, torch.concatenate)
_SLICE_TO_END = 2 ** 62  # aten.slice's end at or past this is "to the end" (2**63 - 1 in practice)


@dataclass
class SinkCat:
    """A softmax input read as ``cat(scores, column)`` along the softmax's axis."""

    cat: fx.Node              # the cat node
    scores: fx.Node           # the scores operand (the matcher walks up from it to Q·Kᵀ)
    column: fx.Node           # the sink column operand (size 1 along the concatenated axis)
    source: fx.Node           # the column before its expands and casts
    first: bool               # the sink column comes first (x-transformers) or last (gpt-oss)
    dim: int                  # the concatenated axis, non-negative
    nodes: List[fx.Node] = field(default_factory=list)         # cat .. softmax input, max shift
    column_nodes: List[fx.Node] = field(default_factory=list)  # column .. source (exclusive)


def _is_cat(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    return n.target in _CATS or getattr(n.target, "overloadpacket", None) is aten.cat


def _cat_args(n: fx.Node) -> Tuple[Any, Any]:
    tensors = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", n.kwargs.get("axis", 0))
    return tensors, dim


def _only_reader(n: fx.Node, reader: fx.Node) -> bool:
    return A.data_users(n) == [reader]


def _peel_column(col: fx.Node, gm) -> Tuple[fx.Node, List[fx.Node]]:
    """(source, nodes): ``col`` followed back through expands, casts and identities
    (``nodes``, from ``col``; each read by the next only), which keep the source's axes
    right-aligned with the column's (broadcasting). Not through views: a view may move a
    size to another axis. The source may have other readers (a parameter read elsewhere)."""
    nodes: List[fx.Node] = []
    x = col
    for _ in range(16):
        if nodes and not _only_reader(x, nodes[-1]):
            break
        op = O.classify(x, gm)
        if op is None or not isinstance(op.get("x"), fx.Node):
            break
        inner = op["x"]
        if not (op.kind == O.CAST or (op.kind == O.LAYOUT and op.sub in ("identity", "expand"))):
            break
        nodes.append(x)
        x = inner
    return x, nodes


def _per_head_source(source: fx.Node, column: fx.Node, dim: int) -> bool:
    """The source broadcasts to the column along every axis but at most one, which is not
    the concatenated one (the matcher proves that one is the head axis)."""
    ss, cs = A.shape(source), A.shape(column)
    if ss is None or cs is None or len(ss) > len(cs) or A.dtype(source) not in (
            torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return False
    off = len(cs) - len(ss)
    varying = [j + off for j, s in enumerate(ss) if not A.is_one(s)]
    return len(varying) <= 1 and dim not in varying and all(
        A.size_eq(ss[j - off], cs[j]) for j in varying)


def sink_cat(x: fx.Node, sm: fx.Node, sm_dim: Any, gm) -> Optional[SinkCat]:
    """The sink reading of the softmax input ``x`` (read by ``sm`` only), or None when
    ``x`` is not a cat (through casts and a max shift). Raises :class:`Miss`, saying why,
    for a cat read only by this chain that is not a sink column next to the scores."""
    r = A.rank(x)
    if r is None or not isinstance(sm_dim, int) or not _only_reader(x, sm):
        return None
    dim = A.norm_dim(sm_dim, r)
    nodes: List[fx.Node] = []
    cur, reader = x, sm
    for _ in range(8):
        if _is_cat(cur):
            break
        op = O.classify(cur, gm)
        if op is None:
            return None
        if op.kind == O.CAST or (op.kind == O.LAYOUT and op.sub == "identity"):
            if (reader is not None and not _only_reader(cur, reader)) or not isinstance(op.get("x"), fx.Node):
                return None
            nodes.append(cur)
            cur, reader = op["x"], cur
            continue
        if op.kind == O.ADD and op.sub == "sub" and isinstance(op["a"], fx.Node) and \
                isinstance(op["b"], fx.Node) and op.get("alpha", 1) == 1:
            shift = row_max(op["b"], op["a"], gm)
            if shift is None or dim not in shift[0] or (reader is not None and not _only_reader(cur, reader)):
                return None
            base = op["a"]
            # the shifted tensor is read by the subtraction and the maximum only
            if set(A.data_users(base)) != {cur, shift[1][-1]}:
                return None
            nodes += [cur] + list(shift[1])
            cur, reader = base, None  # its readers are checked just above
            continue
        return None
    else:
        return None
    if not _is_cat(cur) or (reader is not None and not _only_reader(cur, reader)):
        return None
    tensors, cdim = _cat_args(cur)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or not isinstance(cdim, int) or \
            not all(isinstance(t, fx.Node) and A.rank(t) == r for t in tensors):
        raise Miss("unsupported_op", f"{cur.name}: a cat of other than two tensors of the scores' rank "
                                     f"feeds the softmax (a sink is one column next to the scores)", cur)
    if A.norm_dim(cdim, r) != dim:
        raise Miss("unsupported_op", f"{cur.name} concatenates along axis {cdim}, not the softmax's axis "
                                     f"{sm_dim} (a sink column joins the softmax's axis)", cur)
    found = []
    for i, col in enumerate(tensors):
        scores = tensors[1 - i]
        if col is scores or not A.is_one(A.shape(col)[dim]) or not _only_reader(col, cur):
            continue
        source, col_nodes = _peel_column(col, gm)
        if _per_head_source(source, col, dim):
            found.append(SinkCat(cur, scores, col, source, i == 0, dim, [cur] + nodes, col_nodes))
    if len(found) != 1:
        why = "either operand could be" if found else "neither operand is"
        raise Miss("unsupported_op", f"{cur.name}: {why} a sink column (size 1 along the softmax's axis, "
                                     f"one value per head broadcast along the batch and the queries)", cur)
    return found[0]


# ------------------------------------------------------------------ the slice after the softmax
def _int_or_none(x: Any) -> bool:
    return x is None or (isinstance(x, int) and not isinstance(x, bool))


def _drops(start: Any, stop: Any, step: Any, lk: Any, first: bool) -> bool:
    """Whether ``[start:stop:step]`` over an axis of ``lk + 1`` entries keeps exactly the
    ``lk`` that are not the sink (the first entry when ``first``, else the last)."""
    if not (_int_or_none(start) and _int_or_none(stop) and step in (None, 1)):
        return False
    if first:
        return start == 1 and (stop is None or stop >= _SLICE_TO_END or (
            A.static_int(lk) is not None and stop >= A.static_int(lk) + 1))
    return start in (None, 0) and (stop == -1 or (stop is not None and A.size_eq(stop, lk)))


def _getitem_slices(n: fx.Node, r: int) -> Optional[List[Any]]:
    """The per-axis indices of ``x[idx]`` when ``idx`` is slices and one Ellipsis only."""
    if n.op != "call_function" or n.target is not operator.getitem or len(n.args) != 2:
        return None
    idx = n.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not all(isinstance(i, slice) or i is Ellipsis for i in idx) or \
            sum(i is Ellipsis for i in idx) > 1:
        return None
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        fill = r - (len(idx) - 1)
        if fill < 0:
            return None
        idx = idx[:e] + (slice(None),) * fill + idx[e + 1:]
    if len(idx) > r:
        return None
    return list(idx) + [slice(None)] * (r - len(idx))


def _aten_slice(n: fx.Node) -> Optional[Tuple[int, Any, Any, Any]]:
    if n.op != "call_function" or getattr(n.target, "overloadpacket", None) is not aten.slice:
        return None
    args = list(n.args) + [None] * (5 - len(n.args))
    x, dim, start, end, step = args[:5]
    dim = n.kwargs.get("dim", 0 if dim is None else dim)
    start = n.kwargs.get("start", start)
    end = n.kwargs.get("end", end)
    step = n.kwargs.get("step", 1 if step is None else step)
    return dim, start, end, step


def is_slice(n: fx.Node) -> bool:
    """``x[...]`` with slices only, or an ``aten.slice``."""
    return _aten_slice(n) is not None or (
        n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2 and
        isinstance(n.args[0], fx.Node) and _getitem_slices(n, A.rank(n.args[0]) or 0) is not None)


def is_full_slice(n: fx.Node) -> bool:
    """make_fx's no-op ``aten.slice(x, d, 0, 2**63 - 1)`` (what ``x[:, :]`` traces to)."""
    s = _aten_slice(n)
    if s is None:
        return False
    _, start, end, step = s
    return start in (None, 0) and (end is None or (isinstance(end, int) and end >= _SLICE_TO_END)) \
        and step in (None, 1)


def drops_sink_column(u: fx.Node, cur: fx.Node, key_axis: int, lk: Any, first: bool) -> bool:
    """Whether ``u`` reads ``cur`` (probabilities over ``lk + 1`` keys, the sink column
    first or last along ``key_axis``) and keeps exactly the ``lk`` key columns."""
    r = A.rank(cur)
    if r is None or not u.args or u.args[0] is not cur:
        return False
    idx = _getitem_slices(u, r)
    if idx is not None:
        rest = [i for j, i in enumerate(idx) if j != key_axis]
        if any(i != slice(None) for i in rest):
            return False
        s = idx[key_axis]
        return _drops(s.start, s.stop, s.step, lk, first)
    s = _aten_slice(u)
    if s is None or not isinstance(s[0], int) or A.norm_dim(s[0], r) != key_axis:
        return False
    return _drops(s[1], s[2], s[3], lk, first)
