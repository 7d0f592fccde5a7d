"""The standalone rewrite API: ``attnfuse.rewrite(gm_or_module, example_inputs=None, *, strict=False)``.

Accepts:

- a ``torch.fx.GraphModule`` from ``torch.fx.symbolic_trace`` (shapes are propagated
  with ``ShapeProp`` from ``example_inputs`` when the graph has no shape metadata),
  from ``make_fx`` (any tracing mode, including ``"symbolic"``), or a dynamo graph;
- a ``torch.export.ExportedProgram``: its ``.module()`` is rewritten and that
  **GraphModule** is returned in ``result.graph_module`` (call it like the original
  program's module; re-export it with ``torch.export.export`` if a program is needed);
- a plain ``nn.Module`` with ``example_inputs``: it is traced with ``make_fx``
  (aten graph, parameters as attributes) and the traced GraphModule is rewritten.

For a dynamo graph (the torch.compile backend passes its ``example_inputs``), the
placeholders that dynamo lifted from registered module buffers (``node.meta["grapharg"]``
source ``<module>._buffers[name]``) are read as constants, so nanoGPT's sliced ``tril``
buffer is proven causal. This assumes such a buffer is not mutated in place after
compiling (the assumption inductor's freezing makes); user inputs and parameters are
never read. Shape propagation still runs only when nodes lack shape metadata.

GraphModules are rewritten in place and also returned. An internal error never
escapes (``strict=True`` raises it instead): an error in emitting or checking one
fusion drops only that fusion (a ``rewrite_failed`` near miss with the error as its
reason, and a ``RuntimeWarning``; the other fusions stay); any other error leaves the
whole graph unchanged, with a warning.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import consts as C
from attnfuse.passes.report import Report
from attnfuse.reporting import GraphReport, GraphSnapshot, build_context
from attnfuse.passes.rewrite import REWRITE_FAILED, rewrite_graph


@dataclass
class RewriteResult:
    """``graph_module``: the rewritten GraphModule; ``report``: a
    :class:`attnfuse.reporting.GraphReport` (fusions, near misses, errors, and the
    renderers ``to_text()``, ``to_json()``, ``diff()``, ``to_html(path)``)."""
    graph_module: fx.GraphModule
    report: GraphReport

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
        from torch.fx.experimental.proxy_tensor import make_fx
        return make_fx(obj)(*example_inputs)
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


def rewrite(gm_or_module: Any, example_inputs: Optional[Sequence] = None, *, strict: bool = False) -> RewriteResult:
    """Fuse every provable hand-written attention in the graph; see the module doc."""
    gm = _to_graph_module(gm_or_module, example_inputs)
    if example_inputs is not None and _needs_shapes(gm):
        from torch.fx.passes.shape_prop import ShapeProp
        try:
            ShapeProp(gm).propagate(*example_inputs)
        except Exception as e:  # noqa: BLE001
            if strict:
                raise
            warnings.warn(f"attnfuse.rewrite: shape propagation failed ({e!r}); graph left unchanged")
            return RewriteResult(gm, GraphReport(Report(errors=[f"shape propagation: {e!r}"])))
    backup_graph = copy_graph(gm.graph)
    try:
        result = fuse_graph_module(gm, example_inputs, strict=strict)
    except Exception as e:  # noqa: BLE001
        if strict:
            raise
        warnings.warn(f"attnfuse.rewrite: internal error ({type(e).__name__}: {e}); graph left unchanged")
        gm.graph = backup_graph
        gm.recompile()
        return RewriteResult(gm, GraphReport(Report(errors=[f"{type(e).__name__}: {e}"])))
    for msg in failed_fusion_messages(result.report):
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return result


def fuse_graph_module(gm: fx.GraphModule, example_inputs: Optional[Sequence] = None, *, strict: bool = False,
                      leave_unfused: Optional[Mapping[str, Tuple[str, str]]] = None) -> RewriteResult:
    """Rewrite ``gm`` (which carries shape metadata) in place, fusion by fusion: an error in
    one fusion drops only it (a ``rewrite_failed`` near miss; ``strict`` raises). Any other
    error propagates and may leave the graph half rewritten: the caller restores its copy.
    ``leave_unfused``: softmax node name -> ``(kind, reason)`` of the near miss to report
    instead of fusing there (:func:`attnfuse.passes.rewrite.rewrite_graph`)."""
    snapshot = _snapshot(gm)
    start = time.perf_counter()
    buffers = C.module_buffer_values(gm, example_inputs)
    if buffers:
        setattr(gm, C.BUFFER_VALUES_ATTR, buffers)
    try:
        report = rewrite_graph(gm, strict=strict, leave_unfused=leave_unfused)
    finally:
        if buffers:
            delattr(gm, C.BUFFER_VALUES_ATTR)
    return RewriteResult(gm, _graph_report(report, snapshot, gm, time.perf_counter() - start))


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
