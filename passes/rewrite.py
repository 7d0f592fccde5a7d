"""The rewriter: every proven match becomes one ``attnfuse::flash_attention`` call.

Owns :func:`rewrite_graph`: find softmaxes, match each (:mod:`.match`), emit the
fused call on strided views of q/k/v (no copies, no materialised repeats or bias
broadcasts), view the output back to the P·V layout, check it on fake tensors
(:mod:`.validate`), erase the dead nodes, lint and recompile. Each match is fused
all or nothing: one that fails to emit or to check is undone alone and reported as a
``rewrite_failed`` near miss. Running it again on its output changes nothing (no
softmax is left to anchor on). Cost is linear in the graph size (each match walks its
own chain).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import List, Mapping, Optional, Tuple

import torch
from torch import fx  # noqa: F401

from attnfuse.passes import axes as A
from attnfuse.passes import ops as O
from attnfuse.passes.dead import dead_closure
from attnfuse.passes import fillrows, inputmask
from attnfuse.passes.emit import Emitter, is_aten_graph
from attnfuse.passes.match import match_softmax
from attnfuse.passes.mha import erase_calls, inline_mha, undo_inlines
from attnfuse.passes.report import Fusion, Report
from attnfuse.passes.types import AttentionMatch, NearMiss, View4
from attnfuse.passes.validate import check_replacement, strides_of
from attnfuse.passes.views import axis_at, size_at

_PURE = (O.LAYOUT, O.CAST, O.SCALE, O.ADD, O.MASK, O.COMPARE, O.GETITEM, O.ELEMENTWISE, O.MATMUL,
         O.SOFTMAX, O.LOG_SOFTMAX)


def find_matches(gm: fx.GraphModule):
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    memo: dict = {}
    matches: List[AttentionMatch] = []
    misses: List[NearMiss] = []
    claimed = set()
    for n in list(graph.nodes):
        op = O.classify(n, gm)
        if op is None or op.kind not in (O.SOFTMAX, O.LOG_SOFTMAX):
            continue
        res = match_softmax(n, gm, order, memo)
        if res is None:
            continue
        if isinstance(res, NearMiss):
            misses.append(res)
        elif any(r in claimed for r in res.removed):
            misses.append(NearMiss("unsupported_op", "overlaps another attention", res.location, n.name,
                                   softmax=n.name))
        else:
            claimed.update(res.removed)
            matches.append(res)
    return matches, misses


def _describe_bias(m: AttentionMatch) -> str:
    if not m.terms:
        return "none"
    return " + ".join(f"{t.kind}:{t.view.base.name}" for t in m.terms)


def _emit(m: AttentionMatch, em: Emitter):
    q = em.view4(m.q)
    for fv, how in m.q_factors:
        f = em.view4(fv)
        q2 = em.mul(q, f) if how == "mul" else em.div(q, f)
        q = em.cast(q2, A.dtype(m.q.base)) if A.dtype(fv.base) != A.dtype(m.q.base) else q2
    k, v = em.view4(m.k), em.view4(m.v)
    floats, keeps = [], []
    for t in m.terms:
        x = em.view4(t.view, t.pre, t.pad)
        if t.cast is not None:  # an integer or bool term: eager's promotion to the scores' dtype
            x = em.cast(x, t.cast)
        if t.kind == "float":
            floats.append(x if t.coef == 1.0 else em.mul(x, t.coef))
        elif t.kind == "keep":
            keeps.append(em.logical_not(x) if t.invert else x)
        else:  # fill: positions where (cond, possibly negated) is True get coef
            c = em.logical_not(x) if t.invert else x
            floats.append(em.mul(em.cast(c, torch.float32), t.coef))
    bias = None
    for f in floats:
        bias = f if bias is None else em.add(bias, f)
    keep = None
    for kp in keeps:
        keep = kp if keep is None else em.logical_and(keep, kp)
    if keep is not None:
        bias = keep if bias is None else em.where_neg_inf(keep, bias)
    seed = em.seed() if m.dropout_p > 0 else None
    scale = m.scale
    for node, how in m.info.get("scale_nodes", ()):
        scale = em.scalar(operator.mul if how == "mul" else operator.truediv, scale, node)
    key_mask = None
    for kv_, neg in m.key_masks:  # (B or 1, 1, 1, Lk) -> (B or 1, Lk)
        x = em.squeeze(em.squeeze(em.view4(kv_), 2), 1)
        x = em.logical_not(x) if neg else x
        key_mask = x if key_mask is None else em.logical_and(key_mask, x)
    sinks = None
    if m.sinks is not None:  # (1, H|1, 1, 1) -> (Hq,): one logit per query head
        sinks = em.squeeze(em.squeeze(em.squeeze(em.view4(m.sinks), 3), 2), 0)
        if m.sinks.axes[1] is None:  # one sink shared by every head
            sinks = em.expand(sinks, [em.size(q, 1)])
    alibi = None if m.alibi is None else _alibi_slopes(em, m.alibi, q)
    key_mask = inputmask.combine(em, key_mask, inputmask.derived_key_mask(em, m))
    offsets = inputmask.derived_causal_offsets(em, m, q)
    out, call = em.fused(fillrows.zero_q(em, m, q), k, v, bias, scale, m.causal, m.dropout_p, m.softcap,
                         seed, m.window, key_mask, sinks, alibi, offsets)
    if m.fixup:
        out = _empty_row_fixup(em, m, q, k, v, call, out, scale)
    out = fillrows.apply(em, m, q, k, v, out)
    for rv, zero_when in m.row_zero:  # a fill of whole rows of P is the same fill of P·V's rows
        c = em.view4(rv)
        out = em.zero_where(out, c if zero_when else em.logical_not(c))
    if m.info.get("unmerge") or m.info.get("merge_out"):
        tail = [1 if axis_at(x, i) is None else em.size(x.base, axis_at(x, i)) for x, i in ((m.q, 2), (m.v, 3))]
        if m.info.get("unmerge"):  # merged batch axes (passes/batchaxes.py): split them back
            out = em.reshape(out, [1 if r == 1 else em.size(r[0], r[1]) for r in m.info["unmerge"]] + tail)
        else:  # batch and head split from one axis of Q·Kᵀ (BLOOM, batchaxes.split_frame): merged back
            out = em.reshape(out, [-1] + tail)
    for d in m.out_squeeze:
        out = em.squeeze(out, d)
    if list(m.out_perm) != list(range(len(m.out_perm))):
        out = em.permute(out, m.out_perm)
        out = out if _permute_keeps_layout(m) else em.contiguous(out)
    for d in m.info.get("out_unsqueeze", ()):
        out = em.unsqueeze(out, d)
    if m.out_dtype is not None and A.dtype(m.q.base) != m.out_dtype:
        out = em.cast(out, m.out_dtype)
    return out, call


def _alibi_slopes(em: Emitter, al, q):
    """The op's (B, Hq) float32 slopes of a proven ALiBi term (passes/alibi.py): the slope
    tensor broadcast to the product's shape, through the term's own layout ops, viewed in
    op order, read at query 0 / key 0 (it is constant along both), times the term's
    constant factor. Its values are the graph's, at run time."""
    x = em.expand(al.slopes, list(al.expand_to))
    x.meta.update({k: v for k, v in al.product.meta.items() if k in ("val", "example_value", "tensor_meta")})
    x = em.replay(al.chain, x)   # node_copy keeps each layout node's metadata
    x = em.view4(dataclasses.replace(al.view, base=x))
    x = em.select(em.select(x, 3, 0), 2, 0)
    x = em.cast(em.expand(x, [em.size(q, 0), em.size(q, 1)]), torch.float32)
    if al.coef != 1.0:
        x = em.mul(x, al.coef)
    return em.contiguous(x)


def _permute_keeps_layout(m: AttentionMatch) -> bool:
    """The op's (contiguous) output, squeezed and permuted to the P·V layout, has the strides
    P·V recorded: eager's ``einsum`` returns such a permuted view (e.g. ``bhqk,bkhd->bqhd``),
    and the rewrite then keeps that layout instead of copying to a contiguous one."""
    shape, stride = A.shape(m.pv), strides_of(A.meta_val(m.pv))
    if shape is None or stride is None or len(shape) != len(stride):
        return False
    kept = [d for d in range(len(shape)) if d not in m.info.get("out_unsqueeze", ())]
    sizes, strides = [shape[d] for d in kept], [stride[d] for d in kept]
    perm = list(m.out_perm)
    if len(perm) != len(sizes):
        return False
    before = [None] * len(perm)  # the squeezed op output: before[perm[j]] = sizes[j]
    for j, p in enumerate(perm):
        before[p] = sizes[j]
    contiguous = [A.prod(before[i + 1:]) for i in range(len(before))]
    return all(A.is_one(sizes[j]) or A.size_eq(contiguous[p], strides[j]) for j, p in enumerate(perm))


def _empty_row_fixup(em: Emitter, m: AttentionMatch, q, k, v, call, out, scale):
    """Rows that see no key, under a finite fill (Hugging Face's ``finfo.min``), are in eager a
    uniform softmax over all Lk keys: ``s + fill`` rounds to ``fill`` for ``|s| < 2**103``
    (fp32), and ``masked_fill`` / ``where`` put ``fill`` there. The op gives them 0 and
    ``lse = -inf``; this puts back eager's value, ``mean_j v_j``, and its gradient. An added
    fill passes the gradient on to the scores (``m.fixup_scores_grad``):

        out_i = mean_j v_j + (f_i - f_i.detach()),  f_i = scale · q_i · M,
        M = Kᵀ (V - mean V).detach() / Lk

    f is 0 in the forward; its gradient is the softmax Jacobian at a uniform row
    (dq_i = scale · dout_i · Mᵀ, dk_j = scale/Lk · (dout_i · (v_j - v̄)) q_i), which is what
    eager's autograd gives those rows. A fill that replaces the scores stops it: there
    ``out_i = mean_j v_j`` alone (no gradient to q or k, as in eager). O(B·H·L·D·Dv) work:
    no (Lq, Lk) tensor."""
    lse = em.item(call, 1)
    empty = em.unsqueeze(em.is_neg_inf(lse), 3)                     # (B, Hq, Lq, 1)
    vbar = em.mean_keys(v)                                          # (B, Hkv, 1, Dv)
    if not m.fixup_scores_grad:
        reps = em.floordiv(em.size(q, 1, symbolic=True), em.size(k, 1, symbolic=True))
        return em.where(empty, em.repeat_heads(vbar, reps), out)
    lk = A.static_int(size_at(m.k, 2)) if axis_at(m.k, 2) is not None else 1
    if lk is None:
        lk = em.size(m.k.base, axis_at(m.k, 2), symbolic=True)
    kv_m = em.div(em.matmul(em.transpose_last(k), em.detach(em.sub(v, vbar))), lk)   # (B, Hkv, D, Dv)
    reps = em.floordiv(em.size(q, 1, symbolic=True), em.size(k, 1, symbolic=True))
    vbar, kv_m = em.repeat_heads(vbar, reps), em.repeat_heads(kv_m, reps)
    f = em.mul(em.matmul(q, kv_m), scale)                           # (B, Hq, Lq, Dv)
    fix = em.add(vbar, em.sub(f, em.detach(f)))
    return em.where(empty, fix, out)


def _remap(m: AttentionMatch, rep: dict) -> AttentionMatch:
    """Point a later match at the outputs of earlier rewrites (attention fed by attention)."""
    def n(x):
        return rep.get(x, x) if isinstance(x, fx.Node) else x

    def v(view: View4) -> View4:
        return dataclasses.replace(view, base=n(view.base), expand=tuple(
            None if e is None else (n(e[0]), e[1]) for e in view.expand))

    info = dict(m.info)
    info["scale_nodes"] = [(n(x), how) for x, how in info.get("scale_nodes", ())]
    if info.get("unmerge"):
        info["unmerge"] = tuple(r if r == 1 else (n(r[0]), r[1]) for r in info["unmerge"])
    info["shape_fix"] = [(u, src if src == 1 or not isinstance(src, tuple) else (n(src[0]), src[1]), how)
                         for u, src, how in info.get("shape_fix", ())]
    return dataclasses.replace(
        m, q=v(m.q), k=v(m.k), v=v(m.v), q_factors=[(v(f), how) for f, how in m.q_factors],
        terms=[dataclasses.replace(t, view=v(t.view)) for t in m.terms], info=info,
        key_masks=[(v(kv_), neg) for kv_, neg in m.key_masks], row_zero=[(v(rv), z) for rv, z in m.row_zero],
        sinks=None if m.sinks is None else v(m.sinks))


def _replace_with_const(u: fx.Node, value) -> None:
    for user in list(u.users):
        user.args = tuple(value if a is u else a for a in user.args)
        user.kwargs = {k: (value if a is u else a) for k, a in user.kwargs.items()}


def _erase(gm: fx.GraphModule, removed: List[fx.Node]) -> None:
    graph = gm.graph
    todo = list(removed)
    seen = set()
    while todo:
        progress = False
        for n in list(todo):
            if n.users:
                continue
            todo.remove(n)
            inputs = [a for a in n.all_input_nodes]
            graph.erase_node(n)
            seen.add(n)
            progress = True
            for a in inputs:
                if a in seen or a.users or a in todo:
                    continue
                op = O.classify(a, gm)
                if (op is not None and op.kind in _PURE and not op.inplace) or \
                        A.shape_query(a) is not None or (a.op == "call_method" and a.target == "size") or \
                        A.is_dtype_read(a):
                    todo.append(a)
        if not progress:
            break


_PURE_METHODS = {"to", "expand", "expand_as", "new_ones", "new_zeros", "new_full", "unsqueeze", "view", "reshape",
                 "__and__", "__or__", "__invert__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
                 "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "bool", "float",
                 "long", "int", "type", "size", "contiguous", "clone", "cumsum", "diff", "__getitem__", "__sub__",
                 "__add__", "masked_fill"}
_PURE_TORCH = (torch.arange, torch.zeros, torch.ones, torch.full, torch.where, torch.logical_and, torch.logical_or,
               torch.logical_not, torch.bitwise_and, torch.bitwise_or, torch.bitwise_not, torch.eq, torch.ne,
               torch.lt, torch.le, torch.gt, torch.ge, torch.diff, torch.cumsum, torch.masked_fill)
_PURE_OPERATORS = (operator.and_, operator.or_, operator.invert, operator.not_, operator.eq, operator.ne,
                   operator.lt, operator.le, operator.gt, operator.ge, operator.add, operator.sub, operator.mul,
                   operator.neg, operator.getitem, operator.floordiv)


def _is_pure_mask_node(n: fx.Node) -> bool:
    """A node that builds a mask and has no effect besides its value (never in place, never random)."""
    if n.op == "call_method":
        return n.target in _PURE_METHODS
    if n.op != "call_function":
        return False
    if n.target in _PURE_OPERATORS or n.target in _PURE_TORCH:
        return True
    schema = getattr(n.target, "_schema", None)
    if isinstance(n.target, torch._ops.OpOverload) and schema is not None:
        return not schema.is_mutable and torch.Tag.nondeterministic_seeded not in n.target.tags
    return False


def _mask_ancestors(roots: List[fx.Node]) -> set:
    """The pure nodes a replaced mask is built from (up to the graph's inputs)."""
    cand, todo = set(), list(roots)
    while todo and len(cand) < 4096:
        n = todo.pop()
        if n in cand or not _is_pure_mask_node(n):
            continue
        cand.add(n)
        todo += n.all_input_nodes
    return cand


def _erase_dead_mask_nodes(gm: fx.GraphModule, cand: set) -> None:
    """Erase the (Lq, Lk) mask a structure replaced and what only it read, once unused."""
    for n in reversed(list(gm.graph.nodes)):  # users before their inputs
        if n in cand and not n.users:
            gm.graph.erase_node(n)


REWRITE_FAILED = "rewrite_failed"   # near-miss kind: emitting or checking this fusion raised


def rewrite_graph(gm: fx.GraphModule, *, strict: bool = False,
                  leave_unfused: Optional[Mapping[str, Tuple[str, str]]] = None) -> Report:
    """Rewrite ``gm`` in place; returns what was fused and what was not (and why).

    Each match is fused on its own (:func:`_fuse_one`): when emitting or checking one
    raises, only that match is undone and it becomes a ``rewrite_failed`` near miss whose
    reason is the error (``strict`` raises the error instead); the other matches are fused.
    ``leave_unfused`` maps the name of a softmax to ``(kind, reason)``: a match anchored
    there is left as it is and reported as a near miss of that kind (the backend uses it
    for fusions its inner compiler rejected)."""
    inlined, mha_misses = inline_mha(gm)   # nn.MultiheadAttention's explicit path, written out
    matches, misses = find_matches(gm)
    if inlined:  # a written-out call whose attention is not fused goes back as it was
        inlined = undo_inlines(gm, inlined, {m.softmax for m in matches})
    report = Report(near_misses=mha_misses + misses)
    leave = dict(leave_unfused or {})
    todo = []
    for m in matches:
        if m.softmax.name in leave:
            kind, reason = leave[m.softmax.name]
            report.near_misses.append(NearMiss(kind, reason, m.location, m.softmax.name))
        else:
            planned = fillrows.plan(m, gm)
            if isinstance(planned, NearMiss):
                report.near_misses.append(planned)
            else:
                todo.append(inputmask.plan(planned, gm))
    if not todo:
        if inlined:
            erase_calls(gm, inlined)
            gm.graph.lint()
            gm.recompile()
        return report
    em = Emitter(gm.graph, is_aten_graph(gm.graph))
    replaced: dict = {}  # P·V node of an earlier match -> the node now standing for it
    dead_masks: set = set()  # nodes of masks that became structure: erased once nothing reads them
    for m in todo:
        try:
            if replaced:
                m = _remap(m, replaced)
            out, call, stale = _fuse_one(gm, em, m)
        except Exception as e:  # noqa: BLE001  (this fusion only; the graph is as before it)
            if strict:
                raise
            report.near_misses.append(NearMiss(REWRITE_FAILED, f"{type(e).__name__}: {e}", m.location,
                                               m.softmax.name))
            continue
        replaced[m.pv] = out
        # (before the erase: a mask read only by this match is erased with it, inputs and all)
        dead_masks |= _mask_ancestors(list(m.info.get("mask_roots", ())))
        _erase_replaced(gm, m, stale)
        report.fusions.append(_fusion_of(m, call))
    _erase_dead_mask_nodes(gm, dead_masks)
    erase_calls(gm, inlined)
    gm.graph.lint()
    gm.recompile()
    return report


def _fuse_one(gm: fx.GraphModule, em: Emitter, m: AttentionMatch) -> Tuple[fx.Node, fx.Node, List[fx.Node]]:
    """Emit ``m``'s fused call before its P·V node, check it on fake tensors
    (:func:`~attnfuse.passes.validate.check_replacement`), then point P·V's users and the
    size queries of removed nodes at it. Returns the node standing for P·V, the fused call,
    and the size queries it made dead (erased by the caller).

    All or nothing: on any error, every node inserted is erased and every node whose
    arguments changed gets them back before the error propagates; nothing is erased
    before this returns."""
    graph = gm.graph
    marks: List[Tuple[fx.Node, fx.Node]] = []   # (node before, node after): what lies between is new
    saved: List[Tuple[fx.Node, tuple, dict]] = []   # nodes whose arguments changed, with the old ones
    stale: List[fx.Node] = []
    try:
        marks.append((m.pv.prev, m.pv))
        with graph.inserting_before(m.pv):
            out, call = _emit(m, em)
        check_replacement(_between(*marks[0]), out, m.pv, gm)
        for key in ("val", "example_value", "tensor_meta"):  # same shape and dtype as P·V (checked)
            if key in m.pv.meta and key not in out.meta:
                out.meta[key] = m.pv.meta[key]
        saved += [(u, u.args, dict(u.kwargs)) for u in m.pv.users]
        m.pv.replace_all_uses_with(out)
        for u, src, how in m.info.get("shape_fix", ()):
            if how == "args" and src != 1:
                saved.append((u, u.args, dict(u.kwargs)))
                u.args = (src[0], src[1])
                continue
            marks.append((u.prev, u))
            with graph.inserting_before(u):
                new = 1 if src == 1 else em.size(src[0], src[1], symbolic=True)
            saved += [(w, w.args, dict(w.kwargs)) for w in u.users]
            u.replace_all_uses_with(new) if isinstance(new, fx.Node) else _replace_with_const(u, new)
            stale.append(u)
    except BaseException:
        _undo(graph, marks, saved)
        raise
    return out, call, stale


def _between(first: fx.Node, last: fx.Node) -> List[fx.Node]:
    """The nodes strictly between ``first`` and ``last``, in graph order."""
    nodes, n = [], first.next
    while n is not last:
        nodes.append(n)
        n = n.next
    return nodes


def _undo(graph: fx.Graph, marks: List[Tuple[fx.Node, fx.Node]], saved: List[Tuple[fx.Node, tuple, dict]]) -> None:
    """Give changed nodes their old arguments back, then erase the inserted nodes (users first)."""
    for node, args, kwargs in reversed(saved):
        node.args, node.kwargs = args, kwargs
    for first, last in reversed(marks):
        for n in reversed(_between(first, last)):
            graph.erase_node(n)


def _erase_replaced(gm: fx.GraphModule, m: AttentionMatch, stale: List[fx.Node]) -> None:
    """Erase what a fused match made dead: its size queries, shape tuples, metadata asserts
    and aliases of removed nodes, the dead users of removed nodes (:mod:`.dead`), and the
    removed nodes themselves."""
    for u in stale:
        gm.graph.erase_node(u)
    for n in m.removed:
        for u in list(n.users):
            if A.is_shape_tuple(u) and not u.users:
                gm.graph.erase_node(u)
    for n in m.removed:
        for u in list(n.users):
            if A.is_meta_assert(u) or A.is_dead_alias(u):
                gm.graph.erase_node(u)
    _erase_dead_users(gm, m.removed)
    _erase(gm, list(reversed(m.removed)))


def _erase_dead_users(gm: fx.GraphModule, removed: List[fx.Node]) -> None:
    """Erase the dead values read from removed nodes (a dropped ``attn.to(dtype)``), which the
    matcher did not count as users; a closure that reaches a removed node is left to :func:`_erase`."""
    rem, erased = set(removed), set()
    todo = [u for n in removed for u in n.users if u not in rem]
    while todo:
        u = todo.pop()
        if u in erased or u.graph is not gm.graph:
            continue
        closure = dead_closure(u)
        if not closure or rem.intersection(closure):
            continue
        inputs = {a for x in closure for a in x.all_input_nodes} - set(closure) - rem
        for x in closure:
            gm.graph.erase_node(x)
        erased.update(closure)
        todo += [a for a in inputs if not a.users]  # what only the dead values read (``q.dtype``)


def _fusion_of(m: AttentionMatch, call: fx.Node) -> Fusion:
    scale = repr(m.scale) + (" * tensor(s) folded into q" if m.q_factors else "") + \
        (" * run-time scalar(s)" if m.info.get("scale_nodes") else "")
    key_mask = "&".join(("~" if neg else "") + kv_.base.name for kv_, neg in m.key_masks)
    return Fusion(m.location, scale, m.causal, _describe_bias(m), m.gqa, m.dropout_p, m.softcap,
                  [n.name for n in m.removed], call.name, m.softmax.name, window=m.window, key_mask=key_mask,
                  masks=list(m.mask_notes), empty_row_fixup=m.fixup,
                  sinks="" if m.sinks is None else m.sinks.base.name,
                  alibi="" if m.alibi is None else m.alibi.slopes.name)
