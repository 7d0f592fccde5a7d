"""The backend says when attention was left unfused (issue 19, item 6), and validates its flags.

One WARNING per compiled graph on the ``attnfuse`` logger names each attention-like softmax
left unfused (a matmul before and after it) with its file:line and reason; a classifier's
softmax is not attention; ``warn_unfused=False`` silences it; a model without attention gets
one line in the CLI's text report.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import attnfuse
from attnfuse import model_report

HERE = __file__


def _line(tag: str) -> int:
    with open(HERE) as f:
        return next(i for i, t in enumerate(f, 1) if t.rstrip().endswith(tag) and "_line(" not in t)


class Mixed(nn.Module):
    """One fused attention, two attention-like near misses, one classifier softmax."""

    def forward(self, q, k, v):
        fused = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        axis = torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v  # UNFUSED-AXIS
        probs = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)  # UNFUSED-PROBS
        classes = torch.softmax(q.sum(-1), dim=-1)  # CLASSIFIER
        return fused + axis + probs @ v, probs, classes


def _compile(model, options, *inputs):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend="attnfuse", options={"inner": "eager", "impl": "torch", **options})(*inputs)


def test_one_warning_per_graph_names_unfused_attention(caplog):
    qkv = [torch.randn(1, 2, 6, 4) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="attnfuse"):
        out = _compile(Mixed(), {}, *qkv)
    ref = Mixed()(*qkv)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    rep = attnfuse.last_report()
    assert len(rep.fusions) == 1 and len(rep.near_misses) == 3, rep.to_text()
    warnings = [r for r in caplog.records if r.name == "attnfuse" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert "2 attention-like softmax(es) left unfused" in msg and "warn_unfused" in msg
    for tag, kind in (("# UNFUSED-AXIS", "softmax_axis"), ("# UNFUSED-PROBS", "probs_other_users")):
        assert f"{HERE}:{_line(tag)}: [{kind}]" in msg, msg
    assert f":{_line('# CLASSIFIER')}" not in msg

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attnfuse"):
        _compile(Mixed(), {"warn_unfused": False}, *qkv)
    assert not [r for r in caplog.records if r.name == "attnfuse" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("name, value", [("strict", "yes"), ("strict", 1), ("warn_unfused", None)])
def test_flags_take_bools(name, value):
    with pytest.raises(ValueError, match=name):
        attnfuse.backend._parse_options({name: value})


def test_no_attention_gets_one_line():
    result = attnfuse.rewrite(nn.Linear(4, 4), (torch.randn(2, 4),))
    text = model_report.to_text([result.report])
    assert text == "attnfuse: no attention found: no softmax in the 1 compiled graph"
