"""Higher-order-op bodies: rewriting inside checkpointed regions, reporting the others.

Dynamo puts some code in a graph of its own, called by a higher-order op (HOP) of the
enclosing graph: ``torch.utils.checkpoint`` (also Hugging Face's
``gradient_checkpointing_enable()`` and ``checkpoint_wrapper``) becomes
``tag_activation_checkpoint(wrap_body_0, *operands)``, ``torch._higher_order_ops.wrap``
becomes ``wrap(wrap_body_0, *operands)``, and ``torch.cond`` / ``while_loop`` / ``map`` /
``invoke_subgraph`` / ``autograd_function_apply`` / ``flex_attention`` keep their bodies
the same way. Owns:

- which HOPs' bodies are rewritten (:data:`REWRITTEN_HOPS`): those that call their body
  as a plain function of its operands, so that any exact rewrite of the body is exact for
  the call (activation checkpointing recomputes the rewritten body in the backward; a
  fused call's dropout seed is drawn outside the body, :func:`hoist_seeds`, so the
  recompute reuses the forward's mask under every inner compiler);
- finding a graph's bodies (:func:`bodies`, :func:`graph_modules`; their nodes and code
  under qualified names, :func:`graph_nodes`, :func:`graph_code`) and giving a body the
  lifted module buffers its operands are (:func:`body_buffer_values`);
- :func:`rewrite_graph_and_bodies`: rewrite a graph, then each body of a rewritten HOP
  (recursively); in the bodies of every other HOP, report each softmax as a near miss
  (kind :data:`IN_SUBGRAPH` where the matcher would have fused it), and sweep every graph
  (:func:`.sweep.unreported_softmaxes`). Names in a body's report entries are qualified
  with its attribute path (``wrap_body_0.softmax``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import fx

from attnfuse.passes import consts as C
from attnfuse.passes import ops as O
from attnfuse.passes.breaks import BODY_OF_ATTR
from attnfuse.passes.report import Report
from attnfuse.passes.rewrite import find_matches, rewrite_graph
from attnfuse.passes.sweep import unreported_softmaxes
from attnfuse.passes.types import NearMiss

#: HOPs whose body (their first argument) is rewritten: each calls it as a plain function
#: of the operands that follow it, and their tests run training through it.
REWRITTEN_HOPS: Dict[str, str] = {
    "tag_activation_checkpoint": "activation checkpointing",
    "wrap": "a dynamo wrap",
}

#: Why the bodies of other HOPs are left alone (reported, not rewritten).
DECLINED_HOPS: Dict[str, str] = {
    "cond": "control flow whose branches must trace alike",
    "while_loop": "control flow whose body must keep its carried signature",
    "map_impl": "a map whose body is traced per slice",
    "scan": "a scan whose body is traced per step",
    "associative_scan": "a scan whose combine function is traced on its own",
    "invoke_subgraph": "a nested compile region shared by its callers",
    "autograd_function_apply": "a custom autograd.Function whose backward is the user's own",
    "flex_attention": "flex_attention's own score/mask functions",
    "flex_attention_backward": "flex_attention's own score/mask functions",
    "wrap_activation_checkpoint": "a checkpoint form not tested with the fused op",
    "wrap_with_set_grad_enabled": "a grad-mode region of an exported graph, not tested with the fused op",
    "wrap_with_autocast": "an autocast region of an exported graph, not tested with the fused op",
}

#: HOPs that run their body again in the backward (recompute): a fused call's dropout seed
#: is drawn outside such a body (:func:`hoist_seeds`) so that the recompute reuses it.
RECOMPUTED_HOPS = ("tag_activation_checkpoint",)

#: Near-miss kind of a softmax inside the body of a HOP that attnfuse does not rewrite.
IN_SUBGRAPH = "in_subgraph"

_SEED_META = "attnfuse_seed"  # node.meta flag of a seed draw this module moved out of a body
_RANDINT = (torch.randint, torch.ops.aten.randint.low)


@dataclass(frozen=True)
class Body:
    """A GraphModule that ``parent`` holds as attribute ``name`` and calls through HOPs."""
    name: str
    module: fx.GraphModule
    calls: Tuple[fx.Node, ...]      # the parent's HOP nodes that take it
    hops: Tuple[str, ...]           # their names, e.g. ("tag_activation_checkpoint",)

    @property
    def rewritten(self) -> bool:
        """Every call is a HOP of :data:`REWRITTEN_HOPS` that takes this body as its first argument."""
        return bool(self.calls) and all(h in REWRITTEN_HOPS for h in self.hops) and \
            all(c.args and isinstance(c.args[0], fx.Node) and c.args[0].target == self.name for c in self.calls)

    def describe(self, path: str) -> str:
        hop = self.hops[0] if self.hops else "no higher-order op"
        what = REWRITTEN_HOPS.get(hop) or DECLINED_HOPS.get(hop) or "a higher-order op"
        return f"the body {path} of {hop} ({what})"


def hop_name(node: fx.Node) -> Optional[str]:
    """The name of the higher-order op ``node`` calls (``"tag_activation_checkpoint"``), or None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    try:
        return str(node.target.name())
    except Exception:  # noqa: BLE001
        return None


def bodies(gm: fx.GraphModule) -> List[Body]:
    """The GraphModules ``gm``'s graph reads with ``get_attr`` (HOP bodies), in graph order.
    A body read by anything but HOP calls has no calls (no HOP can be said to own it)."""
    reads: Dict[str, List[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            reads.setdefault(n.target, []).append(n)
    out = []
    for target, nodes in reads.items():
        try:
            mod = gm.get_submodule(target)
        except AttributeError:
            continue
        if not isinstance(mod, fx.GraphModule):
            continue
        users = [u for n in nodes for u in n.users]
        calls = tuple(users) if users and all(hop_name(u) is not None for u in users) else ()
        out.append(Body(target, mod, calls, tuple(hop_name(c) for c in calls)))
    return out


def graph_modules(gm: fx.GraphModule, prefix: str = "") -> List[Tuple[str, fx.GraphModule]]:
    """``(prefix, module)`` for ``gm`` (prefix ``""``) and every body under it, nested ones
    included (prefix ``"wrap_body_0."``): every graph a compile of ``gm`` runs."""
    out = [(prefix, gm)]
    for b in bodies(gm):
        out += graph_modules(b.module, f"{prefix}{b.name}.")
    return out


def graph_nodes(gm: fx.GraphModule) -> Dict[str, fx.Node]:
    """Every node of ``gm`` and of the bodies under it, by name; a body's names qualified
    with its attribute path (``wrap_body_0.softmax``), as in reports."""
    return {prefix + n.name: n for prefix, mod in graph_modules(gm) for n in mod.graph.nodes}


def graph_code(gm: fx.GraphModule) -> str:
    """The Python code of ``gm``, then that of each body under it (after a ``# <path>:`` line)."""
    return gm.code + "".join(f"\n# {prefix[:-1]}:\n{mod.code}" for prefix, mod in graph_modules(gm)[1:])


def body_buffer_values(body: Body, parent_values: Dict[fx.Node, torch.Tensor]) -> Dict[fx.Node, torch.Tensor]:
    """The body's placeholders that are lifted module buffers: those bound, in every call, to
    a parent node with a known buffer value (:func:`.consts.module_buffer_values`), the same
    tensor in each call. Operands follow the body in the call (``hop(body, *operands)``)."""
    if not parent_values or not body.rewritten:
        return {}
    phs = [n for n in body.module.graph.nodes if n.op == "placeholder"]
    binding: Dict[fx.Node, List[fx.Node]] = {}
    for i, ph in enumerate(phs):
        outer = []
        for c in body.calls:
            operands = c.args[1:]
            if len(operands) != len(phs) or not isinstance(operands[i], fx.Node):
                outer = []
                break
            outer.append(operands[i])
        vals = [dict.get(parent_values, o) for o in outer]
        if vals and vals[0] is not None and all(v is vals[0] for v in vals):
            binding[ph] = outer
    if isinstance(parent_values, C.BufferValues):
        return parent_values.for_body(binding)  # a read in the body is a read of the outer buffer
    return {ph: dict.get(parent_values, outer[0]) for ph, outer in binding.items()}


def _seed_draws(body: fx.GraphModule) -> List[fx.Node]:
    """The dropout seeds drawn in ``body`` for the fused calls: ``randint`` nodes without
    inputs whose every use is a fused call's ``seed`` (as :class:`.emit.Emitter` emits them)
    or, for one this module already moved up a level, an operand of a HOP call."""
    out = []
    for n in body.graph.nodes:
        if n.op != "call_function" or n.target not in _RANDINT or n.all_input_nodes or not n.users:
            continue
        if all(u.op == "call_function" and O.is_fused_op(u) and u.kwargs.get("seed") is n and n not in u.args
               for u in n.users) or (n.meta.get(_SEED_META) and all(hop_name(u) for u in n.users)):
            out.append(n)
    return out


def hoist_seeds(parent: fx.GraphModule, body: Body) -> int:
    """Draw the fused calls' dropout seeds of a recomputed body in ``parent``, before each
    call, and pass them in as new trailing operands; returns how many seeds moved.

    A checkpointed body runs again in the backward. Its dropout mask must be the forward's:
    AOTAutograd and Inductor replay a random op's RNG state in the recompute, but the
    checkpoint op run as Python (``inner="eager"``, like ``torch.compile(backend="eager")``
    for dropout itself) draws anew. A seed drawn outside the body is an operand the
    recompute reuses, under every inner compiler. Nested bodies pass theirs up a level each."""
    seeds = _seed_draws(body.module)
    phs = [n for n in body.module.graph.nodes if n.op == "placeholder"]
    if not seeds or not phs or any(len(c.args) - 1 != len(phs) for c in body.calls):
        return 0
    graph = body.module.graph
    for i, s in enumerate(seeds):
        with graph.inserting_after(phs[-1]):
            ph = graph.placeholder(f"attnfuse_seed_{len(phs)}")
        phs.append(ph)
        s.replace_all_uses_with(ph)
        graph.erase_node(s)
        for c in body.calls:
            with parent.graph.inserting_before(c):
                new = parent.graph.call_function(s.target, s.args, dict(s.kwargs))
            new.meta[_SEED_META] = True
            c.args = tuple(c.args) + (new,)
    body.module.recompile()
    parent.recompile()
    return len(seeds)


def _qualified(report: Report, path: str) -> Report:
    """``report`` with every node name prefixed by ``path + "."`` (names in a body)."""
    q = lambda name: f"{path}.{name}" if name else name  # noqa: E731
    return Report(
        fusions=[dataclasses.replace(f, nodes_removed=[q(n) for n in f.nodes_removed], node_inserted=q(f.node_inserted),
                                     softmax=q(f.softmax)) for f in report.fusions],
        near_misses=[dataclasses.replace(m, node=q(m.node), softmax=q(m.softmax)) for m in report.near_misses],
        errors=[f"in {path}: {e}" for e in report.errors])


class _Marked:
    """Sets the matcher's per-rewrite attributes on a body (what it is, its buffer values)
    for the ``with`` block and removes them after."""

    def __init__(self, module: fx.GraphModule, what: str, buffers: Dict[fx.Node, torch.Tensor]):
        self.module, self.attrs = module, {BODY_OF_ATTR: what}
        if buffers:
            self.attrs[C.BUFFER_VALUES_ATTR] = buffers

    def __enter__(self):
        for k, v in self.attrs.items():
            setattr(self.module, k, v)

    def __exit__(self, *exc):
        for k in self.attrs:
            if k in self.module.__dict__:
                delattr(self.module, k)
        return False


def _declined(body: Body, path: str) -> Report:
    """Near misses for the softmaxes in a body attnfuse does not rewrite (and its nested ones)."""
    what = body.describe(path)
    with _Marked(body.module, what, {}):
        matches, misses = find_matches(body.module)  # pure: reports what a rewrite would do
    note = f"inside {what}, whose body attnfuse does not rewrite"
    report = Report(near_misses=[dataclasses.replace(m, reason=f"{m.reason} ({note})") for m in misses])
    for m in matches:
        report.near_misses.append(NearMiss(IN_SUBGRAPH, f"an attention the matcher would fuse, but {note}",
                                           m.location, m.softmax.name, softmax=m.softmax.name))
    report.near_misses += unreported_softmaxes(body.module, report.near_misses)
    for inner in bodies(body.module):
        report.extend(_qualified(_declined(inner, f"{path}.{inner.name}"), inner.name))
    return report


def rewrite_graph_and_bodies(gm: fx.GraphModule,
                             rewrite: Callable[[fx.GraphModule], Report] = rewrite_graph) -> Report:
    """``rewrite(gm)`` (:func:`.rewrite.rewrite_graph` by default), then the same inside the
    body of every rewritten HOP (recursively), and near misses for every softmax left
    without one, in bodies of other HOPs too. Lifted buffer values set on ``gm``
    (:data:`.consts.BUFFER_VALUES_ATTR`) reach the bodies whose operands they are.
    Bodies are rewritten in place: to undo, restore every graph of :func:`graph_modules`."""
    report = rewrite(gm)
    report.near_misses += unreported_softmaxes(gm, report.near_misses)
    parent_values = getattr(gm, C.BUFFER_VALUES_ATTR, None) or {}
    for body in bodies(gm):
        if body.rewritten:
            with _Marked(body.module, body.describe(body.name), body_buffer_values(body, parent_values)):
                sub = rewrite_graph_and_bodies(body.module, rewrite)
            if any(h in RECOMPUTED_HOPS for h in body.hops):
                hoist_seeds(gm, body)
        else:
            sub = _declined(body, body.name)
        report.extend(_qualified(sub, body.name))
    return report
