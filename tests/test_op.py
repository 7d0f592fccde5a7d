"""The public op: validation errors, autograd through both impls, torch.compile and make_fx."""
from __future__ import annotations

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import attnfuse
from tests.reference import attention_reference

IMPLS = ["torch", "triton"]


def _qkv(B=2, Hq=4, Hkv=2, Lq=19, Lk=23, D=16, Dv=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=dtype)
    return q, k, v


# ---------------------------------------------------------------------------
# Bad input: clear errors naming the argument, raised before any kernel runs
# ---------------------------------------------------------------------------

def _bad_cases():
    q, k, v = _qkv()
    return [
        ("rank", (q[0], k, v), {}, ValueError, "q must be a 4-D"),
        ("rank_k", (q, k[0], v), {}, ValueError, "k must be a 4-D"),
        ("not_tensor", (q.tolist(), k, v), {}, TypeError, "q must be a torch.Tensor"),
        ("int_dtype", (q.long(), k.long(), v.long()), {}, TypeError, "q must be float32"),
        ("mixed_dtype", (q, k.half(), v), {}, TypeError, "k has dtype"),
        ("head_dim", (q, k[..., :8], v), {}, ValueError, "head dim"),
        ("kv_len", (q, k, v[:, :, :5]), {}, ValueError, "v must be"),
        ("batch", (q, k[:1], v[:1]), {}, ValueError, "batch sizes differ"),
        ("gqa", (q[:, :3], k, v), {}, ValueError, "multiple of"),
        ("head_dim_max", (torch.randn(1, 1, 2, 300), torch.randn(1, 1, 2, 300), torch.randn(1, 1, 2, 4)), {},
         ValueError, "1..256"),
        ("bias_shape", (q, k, v, torch.randn(19, 22)), {}, ValueError, "does not broadcast"),
        ("bias_rank", (q, k, v, torch.randn(1, 1, 1, 19, 23)), {}, ValueError, "does not broadcast"),
        ("bias_dtype", (q, k, v, torch.ones(19, 23, dtype=torch.int64)), {}, TypeError, "bias must be a float"),
        ("dropout_hi", (q, k, v), {"dropout_p": 1.0}, ValueError, "dropout_p must be in"),
        ("dropout_lo", (q, k, v), {"dropout_p": -0.1}, ValueError, "dropout_p must be in"),
        ("causal", (q, k, v), {"causal": "diagonal"}, ValueError, "causal must be"),
        ("softcap", (q, k, v), {"softcap": -1.0}, ValueError, "softcap must be"),
        ("scale", (q, k, v), {"scale": float("nan")}, TypeError, "scale must be"),
        ("impl", (q, k, v), {"impl": "cuda"}, ValueError, "impl must be"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    _, args, kwargs, exc, msg = case
    with pytest.raises(exc, match=msg):
        attnfuse.flash_attention(*args, **kwargs)


def test_mixed_devices_raise():
    q, k, v = _qkv()
    meta_k = k.to("meta")
    with pytest.raises(ValueError, match="k is on meta"):
        attnfuse.flash_attention(q, meta_k, v)


def test_raw_op_validates_too():
    """The graph-level op (what the rewriter emits) checks its input as well."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="multiple of"):
        torch.ops.attnfuse.flash_attention(q[:, :3], k, v, None, 0.25, "none", 0.0, 0.0, None, "torch")
    with pytest.raises(ValueError, match="needs a seed"):
        torch.ops.attnfuse.flash_attention(q, k, v, None, 0.25, "none", 0.1, 0.0, None, "torch")


# ---------------------------------------------------------------------------
# Forward and gradients through the public function, both impls
# ---------------------------------------------------------------------------

GRID = [
    # causal, bias shape (None = no bias), bias kind, softcap, Lq, Lk
    ("none", None, None, 0.0, 19, 23),
    ("top_left", (1, 4, 19, 23), "float", 0.0, 19, 23),
    ("bottom_right", (2, 1, 1, 23), "bool", 0.0, 9, 23),
    ("none", (19, 23), "float", 5.0, 19, 23),
    ("top_left", (2, 1, 23, 19), "float", 0.0, 23, 19),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal,bias_shape,bias_kind,softcap,Lq,Lk", GRID)
def test_forward_and_grads_match_reference(impl, causal, bias_shape, bias_kind, softcap, Lq, Lk):
    q, k, v = _qkv(Lq=Lq, Lk=Lk)
    bias = None
    if bias_kind == "float":
        bias = torch.randn(bias_shape)
    elif bias_kind == "bool":
        bias = torch.rand(bias_shape) > 0.3
        bias[..., 0] = True  # every row keeps a key
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
    if bias_kind == "float":
        leaves.append(bias.clone().requires_grad_())
        ref_leaves.append(bias.double().clone().requires_grad_())
        b, rb = leaves[3], ref_leaves[3]
    else:
        b = rb = bias
    out = attnfuse.flash_attention(*leaves[:3], b, causal=causal, softcap=softcap, impl=impl)
    ref = attention_reference(*ref_leaves[:3], rb, causal=causal, softcap=softcap)
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=2e-4, rtol=2e-4)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for name, t, r in zip("qkvb", leaves, ref_leaves):
        assert t.grad is not None and t.grad.shape == t.shape, name
        torch.testing.assert_close(t.grad.double(), r.grad, atol=5e-4, rtol=5e-4, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_true_means_top_left(impl):
    q, k, v = _qkv(Lq=7, Lk=12)
    a = attnfuse.flash_attention(q, k, v, causal=True, impl=impl)
    b = attnfuse.flash_attention(q, k, v, causal="top_left", impl=impl)
    c = attnfuse.flash_attention(q, k, v, causal="bottom_right", impl=impl)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _qkv(D=40)
    out = attnfuse.flash_attention(q, k, v, impl="torch")
    ref = attention_reference(q, k, v, scale=1 / math.sqrt(40))
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)


def test_empty_inputs():
    q, k, v = _qkv(Lk=0)
    out = attnfuse.flash_attention(q, k, v, impl="torch")
    assert out.shape == (2, 4, 19, 24) and (out == 0).all()


def test_dropout_reproducible_by_global_seed():
    q, k, v = _qkv()
    torch.manual_seed(123)
    a = attnfuse.flash_attention(q, k, v, dropout_p=0.3, impl="torch")
    torch.manual_seed(123)
    b = attnfuse.flash_attention(q, k, v, dropout_p=0.3, impl="torch")
    c = attnfuse.flash_attention(q, k, v, dropout_p=0.3, impl="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("what", ["bias", "key_mask", "qk"])
def test_trains_with_inference_tensors_where_eager_does(what):
    """Tensors made under torch.inference_mode() cannot be saved for backward; eager
    trains with one wherever its own ops need not save it (an added bias, a mask behind
    ``~``, q and k when only v needs a gradient): so must the op."""
    q, k, v = _qkv()
    bias, km = None, None
    with torch.inference_mode():
        if what == "bias":
            bias = torch.randn(19, 23)
        elif what == "key_mask":
            km = torch.arange(23)[None, :] < torch.tensor([[23], [11]])
        else:
            q, k = q.clone(), k.clone()
    leaves = [q, k, v.requires_grad_()] if what == "qk" else [t.requires_grad_() for t in (q, k, v)]
    out = attnfuse.flash_attention(*leaves, bias, key_mask=km, impl="torch")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g)
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref = attention_reference(*ref_leaves, None if bias is None else bias.double(), key_mask=km)
    want = torch.autograd.grad(ref, [t for t in ref_leaves if t.requires_grad], g.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
    assert len(grads) == (1 if what == "qk" else 3)
    for a, w in zip(grads, want):
        torch.testing.assert_close(a.double(), w, atol=5e-4, rtol=5e-4)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
        attnfuse.flash_attention(q, k, v, impl="triton")


# ---------------------------------------------------------------------------
# Tracing: torch.compile (fullgraph) and make_fx
# ---------------------------------------------------------------------------

def _attn(q, k, v, bias):
    return attnfuse.flash_attention(q, k, v, bias, causal=True, impl="torch") * 2.0


def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v = _qkv()
    bias = torch.randn(4, 1, 23)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    compiled = torch.compile(_attn, backend="aot_eager", fullgraph=True)
    out = compiled(*leaves)
    out.sum().backward()
    ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v, bias)]
    ref = attention_reference(*ref_leaves, causal="top_left") * 2.0
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
    for t, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(t.grad.double(), r.grad, atol=5e-4, rtol=5e-4)


def test_torch_compile_dynamic_shapes():
    compiled = torch.compile(_attn, backend="aot_eager", fullgraph=True, dynamic=True)
    for L in (17, 29):
        q, k, v = _qkv(Lq=L, Lk=L)
        bias = torch.randn(4, 1, L)
        ref = attention_reference(q, k, v, bias, causal="top_left") * 2.0
        torch.testing.assert_close(compiled(q, k, v, bias).double(), ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
def test_make_fx_traces_one_op(mode):
    q, k, v = _qkv()
    bias = torch.randn(4, 1, 23)
    gm = make_fx(_attn, tracing_mode=mode)(q, k, v, bias)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.attnfuse.flash_attention.default in targets
    ref = attention_reference(q, k, v, bias, causal="top_left") * 2.0
    torch.testing.assert_close(gm(q, k, v, bias).double(), ref, atol=2e-4, rtol=2e-4)


def test_make_fx_backward_uses_backward_op():
    q, k, v = _qkv()

    def f(q, k, v):
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = attnfuse.flash_attention(q, k, v, impl="torch")
        return torch.autograd.grad(out.sum(), (q, k, v))

    gm = make_fx(f)(q.clone(), k.clone(), v.clone())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.attnfuse.flash_attention_backward.default in targets
