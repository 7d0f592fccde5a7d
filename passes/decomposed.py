"""Products that aten spelled as layout ops around a ``bmm`` (einsum, matmul decompositions).

Owns :func:`product_above` (the scores node is the end of ``layout* ∘ bmm ∘ layout*``)
and :func:`product_below` (the probabilities enter such a product). Every axis is
followed as a list of index *components* from the operands' roots through permutes,
unsqueezes, expands and views (merges and splits proven with symbolic sizes), so
the bmm's merged batch / contraction axes are paired component by component. The
result is an einsum-like :class:`~attnfuse.passes.matmul.MMSpec` over the roots.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import ops as O
from attnfuse.passes.matmul import MMSpec

_STEPS = ("permute", "transpose", "mT", "t", "unsqueeze", "identity", "expand", "view")
Comps = List[Tuple[Any, Any]]  # (atom, size), outer to inner; [] = a unit axis


def _layout(n: Any, gm) -> Optional[O.Op]:
    op = O.classify(n, gm) if isinstance(n, fx.Node) else None
    if op is None or op.kind != O.LAYOUT or op.sub not in _STEPS or not isinstance(op.get("x"), fx.Node):
        return None
    if A.shape(n) is None or A.shape(op["x"]) is None:
        return None
    return op


def _root(tag: str, n: fx.Node) -> List[Comps]:
    return [[] if A.is_one(s) else [((tag, i), s)] for i, s in enumerate(A.shape(n))]


def _step(n: fx.Node, op: O.Op, xa: List[Comps]) -> Optional[List[Comps]]:
    xs, out = A.shape(op["x"]), A.shape(n)
    r = len(xs)
    if op.sub == "permute":
        return [xa[A.norm_dim(d, r)] for d in op["dims"]]
    if op.sub in ("transpose", "mT", "t"):
        d0, d1 = (op["d0"], op["d1"]) if op.sub == "transpose" else (-2, -1)
        d0, d1 = A.norm_dim(d0, r), A.norm_dim(d1, r)
        res = list(xa)
        res[d0], res[d1] = res[d1], res[d0]
        return res
    if op.sub == "identity":
        return list(xa)
    if op.sub == "unsqueeze":
        d = A.norm_dim(op["dim"], len(out))
        return list(xa[:d]) + [[]] + list(xa[d:])
    if op.sub == "expand":
        pad = len(out) - r
        res = []
        for i, s in enumerate(out):
            j = i - pad
            if j >= 0 and (not A.is_one(xs[j]) or A.is_one(s)):
                res.append(xa[j])
            else:
                res.append([] if A.is_one(s) else [(("x", n.name, i), s)])
        return res
    groups = A.view_groups(xs, out)
    if groups is None:
        return None
    res: List[Comps] = [[] for _ in out]
    for gi, go in groups:
        comps = [c for a in gi for c in xa[a]]
        for o in go:
            take, p = [], 1
            while comps and not A.size_eq(p, out[o]):
                c = comps.pop(0)
                take.append(c)
                p = A.prod([p, c[1]])
            if not A.size_eq(p, out[o]):
                return None
            res[o] = take
        if comps:
            return None
    return res


def _up(n: fx.Node, gm, stop: Optional[fx.Node] = None) -> List[fx.Node]:
    """Layout nodes above ``n`` (inclusive), nearest first, each feeding only the next."""
    path = [n]
    while True:
        op = _layout(path[-1], gm)
        if op is None or path[-1] is stop:
            return path
        x = op["x"]
        if x is stop:
            path.append(x)
            return path
        if len(A.data_users(x)) != 1:
            path.append(x)
            return path
        path.append(x)


def _labels_along(path_up: List[fx.Node], tag: str, gm) -> Optional[List[Comps]]:
    """Components at ``path_up[0]`` with ``path_up[-1]`` as the root."""
    comps = _root(tag, path_up[-1])
    for n in reversed(path_up[:-1]):
        op = _layout(n, gm)
        if op is None:
            return None
        comps = _step(n, op, comps)
        if comps is None:
            return None
    return comps


def _best_root(operand: fx.Node, tag: str, gm, fixed: Optional[fx.Node] = None):
    path = _up(operand, gm, stop=fixed)
    if fixed is not None:
        if path[-1] is not fixed:
            return None
        comps = _labels_along(path, tag, gm)
        return None if comps is None else (fixed, comps)
    for cut in range(len(path), 0, -1):  # farthest root first
        comps = _labels_along(path[:cut], tag, gm)
        if comps is not None:
            return path[cut - 1], comps
    return None


def _clean(comps: List[Comps]) -> bool:
    return all(len(c) <= 1 for c in comps)


def _spec(bmm: fx.Node, out_node: fx.Node, out_path: List[fx.Node], gm,
          fixed_a: Optional[fx.Node] = None, fixed_b: Optional[fx.Node] = None) -> Optional[MMSpec]:
    ra = _best_root(bmm.args[0], "a", gm, fixed_a)
    rb = _best_root(bmm.args[1], "b", gm, fixed_b)
    if ra is None or rb is None:
        return None
    (root_a, ca), (root_b, cb) = ra, rb
    if len(ca) != 3 or len(cb) != 3:
        return None
    letter: Dict[Any, str] = {}
    fresh = iter(f"l{i}" for i in range(10_000))

    def pair(xs: Comps, ys: Comps, allow_bcast: bool) -> bool:
        if len(xs) != len(ys):
            return False
        for (x, sx), (y, sy) in zip(xs, ys):
            bx, by = x[0] == "x", y[0] == "x"
            if (bx or by) and not allow_bcast or (bx and by):
                return False
            if not bx and not by and not A.size_eq(sx, sy):
                return False
            lt = next(fresh)
            letter[x] = letter[y] = lt
        return True

    if not pair(ca[0], cb[0], True) or not pair(ca[2], cb[1], False):
        return None
    for x, _ in ca[1] + cb[2]:
        if x[0] == "x":
            return None
        letter[x] = next(fresh)
    oc = [ca[0] if all(c[0][0] != "x" for c in ca[0]) else cb[0], ca[1], cb[2]]
    oc[0] = [(a if a[0] != "x" else b, s) for (a, s), (b, _) in zip(ca[0], cb[0])]
    for n in out_path:
        op = _layout(n, gm)
        oc = _step(n, op, oc) if op is not None else None
        if oc is None:
            return None
    if not _clean(oc):
        return None
    la = tuple(letter.get(("a", i)) if not A.is_one(s) else None for i, s in enumerate(A.shape(root_a)))
    lb = tuple(letter.get(("b", i)) if not A.is_one(s) else None for i, s in enumerate(A.shape(root_b)))
    if any(lt is None and not A.is_one(s) for lt, s in zip(la, A.shape(root_a))) or \
            any(lt is None and not A.is_one(s) for lt, s in zip(lb, A.shape(root_b))):
        return None
    lo = tuple(letter[c[0][0]] if c else None for c in oc)
    q_hint = letter[ca[1][-1][0]] if ca[1] else None
    k_hint = letter[cb[2][-1][0]] if cb[2] else None
    return MMSpec(root_a, root_b, la, lb, lo, hints=(q_hint, k_hint))


def product_above(s: fx.Node, gm) -> Optional[MMSpec]:
    """If ``s`` ends ``layout* ∘ bmm``, the product over the operands' roots."""
    if _layout(s, gm) is None:
        return None
    path = _up(s, gm)
    bmm = path[-1]
    bop = O.classify(bmm, gm)
    if bop is None or bop.kind != O.MATMUL or bop.sub != "bmm" or len(A.data_users(bmm)) != 1:
        return None
    return _spec(bmm, s, list(reversed(path[:-1])), gm)


def product_below(u: fx.Node, p: fx.Node, gm):
    """If ``p`` enters a bmm through the layout ops starting at ``u``: (out, spec, nodes)."""
    path = []
    n = u
    for _ in range(16):
        if _layout(n, gm) is None:
            break
        path.append(n)
        users = A.data_users(n)
        if len(users) != 1:
            return None
        n = users[0]
    bop = O.classify(n, gm)
    if bop is None or bop.kind != O.MATMUL or bop.sub != "bmm" or not path:
        return None
    bmm = n
    side = 0 if bmm.args[0] is path[-1] else 1 if bmm.args[1] is path[-1] else None
    if side is None:
        return None
    out_path: List[fx.Node] = []
    cur = bmm
    for _ in range(16):
        users = A.data_users(cur)
        if len(users) != 1 or _layout(users[0], gm) is None:
            break
        cur = users[0]
        out_path.append(cur)
        spec = _spec(bmm, cur, out_path, gm, fixed_a=p if side == 0 else None,
                     fixed_b=p if side == 1 else None)
        if spec is not None:
            return cur, spec, path + [bmm] + out_path[:-1]
    return None
