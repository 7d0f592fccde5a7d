"""The op's ``causal_offsets`` (issue 18, category 10): a causal diagonal per batch item,
given at run time. Row i of item b sees keys ``j <= i + causal_offsets[b]``.

Checked against a float64 reference that builds the band as a dense mask, on the CPU path
and in the Triton kernels (interpreter): forward, backward (q, k, v and a float bias), the
decode kernel, offsets that hide every key of an item or none, and that the key blocks
above an item's diagonal are never read.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before the kernel modules are imported

import pytest
import torch

from attnfuse.kernels import triton_decode as td
from attnfuse.kernels import triton_flash as tf
from attnfuse.op import flash_attention
from tests.interp_probe import assert_poisoned_keys_unread, launched_lists  # noqa: F401
from tests.reference import assert_close_rel, attention_reference


def _band(offsets, lq: int, lk: int) -> torch.Tensor:
    """(B, 1, lq, lk) keep-mask of the reference, from the definition."""
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    return (j <= i + torch.as_tensor(offsets, dtype=torch.int64)[:, None, None])[:, None]


def _reference(q, k, v, bias, offsets, key_mask=None):
    keep = _band(offsets, q.shape[2], k.shape[2])
    if bias is None:
        b = keep
    elif bias.dtype == torch.bool:
        b = bias & keep
    else:
        b = bias.double().masked_fill(~keep, float("-inf"))
    return attention_reference(q, k, v, b, key_mask=key_mask, dead_rows="zero")


def _qkv(B, Hq, Hkv, M, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, M, D, generator=g), torch.randn(B, Hkv, N, D, generator=g),
            torch.randn(B, Hkv, N, D, generator=g))


CASES = [
    # B, Hq, Hkv, M, N, offsets, bias kind, key mask
    (3, 2, 1, 21, 35, [0, 8, -5], "float", True),     # top-left, a prefill at 8, a lagging item
    (2, 2, 2, 20, 33, [100, -40], "bool", False),     # every key / no key at all
    (2, 2, 1, 19, 19, [3, 0], None, True),            # MQA, no bias
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[3]}x{c[4]}-{c[6]}")
def test_causal_offsets_match_the_reference(impl, case):
    B, Hq, Hkv, M, N, offsets, bias_kind, with_km = case
    q, k, v = _qkv(B, Hq, Hkv, M, N, 16, seed=M)
    g = torch.Generator().manual_seed(1)
    bias = {None: None, "float": torch.randn(1, Hq, M, N, generator=g),
            "bool": torch.rand(B, 1, M, N, generator=g) > 0.2}[bias_kind]
    key_mask = (torch.rand(B, N, generator=g) > 0.25) if with_km else None
    leaves = [q, k, v] + ([bias] if bias_kind == "float" else [])
    for t in leaves:
        t.requires_grad_()
    off = torch.tensor(offsets, dtype=torch.int32)
    out = flash_attention(q, k, v, bias, causal_offsets=off, key_mask=key_mask, impl=impl)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rb = ref_leaves[3] if bias_kind == "float" else bias
    ref = _reference(*ref_leaves[:3], rb, offsets, key_mask)
    assert_close_rel(out, ref, 2e-5, f"{impl} out")
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, leaves, dout.float())
    want = torch.autograd.grad(ref, ref_leaves, dout)
    for name, a, b in zip("q k v bias".split(), got, want):
        assert_close_rel(a, b, 5e-5, f"{impl} d{name}")
    if offsets[1] == -40:   # item 1 sees no key: out 0, zero gradients
        assert (out[1] == 0).all() and (got[0][1] == 0).all()


def test_decode_kernel_takes_each_items_diagonal():
    """The split-KV decode kernel clips each split to the item's diagonal in the kernel
    (the launcher cannot know the offsets without a sync)."""
    B, Hq, Hkv, M, N = 3, 4, 2, 3, 70
    q, k, v = _qkv(B, Hq, Hkv, M, N, 16, seed=7)
    offsets = [40, 66, -2]
    bias = torch.randn(B, 1, M, N)
    out, lse = td.decode_forward(q, k, v, bias, scale=0.5, causal="none", softcap=0.0,
                                 splits=3, causal_offsets=torch.tensor(offsets))
    ref = _reference(q, k, v, bias, offsets)
    ref_scaled = attention_reference(q, k, v, bias.double().masked_fill(~_band(offsets, M, N), float("-inf")),
                                     scale=0.5, dead_rows="zero")
    assert_close_rel(out, ref_scaled, 2e-5, "decode out")
    assert not torch.allclose(ref.float(), ref_scaled.float())   # the scale was read
    assert (out[2, :, :2] == 0).all() and torch.isneginf(lse[2, :, :2]).all()


def test_key_blocks_above_each_items_diagonal_are_never_read():
    """NaN in key blocks above an item's diagonal cannot reach a result: the forward,
    dK/dV and dQ kernels skip those blocks per batch item (as for ``causal``, the dK/dV
    kernel visits a key block from the first query block that may see it, so the
    blocks chosen lie above the diagonal of every query block, M rounded up)."""
    B, H, M, N = 2, 2, 20, 64
    q, k, v = _qkv(B, H, H, M, N, 16, seed=3)
    offsets = torch.tensor([3, -10])             # last rows see keys <= 22 and <= 9
    kw = dict(scale=0.25, causal="none", dropout_p=0.0, softcap=0.0, seed=0,
              causal_offsets=offsets)
    unread = torch.zeros(B, N, dtype=torch.bool)
    unread[0, 48:] = True                        # block 3 of item 0
    unread[1, 32:] = True                        # blocks 2, 3 of item 1
    assert_poisoned_keys_unread(q, k, v, unread, decode=False, **kw)


def test_bad_causal_offsets_name_the_argument():
    q, k, v = _qkv(2, 2, 2, 4, 6, 8, seed=0)
    with pytest.raises(ValueError, match="causal_offsets.*causal='none'"):
        flash_attention(q, k, v, causal=True, causal_offsets=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="causal_offsets must be int32 or int64"):
        flash_attention(q, k, v, causal_offsets=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"causal_offsets must have shape \(B,\) = \(2,\)"):
        flash_attention(q, k, v, causal_offsets=torch.tensor([0, 1, 2]))


def test_causal_offsets_pick_the_heavy_config_lists(launched_lists):
    """A run-time causal shift spills registers with a plain forward tile (d64 fp16
    128x64 w4 on sm_90: benchmarks/kernel_resources.py), so every kernel of a call with
    causal_offsets takes the "heavy" config lists."""
    q, k, v = _qkv(2, 2, 2, 5, 7, 16, seed=2)
    kw = dict(scale=0.25, causal="none", dropout_p=0.0, softcap=0.0, seed=0,
              causal_offsets=torch.tensor([1, 3]))
    out, lse = tf.forward(q, k, v, None, decode=False, **kw)
    tf.backward(torch.ones_like(out), q, k, v, None, out, lse, need_dbias=False, **kw)
    assert launched_lists == [(n, True) for n in ("attn_fwd", "attn_bwd_preprocess",
                                                  "attn_bwd_dkdv", "attn_bwd_dq")]
