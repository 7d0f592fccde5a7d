"""Exported programs with the fused op lowered to ATen ops (attnfuse/export.py), for
AOTInductor: a program with ``attnfuse::flash_attention`` packages with
``aoti_compile_and_package`` but fails to load without Python; the lowered program has
no attnfuse op, computes what the op computes, and loads and runs in a fresh process
that never imports attnfuse (torch's extension autoload off). The AOTInductor package
itself is built and loaded by benchmarks/aoti_package.py (a C++ compile: too slow here).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import attnfuse
from attnfuse import export as afx
from tests.reference import attention_reference


class Calls(nn.Module):
    """The fused op called directly with every structural argument it takes."""

    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, bias, key_mask):
        return attnfuse.flash_attention(q, k, v, bias, key_mask=key_mask, **self.kw)


def _inputs(lq=6, lk=6, hkv=2):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, lq, 8, generator=g)
    k, v = (torch.randn(2, hkv, lk, 8, generator=g) for _ in range(2))
    bias = torch.randn(1, 4, lq, lk, generator=g)
    key_mask = torch.ones(2, lk, dtype=torch.bool)
    key_mask[1, -2:] = False
    return q, k, v, bias, key_mask


@pytest.mark.parametrize("kw, lq", [
    (dict(causal=True, softcap=5.0, scale=0.3), 6),
    (dict(causal="bottom_right", window=3), 4),
])
def test_lowered_program_matches_op_and_has_no_fused_call(kw, lq):
    inputs = _inputs(lq=lq)
    ep = torch.export.export(Calls(**kw), inputs)
    assert len(afx.fused_calls(ep)) == 1
    lowered = afx.lower_to_aten(ep)
    assert afx.fused_calls(lowered) == []
    assert not any("attnfuse" in str(n.target) for n in lowered.graph.nodes)
    q, k, v, bias, key_mask = inputs
    causal = {True: "top_left"}.get(kw["causal"], kw["causal"])
    want = attention_reference(q, k, v, bias, scale=kw.get("scale"), causal=causal,
                               softcap=kw.get("softcap", 0.0), window=kw.get("window", 0),
                               key_mask=key_mask, dead_rows="zero")
    torch.testing.assert_close(lowered.module()(*inputs).double(), want, atol=2e-6, rtol=1e-5)


def test_dropout_is_refused_before_packaging():
    ep = torch.export.export(Calls(dropout_p=0.1), _inputs())
    with pytest.raises(ValueError, match="dropout_p=0.1.*cannot be lowered"):
        afx.lower_to_aten(ep)


class Causal(nn.Module):
    def forward(self, q, k, v):
        L = q.shape[-2]
        keep = q.new_ones(L, L).tril().bool()
        s = (q @ k.transpose(-2, -1) * 0.3).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


def test_rewritten_lowered_program_runs_in_a_process_without_attnfuse(tmp_path):
    g = torch.Generator().manual_seed(1)
    inputs = tuple(torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    rewritten = attnfuse.rewrite(torch.export.export(Causal(), inputs), strict=True)
    assert rewritten.fused == 1
    lowered = afx.lower_to_aten(torch.export.export(rewritten.graph_module, inputs))
    torch.export.save(lowered, tmp_path / "program.pt2")
    torch.save({"inputs": inputs, "want": Causal()(*(t.double() for t in inputs))}, tmp_path / "io.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"  # attnfuse is not registered in this process
    code = """
        import sys, torch
        ep = torch.export.load("program.pt2")
        io = torch.load("io.pt")
        out = ep.module()(*io["inputs"])
        torch.testing.assert_close(out.double(), io["want"], atol=1e-5, rtol=1e-5)
        assert "attnfuse" not in sys.modules
        print("ran")
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ran" in res.stdout, res.stderr[-3000:]
