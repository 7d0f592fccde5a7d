"""Where a graph's edge cuts an attention: graph breaks and higher-order-op bodies.

Owns the wording of the near misses for a softmax whose scores come from outside the
graph (an input of the graph) or whose probabilities leave it (an output of the graph),
and the evidence of *where* the attention was cut:

- dynamo records why it ended a graph in ``gm.compile_subgraph_reason`` (a graph break:
  ``graph_break=True``, with the user's frame); :func:`graph_break_site` reads it;
- the graph after a break runs in a resume function named
  ``torch_dynamo_resume_in_<fn>_at_<line>``; its frame in a node's ``stack_trace`` says
  where the break was (:func:`resumed_after`);
- the body of a higher-order op (a checkpointed region, a ``cond`` branch) is a graph of
  its own whose inputs and outputs are the enclosing graph's values: the caller of the
  matcher names the op on the body module (:data:`BODY_OF_ATTR`, set for the duration of
  one rewrite) so that the reason says the cut is the op's boundary, not a graph break.

Nothing here changes a graph; only dynamo's own records are read (absent in other
dialects: the reasons then say what the graph shows and no more).
"""
from __future__ import annotations

import re
from typing import Optional

from torch import fx

#: Attribute a caller sets on a higher-order op's body module while it is matched: a
#: description such as ``"the body wrap_body_0 of tag_activation_checkpoint"``.
BODY_OF_ATTR = "_attnfuse_body_of"

#: Near-miss kind of an attention that a graph break split into two graphs.
GRAPH_BREAK = "graph_break"

_RESUME = re.compile(r'File "([^"]+)", line \d+, in torch_dynamo_resume_in_(\w+?)_at_(\d+)')


def body_of(gm) -> Optional[str]:
    """The higher-order op whose body ``gm`` is (as its caller set it), or None."""
    return getattr(gm, BODY_OF_ATTR, None) if gm is not None else None


def resumed_after(node: fx.Node) -> Optional[str]:
    """"a graph break in <fn> at <file>:<line>" when ``node`` was traced in the resume
    function dynamo generates after a graph break (its innermost such frame), else None."""
    found = _RESUME.findall(node.meta.get("stack_trace") or "") if isinstance(node, fx.Node) else []
    if not found:
        return None
    path, fn, line = found[-1]
    return f"a graph break in {fn} at {path}:{line}"


def graph_break_site(gm) -> Optional[str]:
    """"a graph break at <file>:<line> (<why>)" when dynamo ended graph ``gm`` at a graph
    break (``gm.compile_subgraph_reason``), else None (the function returned, or not dynamo)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    stack = list(getattr(reason, "user_stack", None) or [])
    where = f" at {stack[-1].filename}:{stack[-1].lineno}" if stack else ""
    why = (str(getattr(reason, "reason", "")).strip().splitlines() or [""])[0].strip()
    return f"a graph break{where}" + (f" ({why[:120]})" if why else "")


def _source(node: fx.Node) -> str:
    """The user-level name of a graph input (dynamo's source, e.g. ``L['scores']``) or its name."""
    src = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(src, "name", None)
    try:
        name = name() if callable(name) else name
    except Exception:  # noqa: BLE001  (a source that cannot name itself)
        name = None
    return f"{node.name} ({name})" if isinstance(name, str) and name else node.name


def scores_from_input(sm: fx.Node, inp: fx.Node, gm) -> tuple:
    """(kind, reason) for a softmax whose scores are the graph input ``inp`` (possibly
    through casts, scales or views): Q·Kᵀ, if any, is outside this graph."""
    body = body_of(gm)
    if body is not None:
        return ("no_qk_matmul",
                f"the scores {inp.name} come into {body} from the enclosing graph: the higher-order "
                f"op's region starts between Q·Kᵀ and the softmax, so the attention is split across it")
    brk = resumed_after(sm)
    if brk is not None:
        return (GRAPH_BREAK,
                f"the scores {_source(inp)} are an input of this graph, computed in an earlier one: {brk} "
                f"split the attention between Q·Kᵀ and the softmax (remove the break to fuse it)")
    return ("no_qk_matmul",
            f"the scores {_source(inp)} are an input of this graph: no Q·Kᵀ in it to fuse with (if they are "
            f"attention scores, the attention is split across graphs, e.g. by a graph break)")


def probs_to_output(p: fx.Node, gm) -> tuple:
    """(kind, reason) for probabilities ``p`` that are an output of the graph with no P·V in it."""
    body = body_of(gm)
    if body is not None:
        return ("no_pv_matmul",
                f"the probabilities {p.name} leave {body} as its output: the higher-order op's region ends "
                f"between the softmax and P·V, so the attention is split across it")
    brk = graph_break_site(gm)
    if brk is not None:
        return (GRAPH_BREAK,
                f"the probabilities {p.name} are an output of this graph: {brk} split the attention between "
                f"the softmax and P·V, which runs in the next graph (remove the break to fuse it)")
    return ("no_pv_matmul",
            f"the probabilities {p.name} are an output of this graph and no P·V follows in it (if P·V runs "
            f"in another graph, the attention is split across graphs)")
