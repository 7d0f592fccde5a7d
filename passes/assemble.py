"""Turning a proven chain into an :class:`AttentionMatch`.

Owns the second half of matching: given the Q·Kᵀ spec, the score items found on
the way up and the P·V spec found on the way down, it checks the order of score
changes (scale → softcap → bias/masks), checks P·V contracts the key axis, builds
the q/k/v/bias views in op order (peeling layout ops and GQA repeats), hands the
mask terms to :mod:`.structure` (which turns what it proves into causal / window /
key_mask), and decides how the op's output is viewed back. Raises ``Miss``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import batchaxes as BA
from attnfuse.passes import alibi as AL
from attnfuse.passes import consts as C
from attnfuse.passes import structure as S
from attnfuse.passes.types import AttentionMatch, Miss, View4, location_of
from attnfuse.passes.views import axis_at, build_view, peel, size_at, slot_tags

MAX_HEAD_DIM = 256
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def view_tags(tags, xs, out, node):
    """Tags after a view: batch tags may split into parts and parts merge back; q/k stay whole."""
    groups = A.view_groups(xs, out)
    if groups is None:
        raise Miss("unsupported_op", f"{node.name}: a view of the scores that is not a split or merge", node)
    new = [None] * len(out)
    for gi, go in groups:
        if len(gi) == 1 and len(go) == 1:
            new[go[0]] = tags[gi[0]]
        elif len(gi) == 1 and (tags[gi[0]] in ("q", "k") or isinstance(tags[gi[0]], tuple) and tags[gi[0]][0] == "b"):
            # a batch axis, or the query/key axis (decomposed 2-D positions: (B, qh·qw, kh·kw) viewed
            # (B, qh, qw, kh, kw)), split into parts; only the same parts in order merge back
            for j, o in enumerate(go):
                new[o] = ("split", tags[gi[0]], j, len(go))
        elif len(go) == 1 and all(isinstance(tags[a], tuple) and tags[a][0] == "split" for a in gi) and \
                len({tags[a][1] for a in gi}) == 1 and [tags[a][2] for a in gi] == list(range(tags[gi[0]][3])):
            new[go[0]] = tags[gi[0]][1]
        else:
            raise Miss("unsupported_op", f"{node.name}: a view of the scores that mixes query/key axes", node)
    for o, sz in enumerate(out):
        if new[o] is None and not A.is_one(sz):
            raise Miss("unsupported_op", f"{node.name}: a view of the scores the matcher cannot follow", node)
    return new


def tags_through_views(items, stags, tagmap):
    """Tags of the scores at the softmax input; records each chain node's tags in ``tagmap``."""
    tags = list(stags)
    for node, kind, _ in items:
        if kind == "view":
            tags = view_tags(tags, A.shape(node.args[0]), A.shape(node), node)
        if node is not None:
            tagmap[node] = list(tags)
    return tags


def _view_stage(node, stage, stags0, spec):
    tags = stage[0] if stage else list(stags0)
    new = view_tags(tags, A.shape(node.args[0]), A.shape(node), node)
    if new == list(stags0):
        return None
    return (new, A.shape(node))


def _staged_shapes(term: fx.Node, stage_shape, sshape, dynamic_ok: bool, where: fx.Node) -> Tuple[tuple, tuple]:
    """``(stage, scores)`` sizes to broadcast a term added to the scores while they were viewed
    as ``stage_shape`` (B·H split into (B, H); decomposed 2-D relative positions: (B, qh·qw, kh·kw)
    viewed as (B, qh, qw, kh, kw)) and to reshape it to the Q·Kᵀ output's shape: the same
    row-major view the scores went through, so the bias is the term's value at every score.
    The term is materialised at the scores' size, as the model's own addition does.

    Symbolic sizes become ``-1`` where that is exact: in the broadcast, an axis the term
    already has at that size (proven equal); in the reshape, one axis. Only float terms take
    them (a mask's structure is sampled at concrete sizes). Raises ``Miss`` otherwise."""
    ts = A.shape(term)
    if ts is None or len(ts) > len(stage_shape):
        raise Miss("unsupported_op", f"{where.name}: a term of unknown shape or more axes than the reshaped "
                                     f"scores", where)
    off = len(stage_shape) - len(ts)
    st: List = []
    for i, x in enumerate(stage_shape):
        si = A.static_int(x)
        if si is None and dynamic_ok and i >= off and A.size_eq(ts[i - off], x):
            si = -1
        if si is None:
            raise Miss("unsupported_op", f"{where.name}: a bias on reshaped scores with dynamic shapes "
                                         f"(a symbolic size the term does not carry)", where)
        st.append(si)
    co = [A.static_int(x) for x in sshape]
    if co.count(None) > (1 if dynamic_ok else 0):
        raise Miss("unsupported_op", f"{where.name}: a bias on reshaped scores with dynamic shapes "
                                     f"(more than one symbolic size to reshape back to)", where)
    return tuple(st), tuple(-1 if x is None else x for x in co)


def _score_items(items, spec, stags0=None, with_sink: bool = False) -> Dict:
    """Validate the order of score changes and fold them. ``with_sink``: a sink column is
    concatenated to these scores (:mod:`.sinks`), so a shift of the scores alone is no
    longer a softmax no-op (it moves them against the sink)."""
    seq = []
    if getattr(spec, "alpha_node", None) is not None:  # baddbmm's run-time alpha scales the product only
        seq.append((None, "dscale", (spec.alpha_node, "mul")))
    if spec.bias is not None:
        seq.append((None, "scale", (spec.alpha,)))
        if spec.beta != 0:
            if not isinstance(spec.bias, fx.Node):
                seq.append((None, "shift", ()))
            else:
                seq.append((None, "bias", (spec.bias, spec.beta)))
    elif spec.alpha != 1.0:
        seq.append((None, "scale", (spec.alpha,)))
    seq += items
    has_softcap = any(k == "softcap" for _, k, _ in seq)
    stage = None  # (tags, shape) while the scores are viewed differently from Q·Kᵀ's output
    phase, scale, softcap = 0, 1.0, 0.0
    tscales, raw_terms, dscales = [], [], []
    for node, kind, pl in seq:
        where = node or spec.a
        if kind == "cast":
            continue
        if kind == "view":
            stage = _view_stage(node, stage, stags0, spec)
            continue
        if kind in ("shift", "rowshift"):  # a constant, or a row maximum (match._prove_row_shifts)
            if with_sink:
                what = "adds a constant to" if kind == "shift" else "subtracts a row maximum from"
                raise Miss("unsupported_op", f"{where.name} {what} the scores before the sink column is "
                                             f"concatenated: a shift against the sink, not a softmax no-op", where)
            if has_softcap and phase == 0:
                what = "constant added" if kind == "shift" else "row maximum subtracted"
                raise Miss("unsupported_op", f"{where.name}: {what} before the softcap", where)
            continue
        if kind == "scale":
            (c,) = pl
            if phase == 0:
                scale *= c
                continue
            if phase == 2 and softcap == 0.0 and c > 0:
                # (s + b) * c == (c·s) + (c·b): a positive constant after the biases/masks (Falcon's
                # ALiBi `logits *= inv_norm`) folds into the scale and each bias's coefficient (the
                # emitted bias is multiplied by c at its own shape). Never across a softcap's tanh.
                for t in raw_terms:
                    if t[0] == "float":
                        t[2] *= c
                    elif t[0] == "fill":
                        t[2] *= c
                        if not C.absorbing_fill(t[2]):
                            raise Miss("mask_fill_value", f"{where.name}: scaling a mask fill by {c}", where)
                scale *= c
                continue
            raise Miss("unsupported_op", f"{where.name}: scale after the softcap", where)
        if kind == "dscale":
            if phase != 0:
                raise Miss("unsupported_op", f"{where.name}: run-time scale after a bias, mask or softcap", where)
            dscales.append((pl[0], pl[1]))
            continue
        if kind == "tscale":
            if phase != 0:
                raise Miss("unsupported_op", f"{where.name}: tensor scale after a bias, mask or softcap", where)
            if stage is not None:
                raise Miss("unsupported_op", f"{where.name}: tensor scale on reshaped scores", where)
            tscales.append((where, pl[0], pl[1]))
            continue
        if kind == "softcap":
            if phase != 0:
                raise Miss("unsupported_op", f"{where.name}: softcap after a bias or mask", where)
            phase, softcap = 1, pl[0]
            continue
        phase = 2
        if kind == "bias":
            raw_terms.append(["float", pl[0], float(pl[1]), False, where, stage, None])
        elif kind == "padbias":  # an add into a slice of the scores (passes/sliceadd.py)
            raw_terms.append(["float", pl[0], float(pl[1]), False, where, stage, pl[2]])
        elif kind == "keep":
            raw_terms.append(["keep", pl[0], 0.0, pl[1], where, stage, None])  # masked where cond == pl[1]
        elif kind == "fill":
            raw_terms.append(["fill", pl[0], pl[2], pl[1], where, stage, None])
    return {"scale": scale, "softcap": softcap, "tscales": tscales, "terms": raw_terms, "dscales": dscales}


def _key_constant_count(term: fx.Node, tags: List, add: fx.Node, gm) -> bool:
    """An integer or bool term, finite after eager's promotion, that is the same for every key of
    a row only shifts that row: softmax is shift-invariant along the keys, so adding it changes
    nothing (its gradient is zero too). Proven for a bool term that broadcasts along the keys (no
    key axis; 0/1 is finite in every float dtype), or for a term whose value is a constant of the
    graph (not module state, which may change), finite in the promoted dtype and equal along its
    key axis (``torch.ones(L, L, dtype=torch.bool)``). A float term may hold ±inf/NaN, an integer
    input may overflow the scores' dtype: kept as biases."""
    to = promoted_to(term, add)
    if to is None:
        return False
    if "k" not in tags and A.dtype(term) == torch.bool:
        return True
    if C.state_reads(term, gm):
        return False
    val = C.const_eval(term, gm)
    if not isinstance(val, torch.Tensor) or val.dim() != len(tags) or not val.to(to).isfinite().all():
        return False
    kax = tags.index("k")
    return bool((val == val.narrow(kax, 0, 1)).all())


def promoted_to(term: fx.Node, add: fx.Node) -> Optional[torch.dtype]:
    """The dtype eager converts an added tensor ``term`` to, where it is not a float: an
    integer or bool tensor added to float scores takes the scores' dtype, which is the
    dtype of the addition's result (``add``); None for a float term (the op adds it as is)."""
    dt = A.dtype(term)
    if dt is None:
        raise Miss("unsupported_op", f"{add.name}: the dtype of the added {term.name} is unknown", add)
    if dt.is_floating_point:
        return None
    out = A.dtype(add)
    if dt.is_complex or out is None or not out.is_floating_point:
        raise Miss("unsupported_op", f"{add.name}: adds a {dt} tensor to scores of dtype {out}", add)
    return out


def _right_tags(n: fx.Node, stags: List, what: str) -> List:
    s = A.shape(n)
    if s is None:
        raise Miss("unsupported_op", f"{what} {n.name} has no shape metadata", n)
    r = len(stags)
    if len(s) > r:
        raise Miss("unsupported_op", f"{what} {n.name} has more axes than the scores", n)
    return [None if A.is_one(x) else stags[r - len(s) + j] for j, x in enumerate(s)]


def _sinks_view(sink, ctx, ob) -> View4:
    """The sink column's source (:mod:`.sinks`) in op order, proven to be one logit per
    head: it may vary along the op's head axis only (not the batch, queries or keys)."""
    tags = ctx["tags"].get(sink.scores)
    if tags is None:
        raise Miss("unsupported_op", f"sinks {sink.source.name}: the axes of {sink.scores.name} are unknown",
                   sink.cat)
    view = build_view(sink.source, _right_tags(sink.source, tags, "sinks"), ob + ["q", None], "sinks")
    if view.groups != (1, 1):
        raise Miss("unsupported_op", f"sinks {sink.source.name} on scores with more than two batch axes",
                   sink.cat)
    for i, what in ((0, "batch"), (2, "query"), (3, "key")):
        if view.axes[i] is not None:
            raise Miss("unsupported_op", f"sinks {sink.source.name} vary along the {what} axis of the scores "
                                         f"(the op takes one sink logit per head)", sink.cat)
    return view


def _pv_roles(pspec, p_node, ptags, kview_tags_fn):
    if pspec.a is p_node and pspec.b is not p_node:
        lp, lv, v_node = pspec.la, pspec.lb, pspec.b
    elif pspec.b is p_node and pspec.a is not p_node:
        lp, lv, v_node = pspec.lb, pspec.la, pspec.a
    else:
        raise Miss("pv_contraction", "the probabilities are not exactly one operand of P·V", p_node)
    lo = pspec.lo
    tag = dict(zip(lp, ptags))
    if None in tag and tag[None] is not None or len(lp) != len(ptags):
        raise Miss("pv_contraction", "a non-unit axis of the probabilities has no index in P·V", p_node)
    kls = [c for c in lp if c is not None and tag[c] == "k"]
    qls = [c for c in lp if c is not None and tag[c] == "q"]
    if len(kls) != 1 or len(qls) != 1:
        raise Miss("pv_contraction", "P·V does not index the query and key axes once each", p_node)
    kl, ql = kls[0], qls[0]
    lp_l, lv_l = [c for c in lp if c is not None], [c for c in lv if c is not None]
    contracted = [c for c in lp_l if c in lv_l and c not in lo]
    if contracted != [kl]:
        raise Miss("pv_contraction", f"P·V contracts {contracted or 'nothing'} of the probabilities, "
                                     f"not exactly the key axis", p_node)
    if ql not in lo or ql in lv:
        raise Miss("pv_contraction", "P·V does not keep the query axis", p_node)
    for c in lp_l:
        if c != kl and c not in lo:
            raise Miss("pv_contraction", "P·V sums over a batch axis of the probabilities", p_node)
    v_only = [c for c in lv_l if c not in lp_l]
    if any(c not in lo for c in v_only) or len(v_only) != 1:
        raise Miss("pv_contraction", "V must have exactly one feature axis besides the key and batch axes",
                   v_node)
    vtags = [None if c is None else ("k" if c == kl else tag[c]) if c in lp_l else "dv" for c in lv]
    otags = [None if c is None else tag[c] if c in lp_l else "dv" for c in lo]
    return v_node, vtags, otags


def assemble(sm, qk, spec, roles, stags, items, chain, pv, pspec, p_node, ptags, pchain, dropout_p, ctx):
    """The match in Q·Kᵀ's own axes; where that leaves a term reshaped to the scores' size and
    a view splits their one batch axis into (B, H) (BLOOM), the match on the split axes
    instead when it builds (:func:`.batchaxes.split_frame`), else the first."""
    args = (sm, qk, spec, roles, stags, items, chain, pv, pspec, p_node, ptags, pchain, dropout_p, ctx)
    frame = BA.split_frame(items, stags, ctx["tags"])
    try:
        m = _assemble(*args, None)
    except Miss:
        if frame is None:
            raise
        m = None
    if frame is None or (m is not None and all(t.pre is None for t in m.terms)):
        return m
    try:
        return _assemble(*args, frame)
    except Miss as e:
        if m is None:
            raise
        how = "a unit batch axis put in front of" if BA.unit_batch(frame[0], stags) else "a split of"
        m.mask_notes.append(f"scores viewed with {how} their batch axis ({frame[1]}): kept merged, {e.reason}")
        return m


def _assemble(sm, qk, spec, roles, stags, items, chain, pv, pspec, p_node, ptags, pchain, dropout_p, ctx, frame):
    """:func:`assemble` in Q·Kᵀ's axes (``frame`` None) or in the split ``frame`` (tags, shape)."""
    gm = ctx["gm"]
    folded = _score_items(items, spec, stags, with_sink=ctx.get("sink") is not None)
    mstags = stags   # the tags of Q·Kᵀ's output; the tags of the scores are the frame's
    unit = frame is not None and BA.unit_batch(frame[0], mstags)   # B = 1: the merged axis is the head
    if frame is not None:
        if ctx.get("sink") is not None or ctx.get("row_fills"):
            raise Miss("unsupported_op", "sinks or row fills on scores viewed with a split batch axis", qk)
        stags = BA.unit_frame_tags(mstags) if unit else list(frame[0])
    r = len(stags)
    batch = [t for t in mstags if t not in ("q", "k")]
    feat = roles["feat"]
    qtags = ["d" if c == feat else roles["tag"].get(c) for c in spec.la]
    ktags = ["d" if c == feat else roles["tag"].get(c) for c in spec.lb]
    v_node, vtags, otags = _pv_roles(pspec, p_node, ptags, None)
    # V must pair with K the same way Q pairs with K (labels; sizes never decide)
    kl_, vl_ = roles["labels"][1], A.labels(v_node, gm, ctx["memo"])
    if kl_ is not None and vl_ is not None:
        for j, t in enumerate(vtags):
            if isinstance(t, tuple) and t in ktags and A.labels_conflict(kl_[ktags.index(t)], vl_[j]):
                raise Miss("pv_contraction", f"P·V pairs V axis {j} with an axis that means something else "
                                             f"(a permute that is not the transpose it resembles?)", v_node)
    if frame is None or unit:   # (unit: op batch 1, its head the merged axis, read as it is)
        ob, (q, k, v), refs = _operands(spec, qtags, ktags, v_node, vtags, batch, qk, mstags, gm)
        merged = ob[1]
        ob = [stags[0], merged] if unit else ob   # (unit: the batch slot named, at size 1: a key mask's axis)
    else:  # the op's batch and head are the split parts; q, k, v read from before their merge
        merged = [t for t in mstags if t not in ("q", "k")][0]
        parts = [t for t in stags if t not in ("q", "k", None)]
        sizes = [frame[1][stags.index(t)] for t in parts]
        ob = list(parts)
        q = BA.split_operand(spec.a, qtags, merged, parts, sizes, ["q", "d"], "q", gm, gqa=False)
        k = BA.split_operand(spec.b, ktags, merged, parts, sizes, ["k", "d"], "k", gm, gqa=True)
        v = BA.split_operand(v_node, vtags, merged, parts, sizes, ["k", "dv"], "v", gm, gqa=True)
        q, k, v, refs = BA.broadcast(q, k, v, qk, frame[1], stags, ob)
    dts = {A.dtype(x.base) for x in (q, k, v)}
    if len(dts) != 1 or dts.pop() not in FLOATS:
        raise Miss("unsupported_op", "q, k and v do not share one float dtype (float32/float16/bfloat16)", qk)
    for name, x in (("D", size_at(q, 3)), ("Dv", size_at(v, 3))):
        si = A.static_int(x)
        if si is not None and si > MAX_HEAD_DIM:
            raise Miss("unsupported_op", f"head dim {name}={si} exceeds {MAX_HEAD_DIM}", qk)
    # tensor scales fold into q; they must not vary along the key axis
    q_factors = []
    for where, f, how in folded["tscales"]:
        tags = _right_tags(f, mstags, "scale")   # (a tensor scale on a view of the scores is a Miss)
        if frame is not None and not unit and any(t not in ("q", "k", None) for t in tags):
            raise Miss("unsupported_op", f"{where.name}: a tensor scale on merged batch axes", where)
        if "k" in tags:
            raise Miss("key_varying_scale", f"{where.name}: scale {f.name} varies along the key axis", where)
        q_factors.append((BA.complete(build_view(f, tags, ob + ["q", None], "scale"), refs), how))
    sshape = A.shape(qk) if frame is None else frame[1]
    rem_early = set(chain) | {qk}
    raw, dropped, alibis, alibi_notes = [], [], [], []
    for kind, n, coef, flag, where, stage, pad in folded["terms"]:
        pre = None
        if isinstance(n, fx.Node) and n.op == "call_method" and n.target == "expand_as" \
                and n.args[1] in rem_early and isinstance(n.args[0], fx.Node):
            n = n.args[0]  # m.expand_as(scores): the term broadcasts anyway
        if pad is not None:  # an add into a slice (sliceadd.py): (pads, viewed shape or None, slice shape)
            if stage is not None:
                raise Miss("unsupported_op", f"{where.name}: an add into a slice of reshaped scores", where)
            pads, viewed, part_shape = pad
            if viewed is not None:  # added to a view of the slice: broadcast, reshape to the slice, pad
                stage, sshape_to, pad = (None, viewed), part_shape, pads
            else:
                off = len(sshape) - len(A.shape(n))
                pad = tuple((ax - off, start) for ax, start in pads)  # axes of the term
        else:
            sshape_to = sshape
        if frame is not None and stage is not None and stage[0] == list(frame[0]):
            stage = None   # added on the split view: the frame's own axes
        elif frame is not None and stage is None and pad is None:   # added before the split
            mtags = _right_tags(n, mstags, "bias" if kind == "float" else "mask")
            if not unit:   # (B = 1: right-aligned to the frame, it has the axes it has in Q·Kᵀ's output)
                view, pre = BA.split_term(n, mtags, merged, sizes, ob + ["q", "k"], parts,
                                          (refs.get(0), refs.get(1)), kind == "float")
                raw.append(S.RawTerm(kind, n, coef, flag, view, pre, promoted_to(n, where) if kind == "float"
                                     else None, pad))
                continue
        elif frame is not None:
            raise Miss("unsupported_op", f"{where.name}: a term on another view of scores with a split batch axis",
                       where)
        if stage is None:
            tags = _right_tags(n, stags, "bias" if kind == "float" else "mask")
            # (with a sink column such a term shifts the scores against the sink: kept)
            if kind == "float" and pad is None and ctx.get("sink") is None and \
                    _key_constant_count(n, tags, where, gm):
                dropped.append(f"{n.name}: an integer/bool term constant along the keys, a softmax no-op")
                continue
            view = build_view(n, tags, ob + ["q", "k"], "bias" if kind == "float" else "mask")
        else:  # a term added while the scores were viewed differently: broadcast and merge it
            if BA.is_merged(ob):
                raise Miss("unsupported_op", f"{where.name}: a bias on reshaped scores with more than two "
                                             f"batch axes", where)
            pre = _staged_shapes(n, stage[1], sshape_to, kind == "float", where)
            view = View4(n, tuple(stags.index(t) if t in stags else None for t in ob + ["q", "k"]))
        raw.append(S.RawTerm(kind, n, coef, flag, view, pre, promoted_to(n, where) if kind == "float" else None,
                             pad))
        if kind == "float" and stage is None and pad is None and not BA.is_merged(ob) and not alibis:
            sink_rows = ((sshape[stags.index("q")], sshape[stags.index("k")])
                         if ctx.get("sink") is not None else None)
            found, why = AL.prove(raw[-1], n, tags, view, coef, A.dtype(qk), gm, sink_rows)
            alibis += [found] if found is not None else []
            alibi_notes += [why] if why else []
    axmap: Dict = {}

    def axmap_fn():
        if frame is not None:
            return None   # (sampled at the traced sizes only)
        if "v" not in axmap:
            axmap["v"] = S.length_axes(qk, stags, ctx["tags"], (spec.a, qtags, "q"), (spec.b, ktags, "k"),
                                       (v_node, vtags, "k"), (q, k, v), gm)
        return axmap["v"]

    ms, alibi = _choose_with_alibi(raw, alibis, alibi_notes, gm, sshape, stags, ob, axmap_fn,
                                   float(folded["softcap"]), float(dropout_p), ctx["memo"])
    terms = [dataclasses.replace(t, view=BA.complete(t.view, refs)) for t in ms.terms]
    causal = ms.causal
    row_zero = [(BA.complete(build_view(c, ctags, ob + ["q", None], "row fill"), refs), zero_when)
                for c, ctags, zero_when in ctx.get("row_fills", ())]
    sinks = _sinks_view(ctx["sink"], ctx, ob) if ctx.get("sink") is not None else None
    # output: op (B, H, Lq, Dv) -> (split batch axes, when merged) -> P·V layout
    op_out = slot_tags(ob + ["q", "dv"])[0] if frame is None else [merged, "q", "dv"]   # merged back
    squeeze = tuple(i for i in (1, 0) if op_out[i] is None)
    kept = [t for t in op_out if t is not None]
    real = [t for t in otags if t is not None]
    if sorted(map(str, kept)) != sorted(map(str, real)):
        raise Miss("pv_contraction", "P·V output axes do not match (batch, head, query, feature)", pv)
    perm = tuple(kept.index(t) for t in real)
    unsq = tuple(i for i, t in enumerate(otags) if t is None)
    removed = list(chain) + [qk, sm] + list(pchain) + [pv]
    _no_mutation_between(removed, pv, ctx)
    ctx["tags"][pv] = list(otags)
    shape_fix = _shape_fixes(removed, ctx["tags"], (q, k, v), ob)
    hq, hk = size_at(q, 1), size_at(k, 1)
    gqa = ""
    if not A.size_eq(hq, hk):
        gqa = f"{k.gqa_from or 'broadcast'} Hq={hq} Hkv={hk}"
    return AttentionMatch(
        softmax=sm, qk=qk, pv=pv, q=q, k=k, v=v, scale=float(folded["scale"]), q_factors=q_factors,
        terms=terms, causal=causal, softcap=float(folded["softcap"]), dropout_p=float(dropout_p),
        window=ms.window, key_masks=ms.key_masks, fixup=ms.fixup,
        fixup_scores_grad=ms.fixup_scores_grad, mask_notes=ms.notes + dropped + alibi_notes + [
            f"{c.name}: rows of P filled with 0, applied to the output" for c, _, _ in ctx.get("row_fills", ())],
        row_zero=row_zero, sinks=sinks,
        alibi=None if alibi is None else dataclasses.replace(alibi, view=BA.complete(alibi.view, refs)),
        removed=removed, out_squeeze=squeeze, out_perm=perm, out_dtype=A.dtype(pv), gqa=gqa,
        location=location_of(sm) or location_of(pv),
        info={"shape_fix": shape_fix, "scale_nodes": folded["dscales"], "out_unsqueeze": unsq,
              "mask_roots": ms.roots, "unmerge": BA.unmerge_sizes(ob, refs),
              "merge_out": frame is not None})


def _choose_with_alibi(raw, alibis, notes, gm, sshape, stags, ob, axmap_fn, softcap, dropout_p, memo):
    """(:func:`.structure.choose` of the terms, the ALiBi term taken out of them or None).
    A proven ALiBi term (:func:`.alibi.prove`) leaves the terms only where the rest proves
    a causal band under which the op's ALiBi equals it (:func:`.alibi.causal_allows`);
    else every term is chosen as before and ``notes`` says why the ALiBi term stayed."""
    def choose(terms):
        return S.choose(terms, gm, sshape, stags, ob, axmap_fn, softcap=softcap,
                        dropout_p=dropout_p, memo=memo)

    if alibis:
        al = alibis[0]
        try:
            ms = choose([t for t in raw if t is not al.term])
        except Miss:
            ms = None
        lq, lk = sshape[stags.index("q")], sshape[stags.index("k")]
        if ms is not None and AL.causal_allows(ms.causal, lq, lk):
            notes.append(al.note)
            return ms, al
        notes.append(f"{al.term.node.name}: ALiBi proven, but the masks do not show every visible key at or "
                     f"before the bottom-right diagonal (causal={getattr(ms, 'causal', '?')}), where the op's "
                     f"-slope*|i + Lk - Lq - j| equals it; stays a bias")
    return choose(raw), None


def _operands(spec, qtags, ktags, v_node, vtags, batch, qk, stags, gm):
    """(op batch/head tags, (q, k, v) views in op order, size references per batch slot).

    With more than two batch axes (:mod:`.batchaxes`), the first split that builds and
    merges q, k and v without a copy wins; else the first that builds."""
    first, fallback = None, None
    for ob in BA.candidate_obs(batch):
        try:
            q = peel(build_view(spec.a, qtags, ob + ["q", "d"], "q"), gm, gqa=False)
            k0 = build_view(spec.b, ktags, ob + ["k", "d"], "k")
            v0 = build_view(v_node, vtags, ob + ["k", "dv"], "v")
            k, v = peel(k0, gm, gqa=True), peel(v0, gm, gqa=True)
            if not A.size_eq(size_at(k, 1), size_at(v, 1)) and \
                    not (A.is_one(size_at(k, 1)) or A.is_one(size_at(v, 1))):
                k, v = peel(k0, gm, gqa=False), peel(v0, gm, gqa=False)
            q, k, v, refs = BA.broadcast(q, k, v, qk, A.shape(qk), stags, ob)
        except Miss as e:
            first = first or e
            continue
        if all(BA.copy_free(x) for x in (q, k, v)):
            return ob, (q, k, v), refs
        fallback = fallback or (ob, (q, k, v), refs)
    if fallback is None:
        raise first
    return fallback


def _is_mutation(n: fx.Node, gm) -> bool:
    from attnfuse.passes import ops as O
    op = O.classify(n, gm)
    if op is not None and op.inplace:
        return True
    if n.op == "call_method" and str(n.target).endswith("_"):
        return True
    if n.op == "call_function":
        schema = getattr(n.target, "_schema", None)
        if schema is not None and getattr(schema, "is_mutable", False):
            return True
        if str(getattr(n.target, "__name__", "")).endswith("_") and not str(n.target).startswith("<"):
            return True
    return False


def _no_mutation_between(removed, pv, ctx):
    """The op runs where P·V ran: nothing may mutate a tensor in between (q after Q·Kᵀ ...)."""
    import bisect
    order, gm = ctx["order"], ctx["gm"]
    if "mutations" not in ctx["memo"]:  # positions of every mutating node, computed once per graph
        ctx["memo"]["mutations"] = sorted((i, n) for n, i in order.items() if _is_mutation(n, gm))
    muts = ctx["memo"]["mutations"]
    rem = set(removed)
    start = min(order[n] for n in removed)
    j = bisect.bisect_right([i for i, _ in muts], start)
    for i, n in muts[j:]:
        if i >= order[pv]:
            break
        if n not in rem:
            raise Miss("unsupported_op", f"{n.name} mutates a tensor between Q·Kᵀ and P·V", n)


def _shape_fixes(removed, tagmap, views, ob):
    """Size queries on removed nodes, redirected by axis meaning to q, k or v.

    Returns ``(user, (node, axis) | 1, how)``: ``how`` is "args" (re-point a
    ``sym_size``/``size(d)``) or "replace" (a ``shape[i]`` getitem becomes a size).
    """
    q, k, v = views
    fixed = {"q": (q, 2), "k": (k, 2), "d": (q, 3), "dv": (v, 3)}
    flat = slot_tags(ob)[0]

    def source(t, n, d):
        if t in fixed:
            x, i = fixed[t]
            a = axis_at(x, i)
            return (x.base, a) if a is not None else 1
        if t in flat:
            i = flat.index(t)
            for x in views:
                if x.axes[i] is not None and not A.is_one(A.shape(x.base)[x.axes[i]]):
                    return x.base, x.axes[i]
        if A.is_one(A.shape(n)[d]):
            return 1
        raise Miss("unsupported_op", f"no input carries the size of axis {d} of {n.name}", n)

    fixes = []
    rem = set(removed)
    for n in removed:
        for u in n.users:
            if u in rem:
                continue
            if A.reads_only_dtype(u, n):
                raise Miss("scores_other_users", f"{u.name} reads the dtype of {n.name}", u)
            if A.is_expand_as_of(u, n):
                if all(w in rem for w in u.users):
                    continue  # a mask broadcast to the scores' shape; the fused op reads the mask itself
                raise Miss("scores_other_users", f"{u.name} reads the shape of {n.name}", u)
            if A.is_like_read(u):
                raise Miss("probs_other_users", f"{u.name} reads {n.name}", u)
            if A.is_dtype_read(u):
                if A.dtype(n) != A.dtype(q.base):
                    raise Miss("scores_other_users", f"{u.name} reads the dtype of {n.name}", u)
                fixes.append((u, (q.base, "dtype"), "args"))
                continue
            d = A.shape_query(u)
            queries = [(u, d, "args")] if d is not None else \
                [(g, g.args[1], "replace") for g in u.users] if A.is_shape_tuple(u) else []
            for user, dim, how in queries:
                tags = tagmap.get(n)
                if tags is None:
                    raise Miss("unsupported_op", f"{user.name} reads a size of {n.name}", user)
                dim = A.norm_dim(dim, len(tags))
                fixes.append((user, source(tags[dim], n, dim), how))
    return fixes
