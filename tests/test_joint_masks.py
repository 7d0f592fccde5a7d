"""Causal and padding in one expression (issue 18, category 7).

``(kv < lengths[b]) & (q >= kv)`` written on (B, Lq, Lk) and lifted to the scores with
``[:, None]`` / ``.unsqueeze(1)`` / a view, with ``~``, ``== 0`` and ``|`` relatives:
the mask is analysed without the head axis it only inserts (passes/lift.py), so its
factors become ``causal`` + ``key_mask`` structure instead of one (B, 1, Lq, Lk) tensor.
Every spelling is compared with float64 eager (forward and gradients) in symbolic_trace,
make_fx and dynamo (static and dynamic) graphs. A factor that is neither (a query-padding
factor) stays a residual mask beside the proven causal part.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.algebra_check import DIALECTS, check_backend, check_spelling

FMIN = torch.finfo(torch.float32).min


def _inputs(seed=0, b=2, h=2, lq=6, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, lq, d, generator=g) for _ in range(3))
    return [q, k, v, torch.tensor([6, 3])]


def _idx(q, k):
    i = torch.arange(q.shape[-2], device=q.device)
    j = torch.arange(k.shape[-2], device=q.device)
    return i, j


class Unsqueezed(nn.Module):
    """(B, Lq, Lk) keep-mask, ``~m.unsqueeze(1)`` filled with -inf."""

    def forward(self, q, k, v, lengths):
        i, j = _idx(q, k)
        m = (j[None, None, :] < lengths[:, None, None]) & (i[None, :, None] >= j[None, None, :])
        return (q @ k.mT * 0.35).masked_fill(~m.unsqueeze(1), float("-inf")).softmax(-1) @ v


class IndexedEqZero(nn.Module):
    """``m[:, None, :, :] == 0`` as the masked positions (a bool compared with 0 is its negation)."""

    def forward(self, q, k, v, lengths):
        i, j = _idx(q, k)
        m = (j[None, None, :] < lengths[:, None, None]) & (j[None, :] <= i[:, None])[None]
        return torch.softmax((q @ k.mT * 0.35).masked_fill(m[:, None, :, :] == 0, float("-inf")), -1) @ v


class ViewedOr(nn.Module):
    """The masked positions as an OR, viewed to (B, 1, Lq, Lk), through ``torch.where``."""

    def forward(self, q, k, v, lengths):
        i, j = _idx(q, k)
        bad = (j[None, None, :] >= lengths[:, None, None]) | (j[None, :] > i[:, None])[None]
        bad = bad.view(q.shape[0], 1, q.shape[-2], k.shape[-2])
        return torch.where(bad, float("-inf"), q @ k.mT * 0.35).softmax(-1) @ v


class FiniteFill(nn.Module):
    """Hugging Face style: ``where(keep[:, None], s, finfo.min)``."""

    def forward(self, q, k, v, lengths):
        i, j = _idx(q, k)
        keep = (j[None, None, :] < lengths[:, None, None]) & (i[None, :, None] >= j[None, None, :])
        return torch.where(keep[:, None], q @ k.mT * 0.35, FMIN).softmax(-1) @ v


class QueryPadding(nn.Module):
    """Causal & a query-padding factor (varies along the query axis, not the keys): the
    causal part is proven, the query factor stays a residual mask."""

    def forward(self, q, k, v, lengths):
        i, j = _idx(q, k)
        m = (i[None, :, None] < lengths[:, None, None]) & (i[None, :, None] >= j[None, None, :])
        return (q @ k.mT * 0.35).masked_fill(~m[:, None], float("-inf")).softmax(-1) @ v


def _structure(res):
    (f,) = res.report.fusions
    return f.causal, f.key_mask, f.bias


@pytest.mark.parametrize("dialect", DIALECTS)
def test_unsqueezed(dialect):
    res = check_spelling(Unsqueezed(), _inputs(), dialect)
    causal, key_mask, bias = _structure(res)
    assert causal == "top_left" and key_mask and bias == "none"


@pytest.mark.parametrize("module", [IndexedEqZero, ViewedOr, FiniteFill])
@pytest.mark.parametrize("dialect", ["fx", "aten"])
def test_spellings(module, dialect):
    res = check_spelling(module(), _inputs(), dialect)
    causal, key_mask, bias = _structure(res)
    assert causal == "top_left" and key_mask and bias == "none", res.report.fusions[0].masks


@pytest.mark.parametrize("dialect", ["fx", "dynamo"])
def test_query_padding_stays_a_residual(dialect):
    """Forward only: padded query rows see no key, and eager's gradients are NaN everywhere
    (NaN probabilities reach dV)."""
    res = check_spelling(QueryPadding(), _inputs(), dialect, grad=False)
    causal, key_mask, bias = _structure(res)
    assert causal == "top_left" and not key_mask and bias.startswith("keep:")
    assert "residual mask" in res.report.fusions[0].masks[0]


def test_backend_training():
    rep = check_backend(FiniteFill(), _inputs())
    assert rep.fusions[0].causal == "top_left" and rep.fusions[0].key_mask
