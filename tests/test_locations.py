"""Every route names the user's file:line, source line and module path (issue 19, item 1).

The routes: ``rewrite(torch.fx.symbolic_trace(m))`` (stack traces recovered from the module
hierarchy), ``rewrite(m, inputs)`` (make_fx), ``rewrite(torch.export.export(...))`` and
``torch.compile(backend="attnfuse")`` (dynamo). Module paths read as the user wrote them
(``blocks.0.attn``), and a softmax called through ``nn.Softmax`` is located at the user's
call, not inside torch.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import attnfuse
from attnfuse.locations import normalize_module_path

MODEL_SRC = '''
import math
import torch
import torch.nn as nn


class Attn(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.sm = nn.Softmax(dim=dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, 2, 8).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(8)
        att = self.sm(att)  # MODULE-SOFTMAX
        return (att @ v).transpose(1, 2).reshape(B, T, C)


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = Attn(dim)

    def forward(self, x):
        return x + self.attn(x)


class Net(nn.Module):
    """blocks.0 fuses; blocks.1 is a near miss (softmax over the query axis)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(-1), Block(-2)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class TopLevel(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v  # ROOT-SOFTMAX


class TopLevelModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.sm = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        return self.sm(q @ k.transpose(-2, -1)) @ v  # ROOT-MODULE-SOFTMAX
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    path = tmp_path_factory.mktemp("loc") / "user_net.py"
    path.write_text(MODEL_SRC)
    spec = importlib.util.spec_from_file_location("user_net_i19", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["user_net_i19"] = mod
    spec.loader.exec_module(mod)
    lines = MODEL_SRC.splitlines()
    mod.LINE = {tag: f"{path}:{next(i for i, t in enumerate(lines, 1) if tag in t)}"
                for tag in ("MODULE-SOFTMAX", "ROOT-SOFTMAX", "ROOT-MODULE-SOFTMAX")}
    return mod


def _inputs():
    torch.manual_seed(0)
    return (torch.randn(2, 6, 16),)


def _routes(user):
    x = _inputs()
    yield "symbolic_trace", attnfuse.rewrite(torch.fx.symbolic_trace(user.Net().eval()), x).report
    yield "module+inputs", attnfuse.rewrite(user.Net().eval(), x).report
    yield "export", attnfuse.rewrite(torch.export.export(user.Net().eval(), x)).report
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(user.Net().eval(), backend="attnfuse", options={"inner": "eager", "impl": "torch"})(*x)
    yield "dynamo", attnfuse.last_report()


def test_every_route_names_file_line_code_and_module(user):
    seen = []
    for route, report in _routes(user):
        d = report.to_dict()
        assert len(d["fusions"]) == 1 and len(d["near_misses"]) == 1, (route, report.to_text())
        f, m = d["fusions"][0], d["near_misses"][0]
        assert m["kind"] == "softmax_axis", (route, m)
        for entry, module in ((f, "blocks.0.attn"), (m, "blocks.1.attn")):
            assert entry["location"] == user.LINE["MODULE-SOFTMAX"], (route, entry)
            assert entry["code"] == "att = self.sm(att)  # MODULE-SOFTMAX", (route, entry)
            assert entry["module"] == module, (route, entry)
        text = report.to_text()
        assert "<unknown>" not in text and "blocks.0.attn" in text and "blocks.1.attn" in text, (route, text)
        seen.append(route)
    assert seen == ["symbolic_trace", "module+inputs", "export", "dynamo"]


@pytest.mark.parametrize("cls, tag", [("TopLevel", "ROOT-SOFTMAX"), ("TopLevelModule", "ROOT-MODULE-SOFTMAX")])
def test_symbolic_trace_root_level_attention_is_located(user, cls, tag):
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    d = attnfuse.rewrite(torch.fx.symbolic_trace(getattr(user, cls)()), (q, k, v)).report.to_dict()
    (f,) = d["fusions"]
    assert f["location"] == user.LINE[tag] and f["code"].endswith("# " + tag)
    assert f["module"] == ""


@pytest.mark.parametrize("raw, compiled_root, want", [
    ("L['self'].blocks.0.attn", False, "blocks.0.attn"),
    ("L['self'].blocks[0].attn", False, "blocks.0.attn"),
    ("L['self']", False, ""),
    ("G['model'].blocks.1", False, "model.blocks.1"),
    ("L['s'].layers.0", True, "layers.0"),
    ("L['args'][0].model.layers.0.self_attn", True, "model.layers.0.self_attn"),   # Hugging Face
    ("L['args'][0].model", False, "args.0.model"),
    ("L['self']._modules['h']._modules['0']", False, "h.0"),
    ("blocks.0.attn", False, "blocks.0.attn"),
])
def test_module_paths_read_as_written(raw, compiled_root, want):
    assert normalize_module_path(raw, compiled_root) == want
