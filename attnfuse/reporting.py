"""Renderers for what a rewrite did: text, JSON, unified diff and self-contained HTML.

Every renderer takes a :class:`attnfuse.passes.report.Report` (``fusions``,
``near_misses``, ``errors``) and uses, when present, its ``context`` attribute: a
:class:`GraphContext` the backend attaches (graph code before and after the
rewrite, pass time, and per fusion the source code line, module path, shapes,
dtypes, memory saved and the before/after subgraphs). Without a context the
renderers still work; what needs it is reported as unknown.

JSON schema ``attnfuse.report/1`` (:func:`to_json`; one object)::

    schema        "attnfuse.report/1"   (bumped on any incompatible change)
    graph         str | null            name of the compiled graph ("graph_001"), null if unknown
    pass_time_s   float | null          time the attnfuse pass took on this graph
    totals        {"fused": int, "near_misses": int, "errors": int,
                   "memory_bytes_per_call": int | null}   sum over fusions; null if any is unknown
    fusions       list of objects:
        location        str | null      "file:line" of the softmax in the user's source
        code            str | null      that source line (stripped)
        module          str | null      module path as the user wrote it (e.g. "blocks.0.attn"; "" = the
                                        root module), from nn_module_stack
        softmax         str             name of the softmax node that anchored the match
        scale           str             the scale as recognised ("0.125", "... folded into q", ...)
        causal          str             "none" | "top_left" | "bottom_right"
        window          int             sliding window passed with causal; 0 = none
        key_mask        str             "" or the graph node(s) passed as key_mask (B, Lk); "~" = negated
        structure       str             "causal=…, window=…, key_mask=…" or "none": masks the op gets as
                                        structure (no (Lq, Lk) tensor read)
        masks           list[str]       per mask term: the structure it became, or why it stayed a tensor
        empty_row_fixup bool            rows that see no key get eager's finite-fill uniform average
        bias            str             "none" or the bias/mask terms still passed as a tensor
        gqa             str             "" or how K/V repeats were undone
        dropout_p       float
        softcap         float
        dtype           str | null      dtype of the scores (softmax input), e.g. "torch.float32"
        probs_dtype     str | null      dtype of the probabilities (softmax output)
        scores_shape    str | null      shape of the score matrix, e.g. "(2, 4, 64, 64)" or "(s0*4, s1, s1)"
        memory_bytes_per_call  int | null   bytes no longer materialised per call: numel(scores) *
                                            (itemsize(scores) + itemsize(probs)); null if unknown
        memory_note     str             how memory was computed, or why it is unknown
        nodes_removed   list[str]       names of the graph nodes the fusion removed
        node_inserted   str             name of the inserted attnfuse.flash_attention node
        before          list[str]       the removed subgraph, one FX node per line
        after           list[str]       the inserted subgraph, one FX node per line
    near_misses   list of objects: {"kind": str, "reason": str, "location": str | null,
                                    "code": str | null, "module": str | null, "node": str}
    errors        list[str]             internal errors: of the pass (the graph was left unchanged),
                                        or the backend's inner compiler failing on the rewritten
                                        graph (only the fusions it rejected were dropped: they are
                                        near misses of kind "compile_failed")

Node names (``softmax``, ``nodes_removed``, ``node_inserted``, a near miss's ``node``) inside
a higher-order op's body (an activation-checkpoint region) are qualified with the body's
attribute path, e.g. ``"wrap_body_0.flash_attention"``; the graph code before / after (diff,
HTML) is the graph's followed by each body's, under a ``# wrap_body_0:`` line.

Shapes under dynamic compilation are symbolic; ``memory_bytes_per_call`` then uses the
sizes of the example inputs the graph was compiled with (``memory_note`` says so).
"""
from __future__ import annotations

import difflib
import html
import json
import linecache
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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


def _ctx(report: Any, context: Optional[GraphContext]) -> GraphContext:
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


# ---------------------------------------------------------------------------
# Renderers
# ---------------------------------------------------------------------------

def to_dict(report: Any, context: Optional[GraphContext] = None) -> dict:
    """The report as a JSON-ready dict following schema ``attnfuse.report/1`` (module doc)."""
    ctx = _ctx(report, context)
    fusions = []
    for f, d in zip(report.fusions, ctx.fusions):
        fusions.append({
            "location": f.location, "code": d.code, "module": d.module,
            "softmax": getattr(f, "softmax", ""), "scale": f.scale, "causal": f.causal,
            "window": int(getattr(f, "window", 0)), "key_mask": getattr(f, "key_mask", ""),
            "structure": _structure(f), "masks": list(getattr(f, "masks", [])),
            "empty_row_fixup": bool(getattr(f, "empty_row_fixup", False)), "bias": f.bias,
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


def to_json(report: Any, context: Optional[GraphContext] = None, indent: Optional[int] = 2) -> str:
    """The report as JSON (schema ``attnfuse.report/1``, documented in the module doc)."""
    return json.dumps(to_dict(report, context), indent=indent)


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: List[List[str]], header: List[str]) -> List[str]:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def to_text(report: Any, context: Optional[GraphContext] = None) -> str:
    """A terminal table: summary, one row per fusion, one per near miss, errors."""
    d = to_dict(report, context)
    t = d["totals"]
    head = f"attnfuse{' ' + d['graph'] if d['graph'] else ''}: {t['fused']} fused, " \
           f"{t['near_misses']} near miss(es)"
    if t["errors"]:
        head += f", {t['errors']} error(s)"
    if d["pass_time_s"] is not None:
        head += f"; pass {d['pass_time_s'] * 1e3:.1f} ms"
    if t["fused"]:
        head += f"; memory no longer materialised per call: {_bytes(t['memory_bytes_per_call'])}"
    lines = [head]
    if d["fusions"]:
        rows = []
        for f in d["fusions"]:
            rec = [f"scale={f['scale']}", f"causal={f['causal']}"]
            if f["window"]:
                rec.append(f"window={f['window']}")
            if f["key_mask"]:
                rec.append(f"key_mask={f['key_mask']}")
            rec.append(f"bias={f['bias']}")
            if f["empty_row_fixup"]:
                rec.append("empty-row fix-up")
            if f["gqa"]:
                rec.append(f"gqa={f['gqa']}")
            if f["dropout_p"]:
                rec.append(f"dropout_p={f['dropout_p']}")
            if f["softcap"]:
                rec.append(f"softcap={f['softcap']}")
            if f["dtype"]:
                rec.append(f"dtype={f['dtype'].replace('torch.', '')}")
            rows.append([f["location"] or "<unknown>", module_label(f["module"]), (f["code"] or "")[:60],
                         ", ".join(rec), f"{len(f['nodes_removed'])} -> {f['node_inserted']}",
                         _bytes(f["memory_bytes_per_call"])])
        lines += [""] + table(rows, ["FUSED at", "module", "code", "recognised", "nodes", "memory/call"])
    if d["near_misses"]:
        rows = [[m["location"] or "<unknown>", module_label(m["module"]), (m["code"] or "")[:60], m["kind"],
                 m["reason"]] for m in d["near_misses"]]
        lines += [""] + table(rows, ["NEAR MISS at", "module", "code", "kind", "reason"])
    for e in d["errors"]:
        lines.append(f"ERROR {e}")
    return "\n".join(lines)


def diff(report: Any, context: Optional[GraphContext] = None, n: int = 3) -> str:
    """A unified diff of the graph's Python code before and after the rewrite ("" if unknown)."""
    ctx = _ctx(report, context)
    if ctx.before_code is None or ctx.after_code is None:
        return ""
    return "\n".join(difflib.unified_diff(ctx.before_code.splitlines(), ctx.after_code.splitlines(),
                                          "before", "after", n=n, lineterm=""))


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em} h2{font-size:1.2em;margin-top:2em} h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top;text-align:left}
pre,code,.node{font-family:ui-monospace,monospace;font-size:12px}
pre{background:#f6f8fa;padding:.5em;overflow:auto}
.subgraphs{display:flex;gap:2em} .subgraphs>div{flex:1;min-width:0}
.svg svg{max-width:100%;height:auto}
.node{border:1px solid #999;border-radius:4px;padding:2px 6px;margin:0 0 2px 0;white-space:pre-wrap}
.removed .node{background:#ffecec} .inserted .node{background:#eaffea}
.fused{color:#1a7f37} .miss{color:#9a6700} .err{color:#cf222e}
table.diff{font-family:ui-monospace,monospace;font-size:12px}
.diff_add{background:#aaffaa} .diff_chg{background:#ffff77} .diff_sub{background:#ffaaaa}
.diff_header{background:#e0e0e0} td.diff_next{display:none}
"""


def _head(title: str) -> str:
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>")


_TAIL = "</body></html>"


def to_html_many(reports: List[Any], path: Optional[str] = None) -> str:
    """Several reports (e.g. every graph of one model) on one self-contained page."""
    bodies = []
    for r in reports:
        page = to_html(r)
        bodies.append(page[page.index("<body>") + len("<body>"):page.rindex(_TAIL)])
    if not bodies:
        bodies = ["<p>No graph was compiled.</p>"]
    page = _head("attnfuse report") + "\n<hr>\n".join(bodies) + _TAIL
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(page)
    return page


_SAFE_LABEL = re.compile(r"[^A-Za-z0-9_.:\n -]")


def graph_svg(graph: tuple, title: str) -> Optional[str]:
    """An SVG picture of a subgraph through graphviz's ``dot``, or None where graphviz is not
    installed or fails. Labels keep only identifier characters, so nothing from user code
    reaches the SVG unescaped."""
    import shutil
    import subprocess

    dot = shutil.which("dot")
    nodes, edges = graph
    if dot is None or not nodes:
        return None
    ids = {name: f"n{i}" for i, (name, _) in enumerate(nodes)}
    lines = [f'digraph "{_SAFE_LABEL.sub("_", title)}" {{', "rankdir=TB;", 'node [shape=box, fontname="monospace"];']
    for name, label in nodes:
        text = _SAFE_LABEL.sub("_", label).replace("\n", "\\n")
        lines.append(f'{ids[name]} [label="{text}"];')
    lines += [f"{ids[a]} -> {ids[b]};" for a, b in edges]
    lines.append("}")
    try:
        done = subprocess.run([dot, "-Tsvg"], input="\n".join(lines), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    svg = done.stdout
    if done.returncode != 0 or "<svg" not in svg:
        return None
    # Inline SVG in HTML needs no namespace declarations; dropping them leaves no URL at all.
    return re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg[svg.index("<svg"):])


def _subgraph_html(lines: List[str], graph: tuple, title: str) -> str:
    """The subgraph as an SVG picture (graphviz, where installed) or as plain HTML boxes."""
    svg = graph_svg(graph, title)
    if svg is not None:
        return f"<div class='svg'>{svg}</div>"
    return "".join(f"<div class='node'>{html.escape(s, quote=True)}</div>" for s in lines)


def to_html(report: Any, path: Optional[str] = None, context: Optional[GraphContext] = None) -> str:
    """One self-contained HTML page (no scripts, no network): summary, per fusion the recognised
    parameters, before/after code and subgraphs, near misses, and the side-by-side graph diff.
    Every string from user code is escaped. Writes it to ``path`` if given; returns it."""
    e = lambda s: html.escape("" if s is None else str(s), quote=True)  # noqa: E731
    ctx = _ctx(report, context)
    d = to_dict(report, ctx)
    t = d["totals"]
    pass_time = "" if d["pass_time_s"] is None else f"{d['pass_time_s'] * 1e3:.1f} ms"
    out = [_head(f"attnfuse report {d['graph'] or ''}"),
           f"<h1>attnfuse report {e(d['graph'] or '')}</h1>",
           "<table><tr><th>fused</th><th>near misses</th><th>errors</th><th>memory per call no longer "
           "materialised</th><th>pass time</th></tr>",
           f"<tr><td class='fused'>{t['fused']}</td><td class='miss'>{t['near_misses']}</td>"
           f"<td class='err'>{t['errors']}</td><td>{e(_bytes(t['memory_bytes_per_call']))}</td>"
           f"<td>{pass_time}</td></tr></table>"]
    for i, f in enumerate(d["fusions"], 1):
        out.append(f"<h2 class='fused'>Fusion {i}: {e(f['location'] or '<unknown location>')}</h2>")
        out.append(f"<pre>{e(f['code'] or '')}</pre>")
        rows = [("module", f["module"]), ("softmax node", f["softmax"]), ("scale", f["scale"]),
                ("causal", f["causal"]), ("window", f["window"] or "none"),
                ("key_mask", f["key_mask"] or "none"), ("bias", f["bias"]),
                ("masks", "; ".join(f["masks"]) or "none"),
                ("empty-row fix-up", "yes" if f["empty_row_fixup"] else "no"), ("GQA", f["gqa"] or "none"),
                ("dropout_p", f["dropout_p"]), ("softcap", f["softcap"]), ("dtype (scores / probs)",
                f"{f['dtype']} / {f['probs_dtype']}"), ("scores shape", f["scores_shape"]),
                ("memory per call no longer materialised",
                 f"{_bytes(f['memory_bytes_per_call'])} ({f['memory_note']})"),
                ("nodes removed", f"{len(f['nodes_removed'])}: {', '.join(f['nodes_removed'])}"),
                ("node inserted", f["node_inserted"])]
        out.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows) + "</table>")
        detail = ctx.fusions[i - 1]
        out.append("<div class='subgraphs'><div class='removed'><h3>Before (removed subgraph)</h3>"
                   + _subgraph_html(f["before"], detail.before_graph, f"before_{i}")
                   + "</div><div class='inserted'><h3>After (inserted subgraph)</h3>"
                   + _subgraph_html(f["after"], detail.after_graph, f"after_{i}") + "</div></div>")
    if d["near_misses"]:
        out.append("<h2 class='miss'>Near misses</h2><table><tr><th>location</th><th>code</th><th>kind</th>"
                   "<th>reason</th><th>node</th></tr>")
        out += [f"<tr><td>{e(m['location'])}</td><td><code>{e(m['code'])}</code></td><td>{e(m['kind'])}</td>"
                f"<td>{e(m['reason'])}</td><td>{e(m['node'])}</td></tr>" for m in d["near_misses"]]
        out.append("</table>")
    if d["errors"]:
        out.append("<h2 class='err'>Errors</h2><ul>"
                   + "".join(f"<li>{e(x)}</li>" for x in d["errors"]) + "</ul>")
    if ctx.before_code is not None and ctx.after_code is not None:
        out.append("<h2>Graph code before / after</h2>")
        # HtmlDiff escapes &, < and > in the lines it renders.
        out.append(difflib.HtmlDiff(wrapcolumn=100).make_table(
            ctx.before_code.splitlines(), ctx.after_code.splitlines(), "before", "after", context=True,
            numlines=3))
        out.append(f"<h3>Unified diff</h3><pre>{e(diff(report, ctx))}</pre>")
    out.append(_TAIL)
    page = "\n".join(out)
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(page)
    return page


# ---------------------------------------------------------------------------
# The report object users get
# ---------------------------------------------------------------------------

class GraphReport:
    """What one rewrite did, with its renderers as methods.

    ``result.report`` (from :func:`attnfuse.rewrite`) and :func:`attnfuse.last_report`
    are GraphReports. The data lives in the wrapped :class:`attnfuse.passes.report.Report`
    (``fusions``, ``near_misses``, ``errors``); ``context`` adds what only the caller of
    the pass knows (graph code before and after, pass time, shapes). Kept here, not in
    ``passes``, so that ``passes`` never imports ``attnfuse``.
    """

    def __init__(self, report: Any, context: Optional[GraphContext] = None):
        self.data = report
        self.context = context
        #: How many fused calls the backend handed to Inductor as aten code to compile
        #: itself (small CPU calls, :mod:`attnfuse.kernels.torch_inline`); 0 otherwise.
        self.inlined = 0
        #: Softmax names of the near misses that look like attention (the backend's
        #: ``warn_unfused`` check, :mod:`attnfuse.unfused`); empty when not checked.
        self.unfused_attention: set = set()

    @property
    def fusions(self) -> list:
        return self.data.fusions

    @property
    def near_misses(self) -> list:
        return self.data.near_misses

    @property
    def errors(self) -> list:
        return self.data.errors

    def to_text(self) -> str:
        """A terminal table."""
        return to_text(self.data, self.context)

    def to_dict(self) -> dict:
        """A JSON-ready dict (schema ``attnfuse.report/1``, see the module doc)."""
        return to_dict(self.data, self.context)

    def to_json(self, indent: Optional[int] = 2) -> str:
        """JSON, schema ``attnfuse.report/1``."""
        return to_json(self.data, self.context, indent=indent)

    def diff(self) -> str:
        """A unified diff of the graph code before and after the rewrite."""
        return diff(self.data, self.context)

    def to_html(self, path: Optional[str] = None) -> str:
        """One self-contained HTML page; written to ``path`` if given, and returned."""
        return to_html(self.data, path, self.context)

    def __repr__(self) -> str:
        return (f"GraphReport({len(self.fusions)} fused, {len(self.near_misses)} near misses, "
                f"{len(self.errors)} errors)")
