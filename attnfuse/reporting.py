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
        sinks           str             "" or the graph node passed as sinks (one logit per head)
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

import json
from typing import Any, List, Optional

from attnfuse.report_data import (  # noqa: F401  (re-exported: the report's data and its dict form)
    SCHEMA, FusionDetail, GraphContext, GraphSnapshot, build_context, bytes_label, code_line_from_location,
    code_line_from_stack_trace, context_for, diff, module_label, to_dict)
from attnfuse.report_html import graph_svg, to_html, to_html_many  # noqa: F401


def to_json(report: Any, context: Optional[GraphContext] = None, indent: Optional[int] = 2) -> str:
    """The report as JSON (schema ``attnfuse.report/1``, documented in the module doc)."""
    return json.dumps(to_dict(report, context), indent=indent)


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
        head += f"; memory no longer materialised per call: {bytes_label(t['memory_bytes_per_call'])}"
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
            if f.get("sinks"):
                rec.append(f"sinks={f['sinks']}")
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
                         bytes_label(f["memory_bytes_per_call"])])
        lines += [""] + table(rows, ["FUSED at", "module", "code", "recognised", "nodes", "memory/call"])
    if d["near_misses"]:
        rows = [[m["location"] or "<unknown>", module_label(m["module"]), (m["code"] or "")[:60], m["kind"],
                 m["reason"]] for m in d["near_misses"]]
        lines += [""] + table(rows, ["NEAR MISS at", "module", "code", "kind", "reason"])
    for e in d["errors"]:
        lines.append(f"ERROR {e}")
    return "\n".join(lines)


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
