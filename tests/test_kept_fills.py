"""A finite mask fill that stays a tensor and covers whole rows (passes/fillrows.py).

``masked_fill(s, ~keep, finfo.min)`` with ``keep`` from an input's values (DeBERTa-v2's
``bool(m[:, None, None, :] * m[:, None, :, None])``) is the op's added bias. On a row it fills
entirely eager replaces the scores: a uniform average of V with no gradient to q or k; an
added bias passes the uniform softmax's gradient on. Checked against float64 eager, with the
gradients of q, k and v. With dropout, or a term added after the fill, the op gets q = 0 on
those rows instead (its logits there are the fill and the later terms, as eager's); with a
term added *before* the fill (which eager replaces and the op would add) it is declined.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.algebra_check import check_spelling
from tests.attn_spellings import capture, fused_nodes, run_rewrite

B, H, L, D = 2, 2, 6, 8


class ProductMask(nn.Module):
    def __init__(self, p: float = 0.0, bias_after: bool = False, bias_before: bool = False):
        super().__init__()
        self.p, self.bias_after, self.bias_before = p, bias_after, bias_before

    def forward(self, q, k, v, m):
        keep = (m[:, None, None, :] * m[:, None, :, None]).bool()
        s = q @ k.mT * D ** -0.5
        if self.bias_before:
            s = s + k[..., 0][:, :, None, :] * 0.5   # replaced by the fill where it fills
        s = s.masked_fill(~keep, torch.finfo(q.dtype).min)
        if self.bias_after:
            s = s + q[..., :1] * 0.5   # a term added after the fill (varies along the queries only)
            s = s + k[..., 0][:, :, None, :] * 0.5
        p = torch.softmax(s, dim=-1)
        return nn.functional.dropout(p, self.p, training=self.p > 0) @ v


def _inputs():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    m = torch.ones(B, L, dtype=torch.long)
    m[0, -2:] = 0   # item 0: two padded tokens, so two query rows are filled entirely
    return [q, k, v, m]


@pytest.mark.parametrize("dialect", ["aten", "dynamo"])
def test_fully_filled_rows_get_eager_gradients(dialect):
    res = check_spelling(ProductMask(), _inputs(), dialect)
    (f,) = res.report.fusions
    assert any("covers entirely" in n for n in f.masks), f.masks


@pytest.mark.parametrize("dialect", ["aten", "dynamo"])
def test_terms_after_the_fill_zero_q_on_full_rows(dialect):
    """HF GPT-2's shape (a fill, then an added term): the full rows' logits are the fill plus
    the later terms, as eager's; output and gradients of q, k, v against float64 eager."""
    res = check_spelling(ProductMask(bias_after=True), _inputs(), dialect)
    (f,) = res.report.fusions
    assert any("get q = 0" in n for n in f.masks), f.masks


def test_dropout_zero_q_on_full_rows():
    gm, ex = capture(ProductMask(p=0.1), _inputs(), "aten")
    res = run_rewrite(gm, ex, strict=True)
    assert fused_nodes(res.graph_module)
    (f,) = res.report.fusions
    assert any("get q = 0" in n for n in f.masks), f.masks


def test_declined_with_a_term_before_the_fill():
    gm, ex = capture(ProductMask(bias_before=True, bias_after=True), _inputs(), "aten")
    res = run_rewrite(gm, ex, strict=True)
    assert not fused_nodes(res.graph_module)
    assert any("a score term comes before the fill" in nm.reason for nm in res.report.near_misses), \
        [nm.reason for nm in res.report.near_misses]
