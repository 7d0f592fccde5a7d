"""Which autotune config lists a Triton launch takes (``triton_flash._heavy``).

The plain lists (larger tiles) are checked free of register spills only under the
specialisation Triton's JIT gives an aligned launch (``triton_flash.aligned``:
16-byte-aligned operands, unit last strides, other strides and head dims multiples of
16; benchmarks/kernel_resources.py compiles them so).  A launch without it must take the
heavy lists, checked with nothing specialised.  Interpreter on CPU tensors; the launcher
is spied on, the kernels run as usual.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before the kernel modules are imported

import pytest
import torch

from attnfuse.kernels import triton_flash as tf

OPTS = dict(scale=0.25, causal="top_left", dropout_p=0.0, softcap=0.0, seed=0)
B, H, L = 1, 1, 8


def _picks(monkeypatch, q, k, v, dout=None):
    """{kernel name: heavy} of one forward and backward through the launcher."""
    picked = {}
    real = tf._launcher

    def spy(name, device, head_dim, dtype, heavy):
        picked[name] = bool(heavy)
        return real(name, device, head_dim, dtype, heavy)

    monkeypatch.setattr(tf, "_launcher", spy)
    out, lse = tf.forward(q, k, v, None, decode=False, **OPTS)
    dout = torch.ones_like(out) if dout is None else dout
    tf.backward(dout, q, k, v, None, out, lse, need_dbias=False, **OPTS)
    return picked


def _fresh(d=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, d, generator=g) for _ in range(3)]


def _offset_by_one(t):
    """``t``'s values at an address 4 bytes past a 16-byte boundary, same strides."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def _wide_rows(t, width):
    """``t``'s values in the first columns of rows ``width`` elements apart."""
    wide = torch.zeros(*t.shape[:-1], width, dtype=t.dtype)
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]


KERNELS = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


def test_aligned_call_takes_the_plain_lists(monkeypatch):
    q, k, v = _fresh()
    assert tf.aligned((q, k, v), (16, 16))
    picked = _picks(monkeypatch, q, k, v)
    assert {n: picked[n] for n in KERNELS} == dict.fromkeys(KERNELS, False)


@pytest.mark.parametrize("case", ["q address", "k row stride", "head dim 24", "dout address"])
def test_unaligned_call_takes_the_heavy_lists(monkeypatch, case):
    """One fact missing is enough: an address off a 16-byte boundary (q sliced from a
    buffer), a row stride of 24 elements, a head dim of 24 (row stride 32), or only the
    backward's dout (then the forward stays plain)."""
    q, k, v = _fresh(24 if case == "head dim 24" else 16)
    dout = None
    if case == "q address":
        q = _offset_by_one(q)
        assert q.data_ptr() % 16 == 4 and q.stride() == (H * L * 16, L * 16, 16, 1)
    elif case == "k row stride":
        k = _wide_rows(k, 24)
        assert k.data_ptr() % 16 == 0 and k.stride(2) == 24
    elif case == "head dim 24":
        q, k, v = (_wide_rows(t, 32) for t in (q, k, v))
        assert q.stride(2) == 32 and q.data_ptr() % 16 == 0
    else:
        dout = _offset_by_one(torch.ones(B, H, L, 16))
    picked = _picks(monkeypatch, q, k, v, dout)
    want = dict.fromkeys(KERNELS, True)
    if case == "dout address":
        want["attn_fwd"] = False
    assert {n: picked[n] for n in KERNELS} == want
