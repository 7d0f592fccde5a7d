"""``nn.MultiheadAttention`` / ``F.multi_head_attention_forward`` (passes/mha.py).

Dynamo keeps ``F.multi_head_attention_forward`` as one node; with ``need_weights=True`` (the
module's default) torch computes its attention explicitly. When the weights are not read,
the call is written out and fused: checked against eager in float64 (forward and input
gradients), batch_first either way, with key-padding and bool attention masks, static and
dynamic shapes, an attention-pooling head (a learned query), and in training with dropout
through ``torch.compile(backend="attnfuse")``. Weights that are returned stay unfused with
a near miss that says so; a leaf module of ``symbolic_trace`` is reported.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

import attnfuse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared catalog
from attn_spellings import capture, fused_nodes, run_rewrite  # noqa: E402

E, NH, B, L = 16, 4, 2, 5


class Mha(nn.Module):
    def __init__(self, batch_first=True, p=0.0, with_masks=True, weights=False):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, NH, dropout=p, batch_first=batch_first)
        self.with_masks, self.weights = with_masks, weights

    def forward(self, x, kpm, am):
        if not self.with_masks:
            out, w = self.mha(x, x, x)
        else:
            out, w = self.mha(x, x, x, key_padding_mask=kpm, attn_mask=am)
        return (out, w) if self.weights else out


class AttentionPool(nn.Module):
    """A learned query attending over the tokens (CLIP/timm attention-pool heads)."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, E) * 0.5)
        self.mha = nn.MultiheadAttention(E, NH, batch_first=True)

    def forward(self, x, kpm, am):
        return self.mha(self.query.expand(x.shape[0], -1, -1), x, x, key_padding_mask=kpm)[0][:, 0]


def _inputs(batch_first=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, E, generator=g)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 3:] = True
    am = torch.rand(L, L, generator=g) > 0.7   # True = masked (same type as kpm: torch warns otherwise)
    am.fill_diagonal_(False)
    return (x if batch_first else x.transpose(0, 1).contiguous()), kpm, am


def _check_against_float64(mod, inputs, dialect):
    """One fusion, and output and dx equal to eager float64 (eval-free: no dropout)."""
    given = [t.clone() for t in inputs]
    gm, ex = capture(mod, given, dialect)
    res = run_rewrite(gm, ex, strict=True)
    assert len(fused_nodes(res.graph_module)) == 1, [(m.kind, m.reason) for m in res.report.near_misses]
    assert "multi_head_attention_forward" not in res.graph_module.code
    x = given[0].clone().requires_grad_()
    call = [x if a is given[0] else a for a in ex]
    out = res.graph_module(*call)
    out = out[0] if isinstance(out, (tuple, list)) else out
    x64 = inputs[0].double().requires_grad_()
    want = mod.double()(x64, inputs[1], inputs[2])
    mod.float()
    torch.testing.assert_close(out, want.float(), atol=2e-5, rtol=2e-5)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("batch_first,dialect,train", [(True, "dynamo", True), (False, "dynamo", False),
                                                       (True, "dynamo_dynamic", False)])
def test_mha_fused_exact(batch_first, dialect, train):
    # under dynamic=True dynamo traces the module's dropout p as a run-time float: in training
    # that is a near miss (test_traced_dropout_p_is_a_near_miss), in eval it does not matter
    torch.manual_seed(0)
    _check_against_float64(Mha(batch_first).train(train), _inputs(batch_first), dialect)


def test_traced_dropout_p_is_a_near_miss():
    gm, ex = capture(Mha(True).train(), _inputs(), "dynamo_dynamic")
    res = run_rewrite(gm, ex, strict=True)
    assert not fused_nodes(res.graph_module)
    assert any("dropout_p is traced" in m.reason for m in res.report.near_misses), res.report.near_misses


def test_attention_pool_fused_exact():
    torch.manual_seed(0)
    _check_against_float64(AttentionPool().eval(), _inputs(), "dynamo")


def test_mha_training_dropout_backend():
    torch.manual_seed(0)
    mod = Mha(True, p=0.1, with_masks=False).train()
    x, kpm, am = _inputs()
    x.requires_grad_()
    out = torch.compile(mod, backend="attnfuse", options={"inner": "aot_eager"})(x, kpm, am)
    rep = attnfuse.last_report()
    assert len(rep.fusions) == 1 and rep.fusions[0].dropout_p == pytest.approx(0.1), rep.to_text()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_returned_weights_are_a_near_miss():
    """need_weights=True with the weights returned: the probabilities are read, nothing fuses,
    the output is eager's, and the reason names the weights."""
    torch.manual_seed(0)
    mod = Mha(True, weights=True).eval()
    inputs = _inputs()
    gm, ex = capture(mod, [t.clone() for t in inputs], "dynamo")
    res = run_rewrite(gm, ex, strict=True)
    assert not fused_nodes(res.graph_module)
    (nm,) = [m for m in res.report.near_misses if "multi_head_attention_forward" in m.reason]
    assert nm.kind == "probs_other_users" and "attention weights" in nm.reason, nm
    with torch.no_grad():
        got, want = res.graph_module(*ex), mod(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_symbolic_trace_leaf_module_is_reported():
    gm, ex = capture(Mha(True).eval(), _inputs(), "fx")
    res = run_rewrite(gm, ex, strict=True)
    assert not fused_nodes(res.graph_module)
    assert any("leaf module" in m.reason for m in res.report.near_misses), res.report.near_misses
