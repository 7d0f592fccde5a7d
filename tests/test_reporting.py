"""Report renderers (attnfuse.reporting): JSON schema, text, diff, HTML escaping."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import pytest
import torch
import torch.nn as nn

import attnfuse
from attnfuse import reporting

SCRIPT = "<script>alert(1)</script>"

MODEL_SRC = f'''
import torch
import torch.nn as nn


class Attn(nn.Module):
    def forward(self, q, k, v):
        w = torch.softmax((q @ k.transpose(-2, -1)) * 0.5, dim=-1)  # "{SCRIPT}" & more
        return w @ v


class Near(nn.Module):
    def forward(self, q, k, v):
        w = torch.softmax(q @ k.transpose(-2, -1), dim=-2)  # wrong axis {SCRIPT}
        return w @ v
'''


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "evil_model.py"
    path.write_text(MODEL_SRC)
    spec = importlib.util.spec_from_file_location("evil_model", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["evil_model"] = mod
    spec.loader.exec_module(mod)
    return mod


def _compiled_report(model, *inputs):
    with torch.no_grad():
        out = torch.compile(model, backend="attnfuse", options={"inner": "eager", "impl": "torch"})(*inputs)
    torch.testing.assert_close(out, model(*inputs), atol=1e-5, rtol=1e-4)
    return attnfuse.last_report()


def _qkv(B=1, H=2, L=8, D=4):
    torch.manual_seed(0)
    return tuple(torch.randn(B, H, L, D) for _ in range(3))


def _documented_fields():
    """Top-level and per-fusion field names, as documented in the module docstring."""
    doc = reporting.__doc__
    block = doc[doc.index("JSON schema"):doc.index("Shapes under dynamic")]
    top = re.findall(r"^    (\w+)\s", block, re.M)
    fusion = re.findall(r"^        (\w+)\s", block, re.M)
    return set(top), set(fusion)


def test_json_has_schema_and_exactly_the_documented_fields(user_module):
    rep = _compiled_report(user_module.Attn(), *_qkv(B=2, H=3, L=8, D=4))
    data = json.loads(reporting.to_json(rep))
    top, fusion_fields = _documented_fields()
    assert data["schema"] == "attnfuse.report/1" == reporting.SCHEMA
    assert set(data) == top
    assert len(data["fusions"]) == 1
    f = data["fusions"][0]
    assert set(f) == fusion_fields
    assert set(data["totals"]) == {"fused", "near_misses", "errors", "memory_bytes_per_call"}
    assert data["totals"]["fused"] == 1 and data["totals"]["near_misses"] == 0
    # B·H·Lq·Lk · (4 bytes of fp32 scores + 4 of fp32 probabilities)
    assert f["memory_bytes_per_call"] == 2 * 3 * 8 * 8 * 8 == data["totals"]["memory_bytes_per_call"]
    assert f["scores_shape"] == "(2, 3, 8, 8)" and f["dtype"] == "torch.float32"
    assert f["location"].endswith("evil_model.py:8")
    assert SCRIPT in f["code"]                                 # JSON keeps the raw code line
    assert f["node_inserted"] in " ".join(f["after"]) and "flash_attention" in f["node_inserted"]
    assert any("softmax" in line for line in f["before"])
    assert f["scale"] == "0.5" and f["causal"] == "none"
    assert isinstance(data["pass_time_s"], float) and data["graph"].startswith("graph_")


def test_near_miss_in_json_and_text(user_module):
    rep = _compiled_report(user_module.Near(), *_qkv())
    data = json.loads(reporting.to_json(rep))
    assert data["totals"]["fused"] == 0 and len(data["near_misses"]) == 1
    m = data["near_misses"][0]
    assert set(m) == {"kind", "reason", "location", "code", "module", "node"}
    assert m["module"] is None        # dynamo records no module stack for the compiled module's own forward
    assert m["location"].endswith("evil_model.py:14") and "dim=-2" in m["code"]
    text = reporting.to_text(rep)
    assert "0 fused, 1 near miss" in text and "evil_model.py:14" in text and m["reason"][:30] in text


def test_memory_unknown_without_context():
    class M(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    gm = torch.fx.symbolic_trace(M())
    res = attnfuse.rewrite(gm, _qkv())
    assert len(res.report.fusions) == 1
    bare = res.report.data                          # the pass's data alone, no context
    data = reporting.to_dict(bare)
    f = data["fusions"][0]
    assert f["memory_bytes_per_call"] is None and f["memory_note"].startswith("unknown")
    assert data["totals"]["memory_bytes_per_call"] is None
    assert "unknown" in reporting.to_text(bare)
    assert reporting.diff(bare) == ""


def test_rewrite_result_report_has_renderers_and_context():
    class M(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    q, k, v = _qkv()
    res = attnfuse.rewrite(torch.fx.symbolic_trace(M()), (q, k, v))
    data = json.loads(res.report.to_json())
    B, H, L, _ = q.shape
    expected = B * H * L * k.shape[2] * (4 + 4)     # fp32 scores + fp32 probabilities
    assert data["schema"] == "attnfuse.report/1"
    assert data["fusions"][0]["memory_bytes_per_call"] == expected
    d = res.report.diff()
    assert "-" in d and "softmax" in d and "flash_attention" in d
    assert "flash_attention" in res.report.to_text()
    assert res.report.to_html().lstrip().lower().startswith("<!doctype html")


def test_diff_shows_removed_softmax_and_inserted_op(user_module):
    rep = _compiled_report(user_module.Attn(), *_qkv())
    d = reporting.diff(rep)
    assert d.startswith("--- before\n+++ after")
    removed = [line for line in d.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line for line in d.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert any("softmax" in line for line in removed)
    assert not any("softmax" in line for line in added)
    assert any("torch.ops.attnfuse.flash_attention" in line for line in added)


def test_text_table(user_module):
    rep = _compiled_report(user_module.Attn(), *_qkv())
    text = reporting.to_text(rep)
    assert text.splitlines()[0].startswith("attnfuse graph_") and "1 fused, 0 near miss" in text
    assert "evil_model.py:8" in text and "scale=0.5" in text and "1.0 KiB" in text


def test_html_is_self_contained_escaped_and_source_first(user_module, tmp_path):
    rep = _compiled_report(user_module.Attn(), *_qkv())
    path = tmp_path / "r.html"
    page = reporting.to_html(rep, str(path))
    assert path.read_text() == page
    assert "<script" not in page.lower()                                   # escaped, and no scripts
    assert html_escaped(SCRIPT) in page                                    # the code line is there
    # needs no network: no external links or resources (in-page "#" anchors only)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#)|https?://|@import|url\(|<link|<img""", page)
    # source first: the site table, then the user's lines around the site, the graph detail folded below
    order = [page.index(s) for s in ("<h2>Attention sites</h2>", "<h2>In your code</h2>", "<h2>Graphs</h2>")]
    assert order == sorted(order)
    sites = page[order[0]:order[1]]
    assert sites.count("<tr>") == 2 and "evil_model.py:8" in sites and "causal=" not in sites.split("</tr>")[0]
    code = page[order[1]:order[2]]
    assert "<span class='hit'><span class='ln'>8</span>" in code              # the site's own line, marked
    assert "<span class='ln'>7</span>" in code and "<span class='ln'>9</span>" in code   # and its neighbours
    assert code.index("<details>") > code.index("class='hit'")               # graph detail folded below
    for needle in ("Before: removed subgraph", "After: inserted subgraph", "torch.ops.attnfuse.flash_attention"):
        assert needle in code, needle
    graphs = page[order[2]:]
    assert "<details class='graph'>" in graphs and "class='diff'" in graphs and "class='add'" in graphs
    assert "table class=\"diff\"" not in page                             # no side-by-side table to overflow
    assert "white-space:pre-wrap" in page and "max-width:1200px" in page


def test_html_one_page_per_model_and_nothing_fused(user_module, tmp_path):
    rep = _compiled_report(user_module.Near(), *_qkv())
    page = reporting.to_html_many([rep, rep], str(tmp_path / "many.html"))
    assert "<script" not in page.lower() and page.count(html_escaped(SCRIPT)) >= 2
    assert page.count("<h1>") == 1 and page.count("<body>") == 1             # one page for the model
    assert page.count("<details class='graph'>") == 2
    assert "Nothing fused: the graph was compiled as it came." in page and "class='diff'" not in page
    assert "softmax_axis" in page and "0 fused" in page and "2 not fused" in page


def html_escaped(s):
    import html
    return html.escape(s, quote=True)


def _fused_result():
    class M(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
    return attnfuse.rewrite(torch.fx.symbolic_trace(M()), _qkv())


def test_html_subgraphs_plain_without_graphviz(monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    page = _fused_result().report.to_html()
    assert "<svg" not in page and "class='node'" in page and "softmax" in page


def test_html_subgraphs_as_svg_through_dot(monkeypatch, tmp_path):
    """With a ``dot`` on PATH, each subgraph is drawn from a DOT graph of its nodes and edges."""
    seen = tmp_path / "dot_inputs.txt"
    fake = tmp_path / "dot"
    fake.write_text(f"#!/bin/sh\ncat >> {seen}\necho '<?xml version=\"1.0\"?>'\n"
                    "echo '<svg id=\"fake-dot\"><g></g></svg>'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    page = _fused_result().report.to_html()
    assert page.count('<svg id="fake-dot">') == 2          # before and after of the one fusion
    assert "<?xml" not in page
    dot = seen.read_text()
    assert dot.count("digraph") == 2 and "->" in dot
    assert "softmax" in dot and "flash_attention" in dot


def test_matcher_report_text_states_its_counts():
    """The matcher's own report (``passes.report.Report``, ``GraphReport.data``) opens
    with its counts, and lists each fusion and near miss once."""
    class Two(nn.Module):
        def forward(self, q, k, v):
            a = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v
            b = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ (2 * v)
            c = torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v   # over the queries
            return a + b + c

    res = attnfuse.rewrite(torch.fx.symbolic_trace(Two()), _qkv())
    text = res.report.data.to_text()
    assert text.splitlines()[0] == "attnfuse: 2 fused, 1 near miss(es)", text
    assert text.count("  FUSED ") == 2 and text.count("  NEAR MISS [softmax_axis]") == 1, text
