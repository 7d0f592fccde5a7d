"""The op written as aten ops for Inductor (``kernels/torch_inline.py``) and the backend
step that inlines small CPU calls: forward, lse and every gradient against the float64
reference, eagerly and compiled; which calls are inlined; what is saved for backward."""
from __future__ import annotations

import math

import pytest
import torch

import attnfuse
from attnfuse.backend import collect_reports
from attnfuse.kernels import torch_impl as T
from attnfuse.kernels import torch_inline as TI
from tests.reference import attention_reference, visible_keys
from tests.test_torch_impl import BF16, F32, TOL, make_bias, make_qkv


def _ref_lse(q, k, bias, keep, *, scale, softcap):
    """float64 log-sum-exp of the reference's logits (``keep``: the structural masks)."""
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s.masked_fill(~bias, -math.inf) if bias.dtype == torch.bool else s + bias.double()
    return torch.logsumexp(s.masked_fill(~keep, -math.inf), -1)


def _check(q, k, v, bias=None, *, causal="none", window=0, key_mask=None, softcap=0.0,
           scale=None, fn=None):
    """out, lse and grads of ``fn`` (default: :func:`TI.inline_attention`, eagerly)
    against the float64 reference (rows that see no key: 0 and zero gradients)."""
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    float_bias = bias is not None and bias.dtype != torch.bool
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if float_bias:
        leaves.append(bias.detach().clone().requires_grad_())
    args = (*leaves[:3], leaves[3] if float_bias else bias)
    run = fn or (lambda q, k, v, b: TI.inline_attention(
        q, k, v, b, scale, causal, 0.0, softcap, None, "auto", window, key_mask))
    out, lse = run(*args)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == F32

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rb = ref_leaves[3] if float_bias else bias
    ref = attention_reference(*ref_leaves[:3], rb, scale=scale, causal=causal, window=window,
                              key_mask=key_mask, softcap=softcap, dead_rows="zero")
    keep = visible_keys(q.shape[0], q.shape[2], k.shape[2], causal, window, key_mask)
    rl = _ref_lse(q, k, bias, keep, scale=scale, softcap=softcap)
    dead = torch.isneginf(rl)
    atol, rtol, gatol, grtol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol, rtol=rtol)
    assert bool((out[dead] == 0).all()) and bool(torch.isneginf(lse[dead]).all())
    huge = rl.abs() > 1e30  # finfo.min rows: a float32 lse is right only to ~1e31 there
    ok = ~dead & ~huge
    torch.testing.assert_close(lse.double()[ok], rl[ok], atol=1e-4 if dtype == F32 else 1e-2,
                               rtol=1e-5 if dtype == F32 else torch.finfo(dtype).eps)

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, ref_leaves, dout.double())
    for a, w, src in zip(got, want, leaves):
        assert a.shape == src.shape and a.dtype == src.dtype
        torch.testing.assert_close(a.double(), w, atol=gatol, rtol=grtol)
    assert bool((got[0][dead] == 0).all())
    return out, lse, got


# ------------------------------------------------------------------ the math, eagerly
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("causal,lq,lk", [("none", 33, 47), ("top_left", 40, 40),
                                          ("top_left", 21, 37), ("bottom_right", 21, 37),
                                          ("bottom_right", 37, 21)])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_grid(dtype, causal, lq, lk, hkv):
    q, k, v = make_qkv(2, 4, hkv, lq, lk, 16, 24, dtype)
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("shape", [(2, 4, 33, 47), (1, 1, 33, 47), (2, 1, 1, 47), (4, 1, 47),
                                   (47,), (1, 4, 33, 1)])
def test_bias(kind, shape):
    q, k, v = make_qkv(2, 4, 2, 33, 47, 16, 16, F32)
    bias = make_bias(kind, shape, F32, dead_row=len(shape) == 4, finfo_row=len(shape) == 4)
    _check(q, k, v, bias)


def test_bias_in_bf16_with_finfo_rows():
    """HF's bf16 padding bias (finfo.min rows give eager's uniform average)."""
    q, k, v = make_qkv(2, 4, 4, 33, 33, 16, 16, BF16)
    _check(q, k, v, make_bias("float", (2, 1, 33, 33), BF16), causal="top_left")


@pytest.mark.parametrize("causal,lq,lk,window", [("top_left", 40, 40, 7),
                                                 ("bottom_right", 13, 40, 9),
                                                 ("top_left", 13, 40, 1)])
def test_window(causal, lq, lk, window):
    q, k, v = make_qkv(2, 4, 2, lq, lk, 16, 16, F32)
    _check(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("causal", ["none", "top_left"])
def test_key_mask_with_an_item_that_sees_nothing(causal):
    q, k, v = make_qkv(3, 4, 2, 29, 29, 16, 16, F32)
    km = torch.ones(3, 29, dtype=torch.bool)
    km[0, 20:] = False   # right padding
    km[1, :11] = False   # left padding: with causal, rows 0..10 see no key
    km[2] = False        # no visible key at all
    out, lse, grads = _check(q, k, v, causal=causal, key_mask=km)
    assert bool((out[2] == 0).all()) and bool(torch.isneginf(lse[2]).all())
    assert bool((grads[1][2] == 0).all()) and bool((grads[2][:, :, :11] != 0).any())


def test_softcap_with_bias():
    q, k, v = make_qkv(2, 4, 4, 33, 33, 16, 16, F32)
    _check(q * 3, k, v, make_bias("float", (1, 4, 33, 33), F32), softcap=5.0,
           causal="top_left")


@pytest.mark.parametrize("layout", ["blhd", "lastdim"])
def test_non_contiguous(layout):
    q, k, v = make_qkv(2, 4, 2, 33, 33, 16, 16, F32, layout=layout)
    _check(q, k, v, causal="top_left")


def test_inline_attention_rejects_dropout():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8, 8, F32)
    with pytest.raises(ValueError, match="dropout"):
        TI.inline_attention(q, k, v, None, 0.5, "none", 0.1)


# --------------------------------------------------------------- compiled, by the backend
class Attention(torch.nn.Module):
    """A hand-written GPT-style attention (in-graph causal mask), or with a padding mask."""

    def __init__(self, causal=True, padded=False):
        super().__init__()
        self.causal, self.padded = causal, padded

    def forward(self, q, k, v, key_mask=None):
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if self.causal:
            keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
            s = s.masked_fill(~keep, float("-inf"))
        if self.padded:
            s = s.masked_fill(~key_mask[:, None, None, :], torch.finfo(s.dtype).min)
        return torch.softmax(s, dim=-1) @ v


def _compile(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="attnfuse", dynamic=False,
                         options={"strict": True, **options})


@pytest.fixture
def runtime_calls(monkeypatch):
    """Counts the calls that reach the op's runtime CPU path (forward, backward)."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = T.forward, T.backward

    def count_fwd(*a, **kw):
        calls["fwd"] += 1
        return fwd(*a, **kw)

    def count_bwd(*a, **kw):
        calls["bwd"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(T, "forward", count_fwd)
    monkeypatch.setattr(T, "backward", count_bwd)
    return calls


def _compiled_check(model, q, k, v, key_mask=None, **options) -> int:
    """Compile ``model`` with the backend, check its output and input gradients against
    the model in float64, and return how many fused calls were inlined."""
    compiled = _compile(model, **options)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with collect_reports() as reports:
        out = compiled(*leaves, key_mask)
    assert sum(len(r.fusions) for r in reports) == 1
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = model(*ref_leaves, key_mask)
    atol, rtol, gatol, grtol = TOL[q.dtype]
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol, rtol=rtol)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, ref_leaves, dout.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, atol=gatol, rtol=grtol)
    return sum(r.inlined for r in reports)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_compiled_causal_is_inlined(dtype, runtime_calls):
    """A causal call (which Inductor alone runs unfused) is inlined by default, not lowered
    to the fused kernel's call (the lowering of plain calls)."""
    from torch._inductor import config as inductor_config

    graphs = []
    q, k, v = make_qkv(2, 4, 4, 48, 48, 16, 16, dtype)
    with inductor_config.patch(post_grad_custom_post_pass=lambda g: graphs.append(
            [str(n.target) for n in g.nodes if n.op == "call_function"])):
        assert _compiled_check(Attention(), q, k, v) == 1
    assert runtime_calls == {"fwd": 0, "bwd": 0}  # Inductor's own code ran, not the op
    assert graphs and not [t for g in graphs for t in g if "flash_attention" in t], graphs


def test_compiled_padding_is_inlined(runtime_calls):
    q, k, v = make_qkv(3, 4, 4, 40, 40, 16, 16, F32)
    km = torch.ones(3, 40, dtype=torch.bool)
    km[0, 30:] = False
    km[2] = False  # every key padded: eager's uniform average, kept by the graph's fix-up
    assert _compiled_check(Attention(causal=False, padded=True), q, k, v, km) == 1
    assert runtime_calls == {"fwd": 0, "bwd": 0}


@pytest.mark.parametrize("why", ["too_large", "switched_off", "fp16"])
def test_compiled_not_inlined(why, runtime_calls, monkeypatch):
    monkeypatch.setattr(TI, "USE_FUSED_LOWERING", False)  # else one fused-kernel call (below)
    dtype = torch.float16 if why == "fp16" else F32
    if why == "too_large":
        monkeypatch.setitem(TI.INLINE_MAX_SCORES["train_banded"], F32, 2 * 4 * 48 * 48 - 1)
    q, k, v = make_qkv(2, 4, 4, 48, 48, 16, 16, dtype)
    opts = {"cpu_inline": False} if why == "switched_off" else {}
    assert _compiled_check(Attention(), q, k, v, **opts) == 0
    assert runtime_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("grad,causal", [(True, True), (True, False), (False, True),
                                         (False, False)])
def test_each_kind_of_call_has_its_own_bound(grad, causal, monkeypatch):
    """A call whose inputs require grad (under grad mode) is held to the "train" bound, or
    "train_banded" with a causal band; any other call to the "eval" bound: here only the
    bound of the kind that runs admits it."""
    kind = ("train_banded" if causal else "train") if grad else "eval"
    for k in TI.INLINE_MAX_SCORES:
        monkeypatch.setitem(TI.INLINE_MAX_SCORES[k], F32, 2 * 4 * 48 * 48 if k == kind else 0)
    monkeypatch.setattr(TI, "USE_FUSED_LOWERING", False)  # past the bound: the op, not counted
    q, k, v = make_qkv(2, 4, 4, 48, 48, 16, 16, F32)
    model = Attention(causal=causal)
    compiled = _compile(model, cpu_inline="all")  # "all": the plain call is inlined too
    q.requires_grad_()  # no_grad still makes it an inference call
    with collect_reports() as reports, torch.set_grad_enabled(grad):
        out = compiled(q, k, v)
    assert [r.inlined for r in reports] == [1]
    torch.testing.assert_close(out, model(q, k, v), atol=2e-5, rtol=2e-5)


def test_triton_impl_is_not_inlined():
    """``impl="triton"`` asks for the op's Triton kernels: such a call is never inlined."""
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, 16, F32)
    model = Attention()
    with collect_reports() as reports, torch.no_grad():
        out = _compile(model, impl="triton")(q, k, v)
    assert [len(r.fusions) for r in reports] == [1] and [r.inlined for r in reports] == [0]
    torch.testing.assert_close(out, model(q, k, v), atol=2e-5, rtol=2e-5)


def test_dynamic_shapes_guard_the_bound(runtime_calls, monkeypatch):
    """Under dynamic shapes the bound is a guard: lengths on one side share a graph, the
    first length past it recompiles once, and that graph runs the op."""
    monkeypatch.setitem(TI.INLINE_MAX_SCORES["eval"], F32, 2 * 32 * 32)
    monkeypatch.setattr(TI, "USE_FUSED_LOWERING", False)  # past the bound: the op itself
    torch._dynamo.reset()
    model = Attention()
    compiled = torch.compile(model, backend="attnfuse", options={"strict": True})
    inlined = []
    with collect_reports() as reports, torch.no_grad():
        for length in (24, 28, 40, 48, 20):
            q, k, v = make_qkv(1, 2, 2, length, length, 8, 8, F32)
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 2)  # the sequence axis, as e2e.py marks it
            torch.testing.assert_close(compiled(q, k, v), model(q, k, v), atol=2e-5, rtol=2e-5)
            inlined.append([r.inlined for r in reports])
    assert inlined == [[1], [1], [1, 0], [1, 0], [1, 0]]
    assert runtime_calls["fwd"] == 2  # lengths 40 and 48


def test_one_fused_kernel_call_is_lowered_to_it(runtime_calls, monkeypatch):
    """A call past the inline bounds that the CPU dispatcher runs as one plain call of
    PyTorch's fused kernel (BERT's and ViT's attention: no bias, mask or GQA) becomes that
    aten call in the compiled graph, forward and backward (issue 20 part 2): no custom op,
    and no copy of the output to the op's contiguous layout nor of the gradients back."""
    for kind in TI.INLINE_MAX_SCORES:
        monkeypatch.setitem(TI.INLINE_MAX_SCORES[kind], F32, 0)
    graphs = []

    def grab(graph):
        graphs.append([str(n.target) for n in graph.nodes if n.op == "call_function"])

    from torch._inductor import config as inductor_config

    q, k, v = make_qkv(2, 4, 4, 40, 40, 16, 16, F32, layout="blhd")  # as models lay them out
    with inductor_config.patch(post_grad_custom_post_pass=grab):
        assert _compiled_check(Attention(causal=False), q, k, v) == 1
    assert runtime_calls == {"fwd": 0, "bwd": 0}
    fwd, bwd = graphs
    assert [t for t in fwd if "attention" in t] == ["aten._scaled_dot_product_flash_attention_for_cpu.default"]
    assert [t for t in bwd if "attention" in t] == [
        "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"]
    assert not [t for t in fwd if "clone" in t or "copy" in t], fwd


def test_plain_bf16_calls_need_no_guard_at_the_gemm_paths_bound(monkeypatch):
    """Under dynamic shapes a plain bf16 call gets the fused-kernel call on both sides of
    the bf16 GEMM path's key bound (conftest.py's CPU has native bf16 GEMMs), so crossing
    it must not recompile: the lowering does not ask the dispatcher's plan (whose bound
    would become a guard) where the plan does not change the lowering."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    from attnfuse.kernels import torch_lowp as TL

    monkeypatch.setattr(TL, "LOWP_MAX_KEYS", 32)
    torch._dynamo.reset()
    counters.clear()
    model = Attention(causal=False)
    compiled = torch.compile(model, backend="attnfuse", options={"strict": True})
    lowered = []
    with inductor_config.patch(fx_graph_cache=False), collect_reports() as reports, torch.no_grad():
        for length in (24, 40):   # the op itself would take the bf16 GEMM path, then the fused kernel
            q, k, v = make_qkv(1, 2, 2, length, length, 8, 8, BF16)
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 2)
            out = compiled(q, k, v)
            ref = model(*(t.double() for t in (q, k, v)))
            torch.testing.assert_close(out.double(), ref, atol=TOL[BF16][0], rtol=TOL[BF16][1])
            lowered.append([r.inlined for r in reports])
    assert lowered == [[1], [1]]
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("causal,cpu_inline,lowering", [
    (False, True, "fused_kernel"),  # plain: Inductor alone fuses it, so it gets Inductor's own call
    (False, "all", "inline"),       # ... unless asked to inline every small call
])
def test_plain_calls_get_inductors_own_lowering(causal, cpu_inline, lowering, dtype):
    """A plain call that Inductor alone compiles as one fused-kernel call becomes that call
    at every size, even inside the inline bounds (inlining it costs a cold compile more C++
    kernels: benchmarks/results/compile_overhead_policy.txt); ``cpu_inline="all"`` inlines
    it (a causal call is inlined by default: :func:`test_compiled_causal_is_inlined`).
    bf16 too, where conftest.py's CPU has native bf16 GEMMs and the op itself would run
    the dispatcher's bf16 GEMM path (issue 19: the compile-cost target wins over that
    path's run time)."""
    graphs = []

    def grab(graph):
        graphs.append([str(n.target) for n in graph.nodes if n.op == "call_function"])

    from torch._inductor import config as inductor_config

    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, 8, dtype, layout="blhd")
    model = Attention(causal=causal)
    assert TI.inline_applicable(q.shape, k.shape, dtype, q.device, dropout_p=0.0, scale=0.5,
                                softcap=0.0, window=0, causal="top_left" if causal else "none",
                                training=False)
    with inductor_config.patch(post_grad_custom_post_pass=grab), collect_reports() as reports, \
            torch.no_grad():
        out = _compile(model, cpu_inline=cpu_inline)(q, k, v)
    assert [r.inlined for r in reports] == [1]
    atol, rtol = TOL[dtype][:2]
    ref = model(*(t.double() for t in (q, k, v)))
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    fwd, = graphs
    assert not [t for t in fwd if "attnfuse" in t], fwd
    fused = [t for t in fwd if "flash_attention" in t]
    if lowering == "fused_kernel":
        assert fused == ["aten._scaled_dot_product_flash_attention_for_cpu.default"], fwd
    else:
        assert not fused and "aten.exp.default" in fwd, fwd


@pytest.mark.parametrize("value", ["yes", "All", 1, None])
def test_cpu_inline_takes_a_bool_or_all(value):
    """``cpu_inline`` is True, False or "all"; anything else is a ValueError at compile."""
    from attnfuse.backend import _parse_options

    assert _parse_options({"cpu_inline": "all"})["cpu_inline"] == "all"
    with pytest.raises(ValueError, match="cpu_inline"):
        _parse_options({"cpu_inline": value})


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_saves_no_more_than_inductor_for_backward(dtype):
    """An inlined call keeps one (Lq, Lk) tensor for its backward, the probabilities in
    the input dtype: what Inductor alone keeps for the unfused graph, less its mask."""
    L = 64
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 4, 4, L, L, 16, 16, dtype))

    def saved_by(model):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size() if t.dim() >= 2 and
                         tuple(t.shape[-2:]) == (L, L) else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(q, k, v)
        return [n for n in saved if n]

    with collect_reports() as reports:
        ours = saved_by(_compile(Attention()))
    assert sum(r.inlined for r in reports) == 1
    assert ours == [4 * L * L * dtype.itemsize], ours
    inductor = saved_by(torch.compile(Attention(), dynamic=False))
    assert sum(inductor) >= sum(ours), (inductor, ours)


def test_bad_option_value():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8, 8, F32)
    with pytest.raises(Exception, match="cpu_inline"):
        _compile(Attention(), cpu_inline="yes")(q, k, v)
