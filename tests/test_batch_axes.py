"""Scores with more than two batch axes: merged into the op's (batch, head).

Windowed and multi-scale vision attention computes its scores as (B, windows, H, L, L) or
(B, H, units, L, L); the grouped-query einsum views q as (B, G, R, L, D) against k
(B, G, L, D), and einops writes the same grouping with ``rearrange``/``repeat``. Every axis
that is neither query nor key nor contracted is a batch axis (passes/batchaxes.py merges
them). Each case must fuse exactly once in every dialect (symbolic_trace, make_fx, dynamo
static and dynamic) and agree with eager run in float64, forward and backward; with
dropout in training the probability is fused as ``dropout_p``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnfuse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared catalog
from attn_spellings import capture, fused_nodes, run_rewrite  # noqa: E402

B, NW, H, N, C = 2, 3, 2, 4, 8


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class WindowAttention5d(nn.Module):
    """Windowed attention computed on (B, nW, H, N, N) scores (Swin-V2/MaxViT style blocks that
    keep windows as their own axis): a relative-position bias (H, N, N) and a shifted-window
    mask (nW, N, N) broadcast over the batch, as timm's Swin adds them."""

    def __init__(self, p=0.0):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        g = _gen(3)
        self.rel = nn.Parameter(torch.randn(H, N, N, generator=g) * 0.5)
        keep = torch.rand(NW, N, N, generator=g) > 0.3
        keep |= torch.eye(N, dtype=torch.bool)
        self.register_buffer("mask", torch.zeros(NW, N, N).masked_fill(~keep, -100.0))
        self.drop = nn.Dropout(p) if p else nn.Identity()  # dynamo traces p as a run-time float under dynamic=True

    def forward(self, x):  # x: (B, nW, N, C)
        b, nw, n, c = x.shape
        qkv = self.qkv(x).reshape(b, nw, n, 3, H, c // H).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // H) ** -0.5) @ k.transpose(-2, -1)          # (B, nW, H, N, N)
        attn = attn + self.rel + self.mask.unsqueeze(1)
        attn = self.drop(attn.softmax(dim=-1))
        return (attn @ v).transpose(2, 3).reshape(b, nw, n, c)


class MultiScaleUnits(nn.Module):
    """(B, H, units, L, L) scores with a per-head bias (H, 1, L, L) and torch.einsum."""

    def forward(self, q, k, v, bias):  # q, k, v: (B, H, U, L, D); bias: (H, 1, L, L)
        s = torch.einsum("bhuid,bhujd->bhuij", q, k) * 0.3 + bias
        return torch.einsum("bhuij,bhujd->bhuid", s.softmax(-1), v)


class GroupedEinsum5d(nn.Module):
    """The grouped-query einsum: q viewed (B, G, R, L, D) against k, v (B, G, L, D)."""

    def forward(self, q, k, v):  # q (B, Hq, L, D), k, v (B, G, L, D)
        b, h, l, d = q.shape
        qg = q.view(b, k.shape[1], h // k.shape[1], l, d)
        s = torch.einsum("bgrqd,bgkd->bgrqk", qg, k) * d ** -0.5
        o = torch.einsum("bgrqk,bgkd->bgrqd", s.softmax(-1), v)
        return o.reshape(b, h, l, d)


class EinopsRearrangeGroups(nn.Module):
    """``rearrange(q, "b s (g r) d -> b g r s d", g=G)`` and ``rearrange(k, "b s g d -> b g s d")``
    (einops 0.8, as dynamo and make_fx trace it: a reshape splitting the heads, then a
    permute); written out here so the test needs no einops."""

    def forward(self, q, k, v):  # q (B, S, Hq, D), k, v (B, S, G, D)
        b, s_, hq, d = q.shape
        g = k.shape[2]
        q = q.reshape(b, s_, g, hq // g, d).permute(0, 2, 3, 1, 4)
        k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        s = torch.einsum("bgrid,bgjd->bgrij", q, k) * 0.3
        o = torch.einsum("bgrij,bgjd->bgrid", s.softmax(-1), v)
        return o.permute(0, 3, 1, 2, 4).reshape(b, s_, hq, d)  # rearrange "b g r s d -> b s (g r) d"


class EinopsRepeatKv(nn.Module):
    """``repeat(k, "b s h d -> b s (h g) d", g=2)`` (einops 0.8 traces it as unsqueeze, expand
    of the new axis, reshape merging it into the heads): the op must read the unrepeated K/V."""

    def forward(self, q, k, v):  # q (B, S, Hq, D), k, v (B, S, Hkv, D)
        rep = q.shape[2] // k.shape[2]
        b, s_, hkv, d = k.shape
        k = torch.unsqueeze(k, 3).expand(-1, -1, -1, rep, -1).reshape(b, s_, hkv * rep, d)
        v = torch.unsqueeze(v, 3).expand(-1, -1, -1, rep, -1).reshape(b, s_, hkv * rep, d)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        return F.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v


def _window_inputs():
    return (torch.randn(B, NW, N, C, generator=_gen(1)),)


def _units_inputs():
    g = _gen(2)
    return (torch.randn(B, H, 3, N, 8, generator=g), torch.randn(B, H, 3, N + 1, 8, generator=g),
            torch.randn(B, H, 3, N + 1, 6, generator=g), torch.randn(H, 1, N, N + 1, generator=g))


def _gqa_inputs():
    g = _gen(4)
    return (torch.randn(B, 4, 5, 8, generator=g), torch.randn(B, 2, 5, 8, generator=g),
            torch.randn(B, 2, 5, 8, generator=g))


def _blhd_gqa_inputs():
    g = _gen(5)
    return (torch.randn(B, 5, 4, 8, generator=g), torch.randn(B, 5, 2, 8, generator=g),
            torch.randn(B, 5, 2, 8, generator=g))


CASES = {
    "window_5d": (WindowAttention5d, _window_inputs, None),
    "units_5d": (MultiScaleUnits, _units_inputs, None),
    "gqa_einsum_5d": (GroupedEinsum5d, _gqa_inputs, None),
    "einops_rearrange_groups": (EinopsRearrangeGroups, _blhd_gqa_inputs, None),
    "einops_repeat_kv": (EinopsRepeatKv, _blhd_gqa_inputs, 2),   # (B, S, 2 kv heads, D) read as is
}
# each case in two or three dialects (the suite's time budget); every dialect is covered twice or more
PAIRS = [("window_5d", "fx"), ("window_5d", "aten"), ("window_5d", "dynamo_dynamic"),
         ("units_5d", "aten"), ("units_5d", "dynamo"),
         ("gqa_einsum_5d", "fx"), ("gqa_einsum_5d", "dynamo_dynamic"),
         ("einops_rearrange_groups", "aten"), ("einops_rearrange_groups", "dynamo"),
         ("einops_repeat_kv", "aten"), ("einops_repeat_kv", "dynamo_dynamic")]


def _reference(mod, inputs):
    """Eager in float64: outputs and input gradients (sum of the output)."""
    m64 = mod.double()
    x64 = [x.double().requires_grad_(x.is_floating_point()) for x in inputs]
    out = m64(*x64)
    out.sum().backward()
    mod.float()
    return out.float().detach(), [x.grad.float() if x.grad is not None else None for x in x64]


@pytest.mark.parametrize("name,dialect", PAIRS)
def test_fused_exact_forward_and_backward(name, dialect):
    cls, make, kv_heads = CASES[name]
    torch.manual_seed(0)
    mod = cls().train()  # no dropout: train mode, exact gradients
    inputs = make()
    want, want_grads = _reference(mod, inputs)
    given = [x.clone() for x in inputs]
    gm, ex = capture(mod, given, dialect)
    res = run_rewrite(gm, ex, strict=True)
    fused = fused_nodes(res.graph_module)
    assert len(fused) == 1, [(m.kind, m.reason) for m in res.report.near_misses]
    if kv_heads is not None:
        gqa = res.report.fusions[0].gqa  # the repeat is undone: the op reads the kv heads as they are
        assert gqa.startswith("expand+reshape") and (dialect == "dynamo_dynamic" or f"Hkv={kv_heads}" in gqa), gqa
    # the graph's inputs in its own order (dynamo may reorder them and adds parameters)
    xs = [x.clone().requires_grad_() for x in given]
    call = [next((xs[j] for j, g in enumerate(given) if a is g), a) for a in ex]
    out = res.graph_module(*call)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    out.sum().backward()
    for x, g in zip(xs, want_grads):
        if g is not None:
            torch.testing.assert_close(x.grad, g, atol=5e-5, rtol=5e-5)


def test_backend_window_dropout_training_and_report():
    """torch.compile(backend="attnfuse"), training with dropout: one fusion with dropout_p,
    finite gradients, and the report names no near miss; then exact in eval."""
    torch.manual_seed(0)
    mod = WindowAttention5d(p=0.1).train()
    x = _window_inputs()[0].requires_grad_()
    compiled = torch.compile(mod, backend="attnfuse", options={"inner": "aot_eager"})
    out = compiled(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    rep = attnfuse.last_report()
    assert len(rep.fusions) == 1 and rep.fusions[0].dropout_p == pytest.approx(0.1), rep.to_text()
    assert not rep.near_misses, rep.to_text()
    # eval through the same compiled module: exact against eager
    mod.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), mod(x), atol=2e-5, rtol=2e-5)

