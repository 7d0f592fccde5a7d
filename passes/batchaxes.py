"""More than two batch axes: which score axes merge into the op's batch and head.

Owns the rule for scores with three or more batch axes — windowed and multi-scale
vision attention, (B, windows, H, L, L) or (B, H, units, L, L), and the grouped-query
einsum (q viewed (B, G, R, L, D) against k (B, G, L, D)). Every axis of the scores that is
neither query nor key is a batch axis (proven by the matmuls, :mod:`.match`); the op has two,
batch and head, so a run of leading batch axes merges into its batch axis and the rest into
its head axis, row-major (:func:`candidate_obs` lists the ways, head runs shortest first).

Merging is exact for any split: every batch axis indexes independent attentions, so any
bijection from their index tuples to (batch, head) pairs is the same computation, provided
every operand is merged the same way. Three cases per operand and group of axes:

- all of the group's axes present: merged by a reshape (a view where the strides allow,
  which :func:`copy_free` checks, so that the choice prefers a split that copies nothing);
- none present: a broadcast (a stride-0 expand, as for two batch axes);
- some present: a bias or mask is expanded over the missing axes first (the reshape then
  copies it, at most the size of the scores the model itself builds); for K and V, a
  leading run of head axes present and the rest missing is grouped-query attention
  (op head h reads K/V head h // (Hq / Hkv), which is exactly the row-major index of the
  present axes), anything else is expanded like a bias.

The op's output is reshaped back to the split axes (:func:`unmerge_sizes`).

The converse, one batch axis of Q·Kᵀ that a view of the scores splits into two (BLOOM:
``baddbmm`` on (B·H, L, D), scores viewed (B, H, Lq, Lk) before its mask is added), is the
same relabelling read backwards (:func:`split_frame`): the attention is described on the
split axes, as batch and head, where each of q, k and v is a row-major reshape that merged
exactly those two axes of sizes (B, H) (:func:`split_operand`: the op reads that tensor, so
``q.reshape(B*H, L, D)[b*H + h]`` is ``q4[b, h]``), a term added before the split is reshaped
to it (:func:`split_term`: a reshape of its own, O(its size)), and the op's (B, H, Lq, Dv)
output is reshaped back to the merged axis. At batch size 1 the view only puts a unit axis
in front of the merged one (:func:`unit_batch`): the frame is the same, its batch part size 1
and its head part the merged axis as it is. Pure.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import ops as O
from attnfuse.passes.types import Miss, View4
from attnfuse.passes.views import build_view, merged_tag, peel, slot_size, slot_tags

Ref = Tuple[fx.Node, int]


def candidate_obs(batch: Sequence[Any]) -> List[List[Any]]:
    """The (batch, head) op tags for these score batch tags, best first: for at most two
    batch axes the one way there is; for more, every split point of the run, the head
    taking the last axis first (Swin's (B, windows, H): windows merge into the batch)."""
    batch = list(batch)
    n = len(batch)
    if n <= 2:
        return [[None] * (2 - n) + batch]

    def tag(parts):
        return parts[0] if len(parts) == 1 else merged_tag(parts)
    return [[tag(batch[:j]), tag(batch[j:])] for j in range(n - 1, 0, -1)]


def is_merged(ob: Sequence[Any]) -> bool:
    return slot_tags(list(ob))[1] != (1, 1)


def _refs(views: Sequence[View4], sshape, stags, flat: Sequence[Any], nb: int, qk: fx.Node) -> dict:
    """For every batch/head slot of size > 1 in the scores, an operand axis carrying that size."""
    refs = {}
    for s in range(nb):
        t = flat[s]
        target = 1 if t is None else sshape[stags.index(t)]
        if A.is_one(target):
            continue
        for x in views:
            if x.axes[s] is not None and A.size_eq(slot_size(x, s), target):
                refs[s] = (x.base, x.axes[s])
                break
        if s not in refs:
            raise Miss("unsupported_op", "no input carries the broadcast batch/head size", qk)
    return refs


def _with_expand(x: View4, slots: Sequence[int], refs: dict) -> View4:
    e = list(x.expand)
    for s in slots:
        if s in refs and A.is_one(slot_size(x, s)):
            e[s] = refs[s]
    return dataclasses.replace(x, expand=tuple(e))


def _present(x: View4, slots: Sequence[int]) -> List[bool]:
    return [not A.is_one(slot_size(x, s)) for s in slots]


def broadcast(q: View4, k: View4, v: View4, qk: fx.Node, sshape, stags, ob) -> Tuple[View4, View4, View4, dict]:
    """Give q, k, v one batch size and k/v one head count via stride-0 expands; returns them
    with the per-slot size references (for biases and for the output)."""
    flat, (g0, g1) = slot_tags(list(ob))
    nb = g0 + g1
    refs = _refs((q, k, v), sshape, stags, flat, nb, qk)
    bslots, hslots = list(range(g0)), list(range(g0, nb))
    q = _with_expand(q, bslots + hslots, refs)
    k, v = _with_expand(k, bslots, refs), _with_expand(v, bslots, refs)
    pk, pv = _present(k, hslots), _present(v, hslots)
    if g1 == 1:  # one head axis: K or V alone broadcast over heads takes the other's heads
        if not pk[0] and pv[0]:
            k = dataclasses.replace(k, expand=k.expand[:g0] + ((v.base, v.axes[g0]),) + k.expand[g0 + 1:])
        elif not pv[0] and pk[0]:
            v = dataclasses.replace(v, expand=v.expand[:g0] + ((k.base, k.axes[g0]),) + v.expand[g0 + 1:])
    elif not (pk == pv and pk == sorted(pk, reverse=True)):
        # not a leading run of K/V head axes (grouped-query): expand them all, like a bias
        k, v = _with_expand(k, hslots, refs), _with_expand(v, hslots, refs)
    return q, k, v, refs


def complete(x: View4, refs: dict) -> View4:
    """A bias/mask/scale view whose merged group is partly present gets the missing axes
    expanded (merging needs every axis of the group; a group wholly missing broadcasts)."""
    if x.groups == (1, 1):
        return x
    g0, g1 = x.groups
    todo = []
    for group in (range(g0), range(g0, g0 + g1)):
        pres = _present(x, group)
        if any(pres) and not all(pres):
            todo += [s for s in group if not pres[s - group.start]]
    return _with_expand(x, todo, refs) if todo else x


def copy_free(x: View4) -> bool:
    """Whether merging ``x``'s groups is a view (its strides allow it), not a copy."""
    if x.groups == (1, 1):
        return True
    val = A.meta_val(x.base)
    stride = getattr(val, "stride", None)
    try:
        st = tuple(stride()) if callable(stride) else None
    except Exception:  # noqa: BLE001
        st = None
    if st is None:
        return False
    g0, g1 = x.groups
    for group in (range(g0), range(g0, g0 + g1)):
        parts = [s for s in group if not A.is_one(slot_size(x, s)) or x.expand[s] is not None]
        if len(parts) < 2:
            continue
        if any(x.expand[s] is not None for s in parts):
            return False
        for a, b in zip(parts, parts[1:]):
            ia, ib = x.axes[a], x.axes[b]
            if not A.size_eq(st[ia], A.expr(A.shape(x.base)[ib]) * A.expr(st[ib])):
                return False
    return True


def unmerge_sizes(ob, refs: dict) -> Optional[Tuple[Any, ...]]:
    """The op output's batch/head slot sizes ((node, axis) or 1) to reshape it back to, or
    None when nothing was merged."""
    flat, groups = slot_tags(list(ob))
    if groups == (1, 1):
        return None
    return tuple(refs.get(s, 1) for s in range(groups[0] + groups[1]))


# ---------------------------------------------------------------------------
# one batch axis split into batch and head by a view of the scores (BLOOM)
# ---------------------------------------------------------------------------

def split_frame(items: Sequence, stags: Sequence[Any], tagmap: dict) -> Optional[Tuple[List, Tuple]]:
    """``(tags, shape)`` of the scores at their first view when it splits their only batch
    axis into two parts ((B·H, Lq, Lk) viewed (B, H, Lq, Lk)), or puts a unit batch axis in
    front of it (B = 1: (1·H, Lq, Lk) viewed (1, H, Lq, Lk), :func:`unit_batch`), else None."""
    batch = [t for t in stags if t not in ("q", "k")]
    if len(batch) != 1:
        return None
    for node, kind, _ in items:
        if kind != "view":
            continue
        tags = tagmap.get(node)
        parts = [("split", batch[0], 0, 2), ("split", batch[0], 1, 2)]
        if tags is None or not ([t for t in tags if t not in ("q", "k", None)] == parts or unit_batch(tags, stags)):
            return None
        return list(tags), tuple(A.shape(node))
    return None


def unit_batch(frame_tags: Sequence[Any], stags: Sequence[Any]) -> bool:
    """Whether the split frame only puts a size-1 axis in front of the scores' own axes
    (``stags``, one batch axis): the view's split has a unit batch part (B = 1, static: a
    symbolic B keeps a split of B·H, which the general frame reads exactly for every B, 1
    included). Then the merged axis itself is the op's head axis (head h is merged index
    0·H + h), q, k, v and every term added before the view are read as they are, and a
    term right-aligned to the frame has the axes it has right-aligned to ``stags``."""
    return list(frame_tags) == [None] + list(stags)


def unit_frame_tags(stags: Sequence[Any]) -> List[Any]:
    """The tags of a :func:`unit_batch` frame with its unit axis named as the split's batch
    part, so that the op's batch slot has a tag (a key-padding mask varies along it) though
    every operand and term has it at size 1."""
    (merged,) = [t for t in stags if t not in ("q", "k")]
    return [("split", merged, 0, 2)] + list(stags)


def split_operand(node: fx.Node, tags: Sequence[Any], merged: Any, parts: Sequence[Any], sizes: Sequence[Any],
                  tail: Sequence[Any], what: str, gm, gqa: bool) -> View4:
    """``node`` (tagged ``tags``, one axis ``merged``) in op order with ``parts`` as batch and
    head: through view ops back to a row-major reshape whose input has two axes of ``sizes``
    that merge into the ``merged`` axis, the op reading that input. Miss otherwise."""
    v = peel(build_view(node, tags, [None, merged] + list(tail), what), gm, gqa=False)
    b, a = v.base, v.axes[1]
    op = O.classify(b, gm)
    x = op.get("x") if op is not None and op.kind == O.LAYOUT and op.sub == "view" else None
    xs, bs = (A.shape(x), A.shape(b)) if isinstance(x, fx.Node) else (None, None)
    groups = A.view_groups(xs, bs) if xs is not None and bs is not None and a is not None else None
    if groups is None:
        raise Miss("unsupported_op", f"{what} {node.name}: not a reshape that merged the scores' batch parts", node)
    out_to_in, split = {}, None
    for gi, go in groups:
        if go == [a] and len(gi) == 2 and all(A.size_eq(xs[i], s) for i, s in zip(gi, sizes)):
            split = gi
        elif len(gi) == 1 and len(go) == 1:
            out_to_in[go[0]] = gi[0]
    rest = [None if t is None else out_to_in.get(t, -1) for t in v.axes[2:]]
    if split is None or -1 in rest:
        raise Miss("unsupported_op", f"{what} {node.name}: its batch axis is not the scores' (B, H) merged", node)
    return peel(View4(x, (split[0], split[1], rest[0], rest[1])), gm, gqa=gqa)


def split_term(n: fx.Node, tags: Sequence[Any], merged: Any, sizes: Sequence[Any],
               op_tags: Sequence[Any], parts: Sequence[Any], part_refs: Sequence[Any] = (None, None),
               symbolic_ok: bool = False) -> Tuple[View4, Optional[Tuple]]:
    """A term added before the split (tagged on the merged scores) in the split frame: the
    view and its ``pre`` (a reshape splitting its ``merged`` axis into ``sizes``).

    The reshape is row-major, so ``term.reshape(..., B, H, ...)[.., b, h, ..]`` is
    ``term[.., b*H + h, ..]``, the element the merged scores read, where the merged axis has
    size B*H (proven, symbolically where sizes are symbolic). A static size is written as
    an int; with ``symbolic_ok`` (float terms: a mask's structure is sampled at concrete
    sizes, :class:`.bands.Sampler`) a symbolic one as ``-1`` in the no-op broadcast and as a
    ``(node, axis)`` size read at run time in the reshape: the term's own axis, or for the
    split parts ``part_refs`` (an operand axis proven to have that size, :func:`broadcast`).
    Raises ``Miss`` otherwise."""
    if merged not in tags:
        return build_view(n, tags, op_tags, "bias"), None
    shape = A.shape(n)
    i = list(tags).index(merged)
    if shape is None or not A.size_eq(shape[i], A.prod(sizes)):
        raise Miss("unsupported_op", f"{n.name}: a term whose merged batch axis is not provably B*H", n)

    def entry(x, ref):
        si = A.static_int(x)
        if si is not None:
            return si
        if not symbolic_ok or ref is None:
            raise Miss("unsupported_op", f"{n.name}: a mask term on merged batch axes with dynamic shapes "
                                         f"(its structure is sampled at concrete sizes)", n)
        return ref
    own = tuple(-1 if A.static_int(x) is None else A.static_int(x) for x in shape)
    if not symbolic_ok and -1 in own:
        entry(shape[own.index(-1)], None)   # raises
    split = [entry(x, (n, j)) for j, x in enumerate(shape)]
    split[i:i + 1] = [entry(x, r) for x, r in zip(sizes, part_refs)]
    tags2 = list(tags[:i]) + list(parts) + list(tags[i + 1:])
    view = View4(n, tuple(tags2.index(t) if t in tags2 else None for t in op_tags))
    return view, (own, tuple(split))
