"""The HTML report: one self-contained page (no scripts, no network) per compiled model.

Owns :func:`model_page` (every graph of a model on one page; :func:`to_html` for one graph,
:func:`to_html_many` for several) and :func:`graph_svg`. The page reads source first:

1. a summary line and a table of every attention site (fused or not), with its module,
   file:line, and the structure recognised or the reason it was left unfused;
2. per site, the user's own source lines around it (read from the file; the line the
   report recorded where the file cannot be read), what was recognised, and, folded away,
   the graph detail: the removed and the inserted subgraph (SVG pictures through
   graphviz's ``dot`` where installed, plain boxes otherwise) and the fusion's parameters;
3. per graph, folded away, its unified code diff (or "unchanged" when nothing was fused)
   and its errors.

Lines wrap inside the page width: nothing overflows at 1280 px. Every string from user
code is escaped.
"""
from __future__ import annotations

import html
import linecache
import re
from typing import Any, List, Optional, Sequence, Tuple

from attnfuse.report_data import bytes_label, context_for, diff, module_label, sites, to_dict

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;padding:1.5em 2em;max-width:1200px;
color:#1f2328;line-height:1.45}
h1{font-size:1.45em;margin:.2em 0} h2{font-size:1.15em;margin:1.6em 0 .5em;border-bottom:1px solid #d0d7de}
h3{font-size:1em;margin:0 0 .4em}
p.summary{margin:.2em 0 1em;color:#424a53}
table{border-collapse:collapse;width:100%;table-layout:auto}
td,th{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top;text-align:left;overflow-wrap:anywhere}
th{background:#f6f8fa;font-weight:600}
code,pre,.node{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
pre{background:#f6f8fa;padding:.5em .8em;margin:.3em 0;white-space:pre-wrap;overflow-wrap:anywhere;border-radius:6px}
.badge{display:inline-block;padding:0 .5em;border-radius:1em;font-size:.85em;font-weight:600;white-space:nowrap}
.badge.fused{background:#dafbe1;color:#116329} .badge.miss{background:#fff8c5;color:#7d4e00}
.badge.err{background:#ffebe9;color:#a40e26}
section.site{border:1px solid #d0d7de;border-left:5px solid #1a7f37;border-radius:6px;padding:.6em .9em;margin:.8em 0}
section.site.miss{border-left-color:#bf8700}
.src{padding:0;overflow:hidden} .src span{display:block;padding:0 .8em}
.src .ln{color:#6e7781;display:inline-block;min-width:3.5em;user-select:none;padding:0}
.src .hit{background:#fff8c5;font-weight:600}
details{margin:.4em 0} summary{cursor:pointer;color:#0969da}
.subgraphs{display:flex;gap:1em;flex-wrap:wrap} .subgraphs>div{flex:1 1 20em;min-width:0}
.svg svg{max-width:100%;height:auto}
.node{border:1px solid #8c959f;border-radius:4px;padding:2px 6px;margin:0 0 2px;white-space:pre-wrap;overflow-wrap:anywhere}
.removed .node{background:#ffebe9} .inserted .node{background:#dafbe1}
.diff .add{background:#dafbe1;display:block} .diff .del{background:#ffebe9;display:block}
.diff .hunk{color:#6e7781;display:block}
.muted{color:#6e7781}
"""

_TAIL = "</body></html>"


def _e(s: Any) -> str:
    return html.escape("" if s is None else str(s), quote=True)


def _head(title: str) -> str:
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>")


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


def _subgraph_html(lines: List[str], graph: tuple, title: str) -> str:
    """The subgraph as an SVG picture (graphviz, where installed) or as plain HTML boxes."""
    svg = graph_svg(graph, title)
    if svg is not None:
        return f"<div class='svg'>{svg}</div>"
    return "".join(f"<div class='node'>{_e(s)}</div>" for s in lines) or "<p class='muted'>(none)</p>"


def _source(location: Optional[str], code: Optional[str], around: int = 3) -> str:
    """The user's source lines around ``location`` ("file:line"), the line itself marked;
    the recorded code line alone where the file cannot be read."""
    lines: List[Tuple[int, str]] = []
    if location and ":" in location:
        path, _, line = location.rpartition(":")
        if line.isdigit():
            n = int(line)
            lines = [(i, linecache.getline(path, i).rstrip("\n")) for i in range(max(1, n - around), n + around + 1)]
            while lines and not lines[-1][1].strip():
                lines.pop()
            if not any(i == n and text.strip() for i, text in lines):
                lines = []
            else:
                body = "".join(f"<span class='{'hit' if i == n else ''}'><span class='ln'>{i}</span>{_e(text)}</span>"
                               for i, text in lines)
                return f"<pre class='src'>{body}</pre>"
    if code:
        return f"<pre class='src'><span class='hit'>{_e(code)}</span></pre>"
    return "<p class='muted'>(no source location was recorded)</p>"


def _diff_html(text: str) -> str:
    out = []
    for line in text.splitlines():
        cls = "add" if line.startswith("+") and not line.startswith("+++") else \
            "del" if line.startswith("-") and not line.startswith("---") else "hunk" if line.startswith("@@") else ""
        out.append(f"<span class='{cls}'>{_e(line)}</span>" if cls else _e(line) + "\n")
    return "<pre class='diff'>" + "".join(out) + "</pre>"


def _graphs(reports: Sequence[Any]) -> List[Tuple[Any, Any, dict]]:
    """(report data, its context, its dict) per graph: a GraphReport or a plain Report."""
    out = []
    for r in reports:
        data = getattr(r, "data", r)
        ctx = context_for(data, getattr(r, "context", None))
        out.append((data, ctx, to_dict(data, ctx)))
    return out


def _fusion_rows(f: dict) -> List[Tuple[str, Any]]:
    return [("structure (no mask tensor read)", f["structure"]), ("bias / mask tensors", f["bias"]),
            ("masks", "; ".join(f["masks"]) or "none"), ("scale", f["scale"]), ("GQA", f["gqa"] or "none"),
            ("dropout_p", f["dropout_p"]), ("softcap", f["softcap"]),
            ("empty-row fix-up", "yes" if f["empty_row_fixup"] else "no"),
            ("dtype (scores / probs)", f"{f['dtype']} / {f['probs_dtype']}"), ("scores shape", f["scores_shape"]),
            ("memory per call no longer materialised",
             f"{bytes_label(f['memory_bytes_per_call'])} ({f['memory_note']})"),
            ("softmax node", f["softmax"]), ("nodes removed", f"{len(f['nodes_removed'])}: "
                                                                f"{', '.join(f['nodes_removed'])}"),
            ("node inserted", f["node_inserted"])]


def model_page(reports: Sequence[Any], target: Optional[str] = None, mode: Optional[str] = None,
               path: Optional[str] = None) -> str:
    """The HTML page of a model compiled into ``reports`` (one per graph; module doc).
    Writes it to ``path`` if given; returns it."""
    graphs = _graphs(reports)
    dicts = [d for _, _, d in graphs]
    all_sites = sites(dicts)
    fused = sum(s["fused"] for s in all_sites)
    errors = sum(len(d["errors"]) for d in dicts)
    mems = [d["totals"]["memory_bytes_per_call"] for d in dicts if d["totals"]["fused"]]
    pass_ms = sum((d["pass_time_s"] or 0.0) for d in dicts) * 1e3
    title = f"attnfuse report{': ' + target if target else ''}"
    out = [_head(title), f"<h1>{_e(title)}</h1>"]
    summary = (f"<span class='badge fused'>{fused} fused</span> "
               f"<span class='badge miss'>{len(all_sites) - fused} not fused</span> "
               + (f"<span class='badge err'>{errors} error(s)</span> " if errors else "")
               + f"&middot; {len(graphs)} graph(s)" + (f" &middot; {_e(mode)} mode" if mode else "")
               + (f" &middot; memory per call no longer materialised: "
                  f"{_e(bytes_label(None if any(m is None for m in mems) else sum(mems)))}" if mems else "")
               + f" &middot; attnfuse pass {pass_ms:.1f} ms")
    out.append(f"<p class='summary'>{summary}</p>")
    out.append("<h2>Attention sites</h2>")
    if not all_sites:
        out.append("<p>No attention found: no graph holds a softmax.</p>" if graphs else
                   "<p>No graph was compiled.</p>")
    else:
        out.append("<table class='sites'><tr><th>#</th><th>result</th><th>module</th><th>location</th>"
                   "<th>recognised / why not fused</th></tr>")
        for i, s in enumerate(all_sites, 1):
            badge = "<span class='badge fused'>fused</span>" if s["fused"] else \
                f"<span class='badge miss'>not fused</span><br><code>{_e(s['kind'])}</code>"
            out.append(f"<tr><td><a href='#site-{i}'>{i}</a></td><td>{badge}</td>"
                       f"<td><code>{_e(module_label(s['module']))}</code></td><td><code>{_e(s['location'] or '?')}</code>"
                       f"</td><td>{_e(s['detail'])}</td></tr>")
        out.append("</table>")
        out.append("<h2>In your code</h2>")
        out += _site_sections(graphs)
    out.append("<h2>Graphs</h2>")
    for data, ctx, d in graphs:
        out.append(_graph_section(data, ctx, d))
    out.append(_TAIL)
    page = "\n".join(out)
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(page)
    return page


def _site_sections(graphs: List[Tuple[Any, Any, dict]]) -> List[str]:
    out, i = [], 0
    for _, ctx, d in graphs:
        for f, detail in zip(d["fusions"], ctx.fusions):
            i += 1
            head = (f"<h3 id='site-{i}'><span class='badge fused'>fused</span> #{i} "
                    f"<code>{_e(module_label(f['module']))}</code> &middot; <code>{_e(f['location'] or '?')}</code>"
                    f" <span class='muted'>{_e(d['graph'] or '')}</span></h3>")
            what = (f"<p>One <code>attnfuse.flash_attention</code> call: {_e(f['structure'])} as structure; "
                    f"bias {_e(f['bias'])}; scale {_e(f['scale'])}"
                    + (f"; GQA {_e(f['gqa'])}" if f["gqa"] else "")
                    + (f"; dropout_p {_e(f['dropout_p'])}" if f["dropout_p"] else "")
                    + (f"; softcap {_e(f['softcap'])}" if f["softcap"] else "") + ".</p>")
            rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in _fusion_rows(f))
            graph = ("<details><summary>Graph detail: the removed and the inserted nodes</summary>"
                     "<div class='subgraphs'><div class='removed'><h3>Before: removed subgraph</h3>"
                     + _subgraph_html(f["before"], detail.before_graph, f"before_{i}")
                     + "</div><div class='inserted'><h3>After: inserted subgraph</h3>"
                     + _subgraph_html(f["after"], detail.after_graph, f"after_{i}")
                     + f"</div></div><table>{rows}</table></details>")
            out.append(f"<section class='site fused'>{head}{_source(f['location'], f['code'])}{what}{graph}</section>")
        for m in d["near_misses"]:
            i += 1
            head = (f"<h3 id='site-{i}'><span class='badge miss'>not fused</span> #{i} "
                    f"<code>{_e(module_label(m['module']))}</code> &middot; <code>{_e(m['location'] or '?')}</code>"
                    f" <span class='muted'>{_e(d['graph'] or '')}</span></h3>")
            why = f"<p><code>{_e(m['kind'])}</code>: {_e(m['reason'])} <span class='muted'>(node {_e(m['node'])})</span></p>"
            out.append(f"<section class='site miss'>{head}{_source(m['location'], m['code'])}{why}</section>")
    return out


def _graph_section(data: Any, ctx: Any, d: dict) -> str:
    t = d["totals"]
    label = (f"{_e(d['graph'] or 'graph')}: {t['fused']} fused, {t['near_misses']} not fused"
             + (f", {t['errors']} error(s)" if t["errors"] else "")
             + (f", pass {d['pass_time_s'] * 1e3:.1f} ms" if d["pass_time_s"] is not None else ""))
    body = []
    if d["errors"]:
        body.append("<h3>Errors</h3><ul>" + "".join(f"<li><code>{_e(x)}</code></li>" for x in d["errors"]) + "</ul>")
    if not t["fused"]:
        body.append("<p class='muted'>Nothing fused: the graph was compiled as it came.</p>")
    else:
        text = diff(data, ctx)
        body.append("<h3>Graph code: unified diff before / after the rewrite</h3>" +
                    (_diff_html(text) if text else "<p class='muted'>(the graph code was not recorded)</p>"))
    return f"<details class='graph'><summary>{label}</summary>{''.join(body)}</details>"


def to_html(report: Any, path: Optional[str] = None, context: Any = None) -> str:
    """The page of one graph (:func:`model_page`); written to ``path`` if given, and returned."""
    if context is not None:
        report = _WithContext(getattr(report, "data", report), context)
    return model_page([report], path=path)


def to_html_many(reports: List[Any], path: Optional[str] = None) -> str:
    """Several graphs (e.g. every graph of one model) on one page (:func:`model_page`)."""
    return model_page(reports, path=path)


class _WithContext:
    """A report's data with an explicit context (what :func:`to_html`'s ``context`` gives)."""

    def __init__(self, data: Any, context: Any):
        self.data, self.context = data, context
