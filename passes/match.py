"""The matcher: from one softmax, prove an attention or say why not.

Owns :func:`match_softmax`, which anchors on a SOFTMAX (or LOG_SOFTMAX) node, walks
up the score chain to the Q·Kᵀ matmul and down the probability chain to the P·V
matmul, and returns either an :class:`AttentionMatch` (everything the rewriter needs,
all proven) or a :class:`NearMiss` (kind code, reason, source location). Decisions
come from dataflow and axis letters/labels (:mod:`.matmul`, :mod:`.axes`), never
from size coincidences. Pure: no graph is changed here.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import consts as C
from attnfuse.passes import ops as O
from attnfuse.passes import reasons as R
from attnfuse.passes.matmul import MMSpec, decomposed_matmul, mm_spec
from attnfuse.passes.assemble import assemble, tags_through_views, view_tags
from attnfuse.passes.breaks import probs_to_output, scores_from_input
from attnfuse.passes.decomposed import product_above, product_below
from attnfuse.passes.rowfill import row_fill
from attnfuse.passes.shift import row_max
from attnfuse.passes.sinks import drops_sink_column, is_full_slice, is_slice, sink_cat
from attnfuse.passes.sliceadd import slice_add
from attnfuse.passes.types import AttentionMatch, NearMiss, Result, Term, Miss as _Miss, location_of

Tag = Any


def _name(n) -> str:
    if isinstance(n, fx.Node):
        t = n.target if n.op != "call_function" else getattr(n.target, "__name__", str(n.target))
        return f"{n.name} ({n.op} {t})"
    return repr(n)


def matmul_spec_of(node: fx.Node, gm) -> Optional[MMSpec]:
    """The product spec of a MATMUL node or of aten's decomposed matmul ending at a view."""
    op = O.classify(node, gm)
    if op is None:
        return None
    if op.kind == O.MATMUL:
        return mm_spec(node, op)
    if op.kind == O.LAYOUT:
        spec = decomposed_matmul(node, gm) if op.sub == "view" else None
        return spec if spec is not None else product_above(node, gm)
    return None


def _follow_decomposed(u: fx.Node, cur: fx.Node, gm):
    """From the first node after ``cur``, aten's expand/view -> bmm -> view, if that is a matmul of cur."""
    n, path = u, []
    for _ in range(6):
        op = O.classify(n, gm)
        if op is None or op.kind != O.LAYOUT or op.sub not in ("expand", "identity", "view"):
            return None
        path.append(n)
        users = A.data_users(n)
        if len(users) != 1:
            return None
        if op.sub == "view":
            bmm = users[0]
            bop = O.classify(bmm, gm)
            if bop is None or bop.kind != O.MATMUL or len(A.data_users(bmm)) != 1:
                return None
            out = A.data_users(bmm)[0]
            spec = decomposed_matmul(out, gm)
            if spec is not None and (spec.a is cur) != (spec.b is cur):
                return out, spec, path + [bmm]
            return None
        n = users[0]
    return None


# ---------------------------------------------------------------------------
# score chain (softmax input -> Q·Kᵀ)
# ---------------------------------------------------------------------------

def _inplace_users(cur: fx.Node, consumer: fx.Node, order: Dict, gm) -> List[fx.Node]:
    out = []
    for u in A.data_users(cur):
        if u is consumer:
            continue
        op = O.classify(u, gm)
        if op is not None and op.inplace and u.args and u.args[0] is cur and order[u] < order[consumer] \
                and all(x is consumer for x in u.users):
            out.append(u)
    return sorted(out, key=lambda u: order[u])


def _full(n, sshape) -> bool:
    s = A.shape(n)
    return s is not None and len(s) == len(sshape) and all(A.size_eq(x, y) for x, y in zip(s, sshape))


def _runtime_scalar(n: fx.Node) -> bool:
    """A Python number computed at run time (``math.sqrt(q.size(-1))``, a SymFloat)."""
    v = A.meta_val(n)
    if v is None:
        return n.op in ("call_function", "call_method") and not n.meta.get("tensor_meta")
    return isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool)


def _score_op(node: fx.Node, op: O.Op, chain_in: fx.Node, gm) -> Tuple[str, tuple]:
    """The score item of ``node`` applied to ``chain_in``; raises _Miss."""
    if op.kind == O.CAST or (op.kind == O.LAYOUT and op.sub == "identity"):
        return ("cast", ())
    if op.kind == O.SCALE:
        if node.kwargs.get("rounding_mode") is not None:
            raise _Miss("unsupported_op", f"{_name(node)}: division with rounding", node)
        a, b = op["a"], op["b"]
        if a is chain_in:
            other = b
        elif b is chain_in and op.sub == "mul":
            other = a
        else:
            raise _Miss("unsupported_op", f"{_name(node)}: scores are the divisor", node)
        val = C.scalar_value(other, gm)
        if val is not None:
            if val == 0 or val != val:
                raise _Miss("unsupported_op", f"{_name(node)}: scale {val}", node)
            return ("scale", (val if op.sub == "mul" else 1.0 / val,))
        if isinstance(other, fx.Node) and _runtime_scalar(other):
            return ("dscale", (other, op.sub))
        if isinstance(other, fx.Node):
            return ("tscale", (other, op.sub))
        raise _Miss("unsupported_op", f"{_name(node)}: unreadable scale {other!r}", node)
    if op.kind == O.ADD:
        a, b = op["a"], op["b"]
        alpha = op.get("alpha", 1)
        if not isinstance(alpha, (int, float)):
            raise _Miss("unsupported_op", f"{_name(node)}: alpha {alpha!r}", node)
        if a is chain_in:
            other, coef = b, float(alpha) * (-1.0 if op.sub == "sub" else 1.0)
        elif b is chain_in and op.sub == "add" and alpha == 1:
            other, coef = a, 1.0
        else:
            raise _Miss("unsupported_op", f"{_name(node)}: scores subtracted from a tensor", node)
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            if other != other or other in (float("inf"), float("-inf")):
                raise _Miss("unsupported_op", f"{_name(node)}: adds {other}", node)
            return ("shift", ())
        if isinstance(other, fx.Node):
            shift = row_max(other, chain_in, gm)
            if shift is not None:  # a maximum of the scores (proven over the key axis in _match)
                return ("rowshift", shift)
            return ("bias", (other, coef))  # an integer or bool tensor is promoted (assemble.promoted_to)
        raise _Miss("unsupported_op", f"{_name(node)}: unreadable addend", node)
    if op.kind == O.MASK:
        if op.sub == "masked_fill":
            if op["x"] is not chain_in:
                raise _Miss("unsupported_op", f"{_name(node)}: scores used as the mask", node)
            cond, masked_when, fill = op["mask"], True, op["value"]
        else:
            if op["a"] is chain_in:
                cond, masked_when, fill = op["cond"], False, op["b"]
            elif op["b"] is chain_in:
                cond, masked_when, fill = op["cond"], True, op["a"]
            else:
                raise _Miss("unsupported_op", f"{_name(node)}: scores used as the condition", node)
        if not isinstance(cond, fx.Node) or A.dtype(cond) not in (torch.bool, None):
            raise _Miss("mask_fill_value", f"{_name(node)}: condition is not a bool tensor", node)
        val = C.scalar_value(fill, gm)
        if C.is_neg_inf(val):
            return ("keep", (cond, masked_when))
        if C.absorbing_fill(val):
            return ("fill", (cond, masked_when, val))
        raise _Miss("mask_fill_value",
                    f"{_name(node)}: fill value {val if val is not None else fill!r} is neither -inf nor a "
                    f"finite value <= {C.FILL_LIMIT:g} (which addition reproduces exactly)", node)
    raise _Miss("unsupported_op", f"{_name(node)} in the score chain", node)


def _shift_nodes(item: tuple) -> List[fx.Node]:
    """The nodes computing a row maximum that a "rowshift" score item subtracts."""
    return list(item[-1][1]) if item[1] == "rowshift" else []


def _walk_up(cur: fx.Node, consumer: fx.Node, sshape_ref: List, ctx,
             exempt: Tuple[fx.Node, ...] = ()) -> Tuple[fx.Node, List, List]:
    """Walk from the softmax input up to the Q·Kᵀ matmul; returns (qk, items, chain).
    ``exempt``: readers of ``cur`` that belong to the chain (a max shift's reduction)."""
    gm, order = ctx["gm"], ctx["order"]
    items: List = []  # reverse order
    chain: List[fx.Node] = []
    exempt = set(exempt)
    for _ in range(256):
        inpl = _inplace_users(cur, consumer, order, gm)
        inpl_items = []
        for u in reversed(inpl):  # read first: an in-place max shift's reduction reads cur too
            try:
                inpl_items.append((u,) + _score_op(u, O.classify(u, gm), cur, gm))
            except _Miss as m:
                inpl_items.append(m)
            exempt.update(_shift_nodes(inpl_items[-1]) if isinstance(inpl_items[-1], tuple) else ())
        writes = []  # adds into a slice of the scores (passes/sliceadd.py), before the consumer
        for u in A.data_users(cur):
            sa = slice_add(u, cur, gm) if u is not consumer and u not in inpl and u not in exempt else None
            if sa is not None and order[sa.write] < order[consumer]:
                writes.append(sa)
                exempt.update(sa.nodes)
        if writes:
            if inpl:
                raise _Miss("unsupported_op", f"scores {cur.name}: an add into a slice together with other "
                                              f"in-place changes", cur)
            inpl_items = [(sa.write, "padbias", (t, c, (sa.pads, stage, sa.part_shape)))
                          for sa in sorted(writes, key=lambda sa: -order[sa.write]) for t, c, stage in reversed(sa.terms)]
            chain.extend(x for sa in writes for x in sa.nodes)
        others = [u for u in A.data_users(cur) if u is not consumer and u not in inpl and u not in exempt]
        if others:
            raise _Miss("scores_other_users",
                        f"scores {cur.name} are also used by {', '.join(u.name for u in others)}", cur)
        for it in inpl_items:
            if isinstance(it, _Miss):
                raise it
            items.append(it)
            chain.extend(_shift_nodes(it))
        chain.extend(inpl)
        op = O.classify(cur, gm)
        if op is None:
            raise _Miss("no_qk_matmul" if cur.op in ("placeholder", "get_attr") else "unsupported_op",
                        f"{_name(cur)} feeds the softmax, not a Q·Kᵀ matmul", cur)
        spec = matmul_spec_of(cur, gm) if cur not in ctx.get("no_decomp", ()) else None
        if spec is not None or op.kind == O.MATMUL:
            return cur, list(reversed(items)), chain
        # softcap: tanh(s / c) * c
        if op.kind == O.SCALE and op.sub == "mul":
            sc = _softcap(cur, op, gm)
            if sc is not None:
                c, tanh_node, inner, s = sc
                items.append((cur, "softcap", (c,)))
                chain.extend([cur, tanh_node, inner])
                consumer, cur = inner, s
                continue
        if op.kind == O.ELEMENTWISE:
            raise _Miss("unsupported_op", f"{_name(cur)} in the score chain (only tanh softcap is understood)", cur)
        cands = [a for a in cur.args if isinstance(a, fx.Node) and _full(a, A.shape(cur))]
        if op.kind in (O.SCALE, O.ADD, O.MASK) and len(cands) > 1:
            first = None
            for cand in cands:
                try:
                    it = (cur,) + _score_op(cur, op, cand, gm)
                    qk, rest, ch = _walk_up(cand, cur, sshape_ref, ctx, tuple(_shift_nodes(it)))
                    return qk, rest + [it] + list(reversed(items)), chain + [cur] + _shift_nodes(it) + ch
                except _Miss as m:
                    first = first or m
            raise first
        nxt = op.get("x") if op.kind in (O.CAST, O.LAYOUT, O.DROPOUT) else (cands[0] if cands else None)
        if op.kind == O.LAYOUT and op.sub == "view" and isinstance(op["x"], fx.Node):
            items.append((cur, "view", ()))
            chain.append(cur)
            consumer, cur = cur, op["x"]
            continue
        if op.kind == O.LAYOUT and op.sub != "identity":
            raise _Miss("unsupported_op", R.layout_change(cur, gm), cur)
        if op.kind == O.DROPOUT:
            raise _Miss("unsupported_op", f"{_name(cur)}: dropout before the softmax", cur)
        if not isinstance(nxt, fx.Node):
            raise _Miss("unsupported_op", f"{_name(cur)} in the score chain", cur)
        items.append((cur,) + _score_op(cur, op, nxt, gm))
        chain.append(cur)
        exempt = set(_shift_nodes(items[-1]))
        chain.extend(exempt)
        consumer, cur = cur, nxt
    raise _Miss("unsupported_op", "score chain too long", cur)


def _softcap(node: fx.Node, op: O.Op, gm):
    """(c, tanh, inner, s) when ``node`` is ``tanh(s / c) * c``."""
    for t, cv in ((op["a"], op["b"]), (op["b"], op["a"])):
        c = C.scalar_value(cv, gm)
        if not isinstance(t, fx.Node) or c is None or c <= 0:
            continue
        top = O.classify(t, gm)
        if top is None or top.kind != O.ELEMENTWISE or top.sub != "tanh" or len(A.data_users(t)) != 1:
            continue
        inner = top["x"]
        iop = O.classify(inner, gm) if isinstance(inner, fx.Node) else None
        if iop is None or iop.kind != O.SCALE or len(A.data_users(inner)) != 1:
            continue
        if not isinstance(iop["a"], fx.Node):
            continue
        d = C.scalar_value(iop["b"], gm)
        if d is None:
            continue
        inv = d if iop.sub == "div" else (1.0 / d if d else None)
        if inv is not None and abs(inv - c) <= 1e-12 * abs(c):
            return c, t, inner, iop["a"]
    return None


# ---------------------------------------------------------------------------
# probability chain (softmax -> P·V)
# ---------------------------------------------------------------------------

def _walk_down(sm: fx.Node, tags: List[Tag], ctx):
    gm = ctx["gm"]
    cur, chain, dropout_p = sm, [], 0.0
    for _ in range(64):
        ctx["tags"][cur] = list(tags)
        users = A.data_users(cur)
        if not users:
            raise _Miss("no_pv_matmul", f"probabilities {cur.name} are not used", cur)
        if len(users) > 1:
            raise _Miss("probs_other_users",
                        f"probabilities {cur.name} are used by {', '.join(u.name for u in users)}", cur)
        u = users[0]
        if u.op == "output":  # P·V is not in this graph: a graph break or a subgraph's edge
            raise _Miss(*probs_to_output(cur, gm), cur)
        sink = ctx.get("sink")
        if sink is not None and not ctx.get("sink_dropped"):
            if "k" in tags and drops_sink_column(u, cur, tags.index("k"), A.shape(sink.scores)[sink.dim],
                                                 sink.first):
                ctx["sink_dropped"] = True  # passes/sinks.py: the sink column is sliced off here
                chain.append(u)
                cur = u
                continue
            if u.args and u.args[0] is cur and is_slice(u):
                raise _Miss("after_softmax", f"{u.name} slices the probabilities but does not drop exactly "
                                             f"the sink column of {sink.cat.name} (the sink has no value row)", u)
        if sink is not None and is_full_slice(u) and u.args[0] is cur:  # make_fx's no-op slice
            chain.append(u)
            cur = u
            continue
        op = O.classify(u, gm)
        if op is None:
            raise _Miss("after_softmax", R.between_softmax_and_pv(u, cur, gm), u)
        if op.kind == O.MATMUL:
            _check_sink_dropped(u, ctx)
            return u, cur, tags, chain, dropout_p, mm_spec(u, op)
        if op.kind == O.LAYOUT and op.sub == "view" and any(isinstance(t, tuple) and t[0] == "split"
                                                           for t in tags):
            tags = view_tags(tags, A.shape(cur), A.shape(u), u)
            chain.append(u)
            cur = u
            continue
        if op.kind == O.LAYOUT and op.sub in ("expand", "view", "unsqueeze", "permute", "transpose"):
            dec = _follow_decomposed(u, cur, gm)
            if dec is None and op.sub in ("view", "expand", "unsqueeze", "permute", "transpose"):
                dec = product_below(u, cur, gm)
            if dec is not None:
                _check_sink_dropped(u, ctx)
                return dec[0], cur, tags, chain + dec[2], dropout_p, dec[1]
        if op.kind == O.CAST or (op.kind == O.LAYOUT and op.sub == "identity"):
            chain.append(u)
            cur = u
            continue
        if op.kind == O.LAYOUT and op.sub == "view" and op.get("x") is cur:
            # a view the axis tracker can follow (same shape, unit axes, batch splits/merges)
            # keeps every axis's meaning; P·V's contraction is still proven on the new tags
            new = None
            if A.shape(cur) is not None and A.shape(u) is not None and len(tags) == len(A.shape(cur)):
                try:
                    new = view_tags(tags, A.shape(cur), A.shape(u), u)
                except _Miss:
                    new = None
            if new is not None:
                tags = new
                chain.append(u)
                cur = u
                continue
        if op.kind == O.LAYOUT and op.sub in ("permute", "transpose", "mT"):
            r = len(tags)
            if op.sub == "permute":
                tags = [tags[A.norm_dim(d, r)] for d in op["dims"]]
            else:
                d0, d1 = (op["d0"], op["d1"]) if op.sub == "transpose" else (-2, -1)
                d0, d1 = A.norm_dim(d0, r), A.norm_dim(d1, r)
                tags = list(tags)
                tags[d0], tags[d1] = tags[d1], tags[d0]
            chain.append(u)
            cur = u
            continue
        if op.kind == O.DROPOUT:
            p, train = op.get("p"), op.get("train")
            if train is False and op.sub != "native_dropout":
                # eval mode: identity whatever p is (dynamo traces nn.Dropout's p as a
                # run-time scalar under dynamic=True, ``p_tensor.item()``: dead once dropped)
                if isinstance(p, fx.Node) and p.op == "call_method" and p.target == "item" and \
                        list(p.users) == [u]:
                    chain.append(p)
                chain.append(u)
                cur = u
                continue
            if not isinstance(p, (int, float)) or not isinstance(train, bool):
                raise _Miss("unsupported_op", f"{_name(u)}: dropout with a traced p/train", u)
            if train and p > 0:
                if dropout_p:
                    raise _Miss("unsupported_op", "two dropouts on the probabilities", u)
                if p >= 1:
                    raise _Miss("unsupported_op", f"dropout p={p}", u)
                dropout_p = float(p)
            chain.append(u)
            if op.sub == "native_dropout":
                gets = [g for g in u.users if g.users or g.args[1] == 0]
                if len(gets) != 1 or O.classify(gets[0], gm) is None or gets[0].args[1] != 0:
                    raise _Miss("probs_other_users", f"{_name(u)}: the dropout mask is used", u)
                chain.extend([g for g in u.users if g is not gets[0]] + [gets[0]])
                cur = gets[0]
            else:
                cur = u
            continue
        if op.kind == O.MASK:  # a fill of whole query rows commutes with P·V (rowfill.py); else Miss
            ctx.setdefault("row_fills", []).append(row_fill(u, op, cur, tags, gm))
            chain.append(u)
            cur = u
            continue
        dec = _decomposed_dropout(u, op, cur, gm)
        if dec is not None:
            p, nodes = dec
            if dropout_p:
                raise _Miss("unsupported_op", "two dropouts on the probabilities", u)
            dropout_p = p
            chain.extend(nodes + [u])
            cur = u
            continue
        raise _Miss("after_softmax", R.between_softmax_and_pv(u, cur, gm), u)
    raise _Miss("unsupported_op", "probability chain too long", cur)


def _check_sink_dropped(pv: fx.Node, ctx) -> None:
    if ctx.get("sink") is not None and not ctx.get("sink_dropped"):
        raise _Miss("after_softmax", f"{pv.name}: the probabilities reach P·V with the sink column of "
                                     f"{ctx['sink'].cat.name} (no slice dropping exactly that column)", pv)


def _decomposed_dropout(u: fx.Node, op: O.Op, cur: fx.Node, gm):
    """make_fx's dropout: ``cur * div_(bernoulli_(empty_like(cur), 1 - p), 1 - p)`` -> (p, nodes)."""
    if op.kind != O.SCALE or op.sub != "mul":
        return None
    m = op["b"] if op["a"] is cur else op["a"] if op["b"] is cur else None
    if not isinstance(m, fx.Node) or len(m.users) != 1:
        return None
    mop = O.classify(m, gm)
    if mop is None or mop.kind != O.SCALE or mop.sub != "div" or not isinstance(mop["a"], fx.Node):
        return None
    keep = C.scalar_value(mop["b"], gm)
    bern = mop["a"]
    if keep is None or "bernoulli" not in str(bern.target) or len(bern.users) != 1 or not bern.args:
        return None
    bp = bern.args[1] if len(bern.args) > 1 else bern.kwargs.get("p", 0.5)  # schema default p=0.5
    if not isinstance(bp, (int, float)) or float(bp) != keep:
        return None
    like = bern.args[0]
    if not isinstance(like, fx.Node) or "empty_like" not in str(like.target) or len(like.users) != 1:
        return None
    if not 0 < keep <= 1:
        return None
    return 1.0 - keep, [like, bern, m]


# ---------------------------------------------------------------------------
# the match
# ---------------------------------------------------------------------------

def match_softmax(sm: fx.Node, gm, order: Dict[fx.Node, int], memo: Dict) -> Optional[Result]:
    """Match the attention around softmax ``sm``: an :class:`AttentionMatch`, or a
    :class:`NearMiss` saying why not (also for a softmax that is plainly not attention, e.g.
    over an input of the graph). None would mean "no decision"; no path returns it, and
    :mod:`.sweep` reports any softmax left without a near miss."""
    op = O.classify(sm, gm)
    ctx = {"gm": gm, "order": order, "memo": memo, "tags": {}}
    try:
        try:
            return _match(sm, op, ctx)
        except _Miss as first:
            # a view of a bmm read as one batched product may be better read as a reshape of
            # the bmm's scores (fairseq/BART: bmm -> view -> +mask -> view back): try that once
            qk = ctx.get("qk")
            if qk is None or first.kind != "unsupported_op" or O.classify(qk, gm).kind != O.LAYOUT:
                raise
            ctx = {"gm": gm, "order": order, "memo": memo, "tags": {}, "no_decomp": {qk}}
            try:
                return _match(sm, op, ctx)
            except _Miss:
                raise first
    except _Miss as m:
        if m.kind == "no_qk_matmul" and m.node is not None and m.node.op == "placeholder":
            # the scores are an input of this graph: a graph break or a higher-order op's
            # boundary may have split an attention here; say so (never silently skipped)
            kind, reason = scores_from_input(sm, m.node, gm)
            return NearMiss(kind, reason, location_of(sm), m.node.name, softmax=sm.name)
        return NearMiss(m.kind, m.reason, location_of(sm), (m.node or sm).name, softmax=sm.name)


def _match(sm: fx.Node, op: O.Op, ctx) -> Result:
    gm, memo = ctx["gm"], ctx["memo"]
    x = op["x"]
    if not isinstance(x, fx.Node) or A.shape(x) is None:
        raise _Miss("unsupported_op", f"{sm.name}: no shape metadata (pass example_inputs)", sm)
    consumer = sm
    sink = sink_cat(x, sm, op.get("dim"), gm) if op.kind == O.SOFTMAX else None
    if sink is not None:  # softmax(cat(scores, per-head sink column)): passes/sinks.py
        ctx["sink"] = sink
        x, consumer = sink.scores, sink.cat
        if A.shape(x) is None:
            raise _Miss("unsupported_op", f"{x.name}: no shape metadata (pass example_inputs)", x)
    sshape = A.shape(x)
    qk, items, chain = _walk_up(x, consumer, [sshape], ctx)
    if sink is not None:
        chain = chain + sink.nodes + sink.column_nodes
        for n in sink.nodes + sink.column_nodes:  # no size of theirs is one of q, k or v
            ctx["tags"][n] = None
    ctx["qk"] = qk
    if op.kind == O.LOG_SOFTMAX:
        raise _Miss("log_softmax", f"{sm.name} is a log_softmax between Q·Kᵀ and the next op", sm)
    spec = matmul_spec_of(qk, gm)
    if spec is None:
        raise _Miss("qk_contraction", f"{_name(qk)}: not a two-operand product", qk)
    if not all(u in chain or u is sm for u in A.data_users(qk)):
        raise _Miss("scores_other_users", f"scores {qk.name} are used elsewhere", qk)
    roles = _qk_roles(spec, gm, memo)
    stags = [roles["tag"][c] for c in spec.lo]
    if "q" not in stags or "k" not in stags:
        raise _Miss("unsupported_op", "the query or key axis of the scores is a unit axis", qk)
    ctx["tags"][qk] = list(stags)
    smtags = tags_through_views(items, stags, ctx["tags"])
    if len(smtags) != len(sshape):
        raise _Miss("unsupported_op", f"the score chain after {qk.name} changes the score shape", qk)
    r = len(smtags)
    dim = op["dim"]
    if not isinstance(dim, int):
        raise _Miss("softmax_axis", f"{sm.name}: softmax dim {dim!r} is not a constant", sm)
    if smtags[A.norm_dim(dim, r)] != "k":
        where = f"({smtags.index('k') - r})" if "k" in smtags else "(split into parts by a view)"
        raise _Miss("softmax_axis", f"{sm.name}: softmax over axis {dim} of the scores, not the key axis "
                                    f"{where}", sm)
    _prove_row_shifts(items, ctx)
    for n in chain:
        ctx["tags"].setdefault(n, list(stags))
    for it in items:
        for n in _shift_nodes(it):
            ctx["tags"][n] = None  # reduced values: no size of theirs is a size of q, k or v
    pv, p_node, ptags, pchain, dropout_p, pspec = _walk_down(sm, list(smtags), ctx)
    if any(isinstance(t, tuple) and t[0] == "split" for t in ptags):
        raise _Miss("unsupported_op", "P·V reads the probabilities with split batch axes", pv)
    if pspec is None or pspec.bias is not None:
        raise _Miss("pv_contraction", f"{_name(pv)}: not a plain two-operand product", pv)
    return assemble(sm, qk, spec, roles, stags, items, chain, pv, pspec, p_node, ptags, pchain,
                     dropout_p, ctx)


def _prove_row_shifts(items: List, ctx) -> None:
    """A row maximum subtracted from the scores is a no-op only when the key axis is among
    the axes it reduces (then it is constant along the keys)."""
    for node, kind, pl in items:
        if kind != "rowshift":
            continue
        tags = ctx["tags"].get(node)
        dims = pl[0]
        if tags is None or len(tags) <= max(dims) or not any(tags[d] == "k" for d in dims):
            axes = ", ".join(str(d - len(tags or ())) for d in dims)
            raise _Miss("unsupported_op", f"{node.name} subtracts the maximum of the scores over axis {axes}, "
                                          f"not over the key axis (a shift that varies along the keys)", node)


def _qk_roles(spec: MMSpec, gm, memo) -> Dict:
    la_l, lb_l = [c for c in spec.la if c is not None], [c for c in spec.lb if c is not None]
    sa, sb, so = set(la_l), set(lb_l), set(c for c in spec.lo if c is not None)
    contracted = [c for c in la_l if c in sb and c not in so]
    summed = [c for c in la_l + lb_l if c not in so and c not in contracted]
    a_only = [c for c in la_l if c in so and c not in sb]
    b_only = [c for c in lb_l if c in so and c not in sa]
    if len(contracted) != 1 or summed or not a_only or not b_only:
        raise _Miss("qk_contraction", f"Q·Kᵀ ({''.join(spec.la)},{''.join(spec.lb)}->{''.join(spec.lo)}) "
                                      f"does not contract exactly one feature axis", spec.a)
    query, key, feat = a_only[-1], b_only[-1], contracted[0]
    if spec.hints[0] in a_only:
        query = spec.hints[0]
    if spec.hints[1] in b_only:
        key = spec.hints[1]
    la_, lb_ = A.labels(spec.a, gm, memo), A.labels(spec.b, gm, memo)
    if la_ is not None and lb_ is not None:
        for c in la_l:
            if c in sb and c != feat:
                x, y = la_[spec.la.index(c)], lb_[spec.lb.index(c)]
                if A.labels_conflict(x, y):
                    raise _Miss("qk_contraction",
                                f"Q·Kᵀ pairs q axis {spec.la.index(c)} with k axis {spec.lb.index(c)}, which "
                                f"come from different axes (a permute that is not the transpose it resembles?)",
                                spec.b)
    tag = {c: ("b", c) for c in spec.lo if c is not None}
    tag[query], tag[key] = "q", "k"
    tag[None] = None
    return {"query": query, "key": key, "feat": feat, "tag": tag, "labels": (la_, lb_)}


