"""What interpreted Triton kernels load: a probe of every element address a kernel
reads (the ``loaded_addresses`` fixture), the byte addresses of chosen elements of a
tensor, and the padding keys a key mask leaves at either end of each batch item.
Used by the Triton tests to prove that skipped key blocks are never read.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from attnfuse.kernels import triton_flash as tf


def padding_keys(key_mask, B, N, bn=tf.INTERPRETER_CONFIG["BLOCK_N"]):
    """(B, N) bool: the keys of every key block (``bn`` keys) that the key mask hides
    entirely and that lies before the item's first visible key or after its last one
    (padding, not a hole between visible keys): what the kernels must never load."""
    km = key_mask.expand(B, N)
    pad = torch.zeros(B, N, dtype=torch.bool)
    for z in range(B):
        visible = km[z].nonzero().flatten().tolist()
        for j0 in range(0, N, bn):
            j1 = min(j0 + bn, N)
            if not km[z, j0:j1].any() and (not visible or j1 <= visible[0] or j0 > visible[-1]):
                pad[z, j0:j1] = True
    return pad


@pytest.fixture
def loaded_addresses(monkeypatch):
    """{kernel name: [numpy arrays]}: the address of every element each interpreted
    kernel loads while the test runs (masked-off lanes excluded), to check which bytes
    of which tensor a kernel read."""
    from triton.runtime import interpreter

    seen = collections.defaultdict(list)
    kernel = [None]
    real_load = interpreter.InterpreterBuilder.create_masked_load
    real_call = interpreter.GridExecutor.__call__

    def load(self, ptrs, mask, other, *args, **kwargs):
        on = np.broadcast_to(mask.data, ptrs.data.shape).astype(bool)
        seen[kernel[0]].append(np.asarray(ptrs.data)[on].ravel().astype(np.uint64))
        return real_load(self, ptrs, mask, other, *args, **kwargs)

    def call(self, *args, **kwargs):
        kernel[0] = self.fn.__name__
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", load)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
    return seen


def addresses(t, where):
    """Byte addresses of the elements of ``t`` selected by the bool ``where`` (same
    shape)."""
    offs = torch.zeros(t.shape, dtype=torch.int64)
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        shape = [1] * t.dim()
        shape[dim] = size
        offs = offs + torch.arange(size).view(shape) * stride
    return (t.data_ptr() + offs[where] * t.element_size()).numpy().astype(np.uint64)


def assert_poisoned_keys_unread(q, k, v, unread, **kw):
    """NaN in the keys ``unread`` (bool (B, Lk)) of K and V cannot reach any result of
    ``triton_flash.forward`` / ``backward`` (called with ``kw``): out, lse, dq, dk, dv equal
    the clean run's, and dK, dV are 0 there (a kernel that loaded those blocks would compute
    0·NaN = NaN)."""
    out, lse = tf.forward(q, k, v, None, **kw)
    where = unread[:, None, :, None].expand(k.shape)
    k2, v2 = k.masked_fill(where, float("nan")), v.masked_fill(where, float("nan"))
    out2, lse2 = tf.forward(q, k2, v2, None, **kw)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    bkw = {n: x for n, x in kw.items() if n != "decode"}
    dout = torch.randn_like(out)
    g1 = tf.backward(dout, q, k, v, None, out, lse, need_dbias=False, **bkw)
    g2 = tf.backward(dout, q, k2, v2, None, out, lse, need_dbias=False, **bkw)
    for a, b in zip(g1[:3], g2[:3]):
        assert torch.equal(a, b)
    assert (g2[1][where] == 0).all() and (g2[2][where] == 0).all()


@pytest.fixture
def launched_lists(monkeypatch):
    """[(kernel name, heavy)] of every ``triton_flash._launcher`` call while the test runs:
    which config lists (plain or heavy) each kernel was launched with."""
    picked = []
    real = tf._launcher

    def spy(name, device, head_dim, dtype, heavy):
        picked.append((name, bool(heavy)))
        return real(name, device, head_dim, dtype, heavy)

    monkeypatch.setattr(tf, "_launcher", spy)
    return picked
