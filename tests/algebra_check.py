"""Shared check for the algebraic rules of issue 18 (dead users, row fills after the
softmax, the max shift, added index terms, joint causal+padding masks).

:func:`check_spelling` captures a module in a graph dialect (``fx`` = symbolic_trace,
``aten`` = make_fx, ``dynamo`` / ``dynamo_dynamic`` = what a torch.compile backend gets),
rewrites it with ``strict=True``, and compares the rewritten graph with eager PyTorch in
float64: the output and, when ``grad``, the gradients of the float inputs. It returns the
rewrite result so a test can look at the fusion and the near misses.
:func:`check_backend` does the same through ``torch.compile(backend="attnfuse")``.
"""
from __future__ import annotations

import torch

import attnfuse
from tests.attn_spellings import capture, fused_nodes, run_rewrite

DIALECTS = ("fx", "aten", "dynamo", "dynamo_dynamic")


def _float_leaves(inputs, dtype=None):
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.detach().to(dtype or x.dtype).requires_grad_()
        out.append(x)
    return out


def _compare(got_inputs, got, module, inputs, grad, tol, where=None):
    """``where[i]``: the module input that graph input ``i`` is (dynamo orders its inputs itself)."""
    ref_inputs = _float_leaves(inputs, torch.float64)
    ref = module(*ref_inputs)
    fin = torch.isfinite(ref)
    assert got.shape == ref.shape and got.dtype == inputs[0].dtype
    torch.testing.assert_close(got.double()[fin], ref.detach()[fin], atol=tol, rtol=tol)
    if not grad:
        return
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    where = list(range(len(got_inputs))) if where is None else where
    pairs = [(x, ref_inputs[j]) for x, j in zip(got_inputs, where)
             if j is not None and isinstance(x, torch.Tensor) and x.requires_grad]
    assert len(pairs) == sum(isinstance(x, torch.Tensor) and x.requires_grad for x in ref_inputs)
    leaves, ref_leaves = [a for a, _ in pairs], [b for _, b in pairs]
    got_g = torch.autograd.grad(got, leaves, g.to(got.dtype), allow_unused=True)
    ref_g = torch.autograd.grad(ref, ref_leaves, g, allow_unused=True)
    for a, w in zip(got_g, ref_g):
        if w is None:
            assert a is None or not a.abs().max() > 0
            continue
        assert a is not None and torch.isfinite(a).all(), "a gradient is missing or not finite"
        torch.testing.assert_close(a.double(), w, atol=10 * tol, rtol=10 * tol)


def check_spelling(module, inputs, dialect, *, fused=1, grad=True, tol=2e-5):
    """Rewrite ``module`` captured in ``dialect``; it must fuse ``fused`` attentions and agree
    with float64 eager (forward, and the gradients of the float inputs when ``grad``)."""
    clones = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    gm, ex = capture(module, clones, dialect)
    where = [next((j for j, c in enumerate(clones) if c is x), None) for x in ex]
    res = run_rewrite(gm, ex, strict=True)
    assert len(fused_nodes(res.graph_module)) == fused, (
        f"{dialect}: {len(fused_nodes(res.graph_module))} fused, expected {fused}; "
        f"{[(nm.kind, nm.reason) for nm in res.report.near_misses]}")
    run_inputs = _float_leaves(ex)
    out = res.graph_module(*run_inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    _compare(run_inputs, out, module, inputs, grad, tol, where)
    return res


def check_backend(module, inputs, *, fused=1, tol=2e-5, dynamic=False):
    """``torch.compile(backend="attnfuse")`` (Inductor-free inner compiler), with gradients."""
    torch._dynamo.reset()
    run_inputs = _float_leaves(inputs)
    compiled = torch.compile(module, backend="attnfuse", dynamic=dynamic, options={"inner": "aot_eager"})
    out = compiled(*run_inputs)
    rep = attnfuse.last_report()
    assert len(rep.fusions) == fused, [(nm.kind, nm.reason) for nm in rep.near_misses]
    _compare(run_inputs, out, module, inputs, True, tol)
    return rep
