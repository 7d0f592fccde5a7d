"""Constant evaluation of small graph pieces: scalars, fill values and causal masks.

Owns :func:`const_eval` (evaluate a node whose value depends only on constants:
literals, ``get_attr`` buffers, statically known sizes), :func:`scalar_value`
(a Python number for a scale or fill value, when provable) and :func:`causal_kind`
(prove that a keep-mask is exactly a top-left or bottom-right causal mask, e.g.
nanoGPT's sliced ``tril`` buffer or an ``arange`` comparison, by evaluating it at
the graph's static sizes). Nothing is guessed: anything not evaluable is ``None``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import fx

from attnfuse.passes import axes as A

_MAX_NODES = 64
_MAX_ELEMS = 1 << 26
_RANDOM = ("rand", "randn", "randint", "dropout", "bernoulli", "normal", "uniform", "multinomial")


class _NotConst(Exception):
    pass


def _is_random(node: fx.Node) -> bool:
    name = str(getattr(node.target, "__name__", node.target))
    return any(r in name for r in _RANDOM)


def const_eval(node: Any, gm: Optional[torch.nn.Module], subs: Optional[Dict] = None) -> Any:
    """The concrete value of ``node`` if it depends only on constants, else None.

    ``subs`` maps the graph's size symbols to integers: symbolic sizes are then
    evaluated at those values (the caller proves a property at several of them)."""
    try:
        return _eval(node, gm, {}, [0], subs)
    except _NotConst:
        return None
    except Exception:  # noqa: BLE001 - evaluation of user code may fail in any way
        return None


def _sym(a, subs):
    v = A.static_int(a)
    if v is None and subs:
        e = A.expr(a).subs(subs)
        v = int(e) if e.is_Integer else None
    if v is None:
        raise _NotConst
    return v


def _eval(a: Any, gm, memo: Dict, budget, subs=None) -> Any:
    if isinstance(a, (list, tuple)):
        return type(a)(_eval(x, gm, memo, budget, subs) for x in a)
    if isinstance(a, dict):
        return {k: _eval(v, gm, memo, budget, subs) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_eval(a.start, gm, memo, budget, subs), _eval(a.stop, gm, memo, budget, subs),
                     _eval(a.step, gm, memo, budget, subs))
    if isinstance(a, torch.SymInt):
        return _sym(a, subs)
    if not isinstance(a, fx.Node):
        return a
    if a in memo:
        return memo[a]
    budget[0] += 1
    if budget[0] > _MAX_NODES:
        raise _NotConst
    n = a
    if n.op == "get_attr":
        if gm is None:
            raise _NotConst
        obj = gm
        for part in n.target.split("."):
            obj = getattr(obj, part)
        val = obj
    elif n.op == "placeholder" and isinstance(n.meta.get("val", n.meta.get("example_value")), torch.SymInt):
        val = _sym(n.meta.get("val", n.meta.get("example_value")), subs)
    elif n.op == "call_method" and n.target == "size":
        s = _specialized_shape(n.args[0])
        if s is None:
            raise _NotConst
        sizes = [_sym(x, subs) for x in s]
        val = torch.Size(sizes) if len(n.args) == 1 else sizes[n.args[1]]
    elif n.op == "call_function" and n.target is getattr and n.args[1] == "shape":
        s = _specialized_shape(n.args[0])
        if s is None:
            raise _NotConst
        val = torch.Size([_sym(x, subs) for x in s])
    elif n.op == "call_function" and "sym_size" in str(n.target):
        s = _specialized_shape(n.args[0])
        if s is None:
            raise _NotConst
        val = _sym(s[n.args[1]], subs)
    elif n.op in ("call_function", "call_method"):
        if _is_random(n) or str(n.target).endswith("_") and n.op == "call_method":
            raise _NotConst
        args = _eval(n.args, gm, memo, budget, subs)
        kwargs = _eval(dict(n.kwargs), gm, memo, budget, subs)
        for t in list(args) + list(kwargs.values()):
            if isinstance(t, torch.Tensor) and t.numel() > _MAX_ELEMS:
                raise _NotConst
        with torch.no_grad():
            if n.op == "call_method":
                val = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                val = n.target(*args, **kwargs)
    else:
        raise _NotConst
    if isinstance(val, torch.Tensor) and (val.is_meta or type(val) is not torch.Tensor and
                                          not isinstance(val, torch.nn.Parameter)):
        raise _NotConst
    memo[n] = val
    return val


def _specialized_shape(node):
    """A shape the graph is specialised to: dynamo/make_fx/export metadata (static sizes
    there are guarded or baked in). ShapeProp's ``tensor_meta`` describes one example
    only (a symbolic_trace graph runs at any shape), so it never counts as constant."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val", node.meta.get("example_value"))
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def scalar_value(a: Any, gm) -> Optional[float]:
    """A Python float for a number, or a one-element constant tensor node; else None."""
    if isinstance(a, bool):
        return None
    if isinstance(a, (int, float)):
        return float(a)
    if isinstance(a, fx.Node):
        v = const_eval(a, gm)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
            return float(v.reshape(()).item())
    return None


def causal_kind(keep: torch.Tensor, lq: int, lk: int, q_axis: int, k_axis: int) -> Optional[str]:
    """"top_left" / "bottom_right" when bool ``keep`` is exactly that causal mask.

    ``keep`` is right-aligned with the scores; ``q_axis``/``k_axis`` are the score
    axes (negative, from the right). Every other axis of ``keep`` must be size 1.
    """
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        return None
    r = keep.dim()
    if r < max(-q_axis, -k_axis):
        return None
    for d in range(r):
        if d - r not in (q_axis, k_axis) and keep.shape[d] != 1:
            return None
    if keep.shape[q_axis] != lq or keep.shape[k_axis] != lk:
        return None
    idx = [0] * r
    idx[q_axis] = slice(None)
    idx[k_axis] = slice(None)
    m2 = keep[tuple(idx)]
    if (q_axis % r) > (k_axis % r):
        m2 = m2.t()
    ones = torch.ones(lq, lk, dtype=torch.bool)
    if torch.equal(m2, ones.tril()):
        return "top_left"
    if torch.equal(m2, ones.tril(lk - lq)):
        return "bottom_right"
    return None


def size_assignments(sizes) -> Optional[list]:
    """Values of the size symbols in ``sizes`` to prove a property at: the traced example
    and smaller ones (each symbol moved on its own and all together). None if unknown."""
    syms, env = set(), None
    for x in sizes:
        if isinstance(x, torch.SymInt):
            syms |= A.expr(x).free_symbols
            env = env or x.node.shape_env
    if env is None or not syms:
        return None
    try:
        vals = getattr(env, "backed_var_to_val", None) or env.var_to_val
        base = {s: int(vals[s]) for s in syms}
    except (KeyError, AttributeError, TypeError):
        return None
    out = [base, {s: max(2, v - 1) for s, v in base.items()}, {s: max(2, v - 2) for s, v in base.items()}]
    for s in syms:
        out.append({**base, s: max(2, base[s] - 1)})
    return out


def is_neg_inf(v: Optional[float]) -> bool:
    return v is not None and math.isinf(v) and v < 0


FILL_LIMIT = -1e30  # a finite fill at or below this is absorbed: s + fill == fill in fp32


def absorbing_fill(v: Optional[float]) -> bool:
    return v is not None and math.isfinite(v) and v <= FILL_LIMIT

