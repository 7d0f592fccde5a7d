"""benchmarks/gpu_check.py on a machine without a GPU: its no-GPU path, its table code,
and its correctness comparison run on CPU tensors (the op's torch path standing in for
the kernels, and a wrong implementation that it must flag)."""
from __future__ import annotations

import math
import os
import sys
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import gpu_check as G  # noqa: E402

import attnfuse  # noqa: E402


def test_no_gpu_prints_one_line_and_exits_0(capsys):
    assert not torch.cuda.is_available()
    assert G.main([]) == 0
    out = capsys.readouterr().out
    assert out == G.NO_GPU_LINE + "\n"


def test_markdown_table_and_verdicts():
    t = G.markdown_table(["a", "b", "c"], [("x", 1.23456, None), ("y", float("nan"), 12345.6)])
    assert t.splitlines() == ["| a | b | c |", "|---|---|---|", "| x | 1.23 |  |",
                              "| y | nan | 12346 |"]
    assert G.verdict(1e-3, 1e-3, torch.float16) and not G.verdict(5e-2, 1e-3, torch.float16)
    assert G.attention_flops(1, 1, 8, 8, 4, False) == 4 * 8 * 8 * 4
    assert G.attention_flops(1, 1, 8, 8, 4, True, backward=True) == 4 * 8 * 8 * 4 / 2 * 3.5
    b = G.Budget(0.0)
    assert not b.take("row") and b.skipped == ["row"]


def test_dropout_statistics_accept_the_true_rate_and_reject_another():
    g = torch.Generator().manual_seed(0)
    n, p = 1024, 0.2
    keep = torch.rand(4096, n, generator=g) >= p
    out = keep.float().mean(-1) / (1 - p)          # uniform attention, v = 1
    assert G.dropout_ok(*G.dropout_stats(out, p, n))
    wrong = (torch.rand(4096, n, generator=g) >= 0.3).float().mean(-1) / (1 - p)
    assert not G.dropout_ok(*G.dropout_stats(wrong, p, n))


def _small(name, **kw):
    base = dict(dtype=torch.float16, b=1, hq=4, hkv=2, lq=24, lk=40, d=24, causal="top_left")
    return G.Case(name, **{**base, **kw})


def test_correctness_rows_pass_for_the_op_and_flag_a_wrong_one():
    case = _small("cpu bias window key_mask", bias=True, window=9, key_mask=True,
                  causal="bottom_right")
    rows = G.run_case(case, attnfuse, device="cpu", impl="torch")
    assert [r[1] for r in rows] == ["out", "dq", "dk", "dv", "dbias"]
    assert all(r[4] == "ok" for r in rows), rows
    assert max(r[2] for r in rows) < 1e-2

    def wrong(q, k, v, bias=None, **kw):        # forgets the window
        return attnfuse.flash_attention(q, k, v, bias, **{**kw, "window": 0})
    rows = G.run_case(case, types.SimpleNamespace(flash_attention=wrong), device="cpu",
                      impl="torch")
    assert rows[0][4] == "FAIL" and not math.isnan(rows[0][2])
