"""Row fills after the softmax (issue 18, category 2).

Zeroing whole query rows of P — the rows that see no key (``p.masked_fill(all(masked,
-1, keepdim=True), 0.0)``) or padded queries (``qpad[:, None, :, None]``) — commutes with
P·V: the rewriter applies the fill to the op's output (passes/rowfill.py). The model
below is flash-attn's ``attention_ref`` (tests/test_flash_attn.py, the reference its
kernel tests compare against), reduced to the parts that matter: key padding, a
bottom-right causal mask with Lq > Lk (rows that see no key: NaN in eager before the
fill), and the query-padding fill. Compared with float64 eager in every dialect, forward
and gradients (eager's gradients are finite there thanks to the fills). A fill with
another value, or one that varies along the keys, is a near miss that says so.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.algebra_check import DIALECTS, check_backend, check_spelling
from tests.attn_spellings import capture, run_rewrite


def _inputs(seed=0, b=2, h=2, lq=6, lk=4, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k, v = (torch.randn(b, h, lk, d, generator=g) for _ in range(2))
    return [q, k, v, torch.tensor([6, 4]), torch.tensor([4, 3])]


class AttentionRef(nn.Module):
    """flash-attn's attention_ref: key padding, causal (bottom-right), both row fills."""

    def forward(self, q, k, v, query_lens, key_lens):
        lq, lk = q.shape[-2], k.shape[-2]
        qpad = torch.arange(lq)[None, :] < query_lens[:, None]          # (B, Lq) True = real query
        kpad = torch.arange(lk)[None, :] < key_lens[:, None]            # (B, Lk) True = real key
        local = torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + (lk - lq)  # True = masked
        scores = torch.einsum("bhtd,bhsd->bhts", q * 0.35, k)
        scores = scores.masked_fill(~kpad[:, None, None, :], float("-inf"))
        scores = scores.masked_fill(local, float("-inf"))
        attention = torch.softmax(scores, dim=-1).to(v.dtype)
        attention = attention.masked_fill(torch.all(local, dim=-1, keepdim=True), 0.0)
        attention = attention.masked_fill(~qpad[:, None, :, None], 0.0)
        return torch.einsum("bhts,bhsd->bhtd", attention, v)


class WhereKeep(nn.Module):
    """``torch.where(valid_rows, p, 0.0)`` with the rows computed from the key mask."""

    def forward(self, q, k, v, query_lens, key_lens):
        lk = k.shape[-2]
        keep = (torch.arange(lk)[None, :] < key_lens[:, None])[:, None, None, :]   # (B, 1, 1, Lk)
        p = (q @ k.mT * 0.35).masked_fill(~keep, float("-inf")).softmax(-1)
        return torch.where(keep.any(-1, keepdim=True), p, 0.0) @ v


class FillOne(nn.Module):
    def forward(self, q, k, v, query_lens, key_lens):
        qpad = torch.arange(q.shape[-2])[None, :] < query_lens[:, None]
        p = (q @ k.mT * 0.35).softmax(-1)
        return p.masked_fill(~qpad[:, None, :, None], 1.0) @ v


class FillKeys(nn.Module):
    def forward(self, q, k, v, query_lens, key_lens):
        kpad = torch.arange(k.shape[-2])[None, :] < key_lens[:, None]
        p = (q @ k.mT * 0.35).softmax(-1)
        return p.masked_fill(~kpad[:, None, None, :], 0.0) @ v


@pytest.mark.parametrize("dialect", DIALECTS)
def test_attention_ref(dialect):
    res = check_spelling(AttentionRef(), _inputs(), dialect)
    (f,) = res.report.fusions
    assert f.key_mask
    # symbolic_trace: q * 0.35 hides q's length from the dataflow proof, the band stays a mask
    assert f.causal == ("none" if dialect == "fx" else "bottom_right"), f.masks
    assert sum("rows of P filled with 0" in n for n in f.masks) == 2, f.masks


@pytest.mark.parametrize("dialect", ["fx", "aten"])
def test_where_keep(dialect):
    check_spelling(WhereKeep(), _inputs(lq=5, lk=5), dialect)


def test_backend_training():
    check_backend(AttentionRef(), _inputs())


@pytest.mark.parametrize("module,words", [(FillOne, "not 0"), (FillKeys, "varies along the key axis")])
@pytest.mark.parametrize("dialect", ["fx", "aten"])
def test_declined(module, words, dialect):
    gm, ex = capture(module(), _inputs(lq=5, lk=5), dialect)
    res = run_rewrite(gm, ex)
    assert res.fused == 0
    (nm,) = res.report.near_misses
    assert nm.kind == "after_softmax" and words in nm.reason, nm.reason
