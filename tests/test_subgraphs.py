"""No silent misses (issue 16, item 5): attention inside higher-order-op bodies, and every softmax
left in a compiled graph reported with a reason.

- Activation checkpointing (``torch.utils.checkpoint``, Hugging Face's ``gradient_checkpointing_enable()``,
  ``checkpoint_wrapper``) and dynamo's ``wrap`` put a block in a body graph; the backend fuses there, and
  training through the recomputed body gives eager's gradients (float64 eager reference), dropout included
  (the backward uses the forward's mask: checked against eager with that mask).
- Bodies of other higher-order ops (``torch.cond``) are reported, not rewritten.
- A graph break between Q·Kᵀ and the softmax, or between the softmax and P·V, is a ``graph_break`` near
  miss naming the softmax and the break; a softmax over a graph input and an unrecognised softmax spelling
  are near misses too (both were silent). Every case of the spelling and near-miss catalogs also checks
  that no softmax is left in its graph without a near miss (``attn_spellings.check_case``).
"""
from __future__ import annotations

import copy
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared corpus

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

import attnfuse
from attnfuse.backend import attnfuse_backend, collect_reports

import real_models as R

HERE = os.path.abspath(__file__)


def _line(marker: str) -> int:
    """The line number in this file of the line that contains ``marker`` (a comment tag)."""
    with open(HERE, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if marker in line and "_line(" not in line:
                return i
    raise AssertionError(marker)


def graph_modules(gm: torch.fx.GraphModule) -> list:
    """(prefix, module) for ``gm`` and every GraphModule under it (higher-order-op bodies)."""
    return [(f"{name}." if name else "", m) for name, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule)]


def _fused_calls(gm: torch.fx.GraphModule) -> list:
    """(graph path, node) of every fused-op call in ``gm`` and the higher-order-op bodies under it."""
    return [(prefix, n) for prefix, mod in graph_modules(gm) for n in mod.graph.nodes
            if n.op == "call_function" and "attnfuse.flash_attention" in str(n.target)]


def _compile(fn, options: dict, graphs: list):
    """``torch.compile`` with the attnfuse backend; keeps every graph it rewrote in ``graphs``."""
    def backend(gm, example_inputs, **kw):
        graphs.append(gm)
        return attnfuse_backend(gm, example_inputs, options=options)
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend)


def _loss(out) -> torch.Tensor:
    """A fixed pseudo-random weighting of every output element, the same weights in any dtype."""
    return sum((t * torch.randn(t.shape, generator=torch.Generator().manual_seed(100 + i)).to(t.dtype)).sum()
               for i, t in enumerate(R.flatten(out)))


def _grads_close(got: dict, ref: dict, rtol: float) -> None:
    assert set(got) == set(ref)
    for name in ref:
        err = (got[name].double() - ref[name]).abs().max().item()
        scale = max(ref[name].abs().max().item(), 1e-6)
        assert err <= rtol * scale, f"{name}: gradient error {err:.3g} (max |grad| {scale:.3g})"


# ---------------------------------------------------------------------------
# Hugging Face models with gradient checkpointing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,source", [("gpt2-causal", "modeling_gpt2.py"), ("llama-causal", "modeling_llama.py")])
def test_hf_gradient_checkpointing_fuses_every_site(name, source):
    """Training with ``gradient_checkpointing_enable()``: every attention site (each in its own
    ``tag_activation_checkpoint`` body) is fused and reported at its source line; outputs and
    gradients match eager float64 (attnfuse fused 0 of 2 sites here before).

    transformers 5.25's output-capturing hooks mutate a context variable inside the checkpointed
    layer: dynamo then cannot trace the checkpoint op and runs the whole layer uncompiled (no graph
    reaches any backend; 5.23 and 5.24 trace it). The README's workaround, dynamo's
    ``skip_fwd_side_effects_in_bwd_under_checkpoint``, is what this test runs with."""
    torch.manual_seed(0)
    model, inputs, sites = R.CASES[name].build(train=True, dropout=0.0)
    model.model.gradient_checkpointing_enable()
    ref_model = copy.deepcopy(model).double()
    ref = R._run(ref_model, R._clone(inputs), train=True)
    _loss(ref).backward()
    ref_grads = R.grads(ref_model)
    with collect_reports() as reports, torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        res = R.compile_attnfuse(model, inputs, inner="aot_eager", train=True, strict=True)
        assert res.ok, res.error
        _loss(res.out).backward()
    assert res.fused == sites == 2, f"{res.fused}/{sites} fused; {res.near_misses}"
    fusions = [f for r in reports for f in r.fusions]
    assert len(fusions) == sites
    assert all(re.fullmatch(r"wrap_body_\d+\.flash_attention(_\d+)?", f.node_inserted) for f in fusions)
    assert all(f.location and f.location.split(":")[0].endswith(source) for f in fusions), fusions
    _, rel = R.errors(ref, res.out)
    assert rel <= R.TOL, rel
    g_abs, g_rel = R.grad_errors(ref_grads, R.grads(model))
    assert g_rel <= R.GRAD_TOL, (g_abs, g_rel)


# ---------------------------------------------------------------------------
# Hand-written blocks: torch.utils.checkpoint, checkpoint_wrapper, wrap
# ---------------------------------------------------------------------------

class CausalBlock(nn.Module):
    """nanoGPT-style attention: a ``tril`` buffer mask (a lifted buffer, here an operand of the
    checkpointed body), optional attention dropout."""

    def __init__(self, C=16, H=2, T=8, p=0.0):
        super().__init__()
        self.H, self.p = H, p
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)  # CausalBlock softmax
        att = F.dropout(att, self.p, self.training)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class Checkpointed(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        block = CausalBlock()
        if how == "checkpoint_wrapper":
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            block = checkpoint_wrapper(block)
        self.block, self.how = block, how

    def forward(self, x):
        if self.how == "checkpoint":
            return cp.checkpoint(self.block, x, use_reentrant=False) + x
        return self.block(x) + x


@pytest.mark.parametrize("how,inner", [("checkpoint", "eager"), ("checkpoint", "aot_eager"),
                                       ("checkpoint_wrapper", "aot_eager")])
def test_checkpointed_block_fused_with_eager_gradients(how, inner):
    """The body is rewritten: the mask buffer reaches it as an operand and is still proven causal;
    the impl option reaches the body's call; training matches eager float64."""
    torch.manual_seed(0)
    model = Checkpointed(how).train()
    x = torch.randn(2, 8, 16)
    ref_model = copy.deepcopy(model).double()
    xr = x.double().requires_grad_(True)
    ref_model(xr).pow(2).sum().backward()
    graphs = []
    xc = x.clone().requires_grad_(True)
    with collect_reports() as reports:
        out = _compile(model, {"inner": inner, "impl": "torch", "strict": True}, graphs)(xc)
    out.pow(2).sum().backward()
    calls = [c for gm in graphs for c in _fused_calls(gm)]
    assert len(calls) == 1 and calls[0][0].startswith("wrap_body_"), calls
    assert calls[0][1].kwargs["causal"] == "top_left" and calls[0][1].kwargs.get("bias") is None
    assert calls[0][1].kwargs["impl"] == "torch"
    f, = [f for r in reports for f in r.fusions]
    assert f.location == f"{HERE}:{_line('# CausalBlock softmax')}"
    torch.testing.assert_close(out.double(), ref_model(x.double()), atol=1e-5, rtol=1e-5)
    _grads_close({n: p.grad for n, p in model.named_parameters()} | {"x": xc.grad},
                 {n: p.grad for n, p in ref_model.named_parameters()} | {"x": xr.grad}, rtol=1e-5)


def _attention(q, k, v, p=0.0):
    a = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)  # _attention softmax
    return F.dropout(a, p, p > 0) @ v


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_dropout_in_checkpoint_recomputes_the_forward_mask(inner):
    """Dropout inside a checkpointed region: the backward (which recomputes the fused call) uses the
    mask of the forward, as eager checkpointing does. v = identity makes the forward's mask visible in
    its output (out = P * M / (1 - p)); the reference is eager float64 with that mask. The seed is drawn
    outside the body (under ``inner="eager"`` a seed drawn inside was drawn anew by the recompute)."""
    p = 0.3
    B, H, L = 2, 2, 8
    torch.manual_seed(0)
    q = torch.randn(B, H, L, 16, requires_grad=True)
    k = torch.randn(B, H, L, 16, requires_grad=True)
    v = torch.eye(L, 16).repeat(B, H, 1, 1).requires_grad_(True)
    w = torch.randn(B, H, L, 16)
    graphs = []
    fn = _compile(lambda q, k, v: cp.checkpoint(_attention, q, k, v, p, use_reentrant=False) * 1.0,
                  {"inner": inner, "impl": "torch", "strict": True}, graphs)
    out = fn(q, k, v)
    (out * w).sum().backward()
    calls = [c for gm in graphs for c in _fused_calls(gm)]
    assert len(calls) == 1 and calls[0][1].kwargs["dropout_p"] == p, calls
    keep = out[..., :L].detach() != 0
    assert 0.4 < keep.float().mean().item() < 0.95   # dropout did drop, and not everything
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = ((q2 @ k2.transpose(-2, -1) * 0.25).softmax(-1) * keep / (1 - p)) @ v2
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    _grads_close({"q": q.grad, "k": k.grad, "v": v.grad}, {"q": q2.grad, "k": k2.grad, "v": v2.grad}, 1e-5)


def test_wrap_body_fused():
    from torch._higher_order_ops.wrap import wrap

    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    graphs = []
    out = _compile(lambda q, k, v: wrap(_attention, q, k, v) + 1, {"inner": "aot_eager", "strict": True}, graphs)(q, k, v)
    assert len([c for gm in graphs for c in _fused_calls(gm)]) == 1
    torch.testing.assert_close(out, _attention(q, k, v) + 1, atol=1e-5, rtol=1e-5)


def test_cond_bodies_reported_not_rewritten():
    """``torch.cond`` branches are left alone (their tracing rules are their own); each softmax in them is
    a near miss at its source line, and the result is unchanged."""
    def f(q, k, v):
        return torch.cond(q.sum() > 0, _attention, lambda q, k, v: _attention(k, q, v), (q, k, v))
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    graphs = []
    with collect_reports() as reports:
        out = _compile(f, {"inner": "aot_eager", "strict": True}, graphs)(q, k, v)
    torch.testing.assert_close(out, f(q, k, v), atol=1e-5, rtol=1e-5)
    assert not [c for gm in graphs for c in _fused_calls(gm)]
    misses = [m for r in reports for m in r.near_misses]
    assert len(misses) == 2 and {m.kind for m in misses} == {"in_subgraph"}, misses
    assert all(m.location == f"{HERE}:{_line('# _attention softmax')}" and "cond" in m.reason for m in misses)
    assert {m.node.split(".")[0] for m in misses} == {"cond_true_0", "cond_false_0"}


def test_report_of_a_rewritten_body_renders():
    """Text, JSON, diff and HTML of a graph whose fusion is inside a checkpoint body."""
    graphs = []
    with collect_reports() as reports:
        _compile(Checkpointed("checkpoint").eval(), {"inner": "eager", "strict": True}, graphs)(torch.randn(2, 8, 16))
    r, = reports
    d = r.to_dict()
    f, = d["fusions"]
    assert f["node_inserted"].startswith("wrap_body_0.") and f["code"] == "att = F.softmax(att, dim=-1)  # " \
        "CausalBlock softmax"
    assert f["memory_bytes_per_call"] == 2 * 2 * 8 * 8 * 8   # (B, H, T, T) fp32 scores + probabilities
    assert any("softmax" in line for line in f["before"]) and any("flash_attention" in line for line in f["after"])
    assert "# wrap_body_0:" in r.context.before_code and "# wrap_body_0:" in r.context.after_code
    diff = r.diff()
    lines = diff.splitlines()
    assert any(x.startswith("-") and "functional.softmax" in x for x in lines), diff
    assert any(x.startswith("+    flash_attention = ") for x in lines), diff
    assert "flash_attention" in r.to_html() and "wrap_body_0.flash_attention" in r.to_text()


def test_internal_error_in_a_body_restores_every_graph(monkeypatch):
    """An internal error while rewriting a body leaves the outer graph and every body as dynamo made them."""
    import attnfuse.passes.subgraphs as S

    def boom(parent, body):
        raise RuntimeError("boom")
    monkeypatch.setattr(S, "hoist_seeds", boom)
    graphs = []
    model = Checkpointed("checkpoint").train()
    x = torch.randn(2, 8, 16)
    with pytest.warns(RuntimeWarning, match="boom"):
        out = _compile(model, {"inner": "eager"}, graphs)(x)
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-6)
    assert not [c for gm in graphs for c in _fused_calls(gm)]
    body_code = "".join(mod.code for _, mod in graph_modules(graphs[0])[1:])
    assert "softmax" in body_code and "flash_attention" not in body_code


# ---------------------------------------------------------------------------
# Graph breaks and the sweep
# ---------------------------------------------------------------------------

def _break_before_softmax(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    torch._dynamo.graph_break()  # break before softmax
    return s.softmax(-1) @ v  # softmax after the break


def _break_after_softmax(q, k, v):
    p = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)  # softmax before the break
    torch._dynamo.graph_break()  # break after softmax
    return p @ v


@pytest.mark.parametrize("fn,softmax_tag,break_tag", [
    (_break_before_softmax, "# softmax after the break", "# break before softmax"),
    (_break_after_softmax, "# softmax before the break", "# break after softmax")])
def test_graph_break_splitting_an_attention_is_reported(fn, softmax_tag, break_tag):
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    with collect_reports() as reports:
        out = _compile(fn, {"inner": "eager", "strict": True}, [])(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))
    misses = [m for r in reports for m in r.near_misses]
    assert len(misses) == 1, [r.to_text() for r in reports]
    m = misses[0]
    assert m.kind == "graph_break" and m.location == f"{HERE}:{_line(softmax_tag)}"
    assert f"graph break" in m.reason and f"{HERE}:{_line(break_tag)}" in m.reason, m.reason


def test_softmax_over_a_graph_input_is_reported():
    """match_softmax returned None (no decision, no report) for scores that are an input of the graph."""
    gm = torch.fx.symbolic_trace(lambda s, v: s.softmax(-1) @ v)
    res = attnfuse.rewrite(gm, (torch.randn(2, 8, 8), torch.randn(2, 8, 4)), strict=True)
    m, = res.report.near_misses
    assert m.kind == "no_qk_matmul" and "input of this graph" in m.reason and m.softmax == "softmax"


def test_unrecognised_softmax_spelling_is_reported():
    """``aten._safe_softmax`` (SDPA's math path; 0 for fully masked rows, so not a plain softmax): the
    op table does not know it, and the sweep reports it instead of leaving it silent."""
    def f(q, k, v):
        return torch.ops.aten._safe_softmax(q @ k.transpose(-2, -1), -1) @ v  # safe softmax
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    with collect_reports() as reports:
        _compile(f, {"inner": "eager", "strict": True}, [])(q, k, v)
    m, = [m for r in reports for m in r.near_misses]
    assert m.kind == "unsupported_op" and "_safe_softmax" in m.reason
    assert m.location == f"{HERE}:{_line('# safe softmax')}"


def test_sweep_reports_a_softmax_the_matcher_gave_no_decision(monkeypatch):
    """The backstop: a path of the matcher that returns no decision (None, as it did for a softmax over a
    graph input) still leaves a near miss for the softmax."""
    import attnfuse.passes.rewrite as PR

    monkeypatch.setattr(PR, "match_softmax", lambda *a, **k: None)
    gm = torch.fx.symbolic_trace(lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(-1) @ v)
    qkv = tuple(torch.randn(2, 8, 4) for _ in range(3))
    res = attnfuse.rewrite(gm, qkv, strict=True)
    m, = res.report.near_misses
    assert m.kind == "undecided" and m.softmax == "softmax" and "no decision" in m.reason
    torch.testing.assert_close(res.graph_module(*qkv), (qkv[0] @ qkv[1].transpose(-2, -1)).softmax(-1) @ qkv[2])
