"""Precise near-miss reasons for score and probability chains that are not one attention.

Owns :func:`layout_change` (a layout change in the score chain: what it feeds) and
:func:`between_softmax_and_pv` (an op between the softmax and P·V: what it does to P). Both
only describe the graph: they decide nothing. Issue 18 (category 12) asks that every softmax
that stays says precisely what blocked it; the real cases behind them are timm's CaiT
(talking heads: a Linear mixes the heads of the scores before the softmax and of the
probabilities after it) and ConViT (gated positional self-attention: P is a gated mix of two
softmaxes, renormalised).
"""
from __future__ import annotations

from typing import Any

from torch import fx

_MIXERS = ("linear", "addmm", "mm", "matmul", "bmm", "einsum")
_MOVES = ("permute", "transpose", "contiguous", "reshape", "view", "expand")


def _what(n: Any) -> str:
    if not isinstance(n, fx.Node):
        return repr(n)
    t = n.target if n.op != "call_function" else getattr(n.target, "__name__", str(n.target))
    return f"{n.name} ({n.op} {t})"


def _is_mixer(n: Any, gm) -> bool:
    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_module" and gm is not None:
        try:
            return type(gm.get_submodule(n.target)).__name__ == "Linear"
        except AttributeError:
            return False
    name = str(getattr(n.target, "__name__", n.target)).split(".")[0]
    return n.op in ("call_function", "call_method") and name in _MIXERS


def _through(n: Any) -> Any:
    """``n`` past the layout changes and constant scalings above it (a few nodes)."""
    for _ in range(8):
        if not isinstance(n, fx.Node) or n.op not in ("call_method", "call_function"):
            return n
        name = str(getattr(n.target, "__name__", n.target)).split(".")[0]
        nodes = [a for a in n.args if isinstance(a, fx.Node)]
        if len(nodes) != 1 or name not in _MOVES + ("mul", "truediv", "div"):
            return n
        n = nodes[0]
    return n


def layout_change(cur: fx.Node, gm) -> str:
    """Why a permute/transpose of the scores stops the match, naming what it feeds or is fed by."""
    base = f"{_what(cur)}: a layout change in the score chain"
    src = _through(cur.args[0] if cur.args else None)
    if _is_mixer(src, gm):
        inner = _through(src.args[0] if src.args else None)
        if _is_mixer(inner, gm):
            return (f"{base}, after {_what(src)} mixes the axis it moves back (talking-heads attention: each "
                    "head's logits combine every head's Q·Kᵀ, so there is no one attention per head)")
        return (f"{base}, after {_what(src)}: the softmax's input is a projection of {_what(inner)}, "
                "not a Q·Kᵀ (e.g. ConViT's positional scores)")
    return f"{base} (the scores' axes do not stay batch..., query, key in order)"


def between_softmax_and_pv(u: fx.Node, p: fx.Node, gm) -> str:
    """Why an op between the softmax and P·V stops the match, naming what it does to P."""
    base = f"{_what(u)} between the softmax and P·V"
    others = [a for a in u.args if isinstance(a, fx.Node) and a is not p]
    if _is_mixer(u, gm):
        return f"{base}: it mixes the probabilities across an axis (talking heads after the softmax)"
    name = str(getattr(u.target, "__name__", u.target))
    if others and name in ("mul", "add", "sub", "truediv", "div", "mul_", "add_"):
        return (f"{base}: P is combined with {', '.join(o.name for o in others)} elementwise, so the weights "
                "P·V reads are not one softmax's (e.g. a gated mix of two softmaxes)")
    return base
