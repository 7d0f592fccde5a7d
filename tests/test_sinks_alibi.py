"""Attention sinks and ALiBi slopes in one call (issue 22: both op arguments together, as
the merged op allows): out, lse and the gradients of q, k, v and the sinks against a
float64 gpt-oss-style reference whose scores carry the dense ALiBi term, on the CPU
paths and the Triton kernels (interpreter).  The CPU backward then takes the blocked
path (the key-bias form of ALiBi shifts the lse the sink's share is computed from).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernel modules are imported

import math

import pytest
import torch

from tests.reference import assert_close_rel
from tests.test_alibi_op import alibi_dense
from tests.test_sinks import sink_reference

CASES = [
    # impl, causal, lq, lk, slopes per batch
    ("torch", "top_left", 11, 11, False),      # without sinks: ALiBi as a key bias (fused)
    ("torch", "none", 7, 12, True),
    ("triton", "bottom_right", 9, 20, False),
]


@pytest.mark.parametrize("impl,causal,lq,lk,per_batch", CASES)
def test_sinks_with_alibi_match_the_reference(impl, causal, lq, lk, per_batch):
    g = torch.Generator().manual_seed(7)
    b, hq, hkv, d = 2, 4, 2, 16
    mk = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()
    q, k, v, sinks = mk(b, hq, lq, d), mk(b, hkv, lk, d), mk(b, hkv, lk, d), mk(hq)
    slopes = torch.rand((b, hq) if per_batch else (hq,), generator=g)
    scale = 1.0 / math.sqrt(d)
    out, lse = torch.ops.attnfuse.flash_attention(q, k, v, None, scale, causal, 0.0, 0.0, None,
                                                  impl, 0, None, sinks, slopes)
    ref, ref_lse = sink_reference(q, k, v, sinks, alibi_dense(slopes, b, hq, lq, lk),
                                  causal=causal)
    assert_close_rel(out, ref, 2e-5, "out")
    assert_close_rel(lse, ref_lse, 2e-5, "lse")
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v, sinks), dout.float())
    want = torch.autograd.grad(ref, (q, k, v, sinks), dout)
    for name, a, e in zip(("dq", "dk", "dv", "dsinks"), got, want):
        assert_close_rel(a, e, 5e-5, name)
