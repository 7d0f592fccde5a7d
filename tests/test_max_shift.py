"""The max shift (issue 18, category 4): ``s - s.amax(-1, keepdim=True)`` before the
softmax is a no-op (softmax is shift-invariant along the key axis).

Spellings: ``amax(keepdim=True)``, ``.max(-1, keepdim=True).values`` / ``[0]``, detached
or not, ``torch.max(s, -1)[0].unsqueeze(-1)``, ``[..., None]``, the global ``s.max()``,
an in-place ``s -= ...`` and a shift after the masks (x-transformers, lucidrains'
models); all fuse in every dialect and agree with float64 eager, forward and gradients
(the non-detached max passes a gradient in eager that sums to zero over each row).
A maximum over another axis, or a row maximum subtracted before a softcap, varies the
softmax: near misses whose reasons say so.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.algebra_check import DIALECTS, check_backend, check_spelling
from tests.attn_spellings import capture, run_rewrite


def _qkv(seed=0, b=2, h=2, lq=5, lk=6, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk)]


class Amax(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) * 0.35
        s = s - s.amax(dim=-1, keepdim=True).detach()
        return s.softmax(dim=-1) @ v


class MaxValues(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("bhid,bhjd->bhij", q, k) * 0.35
        s = s - s.max(-1, keepdim=True).values  # not detached: eager's gradient through it sums to 0
        return torch.softmax(s, -1) @ v


class MaxUnsqueeze(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.mT) / 3.0
        s = s - torch.max(s, dim=-1)[0].unsqueeze(-1)
        return torch.softmax(s, -1) @ v


class MaxIndexNone(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.mT) / 3.0
        return torch.softmax(s - s.amax(-1)[..., None], -1) @ v


class GlobalMax(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.mT * 0.35
        return (s - s.max()).softmax(-1) @ v


class ShiftAfterMask(nn.Module):
    """x-transformers' Attend: causal -inf fill, then the detached row max (finite: every
    row sees a key)."""

    def forward(self, q, k, v):
        s = q @ k.mT * 0.35
        i, j = q.shape[-2], k.shape[-2]
        causal = torch.arange(j)[None, :] > torch.arange(i)[:, None] + (j - i)
        s = s.masked_fill(causal, float("-inf"))
        s = s - s.amax(dim=-1, keepdim=True).detach()
        return s.softmax(dim=-1) @ v


class InplaceShift(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.mT) * 0.35
        s -= s.amax(-1, keepdim=True)
        return s.softmax(-1) @ v


class OtherAxisMax(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.mT * 0.35
        return (s - s.amax(-2, keepdim=True)).softmax(-1) @ v


class ShiftBeforeSoftcap(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.mT * 0.35
        s = s - s.amax(-1, keepdim=True)
        return (torch.tanh(s / 5.0) * 5.0).softmax(-1) @ v


@pytest.mark.parametrize("dialect", DIALECTS)
def test_amax_detached(dialect):
    check_spelling(Amax(), _qkv(), dialect)


@pytest.mark.parametrize("module,dialect", [(m, d) for m in (MaxValues, MaxUnsqueeze, MaxIndexNone, GlobalMax,
                                                               ShiftAfterMask) for d in ("fx", "aten")] +
                         [(ShiftAfterMask, "dynamo")])
def test_spellings(module, dialect):
    res = check_spelling(module(), _qkv(), dialect)
    if module is ShiftAfterMask:
        assert res.report.fusions[0].causal == "bottom_right"


def test_inplace_shift():
    """Inference only: eager's autograd rejects the in-place subtraction of a value it saved."""
    check_spelling(InplaceShift(), _qkv(), "fx", grad=False)


def test_backend_training():
    check_backend(MaxValues(), _qkv())


@pytest.mark.parametrize("module,words", [(OtherAxisMax, "not over the key axis"),
                                          (ShiftBeforeSoftcap, "row maximum subtracted before the softcap")])
@pytest.mark.parametrize("dialect", ["fx", "aten"])
def test_declined(module, words, dialect):
    gm, ex = capture(module(), _qkv(), dialect)
    res = run_rewrite(gm, ex)
    assert res.fused == 0
    (nm,) = res.report.near_misses
    assert words in nm.reason, nm.reason
