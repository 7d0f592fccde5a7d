"""Focused tests of attnfuse.passes: the op table, axis tracking, matching and rewriting.

Broad spelling/model/fuzz coverage lives in other test files; these pin the core
behaviour of each module in every graph dialect.
"""
from __future__ import annotations

import math
import operator
import warnings

import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import attnfuse
from attnfuse.passes import axes as A
from attnfuse.passes import ops as O
from attnfuse.passes import rewrite as R

aten = torch.ops.aten


def n_fused(gm):
    return sum(1 for n in gm.graph.nodes if O.is_fused_op(n))


def fused_node(gm):
    return next(n for n in gm.graph.nodes if O.is_fused_op(n))


def dynamo_graph(model, args):
    box = {}

    def backend(gm, example_inputs):
        box["gm"], box["ex"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(*args)
    return box["gm"], box["ex"]


class Basic(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return F.softmax(s, dim=-1) @ v


class Fn(nn.Module):
    def __init__(self, f, **buffers):
        super().__init__()
        self.f = f
        for name, b in buffers.items():
            self.register_buffer(name, b)

    def forward(self, q, k, v):
        return self.f(self, q, k, v)


def qkv(b=2, h=3, lq=5, lk=5, d=8, dv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, lq, d, generator=g, dtype=dtype), torch.randn(b, h, lk, d, generator=g, dtype=dtype),
            torch.randn(b, h, lk, dv or d, generator=g, dtype=dtype))


# ---------------------------------------------------------------------------
# 1. the op table
# ---------------------------------------------------------------------------

def _kinds(gm):
    return [(O.classify(n, gm).kind, O.classify(n, gm).sub) for n in gm.graph.nodes if O.classify(n, gm)]


def test_classify_symbolic_trace_modules_and_methods():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.sm, self.drop = nn.Softmax(dim=-1), nn.Dropout(0.1)

        def forward(self, q, k, v, m):
            s = q.matmul(k.transpose(-1, -2)).masked_fill(m, float("-inf")).float()
            return self.drop(self.sm(s)).half() @ v

    gm = torch.fx.symbolic_trace(M())
    assert _kinds(gm) == [(O.LAYOUT, "transpose"), (O.MATMUL, "matmul"), (O.MASK, "masked_fill"),
                          (O.CAST, "to"), (O.SOFTMAX, "softmax"), (O.DROPOUT, "dropout"), (O.CAST, "to"),
                          (O.MATMUL, "matmul")]
    sm = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "sm")
    assert O.classify(sm, gm)["dim"] == -1
    drop = O.classify(next(n for n in gm.graph.nodes if n.target == "drop"), gm)
    assert drop["p"] == 0.1 and drop["train"] is True


def test_classify_torch_level_functions_and_inplace():
    g = torch.fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    cases = {
        g.call_function(operator.matmul, (x, y)): (O.MATMUL, "matmul", False),
        g.call_function(torch.baddbmm, (x, x, y), {"alpha": 0.5}): (O.MATMUL, "baddbmm", False),
        g.call_function(torch.einsum, ("bhqd,bhkd->bhqk", x, y)): (O.MATMUL, "einsum", False),
        g.call_function(operator.truediv, (x, 8.0)): (O.SCALE, "div", False),
        g.call_method("masked_fill_", (x, y, float("-inf"))): (O.MASK, "masked_fill", True),
        g.call_method("add_", (x, y)): (O.ADD, "add", True),
        g.call_method("div_", (x, 2.0)): (O.SCALE, "div", True),
        g.call_function(F.dropout, (x, 0.1, True, True)): (O.DROPOUT, "dropout", True),
        g.call_function(torch.tanh, (x,)): (O.ELEMENTWISE, "tanh", False),
        g.call_function(F.softmax, (x,), {"dim": -1, "dtype": torch.float32}): (O.SOFTMAX, "softmax", False),
        g.call_function(F.log_softmax, (x, -1)): (O.LOG_SOFTMAX, "log_softmax", False),
        g.call_function(getattr, (x, "mT")): (O.LAYOUT, "mT", False),
    }
    for node, (kind, sub, inplace) in cases.items():
        op = O.classify(node)
        assert (op.kind, op.sub, op.inplace) == (kind, sub, inplace), node
    sm = O.classify(next(n for n in cases if n.target is F.softmax))
    assert sm["dtype"] == torch.float32
    assert O.classify(next(n for n in cases if n.target is torch.baddbmm))["alpha"] == 0.5


def test_classify_aten_graph():
    q, k, v = qkv()
    gm = make_fx(lambda q, k, v: F.dropout(torch.softmax((q @ k.transpose(-1, -2)).float(), -1), 0.2,
                                           training=True).half() @ v.half())(q, k, v)
    kinds = {n.target.overloadpacket: O.classify(n, gm).kind for n in gm.graph.nodes
             if n.op == "call_function" and O.classify(n, gm) is not None and hasattr(n.target, "overloadpacket")}
    assert kinds[aten.bmm] == O.MATMUL
    assert kinds[aten._softmax] == O.SOFTMAX
    assert kinds[aten.expand] == O.LAYOUT and kinds[aten.view] == O.LAYOUT
    assert O.CAST in kinds.values()  # prims.convert_element_type / _to_copy
    ep = torch.export.export(nn.Sequential(nn.Dropout(0.2)).train(), (q,))
    drop = next(n for n in ep.graph.nodes if n.op == "call_function")
    op = O.classify(drop)
    assert (op.kind, op["p"], op["train"]) == (O.DROPOUT, 0.2, True)


# ---------------------------------------------------------------------------
# 2. axes
# ---------------------------------------------------------------------------

def test_view_groups_symbolic_merge_and_split():
    b, h, l, d = sympy.symbols("b h l d", positive=True, integer=True)
    assert A.view_groups((b * h, l, d), (b, h, l, d)) == [([0], [0, 1]), ([1], [2]), ([2], [3])]
    assert A.view_groups((b, l, h * d), (b, l, h, d)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert A.view_groups((4, 4, 4), (16, 4)) == [([0, 1], [0]), ([2], [1])]
    assert A.view_groups((6,), (4,)) is None


def test_labels_square_sizes_permute_is_not_transpose():
    """L == D == H: a permute(0, 2, 3, 1) pairs q's head axis with k's seq axis."""
    n = 4

    def f(q, k):
        return q @ k.permute(0, 2, 3, 1), q @ k.transpose(-1, -2)

    x = torch.randn(2, n, n, n)
    gm = make_fx(f)(x, x)
    perm = next(n_ for n_ in gm.graph.nodes if n_.target == aten.permute.default)
    tr = next(n_ for n_ in gm.graph.nodes if n_.target == aten.transpose.int)
    q = next(n_ for n_ in gm.graph.nodes if n_.op == "placeholder")
    memo = {}
    lq, lp, lt = A.labels(q, gm, memo), A.labels(perm, gm, memo), A.labels(tr, gm, memo)
    assert A.labels_conflict(lq[1], lp[1])          # head vs seq
    assert not A.labels_conflict(lq[1], lt[1])      # head vs head
    assert lt[2] == lq[3] and lt[3] == lq[2]


# ---------------------------------------------------------------------------
# 3. end to end, every dialect
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dialect", ["symbolic_trace", "make_fx", "make_fx_symbolic", "dynamo", "export"])
def test_basic_fuses_in_every_dialect(dialect):
    q, k, v = qkv()
    m = Basic()
    ref = m(q, k, v)
    args = (q, k, v)
    if dialect == "symbolic_trace":
        gm = torch.fx.symbolic_trace(m)
        res = attnfuse.rewrite(gm, args, strict=True)
    elif dialect == "make_fx":
        res = attnfuse.rewrite(make_fx(m)(q, k, v), strict=True)
    elif dialect == "make_fx_symbolic":
        res = attnfuse.rewrite(make_fx(m, tracing_mode="symbolic")(q, k, v), strict=True)
    elif dialect == "dynamo":
        gm, args = dynamo_graph(m, args)
        ref = gm(*args)[0]
        res = attnfuse.rewrite(gm, strict=True)
    else:
        res = attnfuse.rewrite(torch.export.export(m, args), strict=True)
    gm = res.graph_module
    assert n_fused(gm) == 1 and len(res.report.fusions) == 1
    assert not any(O.classify(n, gm) is not None and O.classify(n, gm).kind in (O.SOFTMAX, O.MATMUL)
                   for n in gm.graph.nodes)
    out = gm(*args)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, ref)
    if dialect == "symbolic_trace":  # math.sqrt(q.shape[-1]) stays a run-time value
        assert "run-time" in res.report.fusions[0].scale
        q2, k2, v2 = qkv(d=5)
        torch.testing.assert_close(gm(q2, k2, v2), m(q2, k2, v2))
    else:
        assert res.report.fusions[0].scale == repr(1 / math.sqrt(8))


def test_dynamic_shapes_make_fx_symbolic_runs_other_shapes():
    q, k, v = qkv()
    gm = make_fx(Basic(), tracing_mode="symbolic")(q, k, v)
    res = attnfuse.rewrite(gm, strict=True)
    assert n_fused(gm) == 1
    q2, k2, v2 = qkv(b=3, h=2, lq=7, lk=7)
    torch.testing.assert_close(gm(q2, k2, v2), Basic()(q2, k2, v2))
    assert res.report.fusions[0].causal == "none"


def test_bmm_merged_heads_and_output_layout():
    b, h, l, d = 2, 3, 5, 8

    def f(s, q, k, v):
        qq, kk, vv = (t.reshape(b * h, l, d) for t in (q, k, v))
        p = torch.softmax(torch.bmm(qq, kk.transpose(1, 2)) * 0.25, dim=-1)
        return torch.bmm(p, vv).view(b, h, l, d).transpose(1, 2).reshape(b, l, h * d)

    q, k, v = qkv(b, h, l, l, d)
    m = Fn(f)
    gm = torch.fx.symbolic_trace(m)
    attnfuse.rewrite(gm, (q, k, v), strict=True)
    assert n_fused(gm) == 1
    torch.testing.assert_close(gm(q, k, v), m(q, k, v))


def test_gqa_repeat_kv_passes_unrepeated_kv():
    def repeat_kv(x, n):
        bb, hh, ll, dd = x.shape
        return x[:, :, None, :, :].expand(bb, hh, n, ll, dd).reshape(bb, hh * n, ll, dd)

    def f(s, q, k, v):
        k, v = repeat_kv(k, 3), repeat_kv(v, 3)
        return F.softmax(q @ k.transpose(2, 3) / 4.0, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    q = torch.randn(2, 6, 5, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    m = Fn(f)
    for gm in (make_fx(m)(q, k, v), dynamo_graph(m, (q, k, v))[0]):
        res = attnfuse.rewrite(gm, strict=True)
        assert n_fused(gm) == 1
        assert not any(O.classify(n, gm) is not None and O.classify(n, gm).sub == "expand"
                       for n in gm.graph.nodes), gm.code
        assert "Hkv=2" in res.report.fusions[0].gqa
    gm = make_fx(m)(q, k, v)
    attnfuse.rewrite(gm, strict=True)
    torch.testing.assert_close(gm(q, k, v), m(q, k, v))


def test_nanogpt_tril_buffer_becomes_causal():
    def f(s, q, k, v):
        t = 5  # symbolic_trace cannot slice with a traced size
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(8))
        att = att.masked_fill(s.bias[:, :, :t, :t] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v

    m = Fn(f, bias=torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))
    q, k, v = qkv()
    # dynamo lifts the buffer to an input: proven from its values, which the caller must
    # check at run time (result.buffers_read; the backend does, tests/test_witness.py)
    gm, ex = dynamo_graph(m, (q, k, v))
    res = attnfuse.rewrite(gm, ex, strict=True)
    fus = res.report.fusions
    assert len(fus) == 1 and fus[0].causal == "top_left" and fus[0].bias == "none"
    assert [n.name for n in res.buffers_read] == ["l_self_buffers_bias_"]
    torch.testing.assert_close(gm(*ex)[0], m(q, k, v))
    # symbolic_trace computes the sliced comparison at trace time: a constant of the graph
    gm = torch.fx.symbolic_trace(m)
    fus = attnfuse.rewrite(gm, (q, k, v), strict=True).report.fusions
    assert len(fus) == 1 and fus[0].causal == "top_left" and fus[0].bias == "none"
    torch.testing.assert_close(gm(q, k, v), m(q, k, v))
    # make_fx keeps the buffer itself, which could change unchecked: it stays a mask tensor
    for gm in (make_fx(m)(q, k, v), None):
        res = attnfuse.rewrite(gm, (q, k, v), strict=True) if gm is not None else attnfuse.rewrite(m, (q, k, v))
        gm, fus = res.graph_module, res.report.fusions
        assert len(fus) == 1 and fus[0].causal == "none" and fus[0].bias != "none", fus
        assert "module state" in fus[0].masks[0] and not res.buffers_read
        out = gm(q, k, v)
        torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, m(q, k, v))


def test_inplace_mask_bias_softcap_and_dropout():
    pad = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    pad[0, ..., 3:] = True

    def f(s, q, k, v):
        a = q @ k.transpose(-1, -2)
        a = torch.tanh(a * 0.3 / 20.0) * 20.0
        a = a + s.bias
        a.masked_fill_(s.pad, float("-inf"))
        return F.dropout(F.softmax(a, -1), 0.1, training=False) @ v

    m = Fn(f, bias=torch.randn(3, 5, 5), pad=pad)
    q, k, v = qkv()
    gm = torch.fx.symbolic_trace(m)
    res = attnfuse.rewrite(gm, (q, k, v), strict=True)
    assert n_fused(gm) == 1, res.report.to_text()
    f0 = res.report.fusions[0]
    assert f0.softcap == 20.0 and float(f0.scale) == pytest.approx(0.3)
    torch.testing.assert_close(gm(q, k, v), m(q, k, v))

    def g(s, q, k, v):
        return F.dropout(F.softmax(q @ k.transpose(-1, -2), -1), 0.25, training=True) @ v

    gm = torch.fx.symbolic_trace(Fn(g))
    res = attnfuse.rewrite(gm, (q, k, v), strict=True)
    assert res.report.fusions[0].dropout_p == 0.25
    assert fused_node(gm).kwargs["seed"] is not None
    assert gm(q, k, v).shape == v.shape


# ---------------------------------------------------------------------------
# near misses: not fused, output unchanged, reason reported
# ---------------------------------------------------------------------------

NEAR = {
    "softmax_axis": lambda s, q, k, v: F.softmax(q @ k.transpose(-1, -2), dim=-2) @ v,
    "qk_contraction": lambda s, q, k, v: F.softmax(q @ k.permute(0, 2, 3, 1), dim=-1) @ v,
    "probs_other_users": lambda s, q, k, v: (lambda p: (p @ v, p))(F.softmax(q @ k.transpose(-1, -2), -1)),
    "after_softmax": lambda s, q, k, v: (F.softmax(q @ k.transpose(-1, -2), -1) * 2.0) @ v,
    "log_softmax": lambda s, q, k, v: F.log_softmax(q @ k.transpose(-1, -2), -1) @ v,
    "mask_fill_value": lambda s, q, k, v: F.softmax((q @ k.transpose(-1, -2)).masked_fill(s.m, 0.0), -1) @ v,
    "key_varying_scale": lambda s, q, k, v: F.softmax((q @ k.transpose(-1, -2)) * s.w, -1) @ v,
    "scores_other_users": lambda s, q, k, v: (lambda a: (F.softmax(a, -1) @ v, a))(q @ k.transpose(-1, -2)),
}


@pytest.mark.parametrize("kind", sorted(NEAR))
@pytest.mark.parametrize("dialect", ["symbolic_trace", "make_fx"])
def test_near_misses_square_sizes(kind, dialect):
    n = 4  # B == H == L == D: sizes cannot tell axes apart
    q, k, v = (torch.randn(n, n, n, n) for _ in range(3))
    m = Fn(NEAR[kind], m=torch.rand(n, n) > 0.5, w=torch.rand(n) + 0.5)
    ref = m(q, k, v)
    gm = torch.fx.symbolic_trace(m) if dialect == "symbolic_trace" else make_fx(m)(q, k, v)
    res = attnfuse.rewrite(gm, (q, k, v), strict=True)
    assert n_fused(gm) == 0
    assert [x.kind for x in res.report.near_misses] == [kind], res.report.to_text()
    assert res.report.near_misses[0].reason
    torch.testing.assert_close(gm(q, k, v), ref, equal_nan=True)


def test_near_miss_location_from_dynamo_stack_trace():
    gm, args = dynamo_graph(Fn(NEAR["softmax_axis"]), qkv())
    res = attnfuse.rewrite(gm, strict=True)
    loc = res.report.near_misses[0].location
    assert loc is not None and loc.startswith(__file__) and ":" in loc


# ---------------------------------------------------------------------------
# 3. rewriter properties and 4. API behaviour
# ---------------------------------------------------------------------------

def test_idempotent():
    q, k, v = qkv()
    gm = make_fx(Basic())(q, k, v)
    attnfuse.rewrite(gm, strict=True)
    code = gm.code
    res = attnfuse.rewrite(gm, strict=True)
    assert gm.code == code and not res.report.fusions and not res.report.near_misses


def test_plain_module_with_example_inputs():
    q, k, v = qkv()
    res = attnfuse.rewrite(Basic(), (q, k, v), strict=True)
    assert n_fused(res.graph_module) == 1
    torch.testing.assert_close(res.graph_module(q, k, v), Basic()(q, k, v))
    with pytest.raises(ValueError):
        attnfuse.rewrite(Basic(), strict=True)


def test_internal_error_warns_and_leaves_graph_unchanged(monkeypatch):
    q, k, v = qkv()
    gm = make_fx(Basic())(q, k, v)
    code = gm.code

    def boom(gm, **kwargs):
        m = R.find_matches(gm)[0][0]
        gm.graph.erase_node(next(iter(m.pv.users)))  # half-done damage, then fail
        raise RuntimeError("boom")

    import sys
    monkeypatch.setattr(sys.modules["attnfuse.rewrite"], "rewrite_graph", boom)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = attnfuse.rewrite(gm)
    assert any("boom" in str(x.message) for x in w)
    assert res.graph_module.code == code and n_fused(res.graph_module) == 0
    torch.testing.assert_close(res.graph_module(q, k, v), Basic()(q, k, v))
    with pytest.raises(RuntimeError, match="boom"):
        attnfuse.rewrite(make_fx(Basic())(q, k, v), strict=True)


def test_chained_attentions_and_bart_reshaped_scores():
    """Attention fed by attention (the second match reads the first's output), and
    fairseq/BART scores: bmm -> view(B, H, L, L) + mask -> view(B*H, L, L) -> softmax."""
    b, h, l, d = 2, 3, 5, 8

    def f(s, q, k, v):
        o = F.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v
        o = F.softmax(o @ k.transpose(-2, -1) * 0.3, dim=-1) @ v
        w = torch.bmm(o.reshape(b * h, l, d), k.reshape(b * h, l, d).transpose(1, 2))
        w = (w.view(b, h, l, l) + s.mask).view(b * h, l, l)
        return torch.bmm(F.softmax(w, dim=-1), v.reshape(b * h, l, d)).view(b, h, l, d)

    m = Fn(f, mask=torch.randn(b, 1, l, l))
    q, k, v = qkv(b, h, l, l, d)
    for gm in (torch.fx.symbolic_trace(m), make_fx(m)(q, k, v)):
        res = attnfuse.rewrite(gm, (q, k, v), strict=True)
        assert n_fused(gm) == 3, res.report.to_text()
        torch.testing.assert_close(gm(q, k, v), m(q, k, v))


def test_causal_proven_with_symbolic_sizes():
    def f(s, q, k, v):
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        return F.softmax((q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf")), -1) @ v

    q, k, v = qkv(lq=3, lk=6)
    gm = make_fx(Fn(f), tracing_mode="symbolic")(q, k, v)
    res = attnfuse.rewrite(gm, strict=True)
    assert res.report.fusions[0].causal == "bottom_right" and res.report.fusions[0].bias == "none"
    q2, k2, v2 = qkv(lq=4, lk=9)
    torch.testing.assert_close(gm(q2, k2, v2), Fn(f)(q2, k2, v2))


def test_not_causal_when_mask_only_looks_causal_at_the_traced_size():
    """A mask equal to tril at the traced size only (offset L - 5) must not become causal."""
    def f(s, q, k, v):
        n = q.shape[-2]
        keep = torch.arange(n)[None, :] <= torch.arange(n)[:, None] + (n - 5)
        return F.softmax((q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf")), -1) @ v

    q, k, v = qkv(lq=5, lk=5)
    gm = make_fx(Fn(f), tracing_mode="symbolic")(q, k, v)
    res = attnfuse.rewrite(gm, strict=True)
    assert all(fu.causal == "none" for fu in res.report.fusions)
    q2, k2, v2 = qkv(lq=7, lk=7)
    torch.testing.assert_close(gm(q2, k2, v2), Fn(f)(q2, k2, v2))


# ---------------------------------------------------------------------------
# lifted module buffers, dataflow-proven causal masks, dynamic scalars
# ---------------------------------------------------------------------------

class _NanoGPTAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def forward(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_lifted_tril_buffer_becomes_causal(dynamic):
    from attnfuse import backend as B
    m = _NanoGPTAttn()
    torch._dynamo.reset()
    f = torch.compile(m, backend="attnfuse", dynamic=dynamic, options={"inner": "eager"})
    q, k, v = qkv(lq=6, lk=6)
    torch.testing.assert_close(f(q, k, v), m(q, k, v))
    fus = B.last_report().fusions
    assert len(fus) == 1 and fus[0].causal == "top_left" and fus[0].bias == "none"
    q, k, v = qkv(lq=4, lk=4)
    torch.testing.assert_close(f(q, k, v), m(q, k, v))


def test_lifted_buffer_read_but_user_input_mask_never():
    from attnfuse.passes import consts as C

    def f(s, q, k, v, m):
        att = (q @ k.transpose(-2, -1)).masked_fill(m == 0, float("-inf"))
        att = att.masked_fill(s.bias[:, :, :5, :5] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v

    class M(Fn):
        def forward(self, q, k, v, m):
            return self.f(self, q, k, v, m)

    mod = M(f, bias=torch.tril(torch.ones(8, 8)).view(1, 1, 8, 8))
    q, k, v = qkv()
    tril = torch.tril(torch.ones(5, 5))  # a user input that happens to be causal stays a mask
    box = {}

    def backend(gm, ex):  # dynamo drops meta["grapharg"] once its backend returns
        box["kinds"] = {n.name: C.is_module_buffer_placeholder(n) for n in gm.graph.nodes if n.op == "placeholder"}
        box["res"] = attnfuse.rewrite(gm, ex, strict=True)
        assert not hasattr(gm, C.BUFFER_VALUES_ATTR)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(mod, backend=backend, fullgraph=True)(q, k, v, tril)
    kinds = box["kinds"]
    assert sum(kinds.values()) == 1 and [k_ for k_, b in kinds.items() if b][0].endswith("bias_"), kinds
    fus = box["res"].report.fusions
    assert len(fus) == 1 and fus[0].causal == "top_left" and fus[0].bias != "none"
    torch.testing.assert_close(out, mod(q, k, v, tril))


def _fx(f, *args):
    gm = torch.fx.symbolic_trace(Fn(f))
    return gm, attnfuse.rewrite(gm, args, strict=True).report


def test_symbolic_trace_arange_masks_proven_causal_by_dataflow():
    def top_left(s, q, k, v):
        i = torch.arange(q.size(-2), device=q.device)
        j = torch.arange(k.size(-2), device=q.device)
        return F.softmax((q @ k.transpose(-2, -1)).masked_fill(j[None, :] > i[:, None], float("-inf")), -1) @ v

    def bottom_right(s, q, k, v):
        lq, lk = q.shape[2], k.shape[2]
        keep = torch.arange(lk).view(1, -1) <= torch.arange(lq).view(-1, 1) + (lk - lq)
        return F.softmax(torch.where(keep, q @ k.transpose(-2, -1), torch.tensor(float("-inf"))), -1) @ v

    for f, want, (lq, lk) in ((top_left, "top_left", (5, 5)), (bottom_right, "bottom_right", (3, 6))):
        gm, rep = _fx(f, *qkv(lq=lq, lk=lk))
        assert [(fu.causal, fu.bias) for fu in rep.fusions] == [(want, "none")], rep.to_text()
        for lq2, lk2 in ((lq, lk), (2, 7), (4, 4)):  # the graph runs at any size: so must the proof
            q, k, v = qkv(lq=lq2, lk=lk2)
            torch.testing.assert_close(gm(q, k, v), Fn(f)(q, k, v))


def test_symbolic_trace_triu_of_shared_length_is_causal_but_of_q_length_only_is_not():
    class SelfAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qp, self.kp, self.vp = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            t = x.size(1)
            q, k, v = self.qp(x), self.kp(x), self.vp(x)
            future = torch.triu(torch.ones((t, t), dtype=torch.bool, device=x.device), diagonal=1)
            return F.softmax((q @ k.transpose(-2, -1)).masked_fill(future, float("-inf")), -1) @ v

    torch.manual_seed(0)
    m = SelfAttn()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(2, 5, 8)
    rep = attnfuse.rewrite(gm, (x,), strict=True).report
    assert [(fu.causal, fu.bias) for fu in rep.fusions] == [("top_left", "none")], rep.to_text()
    for t in (5, 3, 1):
        x = torch.randn(2, t, 8)
        torch.testing.assert_close(gm(x), m(x))

    def q_only(s, q, k, v):  # Lk may differ from Lq (e.g. Lq == 1 broadcasts the 1x1 mask): not causal
        t = q.size(2)
        future = torch.triu(torch.ones((t, t), dtype=torch.bool), diagonal=1)
        return F.softmax((q @ k.transpose(-2, -1)).masked_fill(future, float("-inf")), -1) @ v

    gm, rep = _fx(q_only, *qkv())
    assert [fu.causal for fu in rep.fusions] == ["none"], rep.to_text()
    for lq, lk in ((5, 5), (1, 4)):
        q, k, v = qkv(lq=lq, lk=lk)
        torch.testing.assert_close(gm(q, k, v), Fn(q_only)(q, k, v))

    def shifted(s, q, k, v):  # equal to tril at L == 5 only
        n = q.size(2)
        keep = torch.arange(k.size(2))[None, :] <= torch.arange(n)[:, None] + (n - 5)
        return F.softmax((q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf")), -1) @ v

    gm, rep = _fx(shifted, *qkv())
    assert [fu.causal for fu in rep.fusions] == ["none"], rep.to_text()
    q, k, v = qkv(lq=7, lk=7)
    torch.testing.assert_close(gm(q, k, v), Fn(shifted)(q, k, v))


def test_eval_dropout_with_traced_p_under_dynamic_shapes_is_dropped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.1)

        def forward(self, q, k, v):
            return self.drop(F.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1)) @ v

    m = M().eval()
    box = {}

    def capture(gm, ex):
        box["res"] = attnfuse.rewrite(gm, ex, strict=True)
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(m, backend=capture, dynamic=True)
    q, k, v = qkv(lq=6, lk=6)
    out = f(q, k, v)
    rep = box["res"].report
    assert len(rep.fusions) == 1 and rep.fusions[0].dropout_p == 0.0 and not rep.near_misses, rep.to_text()
    gm = box["res"].graph_module
    assert not any(n.op == "call_method" and n.target == "item" for n in gm.graph.nodes)
    torch.testing.assert_close(out, m(q, k, v))
    q, k, v = qkv(lq=3, lk=9)
    torch.testing.assert_close(f(q, k, v), m(q, k, v))


def test_baddbmm_symfloat_alpha_becomes_a_runtime_scale():
    class Bloom(nn.Module):
        def forward(self, q, kt, v, alibi):
            s = alibi.baddbmm(batch1=q, batch2=kt, beta=1.0, alpha=1 / math.sqrt(q.size(-1)))
            return torch.bmm(F.softmax(s, -1), v)

    m = Bloom()
    box = {}

    def capture(gm, ex):
        box["res"] = attnfuse.rewrite(gm, ex, strict=True)
        return gm.forward

    def inputs(n, L, D):
        g = torch.Generator().manual_seed(L)
        return (torch.randn(n, L, D, generator=g), torch.randn(n, D, L, generator=g),
                torch.randn(n, L, D, generator=g), torch.randn(n, 1, L, generator=g))

    torch._dynamo.reset()
    f = torch.compile(m, backend=capture, dynamic=True)
    args = inputs(6, 5, 8)
    torch.testing.assert_close(f(*args), m(*args))
    rep = box["res"].report
    assert len(rep.fusions) == 1 and "run-time" in rep.fusions[0].scale, rep.to_text()
    args = inputs(4, 7, 16)  # another head dim: the scale is read at run time
    torch.testing.assert_close(f(*args), m(*args))


def test_symbolic_trace_fill_with_dtype_read_from_the_scores_is_constant_folded():
    def gpt2(s, q, k, v):
        w = q @ k.transpose(-1, -2)
        mask_value = torch.full([], torch.finfo(torch.float32).min, dtype=w.dtype)
        return F.softmax(torch.where(s.keep[:, :, :5, :5], w, mask_value.to(w.dtype)), dim=-1) @ v

    keep = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    keep[..., 2] = False  # a key-padding-like pattern: a bool mask, not causal
    m = Fn(gpt2, keep=keep)
    q, k, v = qkv()
    gm = torch.fx.symbolic_trace(m)
    rep = attnfuse.rewrite(gm, (q, k, v), strict=True).report
    assert len(rep.fusions) == 1 and not rep.near_misses, rep.to_text()
    torch.testing.assert_close(gm(q, k, v), m(q, k, v))


def test_sliding_window_masks_are_windows_not_plain_causal():
    """Causal at every small size, a band of width W past it: never plain causal (the proof
    probes at sizes around W); proven a window of width W at every size tried."""
    W = 20

    def window(s, q, k, v):
        i = torch.arange(q.size(-2))[:, None]
        j = torch.arange(k.size(-2))[None, :]
        keep = (j <= i) & (j > i - W)
        return F.softmax((q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf")), -1) @ v

    gm, rep = _fx(window, *qkv())
    assert [(fu.causal, fu.window, fu.bias) for fu in rep.fusions] == [("top_left", W, "none")], rep.to_text()
    q, k, v = qkv(b=1, h=1, lq=30, lk=30)
    torch.testing.assert_close(gm(q, k, v), Fn(window)(q, k, v))

    class Buf(nn.Module):  # a lifted buffer that stops being triangular at row W, under dynamic=True
        def __init__(self):
            super().__init__()
            ones = torch.ones(32, 32)
            self.register_buffer("bias", (torch.tril(ones) - torch.tril(ones, -W)).view(1, 1, 32, 32))

        def forward(self, q, k, v):
            t = q.size(-2)
            att = (q @ k.transpose(-2, -1)).masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            return F.softmax(att, dim=-1) @ v

    from attnfuse import backend as B
    m = Buf()
    torch._dynamo.reset()
    f = torch.compile(m, backend="attnfuse", dynamic=True, options={"inner": "eager"})
    q, k, v = qkv(lq=6, lk=6)
    torch.testing.assert_close(f(q, k, v), m(q, k, v))
    assert [(fu.causal, fu.window) for fu in B.last_report().fusions] == [("top_left", W)]
    q, k, v = qkv(b=1, h=1, lq=30, lk=30)
    torch.testing.assert_close(f(q, k, v), m(q, k, v))


# ---------------------------------------------------------------------------
# Falcon with ALiBi: (scores + alibi) *= c, an additive mask, probs.view(same shape) @ V
# ---------------------------------------------------------------------------

class _FalconAlibiLike(nn.Module):
    """modeling_falcon.py's eager ALiBi path, reduced: Q·Kᵀ viewed to its own shape, the
    ALiBi bias (stored as (B·H, 1, L)) added *before* the in-place scale, and the
    probabilities viewed to their own shape before P·V."""

    def __init__(self, b=2, h=4, lq=6, d=8, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.inv_norm_factor = 1.0 / math.sqrt(d)  # a constant, as in Falcon
        slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)])
        alibi = slopes[:, None] * torch.arange(lq, dtype=torch.float32)[None]   # (H, L)
        self.register_buffer("alibi", alibi[None].expand(b, h, lq).reshape(b * h, 1, lq).clone())
        mask = torch.triu(torch.full((lq, lq), torch.finfo(torch.float32).min), 1)
        self.register_buffer("mask", mask[None, None].expand(b, 1, lq, lq).clone())

    def forward(self, q, k, v):
        b, h, lq, d = q.shape
        scores = (q @ k.transpose(-1, -2)).view(b, h, lq, -1)
        logits = scores + self.alibi.view(b, h, 1, -1)
        if self.inplace:
            logits *= self.inv_norm_factor
        else:
            logits = logits * self.inv_norm_factor
        probs = F.softmax(logits + self.mask, dim=-1, dtype=torch.float32)
        probs = F.dropout(probs, 0.0, False, False)
        return probs.view(b, h, lq, -1) @ v


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("dialect", ["dynamo", "make_fx", "symbolic_trace"])
def test_falcon_alibi_scale_after_bias_and_probs_view(dialect, inplace):
    q, k, v = qkv(b=2, h=4, lq=6, lk=6, d=8)
    m = _FalconAlibiLike(inplace=inplace)
    ref = m(q, k, v)
    args = (q, k, v)
    if dialect == "dynamo":
        gm, args = dynamo_graph(m, args)
        res = attnfuse.rewrite(gm, strict=True)
    elif dialect == "make_fx":
        gm = make_fx(m)(q, k, v)
        res = attnfuse.rewrite(gm, strict=True)
    else:
        gm = torch.fx.symbolic_trace(m)
        res = attnfuse.rewrite(gm, args, strict=True)
    gm = res.graph_module
    assert n_fused(gm) == 1 and not res.report.near_misses, res.report.to_text()
    assert float(res.report.fusions[0].scale) == pytest.approx(1 / math.sqrt(8))
    out = gm(*args)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, ref)


NEAR_FALCON = {
    # the probabilities viewed so that P·V contracts the query axis, not the key axis
    "pv_contraction": lambda s, q, k, v: F.softmax(q @ k.transpose(-1, -2), -1)
    .transpose(-1, -2).contiguous().view(q.shape[0], q.shape[1], q.shape[2], -1) @ v,
    # softcap, then bias, then scale: the scale would have to reach inside the tanh
    "unsupported_op": lambda s, q, k, v: F.softmax(
        (torch.tanh((q @ k.transpose(-1, -2)) / 20.0) * 20.0 + s.w) * 0.5, -1).view(q.shape) @ v,
}


@pytest.mark.parametrize("kind", sorted(NEAR_FALCON))
@pytest.mark.parametrize("dialect", ["dynamo", "make_fx", "symbolic_trace"])
def test_falcon_like_probs_view_and_scale_after_bias_near_misses(kind, dialect):
    n = 4  # B == H == L == D: sizes cannot tell axes apart
    q, k, v = (torch.randn(n, n, n, n) for _ in range(3))
    m = Fn(NEAR_FALCON[kind], w=torch.randn(n, n))
    ref = m(q, k, v)
    args = (q, k, v)
    if dialect == "dynamo":
        gm, args = dynamo_graph(m, args)
        ref = gm(*args)
        ref = ref[0] if isinstance(ref, (tuple, list)) else ref
        res = attnfuse.rewrite(gm, strict=True)
    else:
        gm = torch.fx.symbolic_trace(m) if dialect == "symbolic_trace" else make_fx(m)(q, k, v)
        res = attnfuse.rewrite(gm, args, strict=True)
    gm = res.graph_module
    assert n_fused(gm) == 0
    assert [x.kind for x in res.report.near_misses] == [kind], res.report.to_text()
    out = gm(*args)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, ref)
