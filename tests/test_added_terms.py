"""Integer and bool tensors added to the scores: fused, with eager's type promotion.

``softmax(q @ k.mT + m)`` with ``m`` int64 / int32 / int16 / int8 / uint8 (a
``tril(ones(..., dtype=long))`` mask added as 0/1, a relative position ``q_idx - kv_idx``
from ``arange``) or bool (added as 0/1, not a keep-mask) is legal eager PyTorch: the
addition converts ``m`` to the scores' dtype. The rewriter does exactly that in the
graph (the op takes float and bool biases only, and a bool *bias* means keep/mask);
these calls used to be fused with the raw integer bias and raise at every run.

Each case is compared with eager in float64 (the term promoted to float64 there) and
must fuse; the fp16 case checks the promotion's rounding to the scores' dtype.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

import attnfuse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared catalog
from attn_spellings import capture, fused_nodes  # noqa: E402

INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
L = 8


def _qkv(dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, L, 8, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


class AddedInput(nn.Module):
    """``softmax(q·kᵀ·c + m) · v`` with ``m`` an input (any dtype)."""

    def forward(self, q, k, v, m):
        return torch.softmax(q @ k.mT * 0.35 + m, dim=-1) @ v


class SubtractedInput(nn.Module):
    def forward(self, q, k, v, m):
        return torch.softmax(q @ k.mT * 0.35 - m, dim=-1) @ v


class RelativePosition(nn.Module):
    """A relative-position bias built in the graph as ``q_idx - kv_idx`` (int64)."""

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2], device=q.device)
        j = torch.arange(k.shape[-2], device=q.device)
        return torch.softmax(q @ k.mT * 0.35 + (i[:, None] - j[None, :]), dim=-1) @ v


class TrilBuffer(nn.Module):
    """A 0/1 ``tril`` of longs kept as a buffer and added (not masked_fill'ed)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("tri", torch.tril(torch.ones(L, L, dtype=torch.long)))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.mT * 0.35 + self.tri, dim=-1) @ v


def _term(dtype):
    if dtype == torch.bool:
        return torch.tril(torch.ones(L, L, dtype=torch.bool))
    if dtype == torch.uint8:
        return torch.tril(torch.ones(L, L, dtype=dtype)) * 3
    i = torch.arange(L)
    return (i[:, None] - i[None, :]).to(dtype)


def _eager64(module, q, k, v, *rest):
    return module(q.double(), k.double(), v.double(), *rest)


@pytest.mark.parametrize("module,dtype", [(AddedInput, d) for d in INT_DTYPES + [torch.bool]] +
                         [(SubtractedInput, d) for d in (torch.int64, torch.uint8)])  # no bool subtraction
def test_backend_promotes_the_added_term(module, dtype):
    mod = module()
    q, k, v = _qkv(grad=True)
    m = _term(dtype)
    torch._dynamo.reset()
    out = torch.compile(mod, backend="attnfuse", options={"inner": "aot_eager"})(q, k, v, m)
    assert len(attnfuse.last_report().fusions) == 1
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _eager64(mod, q64, k64, v64, m)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("module,cpu_inline", [(RelativePosition, False), (TrilBuffer, True)],
                         ids=["RelativePosition-op", "TrilBuffer-inlined"])
def test_backend_inductor(module, cpu_inline):
    """Through the default inner compiler (Inductor), terms built inside the model; the
    fused call either runs as the op (what raised) or is inlined as aten ops for Inductor
    (small CPU calls, the default)."""
    mod = module()
    q, k, v = _qkv()
    torch._dynamo.reset()
    out = torch.compile(mod, backend="attnfuse", options={"cpu_inline": cpu_inline})(q, k, v)
    assert len(attnfuse.last_report().fusions) == 1
    torch.testing.assert_close(out.double(), _eager64(mod, q, k, v), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dialect,dtype", [(a, d) for a in ("fx", "aten") for d in INT_DTYPES + [torch.bool]] +
                         [("dynamo", d) for d in (torch.int64, torch.uint8, torch.bool)])
def test_rewrite_promotes_the_added_term(dialect, dtype):
    mod = AddedInput()
    q, k, v = _qkv()
    m = _term(dtype)
    gm, inputs = capture(mod, (q, k, v, m), dialect)
    res = attnfuse.rewrite(gm, list(inputs), strict=True)
    assert res.fused == 1 and len(fused_nodes(res.graph_module)) == 1
    out = res.graph_module(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out  # a dynamo graph returns a tuple
    torch.testing.assert_close(out.double(), _eager64(mod, q, k, v, m), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dialect", ["fx", "aten"])
def test_rewrite_relative_position_in_the_graph(dialect):
    mod = RelativePosition()
    q, k, v = _qkv()
    gm, inputs = capture(mod, (q, k, v), dialect)
    res = attnfuse.rewrite(gm, list(inputs), strict=True)
    assert res.fused == 1
    torch.testing.assert_close(res.graph_module(*inputs).double(), _eager64(mod, q, k, v),
                               atol=2e-6, rtol=2e-6)


def test_promotion_rounds_to_the_scores_dtype():
    """Eager converts the integers to the scores' dtype before adding: in fp16, 2049 is
    2048 and 2050 stays. The fused call makes the same conversion (compared with float64
    eager on the converted term; the op adds in fp32, where eager also rounds the sum)."""
    mod = AddedInput()
    q, k, v = _qkv(torch.float16)
    m = torch.full((L, L), 2049, dtype=torch.int64)
    m[:, ::2] = 2050
    torch._dynamo.reset()
    out = torch.compile(mod, backend="attnfuse", options={"inner": "aot_eager"})(q, k, v, m)
    assert len(attnfuse.last_report().fusions) == 1
    ref = _eager64(mod, q, k, v, m.to(torch.float16).double())
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)
    unrounded = _eager64(mod, q, k, v, m.double())
    assert (unrounded - ref).abs().max() > 0.1


# ---- issue 18, category 3: a bool term constant along the keys is a softmax no-op ----------------

class AllTrue(nn.Module):
    """``s + ones(L, L, dtype=bool)``: all True, a constant of the graph."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.mT * 0.35 + torch.ones(L, L, dtype=torch.bool), dim=-1) @ v


class RowBool(nn.Module):
    """A per-row bool input (B, 1, Lq, 1): it broadcasts along the keys."""

    def forward(self, q, k, v, rows):
        return torch.softmax(q @ k.mT * 0.35 + rows, dim=-1) @ v


@pytest.mark.parametrize("module,extra", [(AllTrue, None), (RowBool, "rows"), (AddedInput, "int_rows")])
@pytest.mark.parametrize("dialect", ["fx", "aten", "dynamo", "dynamo_dynamic"])
def test_key_constant_bool_is_dropped(module, extra, dialect):
    """Fused with no bias where the term is a proven no-op; an integer input (it may overflow the
    scores' dtype) stays a cast bias. Both agree with float64 eager, forward and gradients."""
    from algebra_check import check_spelling
    g = torch.Generator().manual_seed(3)
    inputs = _qkv()
    if extra == "rows":
        inputs.append(torch.rand(2, 1, L, 1, generator=g) > 0.5)
    elif extra == "int_rows":
        inputs.append(torch.randint(0, 5, (2, 1, L, 1), generator=g))
    res = check_spelling(module(), inputs, dialect)
    (f,) = res.report.fusions
    if extra == "int_rows":
        assert f.bias != "none", f.bias
    else:
        assert f.bias == "none" and any("softmax no-op" in n for n in f.masks), (f.bias, f.masks)
