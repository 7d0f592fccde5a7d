"""Precise near-miss reasons for softmaxes that are not one attention (issue 18, category 12;
passes/reasons.py): talking heads (timm CaiT), projected positional scores and a gated mix of
two softmaxes (timm ConViT)."""
from __future__ import annotations

import torch
from torch import nn

from tests.attn_spellings import capture, fused_nodes, run_rewrite

B, H, L, D = 2, 4, 5, 8


class TalkingHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_l, self.proj_w = nn.Linear(H, H), nn.Linear(H, H)

    def forward(self, q, k, v):
        attn = q @ k.transpose(-2, -1) * D ** -0.5
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return attn @ v


class GatedPositional(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_proj = nn.Linear(3, H)
        self.gating = nn.Parameter(torch.ones(H))
        self.register_buffer("rel", torch.randn(1, L, L, 3))

    def forward(self, q, k, v):
        patch = (q @ k.transpose(-2, -1) * D ** -0.5).softmax(dim=-1)
        pos = self.pos_proj(self.rel).expand(B, -1, -1, -1).permute(0, 3, 1, 2).softmax(dim=-1)
        g = self.gating.view(1, -1, 1, 1).sigmoid()
        attn = (1.0 - g) * patch + g * pos
        return attn @ v


def _reasons(module):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    gm, ex = capture(module, [q, k, v], "fx")
    res = run_rewrite(gm, ex, strict=True)
    assert not fused_nodes(res.graph_module)
    return [nm.reason for nm in res.report.near_misses]


def test_talking_heads_reason_names_the_head_mixing():
    reasons = _reasons(TalkingHeads())
    assert any("talking-heads" in r and "proj_l" in r for r in reasons), reasons


def test_gated_mix_of_two_softmaxes_reasons():
    reasons = _reasons(GatedPositional())
    assert any("gated mix of two softmaxes" in r for r in reasons), reasons
    assert any("not a Q·Kᵀ" in r for r in reasons), reasons
