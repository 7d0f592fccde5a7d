"""The import structure of ``kernels/`` (issue 20) and the README's table of CPU paths.

Parses every module of ``kernels/`` with :mod:`ast` (imports inside functions
included, so no import hidden at call time escapes) and checks that the imports form
no cycle and point one way: :mod:`~attnfuse.kernels.base` imports no sibling, each CPU
path imports only the shared base, the CPU and Triton sides import nothing from each
other, and the Triton launcher and decode module do not import each other both ways.
The README's ``impl="torch"`` table is checked against the dispatcher's
:data:`~attnfuse.kernels.torch_impl.PATHS`, and the dispatcher is asked, for one input
per path, which path it takes.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from attnfuse.kernels import torch_impl as T

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
PACKAGE = "attnfuse.kernels"
BASE = {"base"}
CPU_BASE = {"base", "torch_base", "torch_dropout"}
CPU_PATHS = {"torch_fused", "torch_blocked", "torch_banded", "torch_runs", "torch_lowp"}


def _sibling_imports(source: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``source`` imports, anywhere in it (module level,
    inside functions or under ``if``), relative or absolute."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if alias.name.startswith(PACKAGE + ".") and len(parts) > 2:
                    found.add(parts[2])
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or mod == PACKAGE or mod.startswith(PACKAGE + "."):
                inner = mod if node.level == 1 else mod[len(PACKAGE) + 1:]
                if inner:  # from .x import y / from attnfuse.kernels.x import y
                    found.add(inner.split(".")[0])
                else:      # from . import x / from attnfuse.kernels import x
                    found.update(alias.name for alias in node.names)
    return found & modules


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in KERNELS.glob("*.py")}
    return {m: _sibling_imports((KERNELS / f"{m}.py").read_text(), modules) - {m}
            for m in modules}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a list of modules (first == last), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_parser_sees_every_kind_of_import():
    src = ("from . import a\nfrom .b import x\nimport attnfuse.kernels.c\n"
           "from attnfuse.kernels import d\nfrom attnfuse.kernels.e import y\n"
           "def f():\n    from . import g\nimport torch\nfrom .. import h\n")
    assert _sibling_imports(src, set("abcdefgh")) == set("abcdeg")
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle_in_kernels():
    graph = _graph()
    assert {"base", "torch_base", "torch_impl", "triton_flash", "triton_launch"} <= set(graph)
    assert _cycle(graph) == []


def test_imports_point_one_way():
    graph = _graph()
    assert graph["base"] == set(), "base imports no sibling"
    assert graph["torch_base"] <= BASE
    for path in CPU_PATHS:
        assert graph[path] <= CPU_BASE, (path, graph[path] - CPU_BASE)
    assert graph["torch_inline"] <= BASE
    for m, deps in graph.items():
        if m.startswith("triton_"):
            assert not any(d.startswith("torch_") for d in deps), (m, deps)
        if m.startswith("torch_"):
            assert not any(d.startswith("triton_") for d in deps), (m, deps)
    assert "triton_flash" not in graph["triton_decode"]
    assert "triton_decode" not in graph["triton_launch"] | graph["triton_fwd"] | graph["triton_bwd"]


# ------------------------------------------------------------------ README's table
def _readme_rows() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- cpu-paths:start -->")
    end = text.index("<!-- cpu-paths:end -->")
    rows = []
    for line in text[start:end].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0] != "`path`":
            rows.append((cells[0].strip("`"), cells[1], cells[2]))
    return rows


def test_readme_table_is_the_dispatchers():
    assert _readme_rows() == [tuple(rule) for rule in T.PATHS]


def _qkv(dtype, lq=64, lk=64, b=2, h=2, d=16):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, h, lk, d, generator=g).to(dtype)
    v = torch.randn(b, h, lk, d, generator=g).to(dtype)
    return q, k, v


def _padding(b, lk, visible):
    km = torch.zeros(b, lk, dtype=torch.bool)
    km[:, :visible] = True
    return km


@pytest.mark.parametrize("path,inputs,kw", [
    ("lowp", lambda: _qkv(torch.bfloat16), {}),
    ("runs", lambda: _qkv(torch.float32, lq=256, lk=256, b=1, h=4),
     {"key_mask": _padding(1, 256, 200)}),
    ("banded", lambda: _qkv(torch.float32), {"causal": "top_left", "window": 8}),
    ("fused", lambda: _qkv(torch.float32), {"causal": "top_left"}),
    ("blocked", lambda: _qkv(torch.float32), {"softcap": 30.0}),
])
def test_dispatcher_takes_each_path_of_the_table(path, inputs, kw):
    q, k, v = inputs()
    args = dict(causal="none", dropout_p=0.0, softcap=0.0)
    args.update(kw)
    plan = T.forward_plan(q, k, v, None, **args)
    assert plan == T.CpuPlan(path, dict((r.path, r.when) for r in T.PATHS)[path])
    assert [r.path for r in T.PATHS] == ["lowp", "runs", "banded", "fused", "blocked"]
