"""The max shift: ``s - s.amax(-1, keepdim=True)`` before the softmax changes nothing.

Owns :func:`row_max`, which reads a term subtracted from (or added to) the scores ``s``
as a maximum of ``s`` itself over some axes: ``s.amax(d, keepdim=True)``,
``s.max(d, keepdim=True).values`` / ``[0]``, ``torch.max(s, d)[0].unsqueeze(d)``, the
global ``s.max()``, each possibly ``.detach()``-ed (aten's ``alias``), cast, or read
from ``s.detach()``. The matcher proves the reduced axes include the key axis (then the
term is constant along the keys, and the softmax is shift-invariant along them: the
term is a no-op, its gradient included) once it knows which axis that is; this module
only reads the spelling. A row that is ``-inf`` everywhere gives NaN in eager
(``-inf - -inf``); the op's documented convention for such rows applies.
Nothing here changes a graph.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import ops as O

aten = torch.ops.aten

_DETACH_METHODS = ("detach",)


def _is_detach(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _DETACH_METHODS
    if n.op == "call_function":
        if n.target is torch.detach:
            return True
        packet = getattr(n.target, "overloadpacket", None)
        return packet in (aten.detach, aten.alias)
    return False


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _reduction(n: fx.Node) -> Optional[Tuple[fx.Node, Optional[tuple], bool, List[fx.Node]]]:
    """``(input, dims or None for every axis, keepdim, nodes)`` when ``n`` is the value of a
    max/amax reduction (``nodes``: n and the reduction node, when they differ)."""
    t = n.target
    packet = getattr(t, "overloadpacket", None)
    if (n.op == "call_method" and t == "amax") or t is torch.amax or packet is aten.amax:
        dims = _arg(n, 1, "dim", ())
        dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
        return n.args[0], (dims or None), bool(_arg(n, 2, "keepdim", False)), [n]
    if (n.op == "call_method" and t == "max") or t is torch.max or packet is aten.max:
        if len(n.args) == 1 and not n.kwargs:  # the global max: one value
            return n.args[0], None, False, [n]
        return None
    getter = (n.op == "call_function" and t is operator.getitem and n.args[1] == 0) or \
        (n.op == "call_function" and t is getattr and n.args[1] == "values")
    if not getter or not isinstance(n.args[0], fx.Node):
        return None
    r = n.args[0]
    rt, rp = r.target, getattr(r.target, "overloadpacket", None)
    if not ((r.op == "call_method" and rt == "max") or rt is torch.max or rp is aten.max):
        return None
    dim = _arg(r, 1, "dim")
    if not isinstance(dim, int):
        return None
    return r.args[0], (dim,), bool(_arg(r, 2, "keepdim", False)), [n, r]


def row_max(term: fx.Node, scores: fx.Node, gm) -> Optional[Tuple[Tuple[int, ...], List[fx.Node]]]:
    """``(reduced axes of scores, nodes)`` when ``term`` is a maximum of ``scores`` over
    those axes, broadcast back (keepdim or an unsqueeze of the one reduced axis); ``nodes``
    are the nodes computing it, each read by the next only. None otherwise."""
    r = A.rank(scores)
    if r is None or not isinstance(term, fx.Node):
        return None
    nodes: List[fx.Node] = []
    unsq = None
    x = term
    for _ in range(8):
        op = O.classify(x, gm)
        if _is_detach(x) or (op is not None and (op.kind == O.CAST or (op.kind == O.LAYOUT and op.sub == "identity"))
                             and isinstance(op.get("x"), fx.Node)):
            nodes.append(x)
            x = x.args[0]
            continue
        if op is not None and op.kind == O.LAYOUT and op.sub == "unsqueeze" and unsq is None \
                and isinstance(op["dim"], int):
            unsq = op["dim"]
            nodes.append(x)
            x = op["x"]
            continue
        if op is not None and op.kind == O.GETITEM and unsq is None and isinstance(op["idx"], tuple) \
                and A.rank(x) == r:
            new = [i for i, v in enumerate(op["idx"]) if v is None]
            rest = [v for v in op["idx"] if v is not None]
            if len(new) == 1 and all(v == slice(None) or v is Ellipsis for v in rest) and \
                    (Ellipsis in rest or len(op["idx"]) == r):
                unsq = new[0] - len(op["idx"]) if Ellipsis in rest else new[0]
                nodes.append(x)
                x = op["x"]
                continue
        break
    red = _reduction(x)
    if red is None:
        return None
    src, dims, keepdim, rnodes = red
    nodes += rnodes
    if isinstance(src, fx.Node) and src is not scores and _is_detach(src) and src.args[0] is scores:
        nodes.append(src)  # ``s.detach().amax(...)``
        src = scores
    if src is not scores:
        return None
    dims = tuple(range(r)) if dims is None else tuple(A.norm_dim(d, r) for d in dims)
    if dims and len(set(dims)) != len(dims):
        return None
    out_rank = A.rank(term)
    if keepdim:
        if unsq is not None or out_rank != r:
            return None
    elif A.rank(x) == 0 and len(dims) == r:
        if unsq is not None:
            return None  # a scalar broadcasts as it is
    else:
        if unsq is None or len(dims) != 1 or out_rank != r or A.norm_dim(unsq, r) != dims[0]:
            return None
    for a, b in zip(nodes[1:], nodes[:-1]):  # each node read by the next only (dead readers aside)
        if A.data_users(a) != [b]:
            return None
    return dims, nodes
