"""Dead users: values nothing uses do not count as users.

Owns :func:`is_dead` (a node whose value no live node reads and whose computation has
no effect besides its value: a dropped ``attn.to(dtype)`` after the caller keeps only
the output, an "intermediates" record ``scores.detach()`` that is never returned) and
:func:`dead_closure` (such a node and the dead nodes that read it, users first, for the
rewriter to erase with the attention they read).

Effect-free is decided conservatively: the canonical ops of :mod:`.ops` that are not in
place and not random, a short list of methods that only compute a value, and aten
overloads whose schema mutates nothing, is not random and that torch.fx does not call
impure. Anything else (a module call, an in-place op, dropout, an assert, an attribute
store) is live. The search is bounded: past :data:`LIMIT` nodes a node counts as live.
Nothing here changes a graph.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Set

import torch
from torch import fx

from attnfuse.passes import ops as O

LIMIT = 24  # nodes visited per question; beyond it the answer is "live"

_PURE_KINDS = (O.LAYOUT, O.CAST, O.SCALE, O.ADD, O.MASK, O.COMPARE, O.GETITEM, O.ELEMENTWISE, O.MATMUL,
               O.SOFTMAX, O.LOG_SOFTMAX)
_PURE_METHODS = frozenset({
    "detach", "to", "float", "half", "double", "bfloat16", "type", "type_as", "clone", "contiguous", "cpu",
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "unsqueeze", "squeeze", "expand",
    "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "exp", "log", "abs", "pow", "sqrt",
    "mul", "div", "add", "sub", "neg", "size", "dim", "numel", "__getitem__", "softmax", "log_softmax",
    "clamp", "clamp_min", "clamp_max", "isnan", "isinf", "any", "all", "norm",
})
_PURE_FUNCTIONS = frozenset({
    operator.neg, operator.pos, torch.neg, torch.exp, torch.log, torch.abs, torch.sqrt, torch.sum, torch.mean,
    torch.amax, torch.amin, torch.clamp, torch.clamp_min, torch.clamp_max, torch.isnan, torch.isinf,
    torch.any, torch.all, torch.detach, getattr,  # getattr: a tensor's dtype / shape / device
})


def _effect_free(n: fx.Node) -> bool:
    """Computing ``n`` has no effect besides its value (never in place, never random)."""
    if n.op == "call_method":
        return isinstance(n.target, str) and not n.target.endswith("_") and n.target in _PURE_METHODS
    if n.op != "call_function":
        return False  # placeholders, outputs, get_attr reads, module calls
    if isinstance(n.target, torch._ops.OpOverload):
        schema = n.target._schema
        if schema.is_mutable or torch.Tag.nondeterministic_seeded in n.target.tags:
            return False
        try:
            return not n.is_impure()
        except Exception:  # noqa: BLE001  (a purity check that fails says "live")
            return False
    try:
        if n.target in _PURE_FUNCTIONS:
            return True
    except TypeError:  # an unhashable target
        return False
    op = O.classify(n)
    return op is not None and op.kind in _PURE_KINDS and not op.inplace


def _dead(n: fx.Node, seen: Set[fx.Node]) -> Optional[bool]:
    if n in seen:
        return True
    if len(seen) >= LIMIT or not _effect_free(n):
        return False
    seen.add(n)
    return all(_dead(u, seen) for u in n.users)


def is_dead(n: fx.Node) -> bool:
    """``n`` computes a value that no live node reads, with no effect besides it."""
    return bool(_dead(n, set()))


def dead_closure(n: fx.Node) -> List[fx.Node]:
    """``n`` and every node that reads it, users before what they read, when ``n`` is
    dead (:func:`is_dead`); else ``[]``."""
    seen: Set[fx.Node] = set()
    if not _dead(n, seen):
        return []
    order = {x: i for i, x in enumerate(n.graph.nodes) if x in seen}
    return sorted(seen, key=lambda x: -order[x])
