"""Telling a ``torch.compile`` user that attention was left unfused.

Owns :func:`attention_like` (which near misses are about a softmax that looks like
attention: a matrix product feeds it and one consumes it) and :func:`unfused_message`,
the one warning per compiled graph the backend logs at WARNING level on the ``attnfuse``
logger (option ``warn_unfused=False`` silences it).

A softmax counts as attention-like when, within a few nodes of layout, scale, add, mask,
cast and elementwise ops, a matmul-class node (``@``, matmul, bmm, einsum, baddbmm) produces
its input and another consumes its output (through dropout too); or when the matcher itself
said it is attention (``graph_break``: a break split it; ``in_subgraph``: it would be fused
outside the higher-order op). A classifier's softmax over logits, a router's, a loss's
``log_softmax`` are not. Fusions that failed to emit or compile (``rewrite_failed``,
``compile_failed``) have warnings of their own and are not repeated here.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional, Set

from torch import fx

from attnfuse.passes import ops as O
from attnfuse.passes.subgraphs import graph_modules

_THROUGH = {O.LAYOUT, O.SCALE, O.ADD, O.MASK, O.CAST, O.ELEMENTWISE, O.GETITEM}
_ALWAYS = {"graph_break", "in_subgraph"}          # the matcher found attention there
_WARNED_ELSEWHERE = {"rewrite_failed", "compile_failed"}
_MAX_HOPS = 8


def _reaches_matmul(start: fx.Node, gm: fx.GraphModule, up: bool) -> bool:
    through = _THROUGH if up else _THROUGH | {O.DROPOUT}
    todo, seen = [(start, 0)], {start}
    while todo:
        node, hops = todo.pop()
        nxt = node.all_input_nodes if up else list(node.users)
        for n in nxt:
            if n in seen:
                continue
            seen.add(n)
            op = O.classify(n, gm)
            if op is not None and op.kind == O.MATMUL:
                return True
            if op is not None and op.kind in through and hops + 1 < _MAX_HOPS:
                todo.append((n, hops + 1))
    return False


def attention_like(gm: fx.GraphModule, near_misses: Iterable[Any]) -> Set[str]:
    """The ``softmax`` names (qualified inside bodies) of the near misses in ``gm`` whose
    softmax looks like attention (module doc)."""
    names = {getattr(m, "softmax", "") or m.node: m for m in near_misses}
    out: Set[str] = set()
    for prefix, mod in graph_modules(gm):
        for node in mod.graph.nodes:
            m = names.get(prefix + node.name)
            if m is None or m.kind in _WARNED_ELSEWHERE:
                continue
            if m.kind in _ALWAYS or (_reaches_matmul(node, mod, up=True) and _reaches_matmul(node, mod, up=False)):
                out.add(prefix + node.name)
    return out


def unfused_message(report: Any, attention: Set[str], graph_id: int) -> Optional[str]:
    """The warning for a graph whose report has attention-like near misses (their softmax
    names in ``attention``), one line per site; None when there is none."""
    misses: List[Any] = [m for m in report.near_misses if m.kind not in _WARNED_ELSEWHERE and
                         ((getattr(m, "softmax", "") or m.node) in attention or m.kind in _ALWAYS)]
    if not misses:
        return None
    modules = _modules(report)
    lines = [f"attnfuse: graph {graph_id}: {len(misses)} attention-like softmax(es) left unfused "
             "(options={'warn_unfused': False} silences this):"]
    for m in misses:
        where = m.location or "<unknown location>"
        module = modules.get(id(m))
        lines.append(f"  {where}{f' ({module})' if module else ''}: [{m.kind}] {m.reason}")
    return "\n".join(lines)


def _modules(report: Any) -> dict:
    """id(near miss) -> its module path, where the report's context knows it."""
    ctx = getattr(report, "context", None)
    paths = getattr(ctx, "near_miss_module", None) or []
    if len(paths) != len(report.near_misses):
        return {}
    return {id(m): p for m, p in zip(report.near_misses, paths) if p}
