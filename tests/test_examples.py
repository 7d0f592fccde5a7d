"""The scripts in examples/ run as users would copy them (issue 19, item 10).

Each runs in this process (``runpy``, the script's folder first on ``sys.path``, as
``python examples/x.py`` has it) with small settings; the scripts check their own results
against eager and these tests check what they return.
"""
from __future__ import annotations

import json
import os
import runpy
import sys

import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _run(script: str, argv, monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    torch._dynamo.reset()
    namespace = runpy.run_path(os.path.join(EXAMPLES, script), run_name="example")
    return namespace["main"](argv)


def test_hf_model_report(monkeypatch, tmp_path):
    report = _run("hf_model_report.py", ["--inner", "eager", "--report-dir", str(tmp_path)], monkeypatch)
    assert len(report.fusions) == 2 and not report.near_misses
    assert [f["module"] for f in report.to_dict()["fusions"]] == [f"model.layers.{i}.self_attn" for i in (0, 1)]
    (written,) = tmp_path.glob("graph_*.json")
    data = json.loads(written.read_text())
    assert data["totals"]["fused"] == 2 and next(tmp_path.glob("graph_*.html")).stat().st_size > 0


def test_training_loop(monkeypatch):
    losses = _run("training_loop.py", ["--steps", "3", "--seq-len", "16", "--inner", "eager"], monkeypatch)
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_export_rewrite(monkeypatch, tmp_path):
    result = _run("export_rewrite.py", ["--out", str(tmp_path / "p.pt2")], monkeypatch)
    assert result.fused == 2 and (tmp_path / "p.pt2").exists()
    assert [f["module"] for f in result.report.to_dict()["fusions"]] == ["blocks.0.attn", "blocks.1.attn"]
