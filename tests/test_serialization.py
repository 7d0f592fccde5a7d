"""Saved graphs that call the fused op load in a fresh process without ``import attnfuse``.

A program saved with ``torch.export.save`` names ``torch.ops.attnfuse.flash_attention``;
so does the code of a rewritten GraphModule that is pickled or ``torch.save``'d. Loading
either needs the op registered. attnfuse registers it from torch's extension autoload
(the ``torch.backends`` entry point, attnfuse/_autoload.py), so a process that only
imports torch loads them (this failed with an opaque error). The loaded graphs must
still call the fused op and match eager in float64.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

import attnfuse


class Causal(nn.Module):
    def forward(self, q, k, v):
        L = q.shape[-2]
        keep = q.new_ones(L, L).tril().bool()
        s = (q @ k.transpose(-2, -1) * 0.3).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


def _python(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TORCH_DEVICE_BACKEND_AUTOLOAD")}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _fused(gm) -> int:
    return sum(1 for n in gm.graph.nodes if "attnfuse.flash_attention" in str(n.target))


def test_saved_programs_and_pickled_graphs_load_without_import(tmp_path):
    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    want = Causal()(*(t.double() for t in inputs))
    torch.save({"inputs": inputs, "want": want}, tmp_path / "io.pt")

    exported = attnfuse.rewrite(torch.export.export(Causal(), inputs), strict=True)
    assert exported.fused == 1
    torch.export.save(torch.export.export(exported.graph_module, inputs), tmp_path / "program.pt2")

    traced = attnfuse.rewrite(torch.fx.symbolic_trace(Causal()), inputs, strict=True)
    assert traced.fused == 1
    torch.save(traced.graph_module, tmp_path / "graph.pt")
    (tmp_path / "graph.pkl").write_bytes(pickle.dumps(traced.graph_module))

    out = _python("""
        import pickle, sys
        import torch
        light = not any(m.startswith("attnfuse.kernels") or m == "sympy" for m in sys.modules)
        io = torch.load("io.pt")
        program = torch.export.load("program.pt2").module()
        graphs = {"export": program,
                  "torch.save": torch.load("graph.pt", weights_only=False),
                  "pickle": pickle.loads(open("graph.pkl", "rb").read())}
        for name, gm in graphs.items():
            out = gm(*io["inputs"])
            out = out[0] if isinstance(out, (tuple, list)) else out
            fused = sum(1 for n in gm.graph.nodes if "attnfuse.flash_attention" in str(n.target))
            err = (out.double() - io["want"]).abs().max().item()
            print(name, fused, err)
        print("light", light)
        """, cwd=tmp_path)
    rows = [line.split() for line in out.splitlines()]
    # the autoload imports neither the kernels (TRITON_INTERPRET may still be set after
    # ``import torch``) nor sympy
    assert rows.pop() == ["light", "True"]
    assert [r[0] for r in rows] == ["export", "torch.save", "pickle"]
    for name, fused, err in rows:
        assert int(fused) == 1, f"{name}: the loaded graph does not call the fused op"
        assert float(err) < 2e-6, f"{name}: max error {err}"


def test_import_attnfuse_first_in_a_fresh_process(tmp_path):
    """``import attnfuse`` before torch: torch's autoload then runs while attnfuse is
    being imported, and the op is registered all the same."""
    out = _python("""
        import attnfuse, torch
        q = torch.randn(1, 2, 5, 4)
        print(torch.ops.attnfuse.flash_attention(q, q, q)[0].shape == q.shape)
        """, cwd=tmp_path)
    assert out.split() == ["True"]


def test_a_broken_attnfuse_never_breaks_import_torch(monkeypatch):
    """torch turns an autoload error into a failed ``import torch``: register() only warns."""
    import sys

    import pytest

    from attnfuse import _autoload

    monkeypatch.setitem(sys.modules, "attnfuse.op", None)  # importing it now raises ImportError
    with pytest.warns(RuntimeWarning, match="could not register"):
        _autoload.register()
