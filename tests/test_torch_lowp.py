"""The bf16 GEMM path of the CPU implementation (``kernels/torch_lowp.py``).

Every case runs ``torch_impl.forward/backward`` with the path forced on and compares
with the float64 eager reference and its gradients (``check`` from test_torch_impl,
which also asserts that this path ran, forward and backward).  One test checks the
property the path exists for: its error is the unfused bf16 graph's, not larger.
"""
from __future__ import annotations

import math

import pytest
import torch

import attnfuse
from attnfuse.kernels import base as KB
from attnfuse.kernels import torch_impl as T
from attnfuse.kernels import torch_lowp as TL
from tests.reference import attention_reference
from tests.test_torch_impl import (BF16, F16, F32, check, make_bias, make_qkv,  # noqa: F401
                                   path_spy, small_blocks)


@pytest.fixture(autouse=True)
def lowp_on(small_blocks, monkeypatch):  # noqa: F811  (runs after test_torch_impl's)
    monkeypatch.setattr(TL, "USE_LOWP", True)


@pytest.mark.parametrize("causal", ["none", "bottom_right"])  # bottom_right: Lq = 1 only
@pytest.mark.parametrize("lq,lk", [(37, 53), (53, 37), (1, 45)])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_grid(causal, lq, lk, hkv, path_spy):  # noqa: F811
    q, k, v = make_qkv(2, 4, hkv, lq, lk, 32, 24, BF16)
    if causal == "bottom_right" and lq > 1:
        causal = "none"
    check(q, k, v, causal=causal, spy=path_spy)
    assert T.forward_path(q, k, v, None, causal=causal, dropout_p=0.0, softcap=0.0) == "lowp"


@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("shape", ["11k", "b1qk", "bhqk", "bh11", "expanded"])
@pytest.mark.parametrize("hkv", [3, 1])
def test_bias(kind, shape, hkv, path_spy):  # noqa: F811
    """bf16 biases (with -inf entries, a row of -inf and a row of finfo.min) get their
    gradient; bool masks too (no gradient)."""
    b, h, lq, lk = 2, 3, 37, 41
    shapes = {"11k": (1, 1, 1, lk), "b1qk": (b, 1, lq, lk), "bhqk": (b, h, lq, lk),
              "bh11": (b, h, 1, 1), "expanded": (1, 1, lq, lk)}
    q, k, v = make_qkv(b, h, hkv, lq, lk, 16, 16, BF16)
    bias = make_bias(kind, shapes[shape], BF16)
    if shape == "expanded":  # a stride-0 view of the full shape
        bias = bias.expand(b, h, lq, lk)
    out, lse, grads = check(q, k, v, bias, spy=path_spy)
    if shapes[shape][2] > 3:  # row 3 is masked entirely: out 0, lse -inf, no gradient
        assert bool((out[:, :, 3] == 0).all()) and bool(torch.isneginf(lse[:, :, 3]).all())
        assert bool((grads[0][:, :, 3] == 0).all())


def test_finfo_rows_are_eagers_uniform_average(path_spy):  # noqa: F811
    """Rows filled with finfo(bf16).min, as HF builds padding masks in the model's dtype:
    s + finfo.min rounds to finfo.min in bf16, so eager averages v uniformly; so does
    this path (and the float64 reference agrees)."""
    b, h, lq, lk = 2, 2, 20, 24
    q, k, v = make_qkv(b, h, h, lq, lk, 16, 16, BF16)
    bias = torch.zeros(b, 1, lq, lk, dtype=BF16)
    bias[:, :, 5] = torch.finfo(BF16).min
    out, _, _ = check(q, k, v, bias, spy=path_spy)
    torch.testing.assert_close(out[:, :, 5].float(), v.float().mean(2), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout(p, path_spy):  # noqa: F811
    """The backward applies the forward's keep-mask: the reference applies the mask
    read back from the forward (v = identity, ``check``) and must agree."""
    q, k, v = make_qkv(2, 4, 2, 45, 40, 16, 24, BF16)
    check(q, k, v, make_bias("float", (2, 1, 45, 40), BF16), dropout_p=p, seed=77,
          spy=path_spy)


@pytest.mark.parametrize("layout", ["blhd", "lastdim"])
@pytest.mark.parametrize("hkv", [2, 1])
def test_non_contiguous(layout, hkv, path_spy):  # noqa: F811
    q, k, v = make_qkv(2, 2, hkv, 37, 45, 16, 16, BF16, layout)
    bias = make_bias("float", (2, 2, 45, 37), BF16).transpose(-1, -2)
    check(q, k, v, bias, spy=path_spy)
    check(q, k, v, spy=path_spy)


def test_batch_chunks(monkeypatch, path_spy):  # noqa: F811
    """Blocks smaller than one row of the whole batch split the batch too."""
    monkeypatch.setattr(KB, "BLOCK_ELEMS", 2 * 3 * 40)
    q, k, v = make_qkv(5, 6, 3, 11, 40, 8, 12, BF16)
    check(q, k, v, make_bias("float", (5, 1, 11, 40), BF16), dropout_p=0.25, seed=9,
          spy=path_spy)


@pytest.mark.parametrize("left", [False, True])
def test_key_mask(left):
    """Padding keys through the public op (a batch item with no visible key too)."""
    b, hq, hkv, lq, lk = 3, 4, 2, 33, 33
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, l, 16, generator=g).to(BF16).requires_grad_()
               for h, l in ((hq, lq), (hkv, lk), (hkv, lk)))
    km = torch.ones(b, lk, dtype=torch.bool)
    km[1, :9] = False if left else True
    km[1, 25:] = True if left else False
    km[2] = False
    assert T.forward_path(q, k, v, None, causal="none", dropout_p=0.0, softcap=0.0,
                          key_mask=km) == "lowp"
    out = attnfuse.flash_attention(q, k, v, key_mask=km, impl="torch")
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, scale=1 / 4, key_mask=km, dead_rows="zero")
    torch.testing.assert_close(out.double(), ref, atol=1.6e-2, rtol=1.6e-2)
    assert bool((out[2] == 0).all())
    dout = torch.randn(out.shape, generator=g).to(BF16)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, leaves, dout.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, atol=6e-2, rtol=4e-2)
    assert bool((got[0][2] == 0).all())


def test_error_is_the_unfused_graphs():
    """The path computes eager's bf16 recipe: its error against float64 is no larger
    than that of the unfused bf16 graph (matmul, scale, softmax, matmul) on the same
    inputs (up to 25 %: the scale is folded into the GEMM, one rounding fewer)."""
    q, k, v = make_qkv(2, 4, 4, 200, 200, 64, 64, BF16, seed=5)
    q = q * 2  # sharper softmax: rounding of the scores matters
    scale = 1 / math.sqrt(64)
    out, _ = T.forward(q, k, v, None, scale=scale, causal="none", dropout_p=0.0,
                       softcap=0.0, seed=0)
    assert T.forward_path(q, k, v, None, causal="none", dropout_p=0.0, softcap=0.0) == "lowp"
    eager = ((q @ k.transpose(-1, -2)) * scale).softmax(-1) @ v
    ref = attention_reference(q.double(), k.double(), v.double(), None, scale=scale)
    err_ours = (out.double() - ref).abs().max().item()
    err_eager = (eager.double() - ref).abs().max().item()
    assert 0 < err_ours <= 1.25 * err_eager, (err_ours, err_eager)


@pytest.mark.parametrize("case,expected", [
    (dict(), "lowp"),
    (dict(causal="bottom_right", lq=1), "lowp"),            # a no-op diagonal
    (dict(dtype=F32), "fused"),                              # fp32: PyTorch's kernel
    (dict(dtype=F16), "fused"),                              # CPU fp16 GEMMs are slow
    (dict(causal="top_left"), "fused"),                      # the kernel skips the half
    (dict(causal="top_left", window=8), "banded"),
    (dict(lk=45, max_keys=40), "fused"),                     # more keys than the bound
    (dict(softcap=5.0), "blocked"),
    (dict(bias=torch.zeros(1, 1, 1, 45)), "blocked"),        # fp32 bias on bf16 scores
    (dict(bias=torch.zeros(1, 1, 1, 45, dtype=BF16)), "lowp"),
    (dict(bias=torch.zeros(1, 1, 1, 45, dtype=torch.bool)), "lowp"),
    (dict(switch=False), "fused"),
])
def test_path_choice(case, expected, monkeypatch):
    if "max_keys" in case:
        monkeypatch.setattr(TL, "LOWP_MAX_KEYS", case["max_keys"])
    monkeypatch.setattr(TL, "USE_LOWP", case.get("switch", True))
    q, k, v = make_qkv(1, 2, 2, case.get("lq", 45), case.get("lk", 45), 16, 16,
                       case.get("dtype", BF16))
    got = T.forward_path(q, k, v, case.get("bias"), causal=case.get("causal", "none"),
                         dropout_p=0.0, softcap=case.get("softcap", 0.0),
                         window=case.get("window", 0))
    assert got == expected
