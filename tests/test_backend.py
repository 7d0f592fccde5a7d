"""The ``torch.compile`` backend end to end on CPU (impl "torch" unless stated).

Every test compares with eager PyTorch at fp32 tolerances and checks, in the graph
handed to the inner compiler, that the attention was actually fused (so a backend
that silently fused nothing would fail).
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfuse
import attnfuse.backend as backend_mod
from attnfuse.kernels import torch_inline
from tests.reference import assert_keep_rate, attention_reference, keep_mask_from_identity_v

ATOL, RTOL = 1e-5, 1e-4
FUSED_OPS = (torch.ops.attnfuse.flash_attention, torch.ops.attnfuse.flash_attention.default)


# ---------------------------------------------------------------------------
# Small models
# ---------------------------------------------------------------------------

class NanoGPTBlock(nn.Module):
    """nanoGPT's CausalSelfAttention: tril buffer mask, attention dropout."""

    def __init__(self, C=32, H=4, block_size=64, dropout=0.0):
        super().__init__()
        self.H = H
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        # dropout=None: no dropout module (see test_dynamic_eval_dropout_is_fused)
        self.attn_dropout = nn.Dropout(dropout) if dropout is not None else nn.Identity()
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.H, C // self.H).transpose(1, 2)
        q = q.view(B, T, self.H, C // self.H).transpose(1, 2)
        v = v.view(B, T, self.H, C // self.H).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class BertSelfAttention(nn.Module):
    """HF BERT style: separate projections, additive extended mask (B, 1, 1, L)."""

    def __init__(self, C=32, H=4):
        super().__init__()
        self.H, self.d = H, C // H
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.dropout = nn.Dropout(0.1)

    def shape(self, x):
        B, L, _ = x.shape
        return x.view(B, L, self.H, self.d).permute(0, 2, 1, 3)

    def forward(self, x, attention_mask):
        ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        q, k, v = self.shape(self.query(x)), self.shape(self.key(x)), self.shape(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d)
        scores = scores + ext
        probs = nn.functional.softmax(scores, dim=-1)
        probs = self.dropout(probs)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size(0), ctx.size(1), -1)


class T5Attention(nn.Module):
    """T5 style: no scale, a learned relative-position bias (H, L, L) added to the scores."""

    def __init__(self, C=32, H=4, max_len=32):
        super().__init__()
        self.H, self.d = H, C // H
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.o = nn.Linear(C, C, bias=False)
        self.rel_bias = nn.Parameter(torch.randn(H, max_len, max_len) * 0.5)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.H, self.d).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(3, 2))
        scores = scores + self.rel_bias[:, :L, :L]
        w = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.matmul(w, v).transpose(1, 2).reshape(B, L, C)
        return self.o(out)


class AttnOnly(nn.Module):
    """Bare attention with dropout on the probabilities."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
        return F.dropout(s.softmax(dim=-1), self.p, self.training) @ v


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Recorder:
    """Replaces the inner compiler: records each graph handed to it, then runs it as ``inner``."""

    def __init__(self, monkeypatch):
        self.graphs = []
        real = backend_mod._inner_compiler

        def fake(name):
            inner = real(name)

            def compile_(gm, example_inputs):
                self.graphs.append(gm)
                return inner(gm, example_inputs)
            return compile_
        monkeypatch.setattr(backend_mod, "_inner_compiler", fake)

    def count(self, pred, i=None):
        gms = self.graphs if i is None else [self.graphs[i]]
        return sum(1 for gm in gms for n in gm.graph.nodes if n.op == "call_function" and pred(n))

    @property
    def fused(self):
        """Fused-op calls, and those handed to Inductor inlined (small CPU calls)."""
        return self.count(lambda n: n.target in FUSED_OPS) + self.inlined

    @property
    def inlined(self):
        return self.count(lambda n: n.target in (torch_inline.inline_attention, torch_inline.fused_attention))

    @property
    def softmaxes(self):
        return self.count(lambda n: "softmax" in str(n.target))


def _close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def _compile(model, **opts):
    kw = {k: opts.pop(k) for k in ("dynamic", "fullgraph") if k in opts}
    return torch.compile(model, backend="attnfuse", options={"inner": "eager", "impl": "torch", **opts}, **kw)


def _bert_inputs(B=2, L=12, C=32):
    x = torch.randn(B, L, C)
    mask = torch.ones(B, L)
    mask[0, L - 3:] = 0
    return x, mask


# ---------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", ["nanogpt", "bert"])
def test_inference_matches_eager(monkeypatch, name, inner):
    torch.manual_seed(0)
    if name == "nanogpt":
        model, inputs = NanoGPTBlock(dropout=0.2).eval(), (torch.randn(2, 16, 32),)
    else:
        model, inputs = BertSelfAttention().eval(), _bert_inputs()
    rec = Recorder(monkeypatch)
    with torch.no_grad():
        ref = model(*inputs)
        out = _compile(model, inner=inner)(*inputs)
    _close(out, ref)
    assert len(rec.graphs) == 1
    assert rec.fused == 1 and rec.softmaxes == 0, rec.graphs[0].code
    rep = attnfuse.last_report()
    assert len(rep.fusions) == 1 and rep.fusions[0].dropout_p == 0.0   # eval: dropout dropped
    assert rep.fusions[0].location and "test_backend.py" in rep.fusions[0].location


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def _grads(model, inputs, fn=None):
    """Output and parameter gradients of ``fn`` (default: ``model``) on ``inputs``."""
    model.zero_grad(set_to_none=True)
    out = (fn if fn is not None else model)(*inputs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", ["t5", "nanogpt", "bert"])
def test_training_gradients_match_eager(monkeypatch, name, inner):
    torch.manual_seed(0)
    if name == "t5":
        model, inputs = T5Attention(), (torch.randn(2, 16, 32),)
    elif name == "nanogpt":   # train mode, dropout module present with p=0
        model, inputs = NanoGPTBlock(dropout=0.0), (torch.randn(2, 16, 32),)
    else:
        model, inputs = BertSelfAttention(), _bert_inputs()
        model.dropout.p = 0.0
    model.train()
    rec = Recorder(monkeypatch)
    ref_out, ref = _grads(model, inputs)
    out, got = _grads(model, inputs, _compile(model, inner=inner))
    assert rec.fused == 1 and rec.softmaxes == 0
    _close(out, ref_out)
    assert set(got) == set(ref)
    for n in ref:
        _close(got[n], ref[n])
    if name == "t5":
        assert model.rel_bias.grad is not None and model.rel_bias.grad.abs().sum() > 0


def test_training_input_gradients(monkeypatch):
    torch.manual_seed(0)
    model = AttnOnly(0.0).train()
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    rec = Recorder(monkeypatch)
    ref = torch.autograd.grad(model(q, k, v).pow(2).sum(), (q, k, v))
    got = torch.autograd.grad(_compile(model, inner="aot_eager")(q, k, v).pow(2).sum(), (q, k, v))
    assert rec.fused == 1
    for a, b in zip(got, ref):
        _close(a, b)


def test_train_mode_dropout_is_fused_and_unbiased(monkeypatch):
    """Attention dropout in train mode is fused; v = identity makes the output the dropped
    probabilities themselves, so the keep-mask the kernel used is read back from it (not
    rebuilt with the library's generator): its keep rate is 1 - p, rows sum to 1 in
    expectation, and the output and the backward's gradients equal float64 eager
    attention with that mask."""
    torch.manual_seed(0)
    p, L = 0.5, 64
    model = AttnOnly(p).train()
    q, k = (torch.randn(2, 2, L, 8, requires_grad=True) for _ in range(2))
    v = torch.eye(L).repeat(2, 2, 1, 1).requires_grad_()   # out = dropout(P) itself
    rec = Recorder(monkeypatch)
    cm = _compile(model, inner="aot_eager")
    torch.manual_seed(1)
    out = cm(q, k, v)
    assert rec.fused == 1 and rec.count(lambda n: "dropout" in str(n.target)) == 0
    assert attnfuse.last_report().fusions[0].dropout_p == p
    keep = keep_mask_from_identity_v(out.detach(), L)
    assert_keep_rate(keep, torch.ones(1, 1, L, L, dtype=torch.bool), p)
    assert abs(out.detach().sum(-1).mean().item() - 1.0) < 0.05   # unbiased: E[row sum] = 1
    torch.manual_seed(1)
    _close(cm(q, k, v), out)                                  # seeded from torch's generator
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, dropout_mask=keep, dropout_p=p)
    _close(out.double(), ref.detach())
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, (q, k, v), dout)           # the backward regenerates the mask
    want = torch.autograd.grad(ref, leaves, dout.double())
    for a, w in zip(got, want):
        _close(a.double(), w)


# ---------------------------------------------------------------------------
# Dynamic shapes, fullgraph
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dynamic", "automatic"])
def test_dynamic_shapes_no_recompile_per_length(monkeypatch, mode):
    torch.manual_seed(0)
    model = NanoGPTBlock(dropout=None).eval()
    rec = Recorder(monkeypatch)
    cm = _compile(model, dynamic=True) if mode == "dynamic" else _compile(model)
    lengths = (8, 12, 20, 28)
    with torch.no_grad():
        for L in lengths:
            x = torch.randn(2, L, 32)
            _close(cm(x), model(x))
    # dynamic=True: one graph for all lengths; automatic: a static graph, then one dynamic graph
    assert len(rec.graphs) == (1 if mode == "dynamic" else 2)
    for i in range(len(rec.graphs)):
        assert rec.count(lambda n: n.target in FUSED_OPS, i) == 1


def test_dynamic_eval_dropout_is_fused(monkeypatch):
    model = NanoGPTBlock(dropout=0.1).eval()
    rec = Recorder(monkeypatch)
    with torch.no_grad():
        x = torch.randn(2, 12, 32)
        _close(_compile(model, dynamic=True)(x), model(x))
    assert rec.fused == 1


def test_dynamic_training_t5(monkeypatch):
    torch.manual_seed(0)
    model = T5Attention(max_len=32).train()
    rec = Recorder(monkeypatch)
    cm = _compile(model, inner="aot_eager", dynamic=True)
    for L in (10, 14, 20):
        x = torch.randn(2, L, 32)
        ref_out, ref = _grads(model, (x,))
        out, got = _grads(model, (x,), cm)
        _close(out, ref_out)
        for n in ref:
            _close(got[n], ref[n])
    assert len(rec.graphs) == 1 and rec.fused == 1


def test_fullgraph(monkeypatch):
    torch.manual_seed(0)
    model = BertSelfAttention().eval()
    rec = Recorder(monkeypatch)
    inputs = _bert_inputs()
    with torch.no_grad():
        _close(_compile(model, fullgraph=True)(*inputs), model(*inputs))
    assert len(rec.graphs) == 1 and rec.fused == 1


# ---------------------------------------------------------------------------
# Fallback, strict, options, logging, report folder
# ---------------------------------------------------------------------------

def _break_after_partial_rewrite(monkeypatch):
    rw = sys.modules["attnfuse.rewrite"]     # the module (attnfuse.rewrite is the function)
    real = rw.rewrite_graph

    def broken(gm, **kwargs):
        real(gm, **kwargs)     # mutate the graph first: the backend must restore it
        raise RuntimeError("injected failure")
    monkeypatch.setattr(rw, "rewrite_graph", broken)


def test_internal_error_falls_back_to_unchanged_graph(monkeypatch):
    torch.manual_seed(0)
    model = NanoGPTBlock().eval()
    x = torch.randn(2, 16, 32)
    _break_after_partial_rewrite(monkeypatch)
    rec = Recorder(monkeypatch)
    with pytest.warns(RuntimeWarning, match="injected failure"):
        with torch.no_grad():
            out = _compile(model)(x)
            ref = model(x)
    _close(out, ref)
    assert rec.fused == 0 and rec.softmaxes == 1
    assert any("injected failure" in e for e in attnfuse.last_report().errors)


def test_inner_compiler_failure_falls_back_to_unfused(monkeypatch):
    real = backend_mod._inner_compiler
    seen = []

    def picky(name):
        inner = real(name)

        def compile_(gm, example_inputs):
            fused = any(n.target in FUSED_OPS for n in gm.graph.nodes)
            seen.append(fused)
            if fused:
                raise RuntimeError("inner compiler rejects the fused op")
            return inner(gm, example_inputs)
        return compile_
    monkeypatch.setattr(backend_mod, "_inner_compiler", picky)
    model, x = NanoGPTBlock().eval(), torch.randn(2, 16, 32)
    with pytest.warns(RuntimeWarning, match="rejects the fused op"):
        with torch.no_grad():
            out = _compile(model)(x)
    _close(out, model(x))
    assert seen == [True, False]
    assert any("rejects the fused op" in e for e in attnfuse.last_report().errors)
    torch._dynamo.reset()
    seen.clear()
    with pytest.raises(Exception, match="rejects the fused op"):
        with torch.no_grad():
            _compile(model, strict=True)(x)


def test_internal_error_strict_raises(monkeypatch):
    _break_after_partial_rewrite(monkeypatch)
    with pytest.raises(Exception, match="injected failure"):
        with torch.no_grad():
            _compile(NanoGPTBlock().eval(), strict=True)(torch.randn(2, 16, 32))


def test_bad_options_raise():
    with pytest.raises(Exception, match="unknown attnfuse option"):
        _compile(NanoGPTBlock().eval(), min_seq_len=3)(torch.randn(1, 4, 32))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="inner"):
        _compile(NanoGPTBlock().eval(), inner="nope")(torch.randn(1, 4, 32))


def test_logging(caplog):
    model = NanoGPTBlock().eval()
    with caplog.at_level(logging.DEBUG, logger="attnfuse"):
        with torch.no_grad():
            _compile(model)(torch.randn(1, 8, 32))
    msgs = [r.getMessage() for r in caplog.records if r.name == "attnfuse"]
    info = [r.getMessage() for r in caplog.records if r.name == "attnfuse" and r.levelno == logging.INFO]
    assert len(info) == 1 and "1 fused, 0 near miss" in info[0]
    assert any(m.startswith("attnfuse: FUSED") and "test_backend.py" in m for m in msgs)


def test_near_miss_is_logged_and_left_alone(caplog, monkeypatch):
    class ReturnsWeights(nn.Module):
        def forward(self, q, k, v):
            w = (q @ k.transpose(-2, -1)).softmax(-1)
            return w @ v, w
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    rec = Recorder(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="attnfuse"):
        out = _compile(ReturnsWeights())(q, k, v)
    ref = ReturnsWeights()(q, k, v)
    _close(out[0], ref[0])
    _close(out[1], ref[1])
    assert rec.fused == 0 and len(attnfuse.last_report().near_misses) == 1
    assert any("NEAR MISS" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


@pytest.mark.parametrize("how", ["option", "env"])
def test_report_folder(tmp_path, monkeypatch, how):
    import json
    folder = tmp_path / "reports"
    if how == "env":
        monkeypatch.setenv("ATTNFUSE_REPORT", str(folder))
        opts = {}
    else:
        opts = {"report": str(folder)}
    with torch.no_grad():
        _compile(NanoGPTBlock().eval(), **opts)(torch.randn(1, 8, 32))
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and files[0].endswith(".html") and files[1].endswith(".json")
    data = json.loads((folder / files[1]).read_text())
    assert data["schema"] == "attnfuse.report/1" and data["totals"]["fused"] == 1
    assert "flash_attention" in (folder / files[0]).read_text()


# ---------------------------------------------------------------------------
# Entry point, Triton, Inductor
# ---------------------------------------------------------------------------

def test_entry_point_discovery_in_fresh_process(tmp_path):
    code = textwrap.dedent("""
        import sys, torch
        assert "attnfuse" not in sys.modules
        assert "attnfuse" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        def f(q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
        q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
        gms = []
        out = torch.compile(f, backend="attnfuse", options={"inner": "eager", "impl": "torch"})(q, k, v)
        torch.testing.assert_close(out, f(q, k, v), atol=1e-5, rtol=1e-4)
        import attnfuse
        assert len(attnfuse.last_report().fusions) == 1
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # torch's extension autoload would import attnfuse with torch (attnfuse/_autoload.py):
    # off here, so that only the torch_dynamo_backends entry point can find the backend
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-3000:]


def test_triton_impl_under_interpreter(monkeypatch):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    model = BertSelfAttention(C=16, H=2).eval()
    inputs = _bert_inputs(B=1, L=8, C=16)
    rec = Recorder(monkeypatch)
    with torch.no_grad():
        out = _compile(model, impl="triton")(*inputs)
        ref = model(*inputs)
    _close(out, ref)
    calls = [n for gm in rec.graphs for n in gm.graph.nodes if n.target in FUSED_OPS]
    assert len(calls) == 1 and calls[0].kwargs["impl"] == "triton"


def test_inductor_inner(monkeypatch):
    torch.manual_seed(0)
    model = NanoGPTBlock(C=16, H=2).eval()
    x = torch.randn(1, 8, 16)
    rec = Recorder(monkeypatch)
    with torch.no_grad():
        out = torch.compile(model, backend="attnfuse", options={"impl": "torch"})(x)   # inner defaults to inductor
        ref = model(x)
    _close(out, ref)
    assert rec.fused == 1 and rec.inlined == 1  # small and on CPU: Inductor's own kernels run it
