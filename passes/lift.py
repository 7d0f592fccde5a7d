"""Masks written on fewer axes than the scores, lifted to them by unit axes.

Owns two readings of a keep-mask that :mod:`.structure` uses before it splits the mask
into factors:

- :func:`bool_negation`: ``m == 0`` / ``m == False`` of a bool ``m`` is ``~m``, and
  ``m != 0`` / ``m == 1`` / ``m == True`` is ``m`` (the spellings of ``~`` that models
  use on bool masks); and a comparison with a constant, or a cast to bool, of
  ``where(c, a, b)`` with constants ``a``, ``b`` is ``c`` or ``~c`` where it differs
  between ``a`` and ``b`` (MPT's ``float_mask.to(bool)``, Falcon's ``float_mask < -1``:
  the keep-mask read back from Hugging Face's ``where(keep, 0, finfo.min)``);
- :func:`lower`: a mask built as ``(pad & causal)[:, None]`` (or ``.unsqueeze(1)``, a view
  that only inserts unit axes) is the AND of its factors on the scores *without* the
  inserted axes. When every inserted axis is a batch or head axis of the scores, the
  mask is analysed against the scores with those axes removed (its value at a score
  position is the inner mask's value at the position without them), so each factor
  keeps its own shape: a key-padding factor (B, 1, Lk) and a causal factor (1, Lq, Lk)
  under one ``[:, None]`` become ``key_mask`` and ``causal``.

Pure: nothing here changes a graph.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import consts as C
from attnfuse.passes import ops as O
from attnfuse.passes.views import _getitem_unsqueeze

_MAX_STEPS = 16


def _is_bool(x: Any) -> bool:
    return isinstance(x, fx.Node) and A.dtype(x) == torch.bool


def bool_negation(n: fx.Node, gm) -> Optional[Tuple[fx.Node, bool]]:
    """``(m, negated)`` when ``n`` is ``m == c`` / ``m != c`` of a bool ``m`` and a constant
    ``c`` in {0, 1, False, True}: ``n`` is ``~m`` when ``negated``, else ``m``. None otherwise."""
    op = O.classify(n, gm)
    if op is None or op.kind != O.COMPARE or op.sub not in ("eq", "ne"):
        return _where_read_back(n, gm)
    a, b = op["a"], op["b"]
    if not _is_bool(a) and _is_bool(b):
        a, b = b, a
    if not _is_bool(a) or isinstance(b, fx.Node) or not isinstance(b, (bool, int, float)) or b not in (0, 1):
        return None
    is_true = bool(b)
    return a, (op.sub == "eq") != is_true


_ORDER = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne}
_ORDER_FUNCS = {operator.lt: "lt", operator.le: "le", operator.gt: "gt", operator.ge: "ge",
                operator.eq: "eq", operator.ne: "ne", torch.lt: "lt", torch.le: "le", torch.gt: "gt",
                torch.ge: "ge", torch.eq: "eq", torch.ne: "ne"}
_FLIPPED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


def _comparison(n: fx.Node) -> Optional[Tuple[str, Any, Any]]:
    """``(name, a, b)`` for ``a <op> b`` (``<``, ``<=``, ``>``, ``>=``, ``==``, ``!=``) in any dialect."""
    name = None
    if n.op == "call_function":
        name = _ORDER_FUNCS.get(n.target)
        packet = getattr(n.target, "overloadpacket", None)
        if name is None and packet is not None and getattr(packet, "__name__", None) in _ORDER:
            name = packet.__name__
    elif n.op == "call_method":
        name = n.target.strip("_") if n.target.strip("_") in _ORDER else None
    if name is None or len(n.args) != 2 or n.kwargs:
        return None
    return name, n.args[0], n.args[1]


def _where_read_back(n: fx.Node, gm) -> Optional[Tuple[fx.Node, bool]]:
    """``(c, negated)`` when ``n`` reads a bool back from ``w = where(c, a, b)`` (constants
    ``a``, ``b``, one element each): ``w <op> t`` / ``t <op> w`` (``t`` a Python number) or
    ``w.to(bool)`` (``w != 0``), true for exactly one of ``a``, ``b``. The comparison runs
    on ``a`` and ``b`` rounded to ``w``'s dtype, as the graph compares them."""
    if not isinstance(n, fx.Node) or A.dtype(n) != torch.bool:
        return None
    op = O.classify(n, gm)
    if op is not None and op.kind == O.CAST and op.get("dtype") == torch.bool:
        w, name, t = op["x"], "ne", 0
    else:
        cmp = _comparison(n)
        if cmp is None:
            return None
        name, w, t = cmp
        if not isinstance(w, fx.Node):
            name, w, t = _FLIPPED[name], t, w
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            return None
    wop = O.classify(w, gm) if isinstance(w, fx.Node) else None
    dt = A.dtype(w)
    if wop is None or wop.kind != O.MASK or wop.sub != "where" or not _is_bool(wop["cond"]) or \
            not isinstance(dt, torch.dtype) or dt == torch.bool:
        return None
    vals = [C.scalar_value(x, gm) for x in (wop["a"], wop["b"])]
    if any(v is None for v in vals):
        return None
    a_true, b_true = (bool(_ORDER[name](torch.tensor(v, dtype=dt), t)) for v in vals)
    if a_true == b_true:
        return None
    return wop["cond"], b_true


def _inserted_axes(n: fx.Node, gm) -> Optional[Tuple[fx.Node, List[int]]]:
    """``(x, axes of n that x lacks)`` when ``n`` is ``x`` with unit axes inserted
    (``unsqueeze``, ``x[:, None]``, a view that only inserts unit axes), x a bool tensor."""
    op = O.classify(n, gm)
    if op is None:
        return None
    x = op.get("x")
    if not _is_bool(x) or A.shape(n) is None or A.shape(x) is None:
        return None
    ns, xs = A.shape(n), A.shape(x)
    if op.kind == O.GETITEM:
        new = _getitem_unsqueeze(n, op)
        return (x, new) if new and len(ns) == len(xs) + len(new) else None
    if op.kind != O.LAYOUT:
        return None
    if op.sub == "unsqueeze" and isinstance(op["dim"], int):
        return x, [A.norm_dim(op["dim"], len(ns))]
    if op.sub == "view" and len(ns) > len(xs):
        new, i = [], 0
        for j, size in enumerate(ns):
            if i < len(xs) and (A.is_one(size) == A.is_one(xs[i])) and (A.is_one(size) or A.size_eq(size, xs[i])):
                i += 1
            elif A.is_one(size):
                new.append(j)
            else:
                return None
        return (x, new) if i == len(xs) else None
    return None


def lower(n: fx.Node, negate: bool, gm, sshape: Sequence, stags: Sequence,
          splits: Callable[[fx.Node], bool]) -> Tuple[fx.Node, bool, tuple, list]:
    """``(x, negate, sshape, stags)``: the keep-mask ``n`` (``~n`` when ``negate``) seen as
    ``x`` on the scores without the batch/head axes that ``n`` only inserts; unchanged
    when ``n`` inserts none (or inserts a query or key axis). Lowered only down to a node
    that ``splits`` (an AND or OR of masks, which :func:`.structure.split_and` splits)."""
    sshape, stags = list(sshape), list(stags)
    best = (n, negate, tuple(sshape), list(stags))
    x, neg = n, negate
    for _ in range(_MAX_STEPS):
        op = O.classify(x, gm) if isinstance(x, fx.Node) else None
        if op is not None and op.kind == O.COMPARE and op.sub == "not" and _is_bool(op["x"]):
            x, neg = op["x"], not neg
            continue
        eq = bool_negation(x, gm) if isinstance(x, fx.Node) else None
        if eq is not None:
            x, neg = eq[0], neg != eq[1]
            continue
        ins = _inserted_axes(x, gm) if isinstance(x, fx.Node) else None
        if ins is None:
            break
        inner, new = ins
        rn, r = len(A.shape(x)), len(stags)
        if rn > r:
            break
        drop = sorted(r - rn + p for p in new)
        if any(stags[d] in ("q", "k") for d in drop):
            break
        sshape = [s for i, s in enumerate(sshape) if i not in drop]
        stags = [t for i, t in enumerate(stags) if i not in drop]
        x = inner
        if splits(x):
            best = (x, neg, tuple(sshape), list(stags))
    return best
