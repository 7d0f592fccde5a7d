"""The CPU implementation (impl="torch") of the fused attention op, called directly.

Every case compares ``attnfuse.kernels.torch_impl.forward/backward`` with the float64
eager reference (``tests.reference.attention_reference``) and its autograd gradients
for q, k, v and the bias, on both paths (PyTorch's fused CPU SDPA and the blocked
loop), asserting which path ran.

Rows masked entirely with -inf: eager gives NaN; our convention is out = 0, lse = -inf
and zero gradients. For gradient references over such rows, the reference's softmax is
swapped for one that returns 0 on those rows only (:func:`_nan_free_softmax`); every
other row's arithmetic is the reference's own.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnfuse.kernels import torch_banded as TB
from attnfuse.kernels import torch_blocked as TBK
from attnfuse.kernels import base as KB
from attnfuse.kernels import torch_impl as T
from attnfuse.kernels import torch_base as TS
from attnfuse.kernels import torch_fused as TF
from attnfuse.kernels import torch_lowp as TL
from tests.reference import (assert_close_rel, assert_keep_rate, assert_within_eager_rounding,
                             attention_reference, causal_keep, keep_mask_from_identity_v)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (atol, rtol) for out and for gradients, per dtype
TOL = {F32: (2e-5, 2e-5, 1e-4, 1e-4), F16: (2e-3, 2e-3, 1e-2, 1e-2),
       BF16: (1.6e-2, 1.6e-2, 6e-2, 4e-2)}
# half types: each gradient's error against float64 may be at most this many times the
# error of the unfused graph run in that dtype (eager's own rounding) on the same inputs;
# every path measured at 0.3-1.07x of it (the bf16 GEMM path follows eager's recipe)
EAGER_ROUNDING_FACTOR = 1.5


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Tiny blocks so the small test shapes run the blocked loop over many blocks,
    with a last block that is not full (lengths here are not multiples of 16)."""
    monkeypatch.setattr(KB, "BLOCK_Q", 16)
    monkeypatch.setattr(KB, "BLOCK_ELEMS", 1 << 22)
    monkeypatch.setattr(TS, "USE_FUSED_SDPA", True)
    # half types take the low-precision GEMM path only in the tests that ask for it
    # (path "lowp"), so "fused"/"blocked" mean what they say for every dtype
    monkeypatch.setattr(TL, "USE_LOWP", False)


@pytest.fixture
def path_spy(monkeypatch):
    """Records which implementation ran: 'lowp', 'fused', 'banded' or 'blocked', forward
    and backward."""
    ran = {"fwd": [], "bwd": []}

    def wrap(name, kind, tag, module=T):
        fn = getattr(module, name)

        def spy(*a, **kw):
            ran[kind].append(tag)
            return fn(*a, **kw)

        monkeypatch.setattr(module, name, spy)

    wrap("banded_forward", "fwd", "banded", TB)
    wrap("banded_backward", "bwd", "banded", TB)
    wrap("lowp_forward", "fwd", "lowp", TL)
    wrap("lowp_backward", "bwd", "lowp", TL)

    wrap("fused_forward", "fwd", "fused", TF)
    wrap("blocked_forward", "fwd", "blocked", TBK)
    wrap("fused_backward", "bwd", "fused", TF)
    wrap("blocked_backward", "bwd", "blocked", TBK)
    return ran


# ------------------------------------------------------------------------ references
def _nan_free_softmax(orig):
    def softmax(s, dim=-1, **kw):
        dead = (s == float("-inf")).all(dim, keepdim=True)
        p = orig(s.masked_fill(dead, 0.0), dim, **kw)
        return p.masked_fill(dead, 0.0)

    return softmax


@contextlib.contextmanager
def nan_free_reference():
    orig = torch.softmax
    torch.softmax = _nan_free_softmax(orig)
    try:
        yield
    finally:
        torch.softmax = orig


def ref_lse(q, k, bias, *, scale, causal, softcap):
    """float64 log-sum-exp of the final logits, as the reference builds them."""
    q, k = q.double(), k.double()
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.double()
    if causal != "none":
        s = s.masked_fill(~causal_keep(q.shape[2], k.shape[2], causal), float("-inf"))
    return torch.logsumexp(s, -1)


def make_qkv(b, hq, hkv, lq, lk, d, dv, dtype, layout="contig", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if layout == "contig":
        return rnd(b, hq, lq, d), rnd(b, hkv, lk, d), rnd(b, hkv, lk, dv)
    if layout == "blhd":  # (batch, seq, head, dim) storage, as models produce it
        return (rnd(b, lq, hq, d).transpose(1, 2), rnd(b, lk, hkv, d).transpose(1, 2),
                rnd(b, lk, hkv, dv).transpose(1, 2))
    if layout == "lastdim":  # last dim not unit-stride (the fused kernel mis-reads these)
        return (rnd(b, hq, d, lq).transpose(-1, -2), rnd(b, hkv, d, lk).transpose(-1, -2),
                rnd(b, hkv, dv, 2 * lk)[..., ::2].transpose(-1, -2))
    raise ValueError(layout)


def make_bias(kind, shape, dtype=F32, *, dead_row=True, finfo_row=True, seed=1):
    """Float or bool bias of ``shape`` with (optionally) a row masked entirely with
    -inf / False and a row of finfo(float32).min (HF-style padding)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        b = torch.rand(shape, generator=g) > 0.3
        if dead_row and shape[-2] > 3:
            b[..., 3, :] = False
        return b
    b = torch.randn(shape, generator=g)
    b[torch.rand(shape, generator=g) < 0.2] = float("-inf")
    if dead_row and shape[-2] > 3:
        b[..., 3, :] = float("-inf")
    if finfo_row and shape[-2] > 5:
        b[..., 5, :] = torch.finfo(dtype).min  # HF builds it in the model's dtype
    return b.to(dtype)


def check(q, k, v, bias=None, *, causal="none", softcap=0.0, scale=None, dropout_p=0.0,
          seed=0, need_dbias=None, spy=None, expect_fused=None, tol=None):
    """Run forward + backward and compare with the float64 reference and its grads."""
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if need_dbias is None:
        need_dbias = bias is not None and bias.dtype != torch.bool
    mask = None
    if dropout_p:
        mask = _kernel_keep_mask(q, k, bias, scale=scale, causal=causal, softcap=softcap,
                                 dropout_p=dropout_p, seed=seed)
        if spy is not None:
            del spy["fwd"][-1]  # that call is not the one under test
    fused = T.uses_fused_sdpa(q, k, v, bias, causal=causal, dropout_p=dropout_p,
                              softcap=softcap)
    if expect_fused is not None:
        assert fused == expect_fused
    out, lse = T.forward(q, k, v, bias, scale=scale, causal=causal, dropout_p=dropout_p,
                         softcap=softcap, seed=seed)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == F32

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rb = bias
    if need_dbias:
        rb = bias.detach().double().requires_grad_()
        leaves.append(rb)
    ref_raw = attention_reference(*(x.detach() for x in leaves[:3]), rb, scale=scale,
                                  causal=causal, softcap=softcap, dropout_mask=mask,
                                  dropout_p=dropout_p)
    dead = torch.isnan(ref_raw).all(-1)  # rows masked entirely (eager: NaN)
    with nan_free_reference():
        ref = attention_reference(*leaves[:3], rb, scale=scale, causal=causal,
                                  softcap=softcap, dropout_mask=mask, dropout_p=dropout_p)
    atol, rtol, gatol, grtol = tol or TOL[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol, rtol=rtol)
    assert bool((out[dead] == 0).all())
    rl = ref_lse(q, k, bias, scale=scale, causal=causal, softcap=softcap)
    assert bool(torch.isneginf(lse[dead]).all()) and bool(dead.eq(torch.isneginf(rl)).all())
    huge = rl.abs() > 1e30  # finfo.min rows: fp32 lse is right only to ~1e31 there
    # the lowp path rounds each logit to the input dtype once (as eager does): its lse
    # is off by up to eps/2 of the largest logit
    lowp = TL.lowp_applicable(q, k, v, bias, causal=causal, window=0, softcap=softcap)
    torch.testing.assert_close(lse.double()[~dead & ~huge], rl[~dead & ~huge],
                               atol=1e-4 if dtype == F32 else 1e-2,
                               rtol=torch.finfo(dtype).eps if lowp else 1e-5)
    torch.testing.assert_close(lse.double()[huge], rl[huge], atol=0, rtol=1e-6)

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    grads_ref = torch.autograd.grad(ref, leaves, dout.double())
    grads = T.backward(dout, q, k, v, bias, out, lse, scale=scale, causal=causal,
                       dropout_p=dropout_p, softcap=softcap, seed=seed,
                       need_dbias=need_dbias)
    assert len(grads) == 4
    for got, want, src in zip(grads, grads_ref, (q, k, v, bias)):
        assert got.shape == src.shape and got.dtype == src.dtype
        torch.testing.assert_close(got.double(), want, atol=gatol, rtol=grtol)
    if dtype in (F16, BF16):  # bounded by eager's own rounding in this dtype
        eager_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        eb = bias
        if need_dbias:
            eb = bias.detach().requires_grad_()
            eager_leaves.append(eb)
        with nan_free_reference():
            eager = attention_reference(*eager_leaves[:3], eb, scale=scale, causal=causal,
                                        softcap=softcap, dropout_mask=mask,
                                        dropout_p=dropout_p, dtype=dtype)
        eager_grads = torch.autograd.grad(eager, eager_leaves, dout)
        for name, got, want, e in zip(("dq", "dk", "dv", "dbias"), grads, grads_ref,
                                      eager_grads):
            assert_within_eager_rounding(got, e, want, EAGER_ROUNDING_FACTOR, name)
    if not need_dbias:
        assert grads[3] is None
    if spy is not None:
        lowp = TL.lowp_applicable(q, k, v, bias, causal=causal, window=0, softcap=softcap)
        banded = TB.banded_applicable(q, k, v, bias, causal=causal, window=0,
                                      dropout_p=dropout_p, softcap=softcap)
        fused_bwd = T.uses_fused_sdpa_backward(q, k, v, bias, lse, causal=causal,
                                               dropout_p=dropout_p, softcap=softcap,
                                               need_dbias=need_dbias)
        for kind, fused_ok in (("fwd", fused), ("bwd", fused_bwd)):
            want = ("lowp" if lowp else "fused" if fused_ok else "banded" if banded
                    else "blocked")
            assert spy[kind] == [want]
        spy["fwd"].clear()
        spy["bwd"].clear()
    return out, lse, grads


def _kernel_keep_mask(q, k, bias, *, scale, causal, softcap, dropout_p, seed):
    """The keep-mask the forward applies with this seed, read back from a call with
    v = identity (not rebuilt with the library's generator), after checking its keep
    rate over the positions the float64 reference gives P > 0."""
    b, hkv, lk = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(lk, dtype=q.dtype).expand(b, hkv, lk, lk)
    out, _ = T.forward(q, k, eye, bias, scale=scale, causal=causal, dropout_p=dropout_p,
                       softcap=softcap, seed=seed)
    keep = keep_mask_from_identity_v(out, lk)
    with nan_free_reference():
        p = attention_reference(q.double(), k.double(), eye.double(), bias, scale=scale,
                                causal=causal, softcap=softcap)
    assert_keep_rate(keep, p > 0, dropout_p)
    return keep


def _force(monkeypatch, path):
    if path == "blocked":
        monkeypatch.setattr(TS, "USE_FUSED_SDPA", False)
    if path == "lowp":
        monkeypatch.setattr(TL, "USE_LOWP", True)


# ------------------------------------------------------------------------ path choice
def _decide(hq=4, hkv=4, lq=33, lk=33, d=16, dv=16, dtype=F32, bias=None,
            causal="none", dropout_p=0.0, softcap=0.0, layout="contig"):
    q, k, v = make_qkv(2, hq, hkv, lq, lk, d, dv, dtype, layout)
    return T.uses_fused_sdpa(q, k, v, bias, causal=causal, dropout_p=dropout_p,
                             softcap=softcap)


@pytest.mark.parametrize("kw,expected", [
    (dict(), True),
    (dict(causal="top_left", lq=20, lk=33), True),
    (dict(causal="top_left", lq=40, lk=33), True),
    (dict(causal="bottom_right"), True),                    # Lq == Lk: same as top-left
    (dict(causal="bottom_right", lq=20, lk=33), False),
    (dict(causal="bottom_right", lq=1, lk=33), True),       # decode: no-op mask
    (dict(dtype=F16), True), (dict(dtype=BF16), True),
    (dict(dtype=torch.float64), False),
    (dict(softcap=30.0), False),
    (dict(dropout_p=0.1), False),
    (dict(dv=24), False),
    (dict(layout="blhd"), True), (dict(layout="lastdim"), True),
    (dict(hkv=2), True), (dict(hkv=1), True),               # GQA/MQA merged into rows
    (dict(hkv=2, causal="top_left"), True),                 # causal GQA: K/V repeated
    (dict(hkv=2, layout="blhd"), False),                     # merging would copy q
    (dict(hkv=1, lq=1, causal="bottom_right"), True),       # MQA decode
    (dict(bias=torch.zeros(1, 1, 1, 33)), True),
    (dict(bias=torch.zeros(2, 4, 33, 33, dtype=torch.bool)), True),
    (dict(bias=torch.zeros(1, 1, 1, 33, dtype=torch.float64)), False),
    (dict(bias=torch.zeros(1, 1, 1, 33), dtype=F16), False),  # a cast would round
    (dict(bias=torch.zeros(1, 1, 1, 33, dtype=F16), dtype=F16), True),
    (dict(bias=torch.zeros(1, 1, 1, 33), hkv=2), True),
    (dict(bias=torch.zeros(2, 1, 33, 33), hkv=2), False),
    (dict(bias=torch.zeros(2, 4, 33, 33), hkv=2), True),
    (dict(bias=torch.zeros(2, 4, 1, 33), hkv=2, lq=1), True),
])
def test_fused_decision(kw, expected):
    assert _decide(**kw) is expected


def test_fused_switch_off(monkeypatch):
    assert _decide()
    monkeypatch.setattr(TS, "USE_FUSED_SDPA", False)
    assert not _decide()


def test_fused_backward_decision():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, 16, F32)
    lse = torch.zeros(1, 2, 20)
    kw = dict(causal="none", dropout_p=0.0, softcap=0.0)
    b = torch.zeros(1, 1, 1, 20)
    assert T.uses_fused_sdpa_backward(q, k, v, None, lse, need_dbias=False, **kw)
    assert T.uses_fused_sdpa_backward(q, k, v, b, lse, need_dbias=False, **kw)
    assert not T.uses_fused_sdpa_backward(q, k, v, b, lse, need_dbias=True, **kw)
    assert T.uses_fused_sdpa_backward(q, k, v, b > 0, lse, need_dbias=True, **kw)
    lse[0, 0, 3] = float("-inf")
    assert T.uses_fused_sdpa_backward(q, k, v, b, lse, need_dbias=False, **kw)
    lse[0, 1, 4] = torch.finfo(F32).min  # P = exp(s - lse) is wrong there in fp32
    assert not T.uses_fused_sdpa_backward(q, k, v, b, lse, need_dbias=False, **kw)


# ------------------------------------------------------------------ correctness grid
@pytest.mark.parametrize("path", ["fused", "blocked"])
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("lq,lk", [(37, 53), (53, 37), (45, 45)])
def test_causal_lengths(path, causal, lq, lk, monkeypatch, path_spy):
    _force(monkeypatch, path)
    q, k, v = make_qkv(2, 3, 3, lq, lk, 16, 16, F32)
    expect = path == "fused" and (causal != "bottom_right" or lq == lk)
    check(q, k, v, causal=causal, spy=path_spy, expect_fused=expect)


@pytest.mark.parametrize("path", ["fused", "blocked"])
@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("shape", ["11k", "b1qk", "1hqk", "bhqk", "bh11", "expanded"])
@pytest.mark.parametrize("causal", ["none", "top_left"])
def test_bias(path, kind, shape, causal, monkeypatch, path_spy):
    _force(monkeypatch, path)
    b, h, lq, lk = 2, 3, 37, 41
    shapes = {"11k": (1, 1, 1, lk), "b1qk": (b, 1, lq, lk), "1hqk": (1, h, lq, lk),
              "bhqk": (b, h, lq, lk), "bh11": (b, h, 1, 1), "expanded": (1, 1, lq, lk)}
    bias = make_bias(kind, shapes[shape])
    if shape == "expanded":  # a stride-0 view of the full shape
        bias = bias.expand(b, h, lq, lk)
    q, k, v = make_qkv(b, h, h, lq, lk, 16, 16, F32)
    check(q, k, v, bias, causal=causal, spy=path_spy, expect_fused=path == "fused")


@pytest.mark.parametrize("path", ["fused", "blocked"])
@pytest.mark.parametrize("causal", ["none", "top_left"])
def test_fully_masked_and_finfo_rows(path, causal, monkeypatch, path_spy):
    """-inf rows: out 0, lse -inf, zero grads. finfo.min rows: uniform average."""
    _force(monkeypatch, path)
    b, h, lq, lk = 2, 2, 40, 24
    q, k, v = make_qkv(b, h, h, lq, lk, 16, 16, F32)
    bias = torch.zeros(b, 1, lq, lk)
    bias[:, :, 3] = float("-inf")
    bias[:, :, 5] = torch.finfo(F32).min
    bias[1, :, 7, :] = -1e30
    bias[:, :, 9, :10] = float("-inf")  # dead only under the causal mask (keys j <= 9)
    out, lse, (dq, dk, dv, _) = check(q, k, v, bias, causal=causal, need_dbias=False,
                                      spy=path_spy, expect_fused=path == "fused")
    assert bool((out[:, :, 3] == 0).all()) and bool(torch.isneginf(lse[:, :, 3]).all())
    assert bool((dq[:, :, 3] == 0).all())
    assert bool(torch.isneginf(lse[:, :, 9]).all()) == (causal == "top_left")
    if causal == "none":
        uniform = v.mean(2)  # (b, h, dv)
        torch.testing.assert_close(out[:, :, 5], uniform, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, :, 7], uniform[1], atol=1e-5, rtol=1e-5)
    # a bool mask with a whole batch item masked (padding only)
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[1] = False
    out, lse, _ = check(q, k, v, keep, causal=causal, spy=path_spy,
                        expect_fused=path == "fused")
    assert bool((out[1] == 0).all()) and bool(torch.isneginf(lse[1]).all())


def test_without_fused_kernel(monkeypatch, path_spy):
    """Where torch lacks the fused CPU op (guarded by hasattr), the blocked loop runs."""
    monkeypatch.setattr(TS, "HAS_FUSED", False)
    q, k, v = make_qkv(1, 2, 2, 30, 30, 16, 16, F32)
    check(q, k, v, causal="top_left", spy=path_spy, expect_fused=False)


@pytest.mark.parametrize("path", ["fused", "blocked"])
@pytest.mark.parametrize("hkv", [2, 1])
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_gqa_mqa(path, hkv, causal, monkeypatch, path_spy):
    _force(monkeypatch, path)
    q, k, v = make_qkv(2, 4, hkv, 37, 50, 16, 16, F32)
    check(q, k, v, causal=causal, spy=path_spy,
          expect_fused=path == "fused" and causal != "bottom_right")  # Lq != Lk here


@pytest.mark.parametrize("path", ["fused", "blocked"])
@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("shape", ["11k", "b1qk", "1hqk", "bhqk"])
def test_gqa_bias(path, kind, shape, monkeypatch, path_spy):
    _force(monkeypatch, path)
    b, hq, hkv, lq, lk = 2, 4, 2, 21, 35
    shapes = {"11k": (1, 1, 1, lk), "b1qk": (b, 1, lq, lk), "1hqk": (1, hq, lq, lk),
              "bhqk": (b, hq, lq, lk)}
    q, k, v = make_qkv(b, hq, hkv, lq, lk, 16, 16, F32)
    check(q, k, v, make_bias(kind, shapes[shape]), spy=path_spy)


@pytest.mark.parametrize("path", ["fused", "blocked"])
def test_mqa_decode(path, monkeypatch, path_spy):
    _force(monkeypatch, path)
    q, k, v = make_qkv(2, 8, 1, 1, 70, 32, 32, F32)
    bias = make_bias("float", (2, 8, 1, 70), dead_row=False, finfo_row=False)
    check(q, k, v, bias, causal="bottom_right", spy=path_spy, expect_fused=path == "fused")


@pytest.mark.parametrize("path", ["fused", "blocked"])
@pytest.mark.parametrize("d,dv", [(16, 16), (40, 40), (64, 64), (80, 80), (128, 128),
                                  (40, 24), (64, 128), (1, 1), (256, 256)])
def test_head_dims(path, d, dv, monkeypatch, path_spy):
    _force(monkeypatch, path)
    q, k, v = make_qkv(1, 2, 2, 33, 29, d, dv, F32)
    check(q, k, v, causal="top_left", spy=path_spy,
          expect_fused=path == "fused" and d == dv)


@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("hkv", [3, 1])
def test_softcap(causal, hkv, path_spy):
    q, k, v = make_qkv(2, 3, hkv, 37, 44, 16, 16, F32)
    q = q * 4  # logits well into tanh's curve
    bias = make_bias("float", (2, 1, 37, 44))
    check(q, k, v, bias, causal=causal, softcap=5.0, spy=path_spy, expect_fused=False)


@pytest.mark.parametrize("path", ["fused", "blocked"])
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("kind", ["none", "own_dtype", "f32", "bool"])
def test_half_dtypes(path, dtype, kind, monkeypatch, path_spy):
    _force(monkeypatch, path)
    b, h, lq, lk = 2, 2, 37, 45
    q, k, v = make_qkv(b, h, h, lq, lk, 40, 40, dtype)
    bias = None
    if kind == "own_dtype":
        bias = make_bias("float", (b, 1, lq, lk), dtype)
    elif kind == "f32":  # a cast to the half type would round it: blocked path
        bias = make_bias("float", (b, 1, lq, lk), F32)
    elif kind == "bool":
        bias = make_bias("bool", (1, h, lq, lk))
    check(q, k, v, bias, causal="top_left", spy=path_spy,
          expect_fused=path == "fused" and kind != "f32")


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_half_softcap_gqa_bottom_right(dtype, path_spy):
    q, k, v = make_qkv(2, 4, 2, 45, 33, 64, 48, dtype)
    check(q, k, v, make_bias("float", (1, 4, 45, 33), dtype, finfo_row=False),
          causal="bottom_right", softcap=20.0, spy=path_spy, expect_fused=False)


@pytest.mark.parametrize("path", ["fused", "blocked"])
@pytest.mark.parametrize("layout", ["blhd", "lastdim"])
@pytest.mark.parametrize("hkv", [2, 1])
def test_non_contiguous(path, layout, hkv, monkeypatch, path_spy):
    _force(monkeypatch, path)
    b, hq, lq, lk = 2, 2, 37, 45
    q, k, v = make_qkv(b, hq, hkv, lq, lk, 16, 16, F32, layout)
    bias = make_bias("float", (b, hq, lk, lq)).transpose(-1, -2)  # non-contiguous bias
    check(q, k, v, bias, need_dbias=False, spy=path_spy)
    check(q, k, v, causal="top_left", spy=path_spy)


@pytest.mark.parametrize("path", ["fused", "blocked"])
def test_scale_and_lse_fp32(path, monkeypatch):
    """A non-default scale with a bias: out and lse of each path against float64."""
    _force(monkeypatch, path)
    q, k, v = make_qkv(2, 2, 2, 50, 60, 32, 32, F32)
    bias = make_bias("float", (2, 1, 50, 60), dead_row=False, finfo_row=False)
    kw = dict(scale=0.3, causal="top_left", dropout_p=0.0, softcap=0.0, seed=0)
    assert T.forward_path(q, k, v, bias, causal="top_left", dropout_p=0.0, softcap=0.0) == path
    out, lse = T.forward(q, k, v, bias, **kw)
    with nan_free_reference():  # rows the causal mask and the -inf entries empty: 0
        ref = attention_reference(q, k, v, bias, scale=0.3, causal="top_left")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    rl = ref_lse(q, k, bias, scale=0.3, causal="top_left", softcap=0.0)
    torch.testing.assert_close(lse.double(), rl, atol=1e-5, rtol=1e-6)


def test_block_rows_shrink_for_long_keys(monkeypatch):
    monkeypatch.setattr(KB, "BLOCK_ELEMS", 4096)
    assert TS.chunking(1, 2, 1000) == (1, 2)
    assert TS.chunking(1, 8, 1000) == (1, 1)
    assert TS.chunking(3, 2, 100) == (3, 6)
    monkeypatch.setattr(TS, "USE_FUSED_SDPA", False)
    q, k, v = make_qkv(1, 2, 2, 9, 700, 8, 8, F32)
    check(q, k, v, causal="bottom_right")


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_batch_chunks(dropout_p, monkeypatch, path_spy):
    """Blocks smaller than one row of the whole batch split the batch too."""
    monkeypatch.setattr(KB, "BLOCK_ELEMS", 2 * 3 * 40)  # two batch items, one row
    assert TS.chunking(5, 3, 40) == (2, 1)
    q, k, v = make_qkv(5, 6, 3, 11, 40, 8, 12, F32)
    bias = make_bias("float", (5, 1, 11, 40))
    check(q, k, v, bias, causal="bottom_right", softcap=8.0, dropout_p=dropout_p, seed=9,
          spy=path_spy, expect_fused=False)
    check(q, k, v, make_bias("float", (1, 6, 1, 40)), dropout_p=dropout_p, seed=9,
          spy=path_spy, expect_fused=False)


def test_empty_lengths():
    q, k, v = make_qkv(1, 2, 2, 5, 0, 8, 8, F32)
    out, lse = T.forward(q, k, v, None, scale=1.0, causal="none", dropout_p=0.0,
                         softcap=0.0, seed=0)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    dq, dk, dv, db = T.backward(torch.ones_like(out), q, k, v, None, out, lse, scale=1.0,
                                causal="none", dropout_p=0.0, softcap=0.0, seed=0,
                                need_dbias=False)
    assert bool((dq == 0).all()) and dk.shape == k.shape and db is None


# --------------------------------------------------------------------------- dropout
def test_dropout_keep_rate_and_unbiased():
    p = 0.3
    m = T.dropout_keep_mask(123, p, (2, 4, 64, 64))
    assert abs(m.float().mean().item() - (1 - p)) < 0.01
    # output-level: with v = identity, out = P * M / (1 - p); E[M / (1 - p)] = 1
    b, h, lq, lk = 2, 4, 64, 64
    q, k, _ = make_qkv(b, h, h, lq, lk, 16, 16, F32)
    v = torch.eye(lk).expand(b, h, lk, lk)
    kw = dict(scale=0.25, causal="none", softcap=0.0)
    o0, _ = T.forward(q, k, v, None, dropout_p=0.0, seed=0, **kw)
    od, _ = T.forward(q, k, v, None, dropout_p=p, seed=5, **kw)
    ratio = (od / o0).mean().item()
    assert abs(ratio - 1.0) < 0.03
    assert abs((od != 0).float().mean().item() - (1 - p)) < 0.01


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_forward_backward_agree(p, monkeypatch, path_spy):
    """v = identity (Lk <= Dv) reveals the forward's mask: out = P * M / (1 - p)."""
    b, h, lq, lk, dv = 2, 3, 37, 24, 32
    q, k, _ = make_qkv(b, h, h, lq, lk, 16, dv, F32)
    v = torch.eye(lk, dv).repeat(b, h, 1, 1)
    seed = 1234
    out, _ = T.forward(q, k, v, None, scale=0.25, causal="none", dropout_p=p,
                       softcap=0.0, seed=seed)
    seen = out[..., :lk] != 0
    assert bool(seen.eq(T.dropout_keep_mask(seed, p, (b, h, lq, lk))).all())
    # the backward uses the same mask: matches the reference given that mask
    path_spy["fwd"].clear()
    check(q, k, v, dropout_p=p, seed=seed, scale=0.25, spy=path_spy, expect_fused=False)
    # and with GQA, causal, bias, softcap, several blocks
    q, k, v = make_qkv(2, 4, 2, 45, 40, 16, 24, F32)
    check(q, k, v, make_bias("float", (2, 1, 45, 40)), causal="bottom_right",
          softcap=10.0, dropout_p=p, seed=seed, spy=path_spy, expect_fused=False)


def test_dropout_seed_determinism(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, 16, F32)
    kw = dict(scale=0.25, causal="top_left", dropout_p=0.2, softcap=0.0)
    a, _ = T.forward(q, k, v, None, seed=7, **kw)
    b, _ = T.forward(q, k, v, None, seed=7, **kw)
    c, _ = T.forward(q, k, v, None, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    monkeypatch.setattr(KB, "BLOCK_Q", 7)  # the mask does not depend on the blocking
    d, _ = T.forward(q, k, v, None, seed=7, **kw)
    torch.testing.assert_close(a, d, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- memory
class _MaxStorage(TorchDispatchMode):
    """Largest storage (bytes) of any tensor an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_bytes = max(self.max_bytes, t.untyped_storage().nbytes())
        return out


def _blocked_max_alloc(lq, lk, **kw):
    q, k, v = make_qkv(1, 1, 1, lq, lk, 8, 8, F32)
    bias = torch.randn(1, 1, 1, lk)
    args = dict(scale=0.3, causal="bottom_right", dropout_p=0.1, softcap=20.0, seed=3)
    out, lse = T.forward(q, k, v, bias, **args)
    with _MaxStorage() as m:
        T.forward(q, k, v, bias, **args)
        T.backward(torch.ones_like(out), q, k, v, bias, out, lse, need_dbias=True, **args)
    return m.max_bytes


def test_blocked_path_never_holds_full_score_matrix(monkeypatch):
    lq, lk = 384, 512  # the full score matrix: 384*512 elements (768 KiB in fp32)
    monkeypatch.setattr(KB, "BLOCK_Q", 32)
    small = _blocked_max_alloc(lq, lk)
    # no buffer reaches even one byte per (query, key) pair (a bool full mask would)
    assert small < lq * lk, small
    # the check can fail: one block of all rows does hold the full matrix
    monkeypatch.setattr(KB, "BLOCK_Q", lq)
    assert _blocked_max_alloc(lq, lk) >= lq * lk * 4


@pytest.mark.parametrize("need_dbias", [False, True])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_key_mask_folds_into_a_key_only_bias(kind, need_dbias, path_spy):
    """A key_mask beside a bias constant along the queries (Falcon's, padded BLOOM's ALiBi
    kept as a (B, H, 1, Lk) bias, with causal and padding as structure) is folded into that
    bias, so the fused kernel runs the forward (was: the blocked loop, 2-3x slower at 1-4k
    keys); the backward too where the bias needs no gradient. Exact against float64, rows
    that see no key included (item 1 hides every key but its last three, and its first
    rows see none of them under the causal mask)."""
    b, h, l = 2, 3, 37
    q, k, v = make_qkv(b, h, h, l, l, 16, 16, F32)
    g = torch.Generator().manual_seed(4)
    bias = (torch.randn(b, h, 1, l, generator=g) if kind == "float"
            else torch.rand(b, h, 1, l, generator=g) > 0.2)
    key_mask = torch.ones(b, l, dtype=torch.bool)
    key_mask[1, :-3] = False
    kw = dict(causal="top_left", dropout_p=0.0, softcap=0.0, key_mask=key_mask)
    assert T.forward_plan(q, k, v, bias, **kw).path == "fused"
    leaves = [q, k, v]        # the op layer calls the paths without autograd
    bias_in = bias
    out, lse = T.forward(*leaves, bias_in, scale=0.25, seed=0, **kw)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    rb = bias.double().requires_grad_(need_dbias) if kind == "float" else bias
    ref = attention_reference(*ref_leaves, rb, scale=0.25, causal="top_left", key_mask=key_mask,
                              dead_rows="zero")
    assert torch.isneginf(lse[1, :, :l - 4]).all()   # rows that see no key: -inf, out 0
    assert_close_rel(out, ref, 1e-5, "out")
    dout = torch.randn_like(out)
    grads = T.backward(dout, *leaves, bias_in, out, lse, scale=0.25, seed=0,
                       need_dbias=need_dbias, **kw)
    want = torch.autograd.grad(ref, ref_leaves + ([rb] if need_dbias and kind == "float" else []),
                               dout.double())
    for got, w, name in zip(grads, want, ["dq", "dk", "dv", "dbias"]):
        assert_close_rel(got, w, 1e-5, name)
    assert path_spy["fwd"] == ["fused"]
    assert path_spy["bwd"] == (["blocked"] if need_dbias and kind == "float" else ["fused"])
