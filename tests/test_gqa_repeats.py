"""GQA written with ``repeat_interleave`` on K/V projected from the same input as Q
(issue 18: a near miss "Q·Kᵀ pairs q axis 1 with k axis 1, which come from different
axes" while HF's expand+reshape ``repeat_kv`` of the same tensors fused).

``k.repeat_interleave(g, dim=1)`` is the tensor ``k[:, :, None].expand(.., g, ..).flatten(1, 2)``:
its head axis is Hkv's axis merged with a broadcast one (passes/axes.py ``_repeat_labels``),
which pairs with q's head axis as the expand+reshape spelling does. The fused op must read
the unrepeated K/V (Hkv heads) and agree with float64 eager in every dialect, forward and
gradients; ``repeat`` (tiling: query head h reads kv head h % Hkv) must stay exact too.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.algebra_check import DIALECTS, check_backend, check_spelling

E, HQ, HKV, HD = 16, 4, 2, 4


class Projected(nn.Module):
    def __init__(self, tile=False):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.wq = nn.Parameter(torch.randn(E, HQ * HD, generator=g) * 0.3)
        self.wk = nn.Parameter(torch.randn(E, HKV * HD, generator=g) * 0.3)
        self.wv = nn.Parameter(torch.randn(E, HKV * HD, generator=g) * 0.3)
        self.tile = tile

    def forward(self, x):
        b, n, _ = x.shape
        q = (x @ self.wq.to(x.dtype)).view(b, n, HQ, HD).transpose(1, 2)
        k = (x @ self.wk.to(x.dtype)).view(b, n, HKV, HD).transpose(1, 2)
        v = (x @ self.wv.to(x.dtype)).view(b, n, HKV, HD).transpose(1, 2)
        if self.tile:
            k, v = k.repeat(1, HQ // HKV, 1, 1), v.repeat(1, HQ // HKV, 1, 1)
        else:
            k = k.repeat_interleave(HQ // HKV, dim=1)
            v = torch.repeat_interleave(v, HQ // HKV, dim=1)
        o = torch.softmax(q @ k.transpose(-2, -1) * HD ** -0.5, dim=-1) @ v
        return o.transpose(1, 2).reshape(b, n, HQ * HD)


def _x(seed=0):
    return [torch.randn(2, 5, E, generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_repeat_interleave(dialect):
    res = check_spelling(Projected(), _x(), dialect)
    assert "Hkv=2" in res.report.fusions[0].gqa, res.report.fusions[0].gqa


@pytest.mark.parametrize("dialect", ["fx", "dynamo"])
def test_repeat_tiled(dialect):
    check_spelling(Projected(tile=True), _x(), dialect)


def test_backend_training():
    check_backend(Projected(), _x())
