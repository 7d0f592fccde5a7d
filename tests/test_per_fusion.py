"""A failure in one fusion costs only that fusion (issue 16, item 4).

- The rewrite checks each fusion on fake tensors and undoes only the one that fails:
  injected faults (an emitted result of the wrong shape, dtype or strides, an emitter
  that raises half-way) in one of two attention sites, in every graph dialect; the other
  site stays fused, the failed one is a ``rewrite_failed`` near miss with the error as
  reason, outputs equal eager, ``strict=True`` raises.
- The backend drops only the fusion its inner compiler rejects (a fake inner compiler
  that refuses one fused call), within a bounded number of extra compiles, and the
  report lists exactly the fusions of the graph that was compiled; graphs it restores
  stay compilable by AOTAutograd-based compilers.
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared catalog

import pytest
import torch
import torch.nn as nn

import attnfuse
import attnfuse.backend as backend_mod
from attnfuse.passes import rewrite as passes_rewrite
from attnfuse.passes.emit import Emitter
from attn_spellings import assert_outputs_close, capture, fused_nodes, run_rewrite, softmax_nodes

FUSED_OPS = (torch.ops.attnfuse.flash_attention, torch.ops.attnfuse.flash_attention.default)
SCALES = (0.35, 0.125)   # a fake inner compiler tells site 0 and site 1 apart by their scale


class TwoSites(nn.Module):
    """Two attentions, the second reading the first's output; site i scales its scores by SCALES[i]
    (a constant, except under dynamic shapes, where dynamo passes it as a tensor)."""

    def __init__(self, C=32, H=4):
        super().__init__()
        self.H = H
        self.qkv = nn.ModuleList([nn.Linear(C, 3 * C), nn.Linear(C, 3 * C)])

    def _heads(self, x):
        return x.view(x.size(0), x.size(1), self.H, x.size(2) // self.H).transpose(1, 2)

    def forward(self, x):
        B, L, C = x.size(0), x.size(1), x.size(2)
        for i in range(2):
            q, k, v = self.qkv[i](x).split(C, dim=-1)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)
            p = torch.softmax((q @ k.transpose(-2, -1)) * SCALES[i], dim=-1)
            x = (p @ v).transpose(1, 2).reshape(B, L, C)
        return x


def _inputs():
    torch.manual_seed(0)
    return TwoSites().eval(), (torch.randn(2, 6, 32),)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------
# Faults injected into the emitted region of one site
# ---------------------------------------------------------------------------

def _corrupt(em: Emitter, out, how: str):
    """An emitted result that is wrong in one respect only."""
    if how == "shape":
        return em.unsqueeze(out, 0)
    if how == "dtype":
        return em.cast(out, torch.float64)
    # strides: the same values, column-major in the last two axes
    return em.transpose_last(em.contiguous(em.transpose_last(out)))


def _break_site(monkeypatch, site: int, how: str):
    """Make the rewrite of site ``site`` (matches are fused in graph order) go wrong (``how``)."""
    real_emit = passes_rewrite._emit
    count = []

    def emit(m, em):
        out, call = real_emit(m, em)
        count.append(m)
        if len(count) - 1 == site:
            if how == "raise":
                raise RuntimeError("injected emitter failure")
            out = _corrupt(em, out, how)
        return out, call
    monkeypatch.setattr(passes_rewrite, "_emit", emit)


# every fault in the two main dialects (their values come from tensor_meta and from dynamo's
# fake mode); one in the others (make_fx's per-node fake modes, symbolic sizes)
FAULTS = [(d, h) for d in ("fx", "dynamo") for h in ("shape", "dtype", "stride")] + \
    [("aten", "stride"), ("dynamo_dynamic", "shape")]


@pytest.mark.parametrize("dialect,how", FAULTS)
@pytest.mark.parametrize("site", [0, 1])
def test_failed_check_drops_only_that_fusion(monkeypatch, dialect, how, site):
    model, inputs = _inputs()
    with torch.no_grad():
        ref = model(*inputs)
        gm, ex = capture(model, inputs, dialect)
        sites = [n.name for n in softmax_nodes(gm)]
        _break_site(monkeypatch, site, how)
        with pytest.warns(RuntimeWarning, match="left unfused"):
            result = run_rewrite(gm, ex, strict=False)
        out = gm(*ex)
    assert_outputs_close(out, ref, msg=f"{dialect} {how} site {site}")
    assert [f.softmax for f in result.report.fusions] == [sites[1 - site]], "the other site must stay fused"
    assert [n.name for n in softmax_nodes(gm)] == [sites[site]], "the failed site must be left as it was"
    failed = [m for m in result.report.near_misses if m.kind == "rewrite_failed"]
    assert [m.node for m in failed] == [sites[site]]
    assert "ReplacementMismatch" in failed[0].reason and how in failed[0].reason
    assert len(result.report.fusions) == 1 == len(fused_nodes(gm))
    assert result.report.to_dict()["totals"]["fused"] == 1


@pytest.mark.parametrize("dialect", ["fx", "dynamo"])
def test_failed_check_strict_raises(monkeypatch, dialect):
    model, inputs = _inputs()
    gm, ex = capture(model, inputs, dialect)
    _break_site(monkeypatch, 1, "shape")
    with pytest.raises(Exception, match="differs from"):
        run_rewrite(gm, ex, strict=True)


@pytest.mark.parametrize("dialect", ["fx", "aten", "dynamo"])
def test_emitter_error_is_undone(monkeypatch, dialect):
    """An emitter raising half-way leaves no node behind: with every site failing, the graph
    is exactly the original."""
    model, inputs = _inputs()
    gm, ex = capture(model, inputs, dialect)
    before = gm.code
    real_fused = Emitter.fused

    def fused(self, *args, **kwargs):
        real_fused(self, *args, **kwargs)   # nodes inserted, then a failure
        raise RuntimeError("injected emitter failure")
    monkeypatch.setattr(Emitter, "fused", fused)
    with pytest.warns(RuntimeWarning, match="injected emitter failure"):
        result = run_rewrite(gm, ex, strict=False)
    assert gm.code == before
    assert [m.kind for m in result.report.near_misses] == ["rewrite_failed"] * 2
    assert all("injected emitter failure" in m.reason for m in result.report.near_misses)
    assert not result.report.fusions and not result.report.errors
    with torch.no_grad():
        assert_outputs_close(gm(*ex), model(*inputs))


def _shape_query_model():
    class ShapeQuery(nn.Module):
        """The scores' sizes are read past the attention (a fusion re-points those reads)."""

        def forward(self, q, k, v):
            s = q @ k.transpose(-2, -1)
            n = s.size(-1)
            out = torch.softmax(s * 0.25, dim=-1) @ v
            return out * s.shape[-1] + n
    return ShapeQuery(), tuple(torch.randn(2, 3, 5, 8) for _ in range(3))


def test_undo_restores_size_queries(monkeypatch):
    """A failure after the P·V users and the size queries were re-pointed puts them back."""
    model, inputs = _shape_query_model()
    gm, ex = capture(model, inputs, "fx")
    before = gm.code
    real = passes_rewrite._replace_with_const
    calls = []

    def size_fix_then_fail(u, value):
        calls.append(u.name)
        real(u, value)
        raise RuntimeError("injected size-fix failure")
    monkeypatch.setattr(passes_rewrite, "_replace_with_const", size_fix_then_fail)
    real_size = Emitter.size

    def size(self, x, d, symbolic=False):
        if symbolic:
            raise RuntimeError("injected size-fix failure")
        return real_size(self, x, d, symbolic)
    monkeypatch.setattr(Emitter, "size", size)
    with pytest.warns(RuntimeWarning, match="injected size-fix failure"):
        result = run_rewrite(gm, ex, strict=False)
    assert [m.kind for m in result.report.near_misses] == ["rewrite_failed"]
    assert gm.code == before
    assert_outputs_close(gm(*ex), model(*inputs))


# ---------------------------------------------------------------------------
# The backend: the inner compiler rejects one fused call
# ---------------------------------------------------------------------------

class Picky:
    """An inner compiler that rejects any graph holding a fused call with one of ``bad`` scales;
    records, per compile, the scales of the fused calls it was given."""

    def __init__(self, monkeypatch, bad):
        self.bad, self.seen = set(bad), []
        real = backend_mod._inner_compiler

        def factory(name):
            inner = real(name)

            def compile_(gm, example_inputs):
                scales = sorted(round(float(n.kwargs["scale"]), 6) for n in gm.graph.nodes
                                if n.op == "call_function" and n.target in FUSED_OPS)
                self.seen.append(scales)
                if self.bad & set(scales):
                    raise RuntimeError(f"cannot lower the attention with scale {sorted(self.bad & set(scales))}")
                return inner(gm, example_inputs)
            return compile_
        monkeypatch.setattr(backend_mod, "_inner_compiler", factory)


def _compile(model, **opts):
    return torch.compile(model, backend="attnfuse", options={"inner": "eager", "impl": "torch", **opts})


@pytest.mark.parametrize("bad_site,inner", [(0, "eager"), (1, "eager"), (0, "aot_eager")])
def test_inner_compiler_rejection_drops_only_that_fusion(monkeypatch, bad_site, inner):
    model, inputs = _inputs()
    picky = Picky(monkeypatch, [SCALES[bad_site]])
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="cannot lower the attention"):
            out = _compile(model, inner=inner)(*inputs)
        ref = model(*inputs)
    assert_outputs_close(out, ref)
    good = SCALES[1 - bad_site]
    assert picky.seen[0] == sorted(SCALES) and picky.seen[-1] == [good]
    assert len(picky.seen) <= 1 + backend_mod.MAX_ISOLATION_COMPILES
    report = attnfuse.last_report()
    assert [round(float(f.scale), 6) for f in report.fusions] == [good]
    failed = [m for m in report.near_misses if m.kind == "compile_failed"]
    assert len(failed) == 1 and "cannot lower the attention" in failed[0].reason
    assert report.to_dict()["totals"]["fused"] == 1
    assert any("cannot lower the attention" in e for e in report.errors)


def test_inner_compiler_rejection_strict_raises(monkeypatch):
    model, inputs = _inputs()
    Picky(monkeypatch, [SCALES[1]])
    with pytest.raises(Exception, match="cannot lower the attention"):
        with torch.no_grad():
            _compile(model, strict=True)(*inputs)


def test_inner_compiler_rejecting_everything_compiles_unfused(monkeypatch):
    """No partially fused graph compiles: the graph dynamo produced is compiled, within the bound."""
    model, inputs = _inputs()
    picky = Picky(monkeypatch, SCALES)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="compiling it unfused"):
            out = _compile(model, inner="aot_eager")(*inputs)
        ref = model(*inputs)
    assert_outputs_close(out, ref)
    assert picky.seen[-1] == [] and len(picky.seen) <= 2 + backend_mod.MAX_ISOLATION_COMPILES
    report = attnfuse.last_report()
    assert not report.fusions
    assert sorted(m.kind for m in report.near_misses) == ["compile_failed"] * 2


@pytest.mark.parametrize("n", range(1, 11))
def test_isolate_rejected_finds_one_culprit_within_budget(n):
    """The search, on its own: one rejected fusion among n, every position."""
    budget = backend_mod.MAX_ISOLATION_COMPILES
    names = [f"s{i}" for i in range(n)]
    for culprit in names:
        calls = []

        def compile_without(dropped):
            calls.append(list(dropped))
            return None if culprit not in dropped else ("compiled", tuple(dropped))
        found = backend_mod.isolate_rejected(names, compile_without, budget)
        assert len(calls) <= budget and all(len(d) < n for d in calls)
        if n == 1:
            assert found is None and not calls   # dropping all is the caller's last resort
            continue
        assert found is not None, (n, culprit, calls)
        (_, dropped), dropped_list = found
        assert culprit in dropped_list and list(dropped) == dropped_list
        if n <= 4:
            assert dropped_list == [culprit]
        assert len(dropped_list) <= math.ceil(n / 4)
    # two culprits in different halves, or a graph that fails anyway: no success, within the budget
    calls = []
    assert backend_mod.isolate_rejected(names, lambda d: calls.append(d) or None, budget) is None
    assert len(calls) <= budget


def test_whole_graph_fallback_compiles_with_aot_autograd(monkeypatch):
    """An internal error outside any one fusion restores the graph dynamo handed over; the
    restored copy must still be a dynamo graph to AOTAutograd (``aot_eager``, ``inductor``):
    its placeholders keep ``_dynamo_source``. Before, the user's compile failed here."""
    rw = sys.modules["attnfuse.rewrite"]     # the module (attnfuse.rewrite is the function)
    real = rw.rewrite_graph

    def broken(gm, **kwargs):
        real(gm, **kwargs)
        raise RuntimeError("injected failure")
    monkeypatch.setattr(rw, "rewrite_graph", broken)
    model, inputs = _inputs()
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="injected failure"):
            out = _compile(model, inner="aot_eager")(*inputs)
        assert_outputs_close(out, model(*inputs))
    assert not attnfuse.last_report().fusions
