"""Seeing operands in op order (batch, head, seq, dim) through view ops only.

Owns :func:`build_view` (name which axis of a tensor is which op axis, by tags) and
:func:`peel` (walk a :class:`View4` back through permutes, transposes, unsqueezes,
``contiguous``/``clone`` and, for keys/values, the repeats of GQA/MQA — HF
``repeat_kv`` expand+reshape, ``repeat_interleave``, ``repeat`` of a unit axis — so
the fused op reads the original tensor with strides and no copy).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import ops as O
from attnfuse.passes.types import Miss, View4


MERGED = "merged"


def merged_tag(parts: Sequence[Any]) -> Any:
    """The op tag of a batch or head axis that stands for several score batch axes (row-major)."""
    return (MERGED, tuple(parts))


def slot_tags(op_tags: Sequence[Any]):
    """``op_tags`` with merged tags spelled out, one per slot, and the (batch, head) group sizes."""
    flat: List[Any] = []
    groups = [1, 1]
    for i, t in enumerate(op_tags):
        if i < 2 and isinstance(t, tuple) and len(t) == 2 and t[0] == MERGED:
            flat += list(t[1])
            groups[i] = len(t[1])
        else:
            flat.append(t)
    return flat, (groups[0], groups[1])


def build_view(node: fx.Node, node_tags: Sequence[Any], op_tags: Sequence[Any], what: str) -> View4:
    """Map ``node``'s axes (tagged) onto ``op_tags``; untagged leftovers must be unit axes.
    A merged tag in ``op_tags`` (:func:`merged_tag`) becomes one slot per part."""
    s = A.shape(node)
    op_tags, groups = slot_tags(op_tags)
    axes: List[Optional[int]] = []
    used = set()
    for t in op_tags:
        j = None
        if t is not None:
            hits = [i for i, nt in enumerate(node_tags) if nt == t]
            if len(hits) > 1:
                raise Miss("unsupported_op", f"{what} {node.name}: axis tag {t} appears twice", node)
            j = hits[0] if hits else None
        if j is not None:
            used.add(j)
        axes.append(j)
    for i, size in enumerate(s):
        if i not in used and not A.is_one(size):
            raise Miss("unsupported_op", f"{what} {node.name}: axis {i} (size {size}) has no place in "
                                         f"(batch, head, seq, dim)", node)
    return View4(node, tuple(axes), (None,) * len(axes), None, groups)


def _has_inplace_users(n: fx.Node, gm) -> bool:
    for u in n.users:
        op = O.classify(u, gm)
        if (op is not None and op.inplace) or (u.op == "call_method" and str(u.target).endswith("_")) \
                or (u.op == "call_function" and str(getattr(u.target, "__name__", "")).endswith("_")):
            return True
    return False


def _skip_identity(n: Any, gm) -> Any:
    for _ in range(8):
        op = O.classify(n, gm) if isinstance(n, fx.Node) else None
        if op is None or op.kind != O.LAYOUT or op.sub != "identity" or not isinstance(op["x"], fx.Node) \
                or _has_inplace_users(op["x"], gm):
            return n
        n = op["x"]
    return n


def _getitem_unsqueeze(n: fx.Node, op: O.Op) -> Optional[List[int]]:
    """For ``x[:, :, None]``-style indexing: output axes that are new (None); else None."""
    idx = op["idx"]
    if not isinstance(idx, tuple):
        idx = (idx,)
    xs = A.shape(op["x"])
    if xs is None:
        return None
    if sum(1 for i in idx if i is Ellipsis) > 1:
        return None
    for i in idx:
        if not (i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None, None, None))):
            return None
    n_real = sum(1 for i in idx if isinstance(i, slice))
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (len(xs) - n_real) + idx[e + 1:]
    else:
        idx = idx + (slice(None),) * (len(xs) - n_real)
    return [o for o, i in enumerate(idx) if i is None]


def peel(v: View4, gm, gqa: bool) -> View4:
    """Follow ``v.base`` back through view-like ops (and GQA repeats when ``gqa``)."""
    for _ in range(32):
        b = v.base
        op = O.classify(b, gm)
        if op is None:
            break
        x = op.get("x")
        if not isinstance(x, fx.Node) or A.shape(x) is None or A.shape(b) is None:
            break
        xs, bs = A.shape(x), A.shape(b)
        axes = list(v.axes)
        gqa_from = v.gqa_from
        if op.kind == O.GETITEM:
            new = _getitem_unsqueeze(b, op)
            if new is None:
                break
            keep = [o for o in range(len(bs)) if o not in new]
            axes = [None if a is None or a in new else keep.index(a) for a in axes]
        elif op.kind != O.LAYOUT:
            break
        elif op.sub == "permute":
            dims = [A.norm_dim(d, len(xs)) for d in op["dims"]]
            axes = [None if a is None else dims[a] for a in axes]
        elif op.sub in ("transpose", "mT", "t"):
            d0, d1 = (op["d0"], op["d1"]) if op.sub == "transpose" else (-2, -1)
            d0, d1 = A.norm_dim(d0, len(xs)), A.norm_dim(d1, len(xs))
            sw = {d0: d1, d1: d0}
            axes = [None if a is None else sw.get(a, a) for a in axes]
        elif op.sub == "identity":
            if _has_inplace_users(x, gm):
                break
        elif op.sub == "unsqueeze":
            d = A.norm_dim(op["dim"], len(bs))
            axes = [None if a is None or a == d else (a - 1 if a > d else a) for a in axes]
        elif op.sub == "expand" and gqa:
            pad = len(bs) - len(xs)
            axes = [None if a is None or a < pad else a - pad for a in axes]
            gqa_from = gqa_from or "expand"
        elif op.sub in ("repeat", "repeat_interleave", "view") and gqa and v.groups != (1, 1):
            break  # the head is several slots: only a broadcast expand is undone there
        elif op.sub == "repeat" and gqa:
            reps = op["repeats"]
            if len(reps) != len(xs) or not all(isinstance(r, int) for r in reps) or _has_inplace_users(x, gm):
                break
            if any(r != 1 and not A.is_one(xs[i]) for i, r in enumerate(reps)):
                break
            gqa_from = "repeat"
        elif op.sub == "repeat_interleave" and gqa:
            reps, dim = op["repeats"], op["dim"]
            if not isinstance(reps, int) or not isinstance(dim, int) or _has_inplace_users(x, gm):
                break
            if axes[1] is None or A.norm_dim(dim, len(xs)) != axes[1]:
                break
            gqa_from = "repeat_interleave"
        elif op.sub == "view" and gqa:
            res = _unrepeat_view(v, b, x, gm)
            if res is None:
                break
            v = res
            continue
        else:
            break
        v = View4(x, tuple(axes), v.expand, gqa_from, v.groups)
    return v


def _unrepeat_view(v: View4, b: fx.Node, x: fx.Node, gm) -> Optional[View4]:
    """HF repeat_kv: ``x[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv*n, L, D)``."""
    if v.axes[1] is None:
        return None
    e = _skip_identity(x, gm)
    eop = O.classify(e, gm) if isinstance(e, fx.Node) else None
    if eop is None or eop.kind != O.LAYOUT or eop.sub != "expand" or not isinstance(eop["x"], fx.Node):
        return None
    x0 = eop["x"]
    es, s0, bs = A.shape(e), A.shape(x0), A.shape(b)
    if es is None or s0 is None or len(es) != len(s0):
        return None
    groups = A.view_groups(es, bs)
    if groups is None:
        return None
    out_to_in = {}
    for gi, go in groups:
        if len(gi) == 1 and len(go) == 1:
            out_to_in[go[0]] = gi[0]
        elif len(go) == 1 and go[0] == v.axes[1] and len(gi) == 2:
            h, r = gi
            if not (A.is_one(s0[r]) and not A.is_one(es[r])):
                return None
            out_to_in[go[0]] = h
        else:
            return None
    axes = []
    for a in v.axes:
        if a is None:
            axes.append(None)
        elif a in out_to_in:
            axes.append(out_to_in[a])
        elif A.is_one(bs[a]):
            axes.append(None)
        else:
            return None
    return View4(x0, tuple(axes), v.expand, "expand+reshape")


def slots(v: View4, i: int) -> List[int]:
    """The slots of op axis ``i`` (0 batch, 1 head, 2 seq, 3 dim) in ``v.axes``."""
    g0, g1 = v.groups
    return [list(range(g0)), list(range(g0, g0 + g1)), [g0 + g1], [g0 + g1 + 1]][i]


def slot_size(v: View4, s: int):
    a = v.axes[s]
    return 1 if a is None else A.shape(v.base)[a]


def size_at(v: View4, i: int):
    """The size of op axis ``i`` of ``v`` (the product of its slots' sizes when merged)."""
    sl = slots(v, i)
    if len(sl) == 1:
        return slot_size(v, sl[0])
    return A.prod([slot_size(v, s) for s in sl])


def axis_at(v: View4, i: int) -> Optional[int]:
    """The base axis of op axis ``i``, which must be a single slot (seq and dim always are)."""
    sl = slots(v, i)
    assert len(sl) == 1, "a merged op axis has no single base axis"
    return v.axes[sl[0]]
