"""An in-place add into a slice of the scores: ``attn[:, :, 1:, 1:] += rel``.

Owns :func:`slice_add`, which reads a write into a slice of the scores ``s`` before the
softmax as an additive term: ``s[idx] += t`` (dynamo: ``getitem`` → ``iadd`` → ``setitem``
of the same index; also ``s[idx] = s[idx] + t``) and make_fx's form of it (a chain of
``aten.slice`` → ``add_``, and the same chain again → ``copy_`` of the sum back). Vision
transformers with a class token write it to add a relative-position bias to the patch
tokens only. The write is ``s + pad(t)``: ``t`` broadcast to the slice and padded with 0
before each sliced axis, a float bias of the scores' shape at most (the model already
holds the scores at that size). The value written back may be computed from the slice
through views and several adds (timm's MViTv2 ``cal_rel_pos_type``: the slice viewed
(B, H, qh, qw, kh, kw), ``rel_h`` and ``rel_w`` added, viewed back): each term then is
broadcast to the view it was added in and reshaped to the slice first.

Only slices that start at a constant ≥ 0 (0: the whole axis, MViTv2 without a class token),
run to the end with step 1, and along which a term added at the slice's shape has the
slice's full size (not broadcast) are read; the caller proves the rest
(no other reader of the scores, the order of the score changes). Nothing here changes a
graph.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import ops as O

_END = 2 ** 63 - 1  # aten.slice's "to the end"


@dataclass
class SliceAdd:
    """``scores[sliced] += Σ coef · term``: ``pads`` holds (axis of the scores, start) per sliced
    axis; each term comes with the shape the slice was viewed as when it was added (None: the
    slice's own shape), and ``part_shape`` is the slice's shape."""

    terms: List[Tuple[fx.Node, float, Optional[tuple]]]
    pads: Tuple[Tuple[int, int], ...]
    part_shape: tuple
    nodes: List[fx.Node]     # the slice/add/write-back nodes, removed with the attention
    write: fx.Node           # the node that completes the write (its position orders it)


def _written(part: fx.Node, gm) -> Optional[Tuple[fx.Node, List, List[fx.Node]]]:
    """From the slice ``part`` through views and adds to the one value computed from it:
    (that value, [(term, coef, viewed shape or None)], nodes). None if anything else reads it."""
    cur, terms, nodes, stage = part, [], [], None
    ps = A.shape(part)
    for _ in range(16):
        if len(cur.users) != 1:
            return None
        u = next(iter(cur.users))
        op = O.classify(u, gm)
        if op is not None and op.kind == O.LAYOUT and op.sub == "view" and op.get("x") is cur:
            s = A.shape(u)
            if s is None:
                return None
            stage = None if len(s) == len(ps) and all(A.size_eq(a, b) for a, b in zip(s, ps)) else tuple(s)
        else:
            got = _added(u, cur, gm)
            if got is None:
                break
            terms.append((got[0], got[1], stage))
        nodes.append(u)
        cur = u
    if not terms or stage is not None:
        return None
    return cur, terms, nodes


def _index_starts(idx: Any, rank: int) -> Optional[Tuple[Tuple[int, int], ...]]:
    """(axis, start) of each sliced axis of a basic index tuple; None if not of the read form."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if idx and idx[0] is Ellipsis:
        idx = (slice(None),) * (rank - len(idx) + 1) + tuple(idx[1:])
    if len(idx) > rank or not all(isinstance(x, slice) for x in idx):
        return None
    out = []
    for ax, sl in enumerate(idx):
        if sl.step not in (None, 1) or sl.stop is not None:
            return None
        start = 0 if sl.start is None else sl.start
        if not isinstance(start, int) or start < 0:
            return None
        if start:
            out.append((ax, start))
    return tuple(out)


def _aten_slices(end: fx.Node, root: fx.Node) -> Optional[Tuple[Tuple[int, int], ...]]:
    """(axis, start) of an aten.slice chain from ``root`` to ``end`` (each link read once)."""
    pads, n = [], end
    while n is not root:
        if n.op != "call_function" or "aten.slice.Tensor" not in str(n.target) or len(n.users) != 1:
            return None
        x, dim, start, stop, step = (list(n.args) + [0, None, None, 1][len(n.args) - 1:])[:5]
        if not isinstance(dim, int) or not isinstance(start, int) or start < 0 or step != 1 \
                or stop not in (None, _END):
            return None
        if start:
            pads.append((A.norm_dim(dim, len(A.shape(x))), start))
        n = x
        if not isinstance(n, fx.Node):
            return None
    return tuple(sorted(pads))


def _chain_from(root: fx.Node, first: fx.Node) -> List[fx.Node]:
    chain, n = [first], first
    while len(n.users) == 1 and "aten.slice.Tensor" in str(next(iter(n.users)).target):
        n = next(iter(n.users))
        chain.append(n)
    return chain


def _added(add: fx.Node, part: fx.Node, gm) -> Optional[Tuple[fx.Node, float]]:
    """(term, coef) when ``add`` is ``part + term`` / ``part - term`` (in place or not)."""
    op = O.classify(add, gm)
    if op is None or op.kind != O.ADD or op["a"] is not part or not isinstance(op["b"], fx.Node):
        return None
    alpha = op.get("alpha", 1)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    return op["b"], float(alpha) * (-1.0 if op.sub == "sub" else 1.0)


def _fits(terms, part: fx.Node, pads, rank: int) -> bool:
    """Every term added at the slice's own shape covers every sliced axis at its full (non-unit)
    size (a term added to a view is broadcast to the view first, :mod:`.assemble`)."""
    ps = A.shape(part)
    for term, _, stage in terms:
        ts = A.shape(term)
        if ts is None or ps is None or len(ts) > len(stage or ps):
            return False
        off = rank - len(ts)
        if stage is None and not all(ax >= off and A.size_eq(ts[ax - off], ps[ax]) and not A.is_one(ps[ax])
                                     for ax, _ in pads):
            return False
    return True


def slice_add(first: fx.Node, scores: fx.Node, gm) -> Optional[SliceAdd]:
    """The slice add that starts at ``first`` (a reader of ``scores``), or None."""
    rank = len(A.shape(scores) or ())
    if first.op == "call_function" and first.target is operator.getitem and first.args[0] is scores:
        pads = _index_starts(first.args[1], rank)
        got = _written(first, gm) if pads is not None else None
        if got is None:
            return None
        last, terms, nodes = got
        write = next(iter(last.users))
        if not (write.op == "call_function" and write.target is operator.setitem and write.args[0] is scores
                and write.args[2] is last and write.args[1] == first.args[1] and not write.users):
            return None
        return SliceAdd(terms, pads, A.shape(first), [first] + nodes + [write], write) \
            if _fits(terms, first, pads, rank) else None
    if first.op == "call_function" and "aten.slice.Tensor" in str(first.target) and first.args[0] is scores:
        chain = _chain_from(scores, first)
        part = chain[-1]
        pads = _aten_slices(part, scores)
        got = _written(part, gm) if pads is not None else None
        if got is None:
            return None
        last, terms, nodes = got
        write = next(iter(last.users))
        if not (write.op == "call_function" and "aten.copy_" in str(write.target) and write.args[1] is last
                and not write.users and isinstance(write.args[0], fx.Node)):
            return None
        dest = write.args[0]
        back = []
        n = dest
        while isinstance(n, fx.Node) and n is not scores and len(back) < rank:
            back.append(n)
            n = n.args[0] if n.args else None
        if n is not scores or _aten_slices(dest, scores) != pads:
            return None
        return SliceAdd(terms, pads, A.shape(part), chain + nodes + back + [write], write) \
            if _fits(terms, part, pads, rank) else None
    return None
