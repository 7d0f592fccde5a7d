"""The matcher's sink rule (issue 22, passes/sinks.py): ``cat`` of the scores and a
per-head sink column → optional max shift → softmax → slice the column off → @ v becomes
one fused call with ``sinks=``, in every graph dialect, forward and gradients (the sinks'
included: they are an input here) equal to float64 eager. Spellings that are not one
logit per head, or whose slice keeps the sink column, stay near misses that say why.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.algebra_check import check_spelling
from tests.attn_spellings import capture, run_rewrite


def _inputs(seed=0, b=2, h=4, lq=5, lk=6, d=8, sinks_shape=(4,)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk)] + [
        torch.randn(sinks_shape, generator=g)]


class GptOss(nn.Module):
    """Hugging Face gpt-oss's eager_attention_forward (sink column last, max shift,
    softmax with dtype, dropout, cast)."""

    def forward(self, q, k, v, sinks):
        w = torch.matmul(q, k.transpose(2, 3)) * 0.35
        col = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        combined = torch.cat([w, col], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
        scores = probs[..., :-1]
        return torch.matmul(F.dropout(scores, p=0.0, training=False).to(v.dtype), v)


class FirstColumn(nn.Module):
    """x-transformers' learned sink: the column first, no shift, sliced off with ``1:``."""

    def forward(self, q, k, v, sinks):
        sim = torch.einsum("bhid,bhjd->bhij", q, k) / 3.0
        col = sinks[None, :, None, None].expand(sim.shape[0], -1, sim.shape[2], 1)
        attn = torch.cat((col, sim), dim=-1).softmax(dim=-1)
        return attn[:, :, :, 1:] @ v


class SharedSink(nn.Module):
    """One sink for every head (shape (1,)), cast to the scores' dtype."""

    def forward(self, q, k, v, sinks):
        s = q @ k.mT * 0.35
        col = sinks.to(s.dtype).expand(*s.shape[:-1], 1)
        return torch.cat([s, col], -1).softmax(-1)[..., :-1] @ v


class PerQuerySink(nn.Module):
    """A column that varies along the queries is not a sink of the op."""

    def forward(self, q, k, v, sinks):
        s = q @ k.mT * 0.35
        col = sinks[None, None, :, None].expand(s.shape[0], s.shape[1], -1, 1)
        return torch.cat([s, col], -1).softmax(-1)[..., :-1] @ v


class PerRowColumn(nn.Module):
    """A column computed per row (here the row's mean score) is not a per-head sink."""

    def forward(self, q, k, v, sinks):
        s = q @ k.mT * 0.35
        return torch.cat([s, s.mean(-1, keepdim=True) + sinks[0]], -1).softmax(-1)[..., :-1] @ v


class ShiftBeforeCat(nn.Module):
    """The scores' row max subtracted BEFORE the sink column joins them: a no-op for a plain
    softmax, but here it moves the scores against the sink (another function)."""

    def forward(self, q, k, v, sinks):
        s = q @ k.mT * 0.35
        s = s - s.amax(-1, keepdim=True).detach()
        col = sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
        return torch.cat([s, col], -1).softmax(-1)[..., :-1] @ v


class SliceKeepsSink(nn.Module):
    """The column is appended last but the first key is dropped: the sink reaches P·V."""

    def forward(self, q, k, v, sinks):
        s = q @ k.mT * 0.35
        col = sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
        p = torch.cat([s, col], -1).softmax(-1)[..., 1:]
        return p @ v


# static dynamo graphs and training through the backend: tests/test_real_models.py (gpt-oss)
@pytest.mark.parametrize("dialect", ["fx", "aten", "dynamo_dynamic"])
def test_gpt_oss_spelling_fuses_with_sinks(dialect):
    res = check_spelling(GptOss(), _inputs(), dialect)
    (f,) = res.report.fusions
    assert f.sinks and f"sinks={f.sinks}" in res.report.to_text()


@pytest.mark.parametrize("dialect", ["fx", "aten"])
def test_first_column_sink_fuses(dialect):
    check_spelling(FirstColumn(), _inputs(lq=4, lk=7), dialect)


def test_one_sink_shared_by_every_head_fuses():
    check_spelling(SharedSink(), _inputs(sinks_shape=(1,)), "aten")


@pytest.mark.parametrize("module,words", [
    (PerQuerySink, "vary along the query axis"),
    (PerRowColumn, "neither operand is a sink column"),
    (ShiftBeforeCat, "a shift against the sink"),
    (SliceKeepsSink, "sink column"),
])
@pytest.mark.parametrize("dialect", ["fx", "aten"])
def test_declined(module, words, dialect):
    inputs = _inputs(lq=6, lk=6, sinks_shape=(6,)) if module is PerQuerySink else _inputs()
    gm, ex = capture(module(), inputs, dialect)
    res = run_rewrite(gm, ex)
    assert res.fused == 0
    (nm,) = res.report.near_misses
    assert words in nm.reason, nm.reason


class _AlibiSink(nn.Module):
    """A causal (bottom-right) ALiBi model with a sink column: ``relative`` adds the op's own
    term ``slope * (j - i - (Lk - Lq))``, otherwise BLOOM's key-only ``slope * j``."""

    def __init__(self, relative: bool):
        super().__init__()
        self.relative = relative

    def forward(self, q, k, v, sinks):
        lq, lk = q.shape[2], k.shape[2]
        i = torch.arange(lq).view(-1, 1)
        j = torch.arange(lk).view(1, -1)
        pos = (j - i - (lk - lq)) if self.relative else j
        slopes = 2.0 ** -torch.arange(1, 5, dtype=torch.float32)
        s = q @ k.mT * 0.35 + slopes.view(1, -1, 1, 1) * pos
        s = s.masked_fill(j > i + (lk - lq), float("-inf"))
        col = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, lq, 1)
        return torch.cat([col, s], -1).softmax(-1)[..., 1:] @ v


@pytest.mark.parametrize("dialect", ["aten", "dynamo"])
def test_key_only_alibi_with_a_sink_stays_a_bias(dialect):
    """Regression (fuzzer, seed 630273372 example 566): the op's ALiBi equals BLOOM's
    key-only ``slope * j`` only up to a row constant. Softmax ignores that alone, but not
    beside a sink logit, which the constant would move the scores against: with sinks the
    term stays a bias (exact) unless it is the op's term itself."""
    res = check_spelling(_AlibiSink(relative=False), _inputs(lq=5, lk=7), dialect)
    (f,) = res.report.fusions
    assert f.sinks and not f.alibi, (f.sinks, f.alibi)
    res = check_spelling(_AlibiSink(relative=True), _inputs(lq=5, lk=7), dialect)
    (f,) = res.report.fusions
    assert f.sinks and f.alibi, (f.sinks, f.alibi)
