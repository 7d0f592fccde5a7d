"""The last word on every softmax: none may be left in a graph without a reason.

Owns :func:`unreported_softmaxes`: after a graph is rewritten, every softmax still in it
(what :func:`.ops.classify` calls SOFTMAX / LOG_SOFTMAX, and any other call whose op is
named like a softmax, e.g. ``aten._safe_softmax`` or ``nn.Softmax2d``) that no near miss
is about gets one. The matcher gives each softmax it looks at a decision; this is the
backstop that keeps a path without one (or a spelling the op table lacks) from being a
silent miss. Pure: reads the graph, returns near misses.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional

import torch
from torch import fx

from attnfuse.passes import ops as O
from attnfuse.passes.types import NearMiss, location_of

#: Near-miss kind of a softmax the matcher reached no decision on (a backstop: a bug to report).
UNDECIDED = "undecided"

_SOFTMAX_NAME = re.compile(r"(^|[._])(log_?)?softmax(2d)?($|[._])", re.IGNORECASE)


def _op_name(node: fx.Node, gm: Optional[torch.nn.Module]) -> str:
    """What ``node`` calls, as a name: a function's / op's name, a method, a module's class."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(node.target)).__name__ if gm is not None else ""
        except AttributeError:
            return ""
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", None) or str(t)
        if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            name = str(t)  # "aten._safe_softmax.default"
        return name
    return ""


def is_softmax(node: fx.Node, gm: Optional[torch.nn.Module]) -> bool:
    """A softmax or log-softmax, recognised by the op table or by the name of what it calls
    (forward ops only: ``_softmax_backward_data`` is not one)."""
    op = O.classify(node, gm)
    if op is not None:
        return op.kind in (O.SOFTMAX, O.LOG_SOFTMAX)
    name = _op_name(node, gm)
    return bool(name) and "backward" not in name.lower() and bool(_SOFTMAX_NAME.search(name))


def unreported_softmaxes(gm: fx.GraphModule, near_misses: Iterable[NearMiss]) -> List[NearMiss]:
    """A near miss for each softmax left in ``gm`` that none of ``near_misses`` is about
    (matched by the near miss's ``softmax``, or by its ``node`` where that is the softmax)."""
    covered = set()
    for m in near_misses:
        covered.add(m.softmax or m.node)
        covered.add(m.node)
    out = []
    for n in gm.graph.nodes:
        if n.name in covered or not is_softmax(n, gm):
            continue
        op = O.classify(n, gm)
        if op is None:
            kind, reason = "unsupported_op", f"{n.name} calls {_op_name(n, gm)}, a softmax spelling the " \
                                             f"matcher does not recognise"
        else:
            kind, reason = UNDECIDED, f"{n.name}: the matcher reached no decision on this softmax " \
                                      f"(an attnfuse bug: please report it)"
        out.append(NearMiss(kind, reason, location_of(n), n.name, softmax=n.name))
    return out
