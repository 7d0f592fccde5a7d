"""Masks built from the values of a graph input (issue 18, category 11's second half).

Hugging Face 5.x, given ``position_ids``, builds its causal mask as
``position_ids[b, kv] <= position_ids[b, q]`` (and, for packed sequences, a same-document
factor from ``cumsum(diff(position_ids) != 1)``): causal only when the positions rise by one
along each row, a fact of the input's values at run time, not of the graph. Such a mask is
fused as the float bias it is (exact against float64 eager, forward and gradients), and the
fusion's note says precisely why it is not structure: which graph input it was built from.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.algebra_check import check_spelling

L = 6


class PositionCausal(nn.Module):
    """The Hugging Face 5.x mask with position_ids, packed-sequence factor included."""

    def forward(self, q, k, v, pos):
        first = pos[:, :1] - 1
        psm = (torch.diff(pos, prepend=first, dim=-1) != 1).cumsum(-1)
        b = torch.arange(pos.shape[0])[:, None, None, None]
        qi = torch.arange(L)[None, None, :, None]
        ki = torch.arange(L)[None, None, None, :]
        keep = (pos[b, ki] <= pos[b, qi]) & (psm[b, qi] == psm[b, ki])
        mask = torch.where(keep, torch.tensor(0.0, dtype=q.dtype), torch.finfo(q.dtype).min)  # eager_mask
        return torch.softmax(q @ k.mT * 0.35 + mask, dim=-1) @ v


@pytest.mark.parametrize("dialect", ["aten", "dynamo"])
def test_position_mask_is_a_bias_with_its_reason(dialect):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, L, 8, generator=g) for _ in range(3))
    pos = torch.stack([torch.arange(L) + 3, torch.cat([torch.arange(2), torch.arange(L - 2)])])  # offset, packed
    res = check_spelling(PositionCausal(), [q, k, v, pos], dialect)
    (f,) = res.report.fusions
    assert f.causal == "none" and f.bias != "none"
    assert any("run-time values of the graph input" in n for n in f.masks), f.masks


def test_position_mask_gets_its_causal_band_at_run_time(monkeypatch):
    """With the run-time derivations on (GPU fusions), the position mask also gives the op
    its causal band: offset 0 in both items (offset positions and a packed pair of
    sequences both hide every key j > i), so the kernels skip the blocks above the
    diagonal; still exact against float64 eager, output and gradients."""
    from attnfuse.passes import inputmask
    from tests.attn_spellings import capture, fused_nodes, intermediate_value, run_rewrite

    monkeypatch.setattr(inputmask, "DERIVE_ON_CPU", True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, L, 8, generator=g) for _ in range(3))
    pos = torch.stack([torch.arange(L) + 3, torch.cat([torch.arange(2), torch.arange(L - 2)])])
    check_spelling(PositionCausal(), [q, k, v, pos], "dynamo")
    gm, ex = capture(PositionCausal(), [q, k, v, pos], "aten")
    res = run_rewrite(gm, ex, strict=True)
    (call,) = fused_nodes(res.graph_module)
    assert intermediate_value(res.graph_module, call.kwargs["causal_offsets"], ex).tolist() == [0, 0]
