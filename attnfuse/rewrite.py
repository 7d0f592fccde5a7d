"""The standalone rewrite API: ``attnfuse.rewrite(gm_or_module, example_inputs=None, *, strict=False)``.

Accepts:

- a ``torch.fx.GraphModule`` from ``torch.fx.symbolic_trace`` (shapes are propagated
  with ``ShapeProp`` from ``example_inputs`` when the graph has no shape metadata),
  from ``make_fx`` (any tracing mode, including ``"symbolic"``), or a dynamo graph;
- a ``torch.export.ExportedProgram``: its ``.module()`` is rewritten and that
  **GraphModule** is returned in ``result.graph_module`` (call it like the original
  program's module; re-export it with ``torch.export.export`` if a program is needed);
- a plain ``nn.Module`` with ``example_inputs``: it is traced with ``make_fx``
  (aten graph, parameters as attributes; stack traces and module paths recorded) and the
  traced GraphModule is rewritten.

Report entries name the user's file:line, source line and module path in every route;
for a graph traced without stack traces (``symbolic_trace``) they are recovered from its
module hierarchy (:mod:`attnfuse.locations`).

For a dynamo graph (the torch.compile backend passes its ``example_inputs``), the
placeholders that dynamo lifted from registered module buffers (``node.meta["grapharg"]``
source ``<module>._buffers[name]``) are read as constants, so nanoGPT's sliced ``tril``
buffer is proven causal; ``result.buffers_read`` lists the ones a proof read, and whoever
runs the graph must check them at run time (the backend does: :mod:`attnfuse.witness`).
The values of a GraphModule's module state (``get_attr`` buffers and parameters under the
user's names, and, for a module ``rewrite`` traces itself, the constants ``make_fx`` makes of
them) are never read, since nothing would check them when they change: a nanoGPT ``tril``
buffer mask stays a (fused) mask tensor here. Constants the tracer created
(``_tensor_constant<N>``: a literal, an ``arange`` of fixed size) are read. User inputs
and parameters are never read. Shape propagation still runs only when nodes lack shape
metadata.

Inside a graph, the bodies of activation checkpointing (``tag_activation_checkpoint``,
from ``torch.utils.checkpoint``, Hugging Face's ``gradient_checkpointing_enable()``,
``checkpoint_wrapper``) and of dynamo's ``wrap`` are rewritten too; softmaxes in the
bodies of other higher-order ops (``cond``, ``while_loop``, ``map``, ``invoke_subgraph``,
custom ``autograd.Function``s, ...) are reported as near misses
(:mod:`attnfuse.passes.subgraphs`). Every softmax left anywhere in the graph has a near
miss with its reason (:mod:`attnfuse.passes.sweep`).

GraphModules are rewritten in place (bodies included) and also returned. An internal
error never escapes (``strict=True`` raises it instead): an error in emitting or checking
one fusion drops only that fusion (a ``rewrite_failed`` near miss with the error as its
reason, and a ``RuntimeWarning``; the other fusions stay); any other error leaves the
whole graph unchanged, with a warning.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import consts as C
from attnfuse.passes.report import Report
from attnfuse.reporting import GraphReport, GraphSnapshot, build_context
from attnfuse.passes.rewrite import REWRITE_FAILED, rewrite_graph
from attnfuse.passes.subgraphs import graph_modules, rewrite_graph_and_bodies


@dataclass
class RewriteResult:
    """``graph_module``: the rewritten GraphModule; ``report``: a
    :class:`attnfuse.reporting.GraphReport` (fusions, near misses, errors, and the
    renderers ``to_text()``, ``to_json()``, ``diff()``, ``to_html(path)``)."""
    graph_module: fx.GraphModule
    report: GraphReport
    buffers_read: Dict[fx.Node, torch.Tensor] = field(default_factory=dict)
    """Placeholders (lifted module buffers) whose values a proof read, with those values:
    the rewrite holds only while the buffers keep them (see :mod:`attnfuse.witness`)."""

    @property
    def fused(self) -> int:
        return len(self.report.fusions)


def _needs_shapes(gm: fx.GraphModule) -> bool:
    return any(n.op in ("call_function", "call_method", "call_module") and A.meta_val(n) is None
               for n in gm.graph.nodes)


def _to_graph_module(obj: Any, example_inputs: Optional[Sequence]) -> fx.GraphModule:
    if isinstance(obj, torch.export.ExportedProgram):
        return obj.module()
    if isinstance(obj, fx.GraphModule):
        return obj
    if isinstance(obj, torch.nn.Module):
        if example_inputs is None:
            raise ValueError("attnfuse.rewrite: a plain nn.Module needs example_inputs to be traced")
        from attnfuse.locations import trace_module
        return trace_module(obj, example_inputs)
    raise TypeError(f"attnfuse.rewrite: expected a GraphModule, ExportedProgram or nn.Module, "
                    f"got {type(obj).__name__}")


def copy_graph(g: fx.Graph) -> fx.Graph:
    """A copy of ``g`` to restore on failure (same owning module and code generator). Nodes
    keep their names and metadata, and placeholders the ``_dynamo_source`` attribute that
    dynamo sets on them and AOTAutograd requires of a dynamo graph (without it the
    ``aot_eager`` and ``inductor`` compilers reject the copy)."""
    new = fx.Graph(owning_module=g.owning_module, tracer_cls=g._tracer_cls)
    new._codegen = g._codegen
    copies: dict = {}
    out = new.graph_copy(g, copies)
    new.output(out)
    for old, copied in copies.items():
        if hasattr(old, "_dynamo_source"):
            copied._dynamo_source = old._dynamo_source
    return new


GraphBackup = List[Tuple[fx.GraphModule, fx.Graph]]


def backup_graphs(gm: fx.GraphModule) -> GraphBackup:
    """A copy of the graph of ``gm`` and of every higher-order-op body under it (the rewrite
    changes bodies in place too), for :func:`restore_graphs`."""
    return [(mod, copy_graph(mod.graph)) for _, mod in graph_modules(gm)]


def unrewritten_copy(gm: fx.GraphModule, backup: GraphBackup) -> fx.GraphModule:
    """A new GraphModule tree running the graphs ``backup`` holds (``gm``'s and its bodies'
    before the rewrite), sharing ``gm``'s parameters and buffers; ``gm`` is left as it is."""
    graphs = {id(mod): g for mod, g in backup}
    top = fx.GraphModule(gm, copy_graph(graphs[id(gm)]))
    top.meta.update(getattr(gm, "meta", {}))
    for prefix, mod in graph_modules(gm)[1:]:  # parents before the bodies they hold
        if id(mod) in graphs:
            top.set_submodule(prefix[:-1], fx.GraphModule(mod, copy_graph(graphs[id(mod)])))
    return top


def restore_graphs(backup: GraphBackup) -> None:
    """Put back (a copy of) every graph :func:`backup_graphs` copied: ``backup`` stays
    usable for another restore."""
    for mod, graph in backup:
        mod.graph = copy_graph(graph)
        mod.recompile()


def rewrite(gm_or_module: Any, example_inputs: Optional[Sequence] = None, *, strict: bool = False) -> RewriteResult:
    """Fuse every provable hand-written attention in the graph; see the module doc."""
    gm = _to_graph_module(gm_or_module, example_inputs)
    _recover_locations(gm)
    if example_inputs is not None and _needs_shapes(gm):
        from torch.fx.passes.shape_prop import ShapeProp
        try:
            ShapeProp(gm).propagate(*example_inputs)
        except Exception as e:  # noqa: BLE001
            if strict:
                raise
            warnings.warn(f"attnfuse.rewrite: shape propagation failed ({e!r}); graph left unchanged")
            return RewriteResult(gm, GraphReport(Report(errors=[f"shape propagation: {e!r}"])))
    backup = backup_graphs(gm)
    try:
        result = fuse_graph_module(gm, example_inputs, strict=strict, traced_from=gm_or_module)
    except Exception as e:  # noqa: BLE001
        if strict:
            raise
        warnings.warn(f"attnfuse.rewrite: internal error ({type(e).__name__}: {e}); graph left unchanged")
        restore_graphs(backup)
        return RewriteResult(gm, GraphReport(Report(errors=[f"{type(e).__name__}: {e}"])))
    for msg in failed_fusion_messages(result.report):
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return result


def _recover_locations(gm: fx.GraphModule) -> None:
    """Stack traces for a graph traced without them (``symbolic_trace``), from its module
    hierarchy (:func:`attnfuse.locations.recover_stack_traces`); never fails a rewrite."""
    from attnfuse.locations import recover_stack_traces

    try:
        for _, mod in graph_modules(gm):
            recover_stack_traces(mod)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"attnfuse.rewrite: could not recover source locations ({type(e).__name__}: {e})")


def fuse_graph_module(gm: fx.GraphModule, example_inputs: Optional[Sequence] = None, *, strict: bool = False,
                      leave_unfused: Optional[Mapping[str, Tuple[str, str]]] = None,
                      traced_from: Any = None) -> RewriteResult:
    """Rewrite ``gm`` (which carries shape metadata) and its bodies in place, fusion by
    fusion: an error in one fusion drops only it (a ``rewrite_failed`` near miss; ``strict``
    raises). Any other error propagates and may leave the graphs half rewritten: the caller
    restores its copy (:func:`backup_graphs`). ``leave_unfused``: softmax node name (qualified
    with the body's path inside a body, as in reports) -> ``(kind, reason)`` of the near miss
    to report instead of fusing there (:func:`attnfuse.passes.rewrite.rewrite_graph`).
    ``traced_from``: the module ``gm`` was traced from, if this module traced it (its buffers
    stay module state, :func:`attnfuse.passes.consts.is_module_state`)."""
    snapshot = _snapshot(gm)
    start = time.perf_counter()
    prefixes = {id(mod): prefix for prefix, mod in graph_modules(gm)}

    def rewrite_one(g: fx.GraphModule) -> Report:
        p = prefixes.get(id(g), "")
        own = {k[len(p):]: v for k, v in (leave_unfused or {}).items()
               if k.startswith(p) and "." not in k[len(p):]}
        return rewrite_graph(g, strict=strict, leave_unfused=own)

    buffers = C.module_buffer_values(gm, example_inputs)
    setattr(gm, C.BUFFER_VALUES_ATTR, buffers)
    if traced_from is not gm and isinstance(traced_from, torch.nn.Module) and \
            not isinstance(traced_from, fx.GraphModule):
        # make_fx keeps the traced module's buffers as constants: they stay module state
        setattr(gm, C.STATE_STORAGES_ATTR, C.state_storages(traced_from))
    try:
        report = rewrite_graph_and_bodies(gm, rewrite_one)
    finally:
        for attr in (C.BUFFER_VALUES_ATTR, C.STATE_STORAGES_ATTR):
            if hasattr(gm, attr):
                delattr(gm, attr)
    read = {n: dict.__getitem__(buffers, n) for n in buffers.read} if report.fusions else {}
    return RewriteResult(gm, _graph_report(report, snapshot, gm, time.perf_counter() - start), read)


def failed_fusion_messages(report: Any) -> List[str]:
    """One warning line per fusion that failed to emit or check (``rewrite_failed``)."""
    return [f"attnfuse: the attention at {m.location or m.node} was left unfused: {m.reason}"
            for m in report.near_misses if m.kind == REWRITE_FAILED]


def _snapshot(gm: fx.GraphModule) -> Optional[GraphSnapshot]:
    """The graph before the rewrite, for the report's diff and subgraphs (None if it fails:
    reporting never breaks a rewrite)."""
    try:
        return GraphSnapshot(gm)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"attnfuse.rewrite: could not snapshot the graph for its report ({e!r})")
        return None


def _graph_report(report: Report, snapshot: Optional[GraphSnapshot], gm: fx.GraphModule,
                  elapsed: float) -> GraphReport:
    context = None
    if snapshot is not None:
        try:
            context = build_context(report, snapshot, gm, elapsed)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"attnfuse.rewrite: could not build the report details ({e!r})")
    return GraphReport(report, context)
