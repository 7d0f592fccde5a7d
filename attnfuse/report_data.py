"""What a report holds: the details of a rewrite taken from its graph, as JSON-ready dicts.

Owns :class:`GraphContext` / :class:`FusionDetail` and :func:`build_context` (graph code
before and after, per fusion the user's source line, module path, shapes, dtypes, memory
saved and the before/after subgraphs, per near miss its source line and module), and the
dict forms the renderers share: :func:`to_dict` (schema ``attnfuse.report/1``, documented
in :mod:`attnfuse.reporting`), :func:`sites` (one entry per attention site of several
graphs) and :func:`diff`. Renderers live in :mod:`attnfuse.reporting` (text, JSON),
:mod:`attnfuse.report_html` and :mod:`attnfuse.model_report`.
"""
from __future__ import annotations

import difflib
import linecache
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import fx

from attnfuse.locations import module_path
from attnfuse.passes.axes import meta_val
from attnfuse.passes.subgraphs import graph_code, graph_modules, graph_nodes
from attnfuse.passes.types import user_frame

SCHEMA = "attnfuse.report/1"


@dataclass
class FusionDetail:
    code: Optional[str] = None
    module: Optional[str] = None
    dtype: Optional[str] = None
    probs_dtype: Optional[str] = None
    scores_shape: Optional[str] = None
    memory_bytes_per_call: Optional[int] = None
    memory_note: str = "unknown: the graph carried no shape metadata for the scores"
    before: List[str] = field(default_factory=list)
    after: List[str] = field(default_factory=list)
    # the same subgraphs as (node name, short label) and (source, target) edges, for pictures
    before_graph: tuple = ((), ())
    after_graph: tuple = ((), ())


@dataclass
class GraphContext:
    name: Optional[str] = None
    before_code: Optional[str] = None
    after_code: Optional[str] = None
    pass_time_s: Optional[float] = None
    fusions: List[FusionDetail] = field(default_factory=list)       # parallel to report.fusions
    near_miss_code: List[Optional[str]] = field(default_factory=list)  # parallel to report.near_misses
    near_miss_module: List[Optional[str]] = field(default_factory=list)  # parallel to report.near_misses


# ---------------------------------------------------------------------------
# Building the context (from the graph before and after the rewrite)
# ---------------------------------------------------------------------------

def code_line_from_stack_trace(stack_trace: Optional[str]) -> Optional[str]:
    """The source line (stripped) of the frame an FX ``stack_trace`` names in the user's code
    (:func:`attnfuse.passes.types.user_frame`), or None."""
    frame = user_frame(stack_trace)
    if frame is None:
        return None
    return frame[2] or linecache.getline(frame[0], frame[1]).strip() or None


def code_line_from_location(location: Optional[str]) -> Optional[str]:
    """The source line at ``"file:line"``, read from the file, or None."""
    if not location or ":" not in location:
        return None
    f, _, line = location.rpartition(":")
    try:
        return linecache.getline(f, int(line)).strip() or None
    except ValueError:
        return None


_meta = meta_val  # the value (fake tensor or TensorMetadata) a node's metadata records


def _hint(s: Any) -> Optional[int]:
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        node = s.node
        try:
            if node.has_hint():
                return int(node.hint)
        except Exception:  # noqa: BLE001
            pass
    return None


def _code_of(node: Optional[fx.Node], location: Optional[str]) -> Optional[str]:
    code = code_line_from_stack_trace(node.meta.get("stack_trace")) if node is not None else None
    return code or code_line_from_location(location)


def _memory(detail: FusionDetail, softmax: Optional[fx.Node]) -> None:
    out = _meta(softmax)
    inp = _meta(softmax.args[0]) if softmax is not None and softmax.args and \
        isinstance(softmax.args[0], fx.Node) else None
    if out is None or not hasattr(out, "shape"):
        return
    inp = inp if inp is not None and hasattr(inp, "shape") else out
    shape = tuple(out.shape)
    detail.scores_shape = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    detail.dtype, detail.probs_dtype = str(inp.dtype), str(out.dtype)
    hints = [_hint(s) for s in shape]
    if any(h is None for h in hints):
        detail.memory_note = f"unknown: symbolic score shape {detail.scores_shape} without size hints"
        return
    numel = 1
    for h in hints:
        numel *= h
    itemsize = torch.empty((), dtype=inp.dtype).element_size() + torch.empty((), dtype=out.dtype).element_size()
    detail.memory_bytes_per_call = numel * itemsize
    symbolic = not all(isinstance(s, int) for s in shape)
    detail.memory_note = (f"scores {detail.scores_shape} {detail.dtype} + probabilities {detail.probs_dtype}"
                          + (" at the compiled example sizes" if symbolic else ""))


class GraphSnapshot:
    """What the renderers need of a graph before it is rewritten in place: each node (erased
    nodes keep their metadata), its printed form and its inputs, by (qualified) name, for the
    graph and the higher-order-op bodies under it."""

    def __init__(self, gm: fx.GraphModule):
        self.code = graph_code(gm)
        self.nodes: Dict[str, fx.Node] = {}
        self.text: Dict[str, str] = {}
        self.inputs: Dict[str, List[str]] = {}
        for prefix, mod in graph_modules(gm):
            for n in mod.graph.nodes:
                name = prefix + n.name
                self.nodes[name] = n
                self.text[name] = n.format_node() or n.name
                self.inputs[name] = [prefix + a.name for a in n.all_input_nodes]


def _subgraph(start: List[str], allowed: set, neighbours) -> List[str]:
    seen = {s for s in start if s in allowed}
    todo = list(seen)
    while todo:
        n = todo.pop()
        for m in neighbours(n):
            if m not in seen and m in allowed:
                seen.add(m)
                todo.append(m)
    return list(seen)


def _label(node: Optional[fx.Node]) -> str:
    """A short label for a node in a picture: its name and what it calls."""
    if node is None:
        return ""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name}\n{node.op}: {target}"


def _picture_graph(names: List[str], inputs, label) -> tuple:
    """((name, label), ...), ((src, dst), ...) for the nodes ``names`` (edges between them)."""
    inside = set(names)
    nodes = tuple((n, label(n)) for n in names)
    edges = tuple((a, n) for n in names for a in inputs(n) if a in inside)
    return nodes, edges


def build_context(report: Any, before: GraphSnapshot, after_gm: Optional[fx.GraphModule],
                  pass_time_s: Optional[float] = None, name: Optional[str] = None) -> GraphContext:
    """Details of ``report`` from a snapshot of the graph taken before the rewrite and the
    module after it."""
    ctx = GraphContext(name=name, before_code=before.code, pass_time_s=pass_time_s,
                       after_code=graph_code(after_gm) if after_gm is not None else None)
    after_nodes = graph_nodes(after_gm) if after_gm is not None else {}
    after_name = {n: name for name, n in after_nodes.items()}
    gone = set(before.nodes) - set(after_nodes)
    new = set(after_nodes) - set(before.nodes)
    users: Dict[str, List[str]] = {}
    for n, ins in before.inputs.items():
        for a in ins:
            users.setdefault(a, []).append(n)
    order = {n: i for i, n in enumerate(before.nodes)}
    for f in report.fusions:
        softmax = before.nodes.get(getattr(f, "softmax", "") or "")
        d = FusionDetail(code=_code_of(softmax, f.location),
                         module=module_path(softmax) if softmax is not None else None)
        if softmax is None:
            d.memory_note = "unknown: the softmax node of this fusion was not found in the graph"
        else:
            _memory(d, softmax)
        # the removed subgraph: the nodes the fusion names, plus the erased nodes connected to them
        removed = _subgraph(list(f.nodes_removed), gone,
                            lambda n: before.inputs.get(n, []) + users.get(n, []))
        d.before = [before.text[n] for n in sorted(removed, key=order.get)]
        d.before_graph = _picture_graph(sorted(removed, key=order.get), lambda n: before.inputs.get(n, []),
                                        lambda n: _label(before.nodes.get(n)))
        call = after_nodes.get(f.node_inserted)
        if call is not None:
            inserted = _subgraph([f.node_inserted], new | {f.node_inserted},
                                 lambda n: [after_name.get(m, m.name) for m in after_nodes[n].all_input_nodes] +
                                 [after_name.get(m, m.name) for m in after_nodes[n].users])
            d.after = [after_nodes[n].format_node() or n for n in after_nodes if n in set(inserted)]
            d.after_graph = _picture_graph([n for n in after_nodes if n in set(inserted)],
                                           lambda n: [after_name.get(m, m.name) for m in after_nodes[n].all_input_nodes],
                                           lambda n: _label(after_nodes.get(n)))
        ctx.fusions.append(d)
    for m in report.near_misses:
        # the code line of the softmax (the near miss's location), else of the node it names
        node = before.nodes.get(getattr(m, "softmax", "") or "") or before.nodes.get(m.node)
        ctx.near_miss_code.append(_code_of(node, m.location))
        ctx.near_miss_module.append(module_path(node) if node is not None else None)
    return ctx


def context_for(report: Any, context: Optional[GraphContext]) -> GraphContext:
    ctx = context if context is not None else getattr(report, "context", None)
    if ctx is None:
        ctx = GraphContext()
    if len(ctx.fusions) != len(report.fusions):
        ctx.fusions = [FusionDetail(code=code_line_from_location(f.location),
                                    memory_note="unknown: no shape information was captured for this report")
                       for f in report.fusions]
    if len(ctx.near_miss_code) != len(report.near_misses):
        ctx.near_miss_code = [code_line_from_location(m.location) for m in report.near_misses]
    if len(ctx.near_miss_module) != len(report.near_misses):
        ctx.near_miss_module = [None] * len(report.near_misses)
    return ctx



def to_dict(report: Any, context: Optional[GraphContext] = None) -> dict:
    """The report as a JSON-ready dict following schema ``attnfuse.report/1`` (module doc)."""
    ctx = context_for(report, context)
    fusions = []
    for f, d in zip(report.fusions, ctx.fusions):
        fusions.append({
            "location": f.location, "code": d.code, "module": d.module,
            "softmax": getattr(f, "softmax", ""), "scale": f.scale, "causal": f.causal,
            "window": int(getattr(f, "window", 0)), "key_mask": getattr(f, "key_mask", ""),
            "structure": _structure(f), "masks": list(getattr(f, "masks", [])),
            "empty_row_fixup": bool(getattr(f, "empty_row_fixup", False)), "bias": f.bias,
            "sinks": getattr(f, "sinks", ""),
            "gqa": f.gqa, "dropout_p": float(f.dropout_p), "softcap": float(f.softcap),
            "dtype": d.dtype, "probs_dtype": d.probs_dtype, "scores_shape": d.scores_shape,
            "memory_bytes_per_call": d.memory_bytes_per_call, "memory_note": d.memory_note,
            "nodes_removed": list(f.nodes_removed), "node_inserted": f.node_inserted,
            "before": list(d.before), "after": list(d.after),
        })
    mems = [d.memory_bytes_per_call for d in ctx.fusions]
    return {
        "schema": SCHEMA,
        "graph": ctx.name,
        "pass_time_s": ctx.pass_time_s,
        "totals": {"fused": len(report.fusions), "near_misses": len(report.near_misses),
                   "errors": len(report.errors),
                   "memory_bytes_per_call": None if any(m is None for m in mems) else sum(mems)},
        "fusions": fusions,
        "near_misses": [{"kind": m.kind, "reason": m.reason, "location": m.location, "code": c, "module": mod,
                         "node": m.node}
                        for m, c, mod in zip(report.near_misses, ctx.near_miss_code, ctx.near_miss_module)],
        "errors": list(report.errors),
    }


def module_label(path: Optional[str]) -> str:
    """A module path for display: "" is the root module, None unknown."""
    return "-" if path is None else (path or "(root)")


def _structure(f: Any) -> str:
    s = getattr(f, "structure", None)
    return s if isinstance(s, str) else ("none" if f.causal == "none" else f"causal={f.causal}")


def bytes_label(n: Optional[int]) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def diff(report: Any, context: Optional[GraphContext] = None, n: int = 3) -> str:
    """A unified diff of the graph's Python code before and after the rewrite ("" if unknown)."""
    ctx = context_for(report, context)
    if ctx.before_code is None or ctx.after_code is None:
        return ""
    return "\n".join(difflib.unified_diff(ctx.before_code.splitlines(), ctx.after_code.splitlines(),
                                          "before", "after", n=n, lineterm=""))


def _fusion_detail(f: Dict[str, Any]) -> str:
    parts = [f"structure: {f['structure']}", f"bias: {f['bias']}", f"scale: {f['scale']}"]
    if f["gqa"]:
        parts.append(f"gqa: {f['gqa']}")
    if f["dropout_p"]:
        parts.append(f"dropout_p: {f['dropout_p']}")
    if f["softcap"]:
        parts.append(f"softcap: {f['softcap']}")
    return "; ".join(parts)


def sites(graph_dicts: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The attention sites of the graphs (dicts of schema ``attnfuse.report/1``)."""
    out: List[Dict[str, Any]] = []
    for g in graph_dicts:
        for f in g["fusions"]:
            out.append({"graph": g["graph"], "fused": True, "module": f["module"], "location": f["location"],
                        "code": f["code"], "kind": "fused", "detail": _fusion_detail(f)})
        for m in g["near_misses"]:
            out.append({"graph": g["graph"], "fused": False, "module": m["module"], "location": m["location"],
                        "code": m["code"], "kind": m["kind"], "detail": m["reason"]})
    return out
