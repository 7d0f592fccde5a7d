"""Masks that arrive as graph inputs (issue 18, category 10; passes/inputmask.py).

A 4-D mask passed in (Hugging Face's static KV cache builds it outside the compiled
forward) stays the op's bias; the rewrite adds a key mask derived from it at run time:
the keys no (head, query) row of a batch item sees, so the kernels skip a static cache's
empty slots. Checked against float64 eager, output and gradients (the mask's own included),
with a mask that has empty slots, left padding and a pad query that sees no key (a
``finfo.min`` row is eager's uniform average over all keys: its batch item must keep every
key, or the result changes).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attnfuse.passes import inputmask
from tests.algebra_check import check_spelling
from tests.attn_spellings import capture, fused_nodes, intermediate_value, run_rewrite

B, H, LQ, LK, D = 2, 2, 3, 8, 8


class MaskInput(nn.Module):
    """Hugging Face's eager attention: the 4-D mask is added to the scores."""

    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.mT * D ** -0.5 + mask, dim=-1) @ v


class BoolMaskInput(nn.Module):
    def forward(self, q, k, v, keep):
        s = (q @ k.mT * D ** -0.5).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class ProductMask(nn.Module):
    """DeBERTa-v2's padding mask: ``bool(m[:, None, None, :] * m[:, None, :, None])``, filled."""

    def forward(self, q, k, v, m):
        keep = (m[:, None, None, :] * m[:, None, :, None]).bool()
        s = (q @ k.mT * D ** -0.5).masked_fill(~keep, torch.finfo(q.dtype).min)
        return torch.softmax(s, dim=-1) @ v


def _static_cache_keep():
    """(B, 1, LQ, LK): queries at cache positions 2..4 of an 8-slot cache (slots 5..7 empty);
    item 0 is left-padded by one token; item 1 by three, so its first query sees no key."""
    pos = torch.arange(2, 2 + LQ)[:, None]
    j = torch.arange(LK)[None, :]
    pads = torch.tensor([1, 3])[:, None, None]
    return ((j <= pos) & (j >= pads))[:, None]


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, LQ, D, generator=g)
    k, v = (torch.randn(B, H, LK, D, generator=g) for _ in range(2))
    return q, k, v


@pytest.fixture
def derive_on_cpu(monkeypatch):
    monkeypatch.setattr(inputmask, "DERIVE_ON_CPU", True)


def _key_mask_arg(res):
    (call,) = fused_nodes(res.graph_module)
    return call.kwargs.get("key_mask")


@pytest.mark.parametrize("dialect", ["fx", "aten", "dynamo"])
def test_float_mask_input_gets_a_derived_key_mask(dialect, derive_on_cpu):
    keep = _static_cache_keep()
    assert not keep[1, 0, 0].any()   # the pad query of item 1 sees nothing: eager averages all keys
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    res = check_spelling(MaskInput(), [*_inputs(), mask], dialect)
    assert _key_mask_arg(res) is not None
    (f,) = res.report.fusions
    assert any("key mask derived from it at run time" in n for n in f.masks), f.masks
    (call,) = fused_nodes(res.graph_module)
    if dialect != "fx":   # symbolic_trace records no device to build the band's positions on
        assert call.kwargs.get("causal_offsets") is not None
        assert any("causal band, as causal_offsets" in n for n in f.masks), f.masks
    else:
        assert any("no causal band derived: the device" in n for n in f.masks), f.masks


def test_derived_causal_offsets_values(derive_on_cpu):
    """Item 0 (queries at cache positions 2..4) gets its diagonal, offset 2; item 1, with a
    row that sees no key, an offset that hides nothing (its finite-fill row is eager's
    average over every key)."""
    keep = _static_cache_keep()
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    gm, ex = capture(MaskInput(), [*_inputs(), mask], "aten")
    res = run_rewrite(gm, ex, strict=True)
    (call,) = fused_nodes(res.graph_module)
    got = intermediate_value(res.graph_module, call.kwargs["causal_offsets"], ex)
    assert got.tolist() == [2, inputmask._NO_BAND]


@pytest.mark.parametrize("dialect", ["aten", "dynamo"])
def test_prefill_mask_input_gets_its_causal_band(dialect, derive_on_cpu):
    """A static cache's prefill from position 0 with right padding: every row sees a key,
    the band is top-left in both items (offset 0), and the fusion is exact."""
    i, j = torch.arange(LQ)[:, None], torch.arange(LK)[None, :]
    keep = ((j <= i) & (j < torch.tensor([3, 2])[:, None, None]))[:, None]
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    res = check_spelling(MaskInput(), [*_inputs(), mask], dialect)
    (call,) = fused_nodes(res.graph_module)
    assert call.kwargs.get("causal_offsets") is not None
    gm, ex = capture(MaskInput(), [*_inputs(), mask], "aten")
    res = run_rewrite(gm, ex, strict=True)
    (call,) = fused_nodes(res.graph_module)
    assert intermediate_value(res.graph_module, call.kwargs["causal_offsets"], ex).tolist() == [0, 0]


def test_no_band_for_one_query_row_or_a_row_broadcast_mask(derive_on_cpu):
    """Decode (one query row: the key bounds already stop at its last key) and a mask with
    one row for every query (padding only) get a key mask and no causal offsets."""
    q, k, v = _inputs()
    mask = torch.zeros(B, 1, 1, LK)
    mask[0, ..., 5:] = torch.finfo(torch.float32).min
    for qq, m in ((q[:, :, :1], mask), (q, mask)):
        res = check_spelling(MaskInput(), [qq, k, v, m], "aten")
        (call,) = fused_nodes(res.graph_module)
        assert call.kwargs.get("key_mask") is not None
        assert call.kwargs.get("causal_offsets") is None


def test_derived_key_mask_values(derive_on_cpu):
    """What the op is given: item 0 hides its pad and the empty slots; item 1, with a row
    that sees no key, keeps every key (its finite-fill row must stay eager's average)."""
    keep = _static_cache_keep()
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    gm, ex = capture(MaskInput(), [*_inputs(), mask], "aten")
    res = run_rewrite(gm, ex, strict=True)
    km = intermediate_value(res.graph_module, _key_mask_arg(res), ex)
    want = torch.tensor([[False, True, True, True, True, False, False, False], [True] * LK])
    assert torch.equal(km, want)


@pytest.mark.parametrize("dialect", ["aten", "dynamo"])
def test_bool_mask_input_gets_a_derived_key_mask(dialect, derive_on_cpu):
    keep = _static_cache_keep().clone()
    keep[1, 0, 0, 0] = True   # every row sees a key: -inf rows would be NaN in eager
    res = check_spelling(BoolMaskInput(), [*_inputs(), keep], dialect)
    assert _key_mask_arg(res) is not None


def test_cpu_keeps_the_bias_alone_and_says_why():
    keep = _static_cache_keep()
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    res = check_spelling(MaskInput(), [*_inputs(), mask], "dynamo", grad=False)
    assert _key_mask_arg(res) is None
    (f,) = res.report.fusions
    assert any("on CPU" in n for n in f.masks), f.masks


def test_filled_product_mask_gets_a_derived_key_mask(derive_on_cpu):
    """A fill from an input's values (DeBERTa-v2): item 0 pads two keys (hidden from every row but
    also leaving its pad queries without keys: it keeps every key); item 1 has no padding."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, LK, D, generator=g) for _ in range(3))
    m = torch.ones(B, LK, dtype=torch.long)
    m[0, -2:] = 0
    res = check_spelling(ProductMask(), [q, k, v, m], "dynamo")
    assert _key_mask_arg(res) is not None
