"""Structural masks of the op (``window``, ``key_mask``) on the CPU path (impl="torch").

Every result is compared with tests/reference.py, which builds the dense boolean mask
from the definition and runs eager matmul / softmax / matmul in float64.  The blocked
loop is forced to small row blocks so windows cross block boundaries and key ranges
[kmin, kmax) are exercised.  The Triton kernels have their own file
(tests/test_triton_structural.py).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnfuse
from attnfuse.kernels import torch_banded as TB
from attnfuse.kernels import base as KB
from attnfuse.kernels import torch_impl as T
from attnfuse.kernels import torch_base as TS
from attnfuse.kernels import torch_fused as TF
from tests.reference import (assert_close_rel, assert_keep_rate, assert_within_eager_rounding,
                             attention_reference, keep_mask_from_identity_v, window_keep)


# half types: a gradient's error against float64 at most this many times the error of
# the unfused graph run in that dtype (as tests/test_torch_impl.py bounds them)
EAGER_ROUNDING_FACTOR = 1.5


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(KB, "BLOCK_Q", 8)


def _inputs(b=2, hq=4, hkv=2, lq=29, lk=29, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return mk(b, hq, lq, d), mk(b, hkv, lk, d), mk(b, hkv, lk, d)


def _padding(b, lk, *, left=False, keep=(1.0, 0.6), seed=1):
    """HF-style padding masks: row r keeps a prefix (right padding) or a suffix (left
    padding) of ``keep[r] * lk`` keys; (1, Lk) when b == 1."""
    m = torch.zeros(b, lk, dtype=torch.bool)
    for r in range(b):
        n = max(1, int(round(keep[r % len(keep)] * lk)))
        if left:
            m[r, lk - n:] = True
        else:
            m[r, :n] = True
    return m


def _check(q, k, v, *, bias=None, causal="none", window=0, key_mask=None, tol=2e-5):
    """Forward and gradients against the float64 reference; rows that see no key must
    give 0 with zero gradients (the reference's ``dead_rows="zero"``)."""
    out = attnfuse.flash_attention(q, k, v, bias, causal=causal, window=window,
                                   key_mask=key_mask, impl="torch")
    leaves = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rq, rk, rv = next(it), next(it), next(it)
    rb = next(it) if bias is not None and bias.requires_grad else bias
    ref = attention_reference(rq, rk, rv, rb, causal=causal, window=window, key_mask=key_mask,
                              dead_rows="zero")
    dead = torch.isnan(attention_reference(q, k, v, bias, causal=causal, window=window,
                                           key_mask=key_mask)).all(-1, keepdim=True)
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, ref_leaves, g.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, atol=10 * tol, rtol=10 * tol)
    if q.dtype in (torch.float16, torch.bfloat16):  # gradients within eager's own rounding
        eager_leaves = [t.detach().requires_grad_() for t in leaves]
        it = iter(eager_leaves)
        eq, ek, ev = next(it), next(it), next(it)
        eb = next(it) if bias is not None and bias.requires_grad else bias
        eager = attention_reference(eq, ek, ev, eb, causal=causal, window=window,
                                    key_mask=key_mask, dead_rows="zero", dtype=q.dtype)
        eager_grads = torch.autograd.grad(eager, eager_leaves, g)
        for name, a, w, e in zip(("dq", "dk", "dv", "dbias"), got, want, eager_grads):
            assert_within_eager_rounding(a, e, w, EAGER_ROUNDING_FACTOR, name)
    return out, dead


@pytest.mark.parametrize("path", ["banded", "blocked"])
@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("window", [1, 5, 17, 64])
@pytest.mark.parametrize("lq,lk", [(29, 29), (13, 29), (29, 13)])
def test_window(path, causal, window, lq, lk, monkeypatch):
    """Both CPU paths: the banded fused kernel per row block, and the blocked loop."""
    monkeypatch.setattr(TS, "USE_FUSED_SDPA", path == "banded")
    q, k, v = _inputs(lq=lq, lk=lk)
    assert TB.banded_applicable(q, k, v, None, causal=causal, window=window, dropout_p=0.0,
                                softcap=0.0) == (path == "banded")
    _check(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("left", [False, True])
def test_window_with_key_mask_banded(left):
    q, k, v = _inputs(lq=31, lk=31)
    assert TB.banded_applicable(q, k, v, None, causal="top_left", window=9, dropout_p=0.0,
                                softcap=0.0)
    _check(q, k, v, causal="top_left", window=9, key_mask=_padding(2, 31, left=left))


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("lq", [9, 40])
def test_bottom_right_with_key_mask_banded(left, lq):
    """A bottom-right diagonal (Lq != Lk) with a key_mask runs the banded path, which
    takes the key_mask per block (no folded (B, 1, 1, Lk) bias)."""
    q, k, v = _inputs(lq=lq, lk=31)
    km = _padding(2, 31, left=left)
    assert T.forward_path(q, k, v, None, causal="bottom_right", dropout_p=0.0, softcap=0.0,
                          key_mask=km) == "banded"
    _check(q, k, v, causal="bottom_right", key_mask=km)


@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("batch", [2, 1])
def test_key_mask_padding(causal, left, batch):
    q, k, v = _inputs(b=batch, lq=21, lk=21)
    km = _padding(batch, 21, left=left, keep=(0.6,) if batch == 1 else (1.0, 0.6))
    out, dead = _check(q, k, v, causal=causal, key_mask=km)
    if left and causal != "none":  # left-padded pad queries see only pad keys
        assert dead.any()
        assert (out.masked_select(dead.expand_as(out)) == 0).all()


def test_key_mask_broadcast_batch_of_one():
    q, k, v = _inputs(b=3, lq=11, lk=17)
    km = torch.rand(1, 17, generator=torch.Generator().manual_seed(3)) > 0.4
    _check(q, k, v, key_mask=km)


@pytest.mark.parametrize("bias_shape", [(1, 4, 29, 29), (2, 1, 1, 29)])
def test_window_and_key_mask_with_bias(bias_shape):
    q, k, v = _inputs()
    bias = torch.randn(*bias_shape, generator=torch.Generator().manual_seed(5)).requires_grad_()
    km = _padding(2, 29)
    _check(q, k, v, bias=bias, causal="top_left", window=7, key_mask=km)


def test_key_mask_with_bool_bias():
    q, k, v = _inputs(lq=15, lk=19)
    bias = torch.rand(1, 1, 15, 19, generator=torch.Generator().manual_seed(7)) > 0.3
    _check(q, k, v, bias=bias, key_mask=_padding(2, 19, left=True))


def test_every_key_masked_gives_zero():
    q, k, v = _inputs(lq=9, lk=9)
    km = torch.zeros(2, 9, dtype=torch.bool)
    out = attnfuse.flash_attention(q, k, v, key_mask=km, impl="torch")
    assert (out == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_half_types(dtype, tol):
    q, k, v = _inputs(lq=33, lk=33, dtype=dtype)
    _check(q, k, v, causal="top_left", window=9, key_mask=_padding(2, 33, left=True), tol=tol)


def test_window_wider_than_keys_equals_causal():
    q, k, v = _inputs(lq=19, lk=19)
    a = attnfuse.flash_attention(q, k, v, causal=True, window=19, impl="torch")
    b = attnfuse.flash_attention(q, k, v, causal=True, impl="torch")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_dropout_with_window_uses_one_mask():
    """Dropout with a window on the blocked path (row blocks of 8, so most blocks' bands
    start past key 0): the backward applies the forward's keep-mask at the same keys.
    The mask is read back from the forward with v = identity (not rebuilt with the
    library's generator); output and gradients are checked against the float64 reference
    given that mask."""
    b, h, L, p, scale, window = 1, 2, 40, 0.3, 0.25, 6
    q, k, v = _inputs(b=b, hq=h, hkv=h, lq=L, lk=L)
    seed = torch.tensor(1234, dtype=torch.int64)

    def op(v):
        return torch.ops.attnfuse.flash_attention(q, k, v, None, scale, "top_left", p, 0.0, seed,
                                                  "torch", window, None)[0]

    with torch.no_grad():
        keep = keep_mask_from_identity_v(op(torch.eye(L).expand(b, h, L, L)), L)
    visible = window_keep(L, L, "top_left", window)
    assert_keep_rate(keep, visible, p)
    out = op(v)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, scale=scale, causal="top_left", window=window,
                              dropout_mask=keep, dropout_p=p)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=2e-5)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, leaves, dout.double())
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert_close_rel(a, w, 1e-5, name)


class _LargestAlloc(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_window_work_is_banded():
    """With a window the blocked path only scores keys inside the band: no tensor
    reaches Lq x Lk elements per head."""
    L, w, d = 512, 32, 2  # head dim 2: a (rows x Lk) score block would outgrow q itself
    q, k, v = (t.detach() for t in _inputs(b=1, hq=1, hkv=1, lq=L, lk=L, d=d))
    with _LargestAlloc() as spy:  # T.forward itself: the mode does not see inside a custom op
        T.forward(q, k, v, None, scale=0.5, causal="top_left", dropout_p=0.0, softcap=0.0, seed=0,
                  window=w)
    # BLOCK_Q=8 rows x (rows + window) keys per block; an unbanded block is 8 x 512
    assert spy.largest <= max(L * d, 8 * (8 + w)), spy.largest


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(window=-1, causal=True), ValueError, "window must be an int"),
    (dict(window=4), ValueError, "window needs causal"),
    (dict(window=2.5, causal=True), ValueError, "window must be an int"),
    (dict(key_mask=torch.ones(2, 7)), TypeError, "key_mask must be a bool"),
    (dict(key_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "key_mask must have shape"),
    (dict(key_mask=torch.ones(3, 7, dtype=torch.bool)), ValueError, "key_mask must have shape"),
    (dict(key_mask=torch.ones(2, 1, 7, dtype=torch.bool)), ValueError, "key_mask must have shape"),
    (dict(key_mask=[True] * 7), TypeError, "key_mask must be a torch.Tensor"),
])
def test_bad_structural_arguments(kwargs, err, match):
    q, k, v = _inputs(lq=7, lk=7)
    with pytest.raises(err, match=match):
        attnfuse.flash_attention(q, k, v, impl="torch", **kwargs)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_through_torch_compile(backend):
    """The fake kernel and autograd formula carry window and key_mask through AOTAutograd."""
    q, k, v = _inputs(lq=24, lk=24)
    km = _padding(2, 24, left=True)

    def f(q, k, v, km):
        return attnfuse.flash_attention(q, k, v, causal=True, window=6, key_mask=km, impl="torch")

    out = torch.compile(f, backend=backend, fullgraph=True)(q, k, v, km)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, causal="top_left", window=6, key_mask=km,
                              dead_rows="zero")
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=2e-5)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    g1 = torch.autograd.grad(out, (q, k, v), dout)
    g2 = torch.autograd.grad(ref, leaves, dout.double())
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-4)


def test_fused_path_for_key_mask_with_holes(monkeypatch):
    """A key_mask whose visible keys are not one run per row (so not the key-run path)
    runs PyTorch's fused CPU kernel with a broadcast (B,1,1,Lk) mask."""
    ran = []
    real = TF.fused_forward
    monkeypatch.setattr(TF, "fused_forward", lambda *a, **kw: ran.append(a[3].shape) or real(*a, **kw))
    q, k, v = _inputs(lq=16, lk=16)
    km = _padding(2, 16)
    km[0, 5] = False  # a hole between visible keys
    assert T.forward_path(q, k, v, None, causal="none", dropout_p=0.0, softcap=0.0,
                          key_mask=km) == "fused"
    _check(q, k, v, key_mask=km)
    assert ran == [torch.Size([2, 1, 1, 16])]
    assert math.prod(ran[0]) == 32  # never an (Lq, Lk) mask
