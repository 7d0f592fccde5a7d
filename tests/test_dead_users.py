"""Dead users (issue 18, category 1): a value computed from the scores or the
probabilities that nothing uses is not another user.

A dropped ``attn.to(dtype)`` (the caller keeps only the output), an "intermediates"
record of the scores that is never returned, a dead chain of several such values: the
attention fuses, the dead values are erased with it, and the result agrees with float64
eager in every dialect (symbolic_trace, make_fx, dynamo static and dynamic), forward and
gradients. A value that is used (returned, or read by an in-place op or a dropout, which
have effects) still blocks the fusion with the reason naming it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.algebra_check import DIALECTS, check_backend, check_spelling
from tests.attn_spellings import capture, run_rewrite


def _qkv(seed=0, b=2, h=2, lq=5, lk=6, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk)]


class DroppedWeightsCast(nn.Module):
    """HF's eager attention returns ``(out, attn_weights.to(dtype))``; the caller drops the weights."""

    def forward(self, q, k, v):
        attn = F.softmax(q @ k.transpose(-1, -2) * 0.35, dim=-1, dtype=torch.float32)
        weights = attn.to(q.dtype)  # noqa: F841  (kept for output_attentions, unused here)
        return attn.to(q.dtype) @ v


class ScoresRecord(nn.Module):
    """An intermediates record of the scores that is never returned."""

    def forward(self, q, k, v):
        s = torch.matmul(q, k.mT) / 3.0
        record = {"scores": s.detach(), "row_max": s.amax(-1)}  # noqa: F841
        return torch.softmax(s, -1) @ v


class DeadChain(nn.Module):
    """Several dead values hanging off the probabilities (a debug statistic never used)."""

    def forward(self, q, k, v):
        p = (q @ k.mT * 0.35).softmax(-1)
        entropy = -(p * p.clamp_min(1e-9).log()).sum(-1)  # noqa: F841
        stat = p.detach().float().mean()  # noqa: F841
        return p @ v


class ReturnedWeights(nn.Module):
    def forward(self, q, k, v):
        p = (q @ k.mT * 0.35).softmax(-1)
        return p @ v, p.to(torch.float16)


class DeadButRandom(nn.Module):
    """An unused dropout still draws random numbers: not dead."""

    def forward(self, q, k, v):
        p = (q @ k.mT * 0.35).softmax(-1)
        F.dropout(p, 0.5, training=True)
        return p @ v


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("module", [DroppedWeightsCast, ScoresRecord])
def test_dead_users_do_not_block(module, dialect):
    res = check_spelling(module(), _qkv(), dialect)
    assert not res.report.near_misses
    _assert_nothing_dead(res.graph_module)


def _assert_nothing_dead(gm):
    """The dead values went with the attention: every node left is used."""
    unused = [n.name for n in gm.graph.nodes if not n.users and n.op not in ("output", "placeholder")]
    assert not unused, gm.code


@pytest.mark.parametrize("dialect", ["fx", "dynamo"])
def test_dead_chain(dialect):
    res = check_spelling(DeadChain(), _qkv(), dialect)
    _assert_nothing_dead(res.graph_module)


def test_backend_training():
    check_backend(DroppedWeightsCast(), _qkv())


@pytest.mark.parametrize("module,what", [(ReturnedWeights, "to"), (DeadButRandom, "dropout")])
@pytest.mark.parametrize("dialect", ["fx", "dynamo"])
def test_live_users_still_block(module, what, dialect):
    gm, ex = capture(module(), _qkv(), dialect)
    res = run_rewrite(gm, ex, strict=True)
    assert res.fused == 0
    (nm,) = res.report.near_misses
    assert nm.kind == "probs_other_users" and what in nm.reason, nm.reason
