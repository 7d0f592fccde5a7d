"""The part of the op's backward contract that ring attention relies on.

:mod:`attnfuse.distributed.ring` runs each chunk's backward through
``attnfuse::flash_attention_backward`` with the *global* output of each row as ``out``
and the chunk's *own* lse, and needs the backward to compute
``dS = P * (dP - rowsum(dout * out))`` with that given ``out`` (P being the chunk's own
softmax, whether a path reads it from the lse or recomputes it). This checks it on every
CPU path, each confirmed through the dispatcher's plan, against a float64
formula: float32 on every CPU path (the ring runs half-precision chunk backwards on CPU in
float32, because the bf16 path and the blocked path in half precision take the row sum
from their own block), and the Triton kernels (interpreter). It also checks the ring's
lse merge and its chunk planner.
"""
import math

import pytest
import torch

from attnfuse.distributed.ring import ChunkCall, _chunk_weight, _merge_into, step_calls
from attnfuse.kernels import torch_impl, torch_runs


def _formula(dout, q, k, v, out_given, *, scale, causal, softcap, key_mask):
    """(dq, dk, dv) in float64 with dS = P * (dP - rowsum(dout * out_given))."""
    q, k, v, dout, out_given = (t.double() for t in (q, k, v, dout, out_given))
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    raw = scale * q @ kr.transpose(-1, -2)
    s = torch.tanh(raw / softcap) * softcap if softcap else raw
    lq, lk = q.shape[2], k.shape[2]
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if causal != "none":
        off = lk - lq if causal == "bottom_right" else 0
        keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + off
    keep = keep[None, None]
    if key_mask is not None:
        keep = keep & key_mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~keep, -math.inf), -1)
    dp = dout @ vr.transpose(-1, -2)
    ds = p * (dp - (dout * out_given).sum(-1, keepdim=True))
    if softcap:
        ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
    dq = scale * ds @ kr
    dk = (scale * ds.transpose(-1, -2) @ q).unflatten(1, (-1, g)).sum(2)
    dv = (p.transpose(-1, -2) @ dout).unflatten(1, (-1, g)).sum(2)
    return dq, dk, dv


CASES = [  # (path, impl, lq, lk, d, dv, causal, softcap, key_mask)
    ("fused", "torch", 16, 16, 8, 8, "none", 0.0, False),
    ("fused", "torch", 16, 16, 8, 8, "top_left", 0.0, True),
    ("banded", "torch", 8, 16, 8, 8, "bottom_right", 0.0, True),
    ("runs", "torch", 16, 16, 8, 8, "none", 0.0, True),
    ("blocked", "torch", 8, 16, 8, 8, "bottom_right", 2.0, False),
    ("blocked", "torch", 16, 16, 8, 4, "none", 0.0, True),
    ("triton", "triton", 8, 16, 8, 8, "bottom_right", 0.0, True),
]


@pytest.mark.parametrize("path,impl,lq,lk,d,dv,causal,softcap,masked", CASES)
def test_backward_takes_rowsum_from_given_out(monkeypatch, path, impl, lq, lk, d, dv, causal,
                                              softcap, masked):
    if path == "runs":  # per-row calls even at this size
        monkeypatch.setitem(torch_runs.RUNS_MIN_SCORES, torch.float32, 1)
        monkeypatch.setattr(torch_runs, "kernel_tasks", lambda *a, **k: 1 << 20, raising=False)
    g = torch.Generator().manual_seed(len(path) + lq + dv)
    q = torch.randn(2, 4, lq, d, generator=g)
    k = torch.randn(2, 2, lk, d, generator=g)
    v = torch.randn(2, 2, lk, dv, generator=g)
    km = None
    if masked:
        km = torch.ones(2, lk, dtype=torch.bool)
        km[1, lk - 5:] = False  # one run of visible keys per row
    scale = 0.3
    out, lse = torch.ops.attnfuse.flash_attention(q, k, v, None, scale, causal, 0.0, softcap, None,
                                                  impl, 0, km)
    if impl == "torch":
        chosen = torch_impl.backward_path(q, k, v, None, lse, causal=causal, dropout_p=0.0,
                                          softcap=softcap, need_dbias=False, key_mask=km)
        assert chosen == path, f"the case meant for the {path} path runs {chosen}"
    # a different out, as the ring gives (the row's output over every chunk)
    out_given = out + 0.5 * torch.randn(out.shape, generator=g)
    dout = torch.randn(out.shape, generator=g)
    got = torch.ops.attnfuse.flash_attention_backward(dout, q, k, v, None, out_given, lse, scale,
                                                      causal, 0.0, softcap, None, impl, False, 0, km)
    want = _formula(dout, q, k, v, out_given, scale=scale, causal=causal, softcap=softcap,
                    key_mask=km)
    for name, a, b in zip(("dq", "dk", "dv"), got[:3], want):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_merge_is_softmax_over_the_union():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 5, 12, generator=g, dtype=torch.float64)
    s[0, 0, 0, :] = -math.inf          # a row that sees no key at all
    s[0, 1, 1, :7] = -math.inf         # a row that sees no key of the first part
    v = torch.randn(2, 3, 12, 4, generator=g, dtype=torch.float64)
    parts = []
    for sl in (slice(0, 7), slice(7, 12)):
        lse = torch.logsumexp(s[..., sl], -1)
        p = torch.softmax(s[..., sl], -1).nan_to_num(0.0)
        parts.append((p @ v[:, :, sl], lse))
    out, lse = (torch.zeros(2, 3, 5, 4, dtype=torch.float64),
                torch.full((2, 3, 5), -math.inf, dtype=torch.float64))
    for o, l in parts:
        _merge_into(out, lse, o.clone(), l)
    want = torch.softmax(s, -1).nan_to_num(0.0) @ v
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    w = _chunk_weight(parts[1][1], lse)
    assert w[0, 0, 0] == 0 and torch.isfinite(w).all()
    torch.testing.assert_close(w[0, 1, 1], torch.tensor(1.0, dtype=torch.float64))


def test_step_calls_cover_the_causal_triangle_once():
    """Over every step of every rank, the planned calls visit each (query, key) chunk pair
    below the diagonal once in full and each diagonal pair once causally; none above."""
    for world in (1, 2, 3, 4):
        for balanced in (True, False):
            n = 2 * world if balanced else world
            seen = {}
            for rank in range(world):
                mine = [rank, 2 * world - 1 - rank] if balanced else [rank]
                work = 0
                for s in range(world):
                    src = (rank - s) % world
                    theirs = [src, 2 * world - 1 - src] if balanced else [src]
                    for c in step_calls(mine, theirs, causal=True):
                        assert not c.diagonal or (c.q1 - c.q0, c.k1 - c.k0) == (1, 1), c
                        for a in mine[c.q0:c.q1]:
                            for b in theirs[c.k0:c.k1]:
                                assert (a, b) not in seen
                                seen[(a, b)] = "diag" if c.diagonal else "full"
                        work += (c.q1 - c.q0) * (c.k1 - c.k0)
                if balanced:
                    assert work == 2 * world + 1, (world, rank, work)
            want = {(a, b): "diag" if a == b else "full" for a in range(n) for b in range(a + 1)}
            assert seen == want, (world, balanced)
    assert step_calls([0, 3], [1, 2], causal=False) == [ChunkCall(0, 2, 0, 2, False)]
