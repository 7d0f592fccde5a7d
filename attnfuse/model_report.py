"""The report of a whole model: every graph compiled for it, and every attention site.

A model compiled with ``torch.compile`` may become several graphs (graph breaks, recompiles);
the per-graph reports (:class:`attnfuse.reporting.GraphReport`) say what happened in each.
This module puts them together, for the CLI (``attnfuse report``) and the HTML report:

- :func:`attnfuse.report_data.sites`: one entry per attention site (each fusion and each near miss), with the
  user's module path, file:line and source line, and what was fused or why not;
- :func:`to_dict` / :func:`to_json`: one JSON object of a stable shape, whatever the number
  of graphs (schema ``attnfuse.model-report/1``)::

      schema    "attnfuse.model-report/1"   (bumped on any incompatible change)
      target    str | null     what was compiled (the CLI's FILE.py:FACTORY)
      mode      str | null     "eval" or "train"
      totals    {"graphs": int, "fused": int, "not_fused": int, "errors": int,
                 "memory_bytes_per_call": int | null}
      sites     list of objects, in graph order, fusions first within a graph:
          graph     str | null   the graph's name ("graph_001")
          fused     bool
          module    str | null   module path as the user wrote it ("blocks.0.attn"; "" = root)
          location  str | null   "file:line" in the user's source
          code      str | null   that source line
          kind      str          "fused", or the near miss's kind ("softmax_axis", ...)
          detail    str          fused: the structure, bias and scale recognised;
                                 not fused: the reason
      graphs    list of objects of schema "attnfuse.report/1" (:mod:`attnfuse.reporting`)

- :func:`to_text`: a summary line, the site table and each graph's report; a model with no
  softmax at all gets one line saying so.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

from attnfuse import reporting
from attnfuse.report_data import sites

SCHEMA = "attnfuse.model-report/1"


def to_dict(reports: Sequence[Any], target: Optional[str] = None, mode: Optional[str] = None) -> Dict[str, Any]:
    """The model's report as a JSON-ready dict (schema ``attnfuse.model-report/1``, module doc)."""
    graphs = [r.to_dict() if hasattr(r, "to_dict") else reporting.to_dict(r) for r in reports]
    mems = [g["totals"]["memory_bytes_per_call"] for g in graphs if g["totals"]["fused"]]
    return {
        "schema": SCHEMA,
        "target": target,
        "mode": mode,
        "totals": {"graphs": len(graphs), "fused": sum(g["totals"]["fused"] for g in graphs),
                   "not_fused": sum(g["totals"]["near_misses"] for g in graphs),
                   "errors": sum(g["totals"]["errors"] for g in graphs),
                   "memory_bytes_per_call": None if any(m is None for m in mems) else sum(mems)},
        "sites": sites(graphs),
        "graphs": graphs,
    }


def to_json(reports: Sequence[Any], target: Optional[str] = None, mode: Optional[str] = None,
            indent: Optional[int] = 2) -> str:
    """:func:`to_dict` as JSON."""
    return json.dumps(to_dict(reports, target, mode), indent=indent)


def no_attention_line(d: Dict[str, Any]) -> Optional[str]:
    """The one line for a model in which no graph holds a softmax (None otherwise)."""
    if d["sites"]:
        return None
    n = d["totals"]["graphs"]
    return (f"attnfuse: no attention found: no softmax in the {n} compiled graph{'s' if n != 1 else ''}"
            if n else "attnfuse: no attention found: no graph was compiled")


def to_text(reports: Sequence[Any], target: Optional[str] = None, mode: Optional[str] = None) -> str:
    """A summary line, one row per attention site, then each graph's own report."""
    d = to_dict(reports, target, mode)
    t = d["totals"]
    none = no_attention_line(d)
    if none is not None:
        return none
    head = (f"attnfuse{' ' + target if target else ''}: {t['graphs']} graph(s), {t['fused']} attention "
            f"site(s) fused, {t['not_fused']} not fused" + (f", {t['errors']} error(s)" if t["errors"] else ""))
    rows = [[s["location"] or "<unknown>", reporting.module_label(s["module"]),
             "fused" if s["fused"] else f"NOT FUSED ({s['kind']})", (s["code"] or "")[:60]] for s in d["sites"]]
    parts = [head, "", *reporting.table(rows, ["site", "module", "result", "code"])]
    parts += ["", "\n\n".join(r.to_text() if hasattr(r, "to_text") else reporting.to_text(r) for r in reports)]
    return "\n".join(parts)


def to_html(reports: Sequence[Any], target: Optional[str] = None, mode: Optional[str] = None,
            path: Optional[str] = None) -> str:
    """One self-contained HTML page for the model (every graph; :mod:`attnfuse.report_html`)."""
    from attnfuse.report_html import model_page

    return model_page(reports, target, mode, path)
