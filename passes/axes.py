"""Axis tracking: shapes, symbolic sizes, and what each tensor axis means.

Owns:

- reading a node's tensor shape/dtype from whichever metadata the dialect left
  (``meta["val"]``, ``meta["example_value"]``, ``meta["tensor_meta"]``), sizes kept
  symbolic (SymInt → sympy expression) so dynamic shapes are compared exactly;
- :func:`view_groups`: how a view/reshape maps input axes to output axes (merge of
  a run of axes, split of one axis), decided by products of symbolic sizes;
- axis *labels*: :func:`labels` gives every axis of a tensor an identity derived
  from dataflow (positional at opaque roots, carried through permutes, split /
  merged through views). Two axes paired by a matmul whose labels come from the
  same kind of root but differ betray a permute that is not the transpose it
  resembles; sizes never decide this.

Pure functions; the only state is an explicit memo dict passed by the caller.
sympy is imported by the functions that use it, on first use: ``import attnfuse`` runs
inside every ``import torch`` (torch's backend autoload, see attnfuse/_autoload.py) and
must stay light.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx

from attnfuse.passes import dead as D
from attnfuse.passes import ops as O

ONE = ("one",)  # label of a size-1 axis


# ---------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------

def meta_val(node: Any):
    """The fake/real tensor (or TensorMetadata) describing ``node``'s value, or None."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        v = node.meta.get(key)
        if v is not None:
            return v
    return node.meta.get("tensor_meta")


def shape(node: Any) -> Optional[Tuple]:
    v = meta_val(node)
    if isinstance(v, torch.Tensor) or hasattr(v, "shape") and hasattr(v, "dtype"):
        try:
            return tuple(v.shape)
        except Exception:  # noqa: BLE001
            return None
    return None


def dtype(node: Any):
    v = meta_val(node)
    return getattr(v, "dtype", None)


def rank(node: Any) -> Optional[int]:
    s = shape(node)
    return None if s is None else len(s)


def expr(size) -> Any:
    """A size (int or SymInt) as a sympy expression."""
    import sympy

    if isinstance(size, torch.SymInt):
        return _exact_div(size.node.expr)
    if isinstance(size, sympy.Basic):
        return _exact_div(size)
    return sympy.Integer(int(size))


def _is_div(x) -> bool:
    return type(x).__name__ in ("FloorDiv", "CleanDiv", "IntTrueDiv") and len(x.args) == 2


def _exact_div(e):
    """Rewrite ``FloorDiv(a, b)`` as ``a / b`` where b divides a as polynomials (exact)."""
    import sympy

    if not any(_is_div(x) for x in sympy.preorder_traversal(e)):
        return e

    def sub(x):
        q = sympy.cancel(x.args[0] / x.args[1])
        return q if sympy.fraction(q)[1] == 1 else x
    return e.replace(_is_div, sub)


def size_eq(a, b) -> bool:
    """Exact equality of two sizes; True only when provable."""
    try:
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        import sympy

        d = sympy.expand(expr(a) - expr(b))
        return d == 0 or _static_eq(a, b)
    except Exception:  # noqa: BLE001
        return False


def _static_eq(a, b) -> bool:
    """Equality of two sizes, at least one a SymInt, proven by its shape environment from
    the value ranges it knows (``Max(1, 2*(s0//2))`` is ``2*(s0//2)`` for ``s0 >= 2``),
    without adding a guard; False when not provable."""
    import sympy

    env = next((x.node.shape_env for x in (a, b) if isinstance(x, torch.SymInt)), None)
    if env is None or not hasattr(env, "_maybe_evaluate_static"):
        return False
    ea, eb = (x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x)) for x in (a, b))
    return env._maybe_evaluate_static(sympy.Eq(ea, eb)) is sympy.true


def is_one(size) -> bool:
    return size_eq(size, 1)


def prod(sizes: Sequence) -> Any:
    import sympy

    p = sympy.Integer(1)
    for s in sizes:
        p = p * expr(s)
    return sympy.expand(p)


def static_int(size) -> Optional[int]:
    if isinstance(size, int):
        return size
    e = expr(size)
    return int(e) if e.is_Integer else None


def norm_dim(d: int, r: int) -> int:
    return d + r if d < 0 else d


# ---------------------------------------------------------------------------
# views
# ---------------------------------------------------------------------------

def view_groups(ins: Sequence, outs: Sequence) -> Optional[List[Tuple[List[int], List[int]]]]:
    """Pair runs of input axes with runs of output axes of equal product.

    Returns a list of ``(in_axes, out_axes)`` groups covering all non-unit axes
    (size-1 axes are left out of every group), or None when the sizes do not
    factor provably. A group with one input and several outputs is a split, with
    several inputs and one output a merge.
    """
    import sympy

    i_ax = [i for i, s in enumerate(ins) if not is_one(s)]
    o_ax = [o for o, s in enumerate(outs) if not is_one(s)]
    groups = []
    i = o = 0
    while i < len(i_ax) or o < len(o_ax):
        if i >= len(i_ax) or o >= len(o_ax):
            return None
        gi, go = [i_ax[i]], [o_ax[o]]
        i += 1
        o += 1
        for _ in range(64):
            pi, po = prod([ins[a] for a in gi]), prod([outs[a] for a in go])
            if sympy.expand(pi - po) == 0:
                break
            # grow the side that provably divides into the other; else grow the smaller
            q = sympy.simplify(po / pi)
            if q.is_Integer or (q.is_number is False and sympy.fraction(sympy.factor(q))[1] == 1):
                if i >= len(i_ax):
                    return None
                gi.append(i_ax[i])
                i += 1
            else:
                if o >= len(o_ax):
                    return None
                go.append(o_ax[o])
                o += 1
        else:
            return None
        groups.append((gi, go))
    return groups


def view_labels(in_labels: Sequence, ins: Sequence, outs: Sequence) -> Optional[List]:
    """Labels of a view's output from its input's labels (split/merge aware)."""
    groups = view_groups(ins, outs)
    if groups is None:
        return None
    out: List = [ONE] * len(outs)
    for gi, go in groups:
        if len(gi) == 1 and len(go) == 1:
            out[go[0]] = in_labels[gi[0]]
        elif len(go) == 1:  # merge
            parts: List = []
            for a in gi:
                lab = in_labels[a]
                parts.extend(lab[1] if lab[0] == "merge" else [lab])
            out[go[0]] = ("merge", tuple(parts))
        elif len(gi) == 1:  # split
            lab = in_labels[gi[0]]
            if lab[0] == "merge" and len(lab[1]) == len(go):
                for k, o in enumerate(go):
                    out[o] = lab[1][k]
            else:
                sizes = tuple(str(expr(outs[o])) for o in go)
                for k, o in enumerate(go):
                    out[o] = ("split", lab, k, sizes)
        else:
            for o in go:
                out[o] = ("mixed", tuple(in_labels[a] for a in gi), o)
    return out


def root_rank(label) -> Optional[int]:
    if label[0] == "pos":
        return label[1]
    if label[0] == "split":
        return root_rank(label[1])
    if label[0] == "merge":
        rs = {root_rank(x) for x in label[1]}
        return rs.pop() if len(rs) == 1 else None
    return None


def labels_conflict(a, b) -> bool:
    """True when two paired axes provably mean different things.

    Only labels grown from roots of the same rank are compared (the positional
    convention: same-rank inputs share one layout); anything else is not evidence.
    """
    if a == ONE or b == ONE or a == b:
        return False
    if _outer_part_of(a, b) or _outer_part_of(b, a):
        return False  # grouped-query: q's heads split (groups, repeats), the groups paired with k's heads
    ra, rb = root_rank(a), root_rank(b)
    return ra is not None and ra == rb


def _outer_part_of(a, b) -> bool:
    """``a`` is the outer (first) part of axis ``b`` split by a view."""
    return a[0] == "split" and a[1] == b and a[2] == 0


def permute_labels(labs: Sequence, dims: Sequence[int]) -> List:
    r = len(labs)
    return [labs[norm_dim(d, r)] for d in dims]


def labels(node: Any, gm, memo: Dict) -> Optional[List]:
    """Axis labels of ``node``'s value (see module doc); None when unknown."""
    if not isinstance(node, fx.Node):
        return None
    if node in memo:
        return memo[node]
    memo[node] = None  # cycle guard
    res = _labels(node, gm, memo)
    memo[node] = res
    return res


def _positional(node) -> Optional[List]:
    s = shape(node)
    if s is None:
        return None
    return [ONE if is_one(x) else ("pos", len(s), i) for i, x in enumerate(s)]


def _labels(node: fx.Node, gm, memo: Dict) -> Optional[List]:
    s = shape(node)
    if s is None:
        return None
    op = O.classify(node, gm)
    if op is not None and op.kind in (O.LAYOUT, O.CAST, O.DROPOUT) and isinstance(op.get("x"), fx.Node):
        x = op["x"]
        inl = labels(x, gm, memo)
        xs = shape(x)
        if inl is None or xs is None:
            return _positional(node)
        r = len(xs)
        try:
            if op.sub == "permute":
                return permute_labels(inl, op["dims"])
            if op.sub in ("transpose", "mT", "t"):
                d0, d1 = (op["d0"], op["d1"]) if op.sub == "transpose" else (-2, -1)
                d0, d1 = norm_dim(d0, r), norm_dim(d1, r)
                out = list(inl)
                out[d0], out[d1] = out[d1], out[d0]
                return out
            if op.sub in ("identity",) or op.kind in (O.CAST, O.DROPOUT):
                return list(inl) if len(inl) == len(s) else _positional(node)
            if op.sub == "unsqueeze":
                d = norm_dim(op["dim"], len(s))
                return list(inl[:d]) + [ONE] + list(inl[d:])
            if op.sub == "expand":
                pad = len(s) - r
                out = [ONE] * pad + list(inl)
                return [("bcast",) if (lab == ONE and not is_one(s[i])) else lab for i, lab in enumerate(out)]
            if op.sub == "view":
                return view_labels(inl, xs, s)
            if op.sub in ("repeat_interleave", "repeat"):
                rep = _repeat_labels(op, inl, s)
                if rep is not None:
                    return rep
            if len(inl) == len(s):  # repeat, repeat_interleave: axes keep their meaning
                return [ONE if is_one(x) else (lab if lab != ONE else ("op", node.name, i))
                        for i, (x, lab) in enumerate(zip(s, inl))]
        except Exception:  # noqa: BLE001
            pass
        return [ONE if is_one(x) else ("op", node.name, i) for i, x in enumerate(s)]
    if node.op in ("placeholder", "get_attr"):
        return _positional(node)
    # any other op: axes keep the meaning of its first input of the same rank (elementwise ops,
    # cat, repeat, linear ...); otherwise they are new and comparable with nothing
    for a in node.all_input_nodes:
        sa = shape(a)
        if sa is not None and len(sa) == len(s):
            la = labels(a, gm, memo)
            if la is not None:
                return [ONE if is_one(x) else (lab if lab != ONE else ("op", node.name, i))
                        for i, (x, lab) in enumerate(zip(s, la))]
    return [ONE if is_one(x) else ("op", node.name, i) for i, x in enumerate(s)]


def _repeat_labels(op, inl: Sequence, s: Sequence) -> Optional[List]:
    """Labels after a repeat of axes: ``x.repeat_interleave(g, dim=d)`` is the same tensor as
    ``x.unsqueeze(d + 1).expand(.., g, ..).flatten(d, d + 1)`` (each index read g times in a
    row), so axis d is the merge of its input axis with a broadcast one, the label HF's
    ``repeat_kv`` (expand + reshape) gives; ``x.repeat(.., g, ..)`` (tiling) is the merge of a
    broadcast axis with the input axis. None where the repeats are per element (a tensor)."""
    def grouped(lab, tiled: bool):
        if lab == ONE:
            return ("bcast",)
        parts = list(lab[1]) if lab[0] == "merge" else [lab]
        return ("merge", tuple([("bcast",)] + parts if tiled else parts + [("bcast",)]))

    reps = op.get("repeats")
    if op.sub == "repeat_interleave":
        d = op.get("dim")
        if not isinstance(d, int) or isinstance(reps, (list, tuple)) or shape(reps) is not None \
                or len(inl) != len(s):
            return None
        d = norm_dim(d, len(s))
        out = list(inl)
        if not (isinstance(reps, int) and reps == 1):
            out[d] = grouped(inl[d], False)
        return out
    if not isinstance(reps, (list, tuple)) or len(reps) != len(inl) or len(inl) != len(s):
        return None
    return [lab if isinstance(g, int) and g == 1 else grouped(lab, True) for lab, g in zip(inl, reps)]


def shape_query(u: fx.Node) -> Optional[int]:
    """The axis ``u`` reads the size of (``aten.sym_size.int(x, d)``, ``x.size(d)``), else None."""
    if u.op == "call_function" and "sym_size" in str(u.target) and len(u.args) == 2 \
            and isinstance(u.args[1], int):
        return u.args[1]
    if u.op == "call_method" and u.target == "size" and len(u.args) == 2 and isinstance(u.args[1], int):
        return u.args[1]
    return None


def is_meta_assert(u: fx.Node) -> bool:
    """``aten._assert_tensor_metadata`` (export): checks metadata, reads no values."""
    return u.op == "call_function" and "_assert_tensor_metadata" in str(u.target)


def is_dead_alias(u: fx.Node) -> bool:
    """An unused ``alias``/``detach`` (make_fx leaves these for autograd)."""
    return not u.users and u.op == "call_function" and any(
        x in str(u.target) for x in ("aten.alias", "aten.detach"))


def reads_only_dtype(u: fx.Node, n: fx.Node) -> bool:
    """``x.type_as(n)`` / ``x.to(n)``: ``u`` reads only ``n``'s dtype."""
    if u.op == "call_method" and u.target in ("type_as", "to") and len(u.args) == 2 \
            and u.args[1] is n and u.args[0] is not n and not u.kwargs:
        return True
    if u.op == "call_function" and "type_as" in str(u.target) and len(u.args) == 2 \
            and u.args[1] is n and u.args[0] is not n:
        return True
    return False


def is_shape_tuple(u: fx.Node) -> bool:
    """``x.shape`` / ``x.size()`` whose every use is ``[i]`` with a constant i."""
    full = (u.op == "call_function" and u.target is getattr and len(u.args) == 2 and u.args[1] == "shape") or \
        (u.op == "call_method" and u.target == "size" and len(u.args) == 1 and not u.kwargs)
    if not full:
        return False
    import operator as _op
    return all(g.op == "call_function" and g.target is _op.getitem and isinstance(g.args[1], int)
               for g in u.users)


def is_like_read(u: fx.Node) -> bool:
    """``empty_like(x)``: reads only x's shape, dtype and device."""
    return u.op == "call_function" and "empty_like" in str(u.target)


def is_expand_as_of(u: fx.Node, n: fx.Node) -> bool:
    """``m.expand_as(n)``: reads only ``n``'s shape."""
    return u.op == "call_method" and u.target == "expand_as" and len(u.args) == 2 and u.args[1] is n \
        and u.args[0] is not n


def is_dtype_read(u: fx.Node) -> bool:
    return u.op == "call_function" and u.target is getattr and len(u.args) == 2 and u.args[1] == "dtype"


def data_users(n: fx.Node) -> List[fx.Node]:
    """Users that read ``n``'s values (not only one of its sizes, dtype or metadata) and
    whose value is used (:func:`.dead.is_dead`: a dead user is no user)."""
    return [u for u in n.users if shape_query(u) is None and not is_meta_assert(u) and not is_shape_tuple(u)
            and not is_dtype_read(u) and not is_like_read(u) and not is_expand_as_of(u, n)
            and not is_dead_alias(u) and not reads_only_dtype(u, n) and not D.is_dead(u)]
