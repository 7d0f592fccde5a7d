"""ALiBi as structure in the fused op (``alibi_slopes``): the CPU path and the Triton
forward, backward and decode kernels (interpreter) against an eager float64 reference
that materialises the FlashAttention-2 term ``-slope * |i + Lk - Lq - j|``; validation,
the fake kernel, and the no-gradient contract for slopes.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernel modules are imported

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import attnfuse
from attnfuse.kernels import torch_impl
from attnfuse.kernels import triton_decode as td
from tests.interp_probe import launched_lists  # noqa: F401
from tests.reference import assert_close_rel, attention_reference


def alibi_dense(slopes, b, hq, lq, lk):
    """The ALiBi term as a dense float64 (B|1, Hq, Lq, Lk) tensor, written from its
    definition (independent of the kernels' block helper)."""
    i = torch.arange(lq, dtype=torch.float64)[:, None]
    j = torch.arange(lk, dtype=torch.float64)[None, :]
    dist = (i + lk - lq - j).abs()
    s = slopes.double()
    s = s[None] if s.dim() == 1 else s
    return -s[:, :, None, None] * dist


def _inputs(b=2, hq=4, hkv=2, lq=9, lk=13, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    return q, k, v, g


def _ref(q, k, v, slopes, bias=None, **kw):
    b, hq, lq, _ = q.shape
    term = alibi_dense(slopes, b, hq, lq, k.shape[2])
    if bias is not None:
        term = term + bias.double()
    return attention_reference(q, k, v, term, dead_rows="zero", **kw)


CASES = [
    # slopes shape, causal, window, key_mask, softcap, float bias, Lq, Lk
    ("h", "none", 0, False, 0.0, False, 9, 13),
    ("bh", "bottom_right", 0, True, 0.0, False, 9, 13),
    ("h", "top_left", 3, False, 4.0, True, 13, 13),
    ("bh", "bottom_right", 0, False, 0.0, False, 1, 13),
]


def _case_inputs(case):
    shape, causal, window, use_km, softcap, use_bias, lq, lk = case
    q, k, v, g = _inputs(lq=lq, lk=lk)
    b, hq = q.shape[:2]
    slopes = torch.rand((hq,) if shape == "h" else (b, hq), generator=g) * 0.5
    km = None
    if use_km:
        km = torch.rand(b, lk, generator=g) > 0.3
        km[:, -1] = True
    bias = torch.randn(1, hq, lq, lk, generator=g) if use_bias else None
    kw = dict(causal=causal, window=window, key_mask=km, softcap=softcap)
    return q, k, v, slopes, bias, kw


# every case on the CPU path; the interpreter (slow) runs two that together cover both
# slope shapes, every causal mode but none, a window, a key_mask, softcap and a bias
RUNS = [("torch", c) for c in CASES] + [("triton", CASES[1]), ("triton", CASES[2])]


@pytest.mark.parametrize("impl,case", RUNS, ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else c)
def test_alibi_forward_and_grads_match_float64_reference(impl, case):
    q, k, v, slopes, bias, kw = _case_inputs(case)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
    out = attnfuse.flash_attention(*leaves, bias, impl=impl, alibi_slopes=slopes, **kw)
    ref = _ref(*ref_leaves, slopes, bias, **kw)
    assert_close_rel(out, ref, 2e-4, "out")
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for name, t, r in zip("qkv", leaves, ref_leaves):
        assert_close_rel(t.grad, r.grad, 5e-4, f"d{name}")


def test_alibi_changes_the_output():
    """The slopes reach the kernels (a test of the tests: zero slopes differ)."""
    q, k, v, _ = _inputs(b=1, lq=4, lk=6)
    slopes = torch.full((4,), 0.5)
    for impl in ("torch", "triton"):
        a = attnfuse.flash_attention(q, k, v, impl=impl, alibi_slopes=slopes)
        b = attnfuse.flash_attention(q, k, v, impl=impl, alibi_slopes=torch.zeros(4))
        assert (a - b).abs().max() > 1e-2, impl
        torch.testing.assert_close(b, attnfuse.flash_attention(q, k, v, impl=impl))


def test_key_position_alibi_equals_the_op_under_bottom_right_causal():
    """The matcher's equivalence, checked numerically: under bottom-right causal, the
    models' key-position-only term ``slope * (j + c_b)`` (any per-batch shift) gives the
    op's output with ``alibi_slopes``."""
    q, k, v, g = _inputs(lq=5, lk=11)
    slopes = torch.rand(4, generator=g)
    shift = torch.tensor([-3.0, 7.0]).view(2, 1, 1, 1)
    j = torch.arange(11, dtype=torch.float64)
    model_term = slopes.double().view(1, 4, 1, 1) * (j + shift)   # (B, H, 1, Lk)
    ref = attention_reference(q, k, v, model_term, causal="bottom_right")
    out = attnfuse.flash_attention(q, k, v, causal="bottom_right", impl="torch",
                                   alibi_slopes=slopes)
    assert_close_rel(out, ref, 2e-4, "out")


def test_triton_decode_kernel_with_alibi():
    """The split-KV decode kernel (few rows, many keys, several splits) with GQA rows
    packed per kv head, each with its own head's slope."""
    q, k, v, g = _inputs(b=2, hq=4, hkv=2, lq=2, lk=40)
    slopes = torch.rand(2, 4, generator=g)
    km = torch.rand(2, 40, generator=g) > 0.2
    out, lse = td.decode_forward(q, k, v, None, scale=0.25, causal="bottom_right", softcap=0.0,
                                 key_mask=km, splits=2, alibi_slopes=slopes)
    ref = _ref(q, k, v, slopes, scale=0.25, causal="bottom_right", key_mask=km)
    assert_close_rel(out, ref, 2e-4, "decode out")
    term = alibi_dense(slopes, 2, 4, 2, 40) + torch.where(km, 0.0, float("-inf"))[:, None, None]
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25 + term
    s = s.masked_fill(torch.ones(2, 40, dtype=torch.bool).triu(40 - 2 + 1), float("-inf"))
    assert_close_rel(lse, torch.logsumexp(s, -1), 2e-5, "decode lse")


def test_cpu_plan_never_materialises_alibi():
    q, k, v, _ = _inputs()
    plan = torch_impl.forward_plan(q, k, v, None, causal="none", dropout_p=0.0,
                                   softcap=0.0, alibi_slopes=torch.ones(4))
    assert plan.path == "blocked" and "ALiBi" in plan.why   # no causal band: the term per block


@pytest.mark.parametrize("slopes,err,match", [
    (torch.ones(4, dtype=torch.float64), TypeError, "float32"),
    (torch.ones(3), ValueError, r"\(Hq,\)"),
    (torch.ones(3, 4), ValueError, r"\(B, Hq\)"),
])
def test_alibi_validation(slopes, err, match):
    q, k, v, _ = _inputs()
    with pytest.raises(err, match=match):
        attnfuse.flash_attention(q, k, v, alibi_slopes=slopes)
    with pytest.raises(err, match=match):   # the graph-level op and its fake kernel too
        with FakeTensorMode(allow_non_fake_inputs=True):
            torch.ops.attnfuse.flash_attention(q, k, v, None, 0.25, "none", 0.0, 0.0, None,
                                               "torch", 0, None, None, slopes)


def test_slopes_that_require_grad_raise():
    q, k, v, _ = _inputs()
    slopes = torch.ones(4, requires_grad=True)
    with pytest.raises(ValueError, match="must not require grad"):
        attnfuse.flash_attention(q, k, v, alibi_slopes=slopes)
    with pytest.raises(ValueError, match="must not require grad"):
        torch.ops.attnfuse.flash_attention(q, k, v, None, 0.25, "none", 0.0, 0.0, None,
                                           "torch", 0, None, None, slopes)
    with torch.no_grad():   # no autograd: nothing to refuse
        attnfuse.flash_attention(q, k, v, alibi_slopes=slopes)


def test_fake_kernel_shapes():
    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 9, 16), torch.empty(2, 2, 13, 16), torch.empty(2, 2, 13, 8)
        out, lse = torch.ops.attnfuse.flash_attention(q, k, v, None, 0.25, "top_left", 0.0,
                                                      0.0, None, "torch", 0, None, None,
                                                      torch.empty(2, 4))
        assert out.shape == (2, 4, 9, 8) and lse.shape == (2, 4, 9)


def test_inline_lowering_keeps_alibi():
    """The ATen lowering (the backend's small-call inlining for Inductor, and
    attnfuse.export's decomposition) computes the ALiBi term too, with gradients."""
    from attnfuse.export import _decomposition

    q, k, v, slopes, bias, kw = _case_inputs(CASES[1])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = _decomposition(*leaves, None, 0.25, kw["causal"], 0.0, 0.0, None, "auto", 0,
                            kw["key_mask"], None, slopes)
    ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
    ref = _ref(*ref_leaves, slopes, scale=0.25, causal=kw["causal"], key_mask=kw["key_mask"])
    assert_close_rel(out, ref, 2e-4, "inline out")
    out.sum().backward()
    ref.sum().backward()
    assert_close_rel(leaves[1].grad, ref_leaves[1].grad, 5e-4, "inline dk")


def test_cpu_causal_alibi_runs_as_a_key_bias_with_the_ops_lse():
    """Under a causal mask that hides every key right of the bottom-right diagonal, the CPU
    path passes ALiBi as a broadcast (B|1, Hq, 1, Lk) key bias (PyTorch's fused kernel for
    top-left Lq == Lk, the models' case) and shifts the lse back: out, lse and gradients
    are the FA2 definition's."""
    for causal, lq in (("top_left", 10), ("bottom_right", 6)):
        q, k, v, g = _inputs(lq=lq, lk=10)
        slopes = torch.rand(2, 4, generator=g)
        plan = torch_impl.forward_plan(q, k, v, None, causal=causal, dropout_p=0.0,
                                       softcap=0.0, alibi_slopes=slopes)
        assert causal != "top_left" or plan.path == "fused", plan
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = torch.ops.attnfuse.flash_attention(*leaves, None, 0.25, causal, 0.0, 0.0,
                                                      None, "torch", 0, None, None, slopes)
        ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
        ref = _ref(*ref_leaves, slopes, scale=0.25, causal=causal)
        assert_close_rel(out, ref, 2e-4, f"out {causal}")
        term = alibi_dense(slopes, 2, 4, lq, 10)
        s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25 + term
        s = s.masked_fill(torch.ones(lq, 10, dtype=torch.bool).triu(10 - lq + 1), float("-inf"))
        assert_close_rel(lse, torch.logsumexp(s, -1), 2e-5, f"lse {causal}")
        grad = torch.randn_like(ref)
        out.backward(grad.float())
        ref.backward(grad)
        for name, t, r in zip("qkv", leaves, ref_leaves):
            assert_close_rel(t.grad, r.grad, 5e-4, f"d{name} {causal}")


def test_triton_alibi_picks_the_heavy_config_lists(launched_lists):
    """ALiBi's per-tile index arithmetic spills registers with the plain lists' tiles
    (benchmarks/kernel_resources.py), so every forward and backward kernel of an ALiBi
    call takes the "heavy" config lists; sinks alone keep the plain ones."""
    from attnfuse.kernels import triton_flash as tf

    picked = launched_lists
    q, k, v, _ = _inputs(b=1, hq=2, hkv=2, lq=5, lk=7)
    opts = dict(scale=0.25, causal="none", dropout_p=0.0, softcap=0.0, seed=0)
    slopes = torch.tensor([0.5, 0.25])
    out, lse = tf.forward(q, k, v, None, alibi_slopes=slopes, decode=False, **opts)
    tf.backward(torch.ones_like(out), q, k, v, None, out, lse, need_dbias=False,
                alibi_slopes=slopes, **opts)
    assert picked == [(n, True) for n in ("attn_fwd", "attn_bwd_preprocess",
                                          "attn_bwd_dkdv", "attn_bwd_dq")]
    picked.clear()
    tf.forward(q, k, v, None, sinks=torch.tensor([0.1, -0.2]), decode=False, **opts)
    assert picked == [("attn_fwd", False)]
