"""The matcher proves ALiBi from the graph (passes/alibi.py) and passes the slope tensor
as ``alibi_slopes``: no (Lq, Lk) bias reaches the op. BLOOM's spelling (slopes ×
``arange``, repeated per batch item, through ``baddbmm``) and MPT's (``arange(1 - L, 1)``
× slopes, added), in the graph dialects; what is not proven stays a bias with a note.
Outputs (and gradients) against eager in float64.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

import attnfuse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared catalog
from attn_spellings import capture, fused_nodes  # noqa: E402

B, H, L, D = 2, 4, 8, 8


def _qkv(seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).requires_grad_(grad) for _ in range(3)]


def _causal(n, device):
    i = torch.arange(n, device=device)
    return i[None, :] <= i[:, None]


class BloomStyle(nn.Module):
    """BLOOM's eager attention: ``baddbmm(alibi, q, kᵀ)`` with alibi (B·H, 1, L) from a slope
    buffer × ``arange``, a causal mask from index comparisons."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125, 0.0625]))

    def forward(self, q, k, v):
        b, h, n, d = q.shape
        alibi = self.slopes[:, None, None] * torch.arange(n, device=q.device)
        alibi = alibi.repeat(b, 1, 1).to(q.dtype)
        s = alibi.baddbmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2),
                          beta=1.0, alpha=d ** -0.5)
        s = s.view(b, h, n, n).masked_fill(~_causal(n, q.device), float("-inf"))
        p = torch.softmax(s, dim=-1).view(b * h, n, n)
        return torch.bmm(p, v.reshape(b * h, n, d)).view(b, h, n, d)


class MptStyle(nn.Module):
    """MPT's: ``arange(1 - L, 1) (int32) × slopes`` built in the graph, sliced, added."""

    def forward(self, q, k, v):
        n = q.shape[2]
        pos = torch.arange(1 - n, 1, dtype=torch.int32, device=q.device).view(1, 1, 1, n)
        slopes = 1.0 / torch.pow(2, torch.arange(1, H + 1, device=q.device).float())
        alibi = (pos * slopes.view(1, H, 1, 1)).squeeze(0)[:, 0:, 0:]
        s = q @ k.transpose(-1, -2) * D ** -0.5 + alibi
        s = s.masked_fill(~_causal(n, q.device), -3.4028234663852886e+38)   # finfo(float32).min
        return torch.softmax(s, dim=-1) @ v


class DirectProduct(BloomStyle):
    """The product itself added (no layout op after it), bottom-right causal mask."""

    def forward(self, q, k, v):
        n = q.shape[2]
        i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
        s = q @ k.transpose(-1, -2) + self.slopes.view(1, H, 1, 1) * (torch.arange(n) - n)
        return torch.softmax(s.masked_fill(j > i, float("-inf")), dim=-1) @ v


class NotCausal(BloomStyle):
    """The key-position ALiBi without a causal mask: not the op's symmetric ALiBi."""

    def forward(self, q, k, v):
        alibi = (self.slopes[:, None, None] * torch.arange(L)).repeat(B, 1, 1).view(B, H, 1, L)
        return torch.softmax(q @ k.transpose(-1, -2) + alibi, dim=-1) @ v


class SquaredPositions(BloomStyle):
    """slope × j² is not ALiBi."""

    def forward(self, q, k, v):
        alibi = self.slopes.view(1, H, 1, 1) * torch.arange(L).pow(2)
        s = (q @ k.transpose(-1, -2) + alibi).masked_fill(~_causal(L, q.device), float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class InputPositions(BloomStyle):
    """BLOOM's padding-derived positions, ``(mask.cumsum(-1) - 1) * mask``, from an input."""

    def forward(self, q, k, v, mask):
        pos = ((mask.cumsum(-1) - 1) * mask)[:, None, None, :]
        alibi = self.slopes.view(1, H, 1, 1) * pos
        s = (q @ k.transpose(-1, -2) + alibi).masked_fill(~_causal(L, q.device), float("-inf"))
        return torch.softmax(s, dim=-1) @ v


def _eager64(mod, *xs):
    return mod.double()(*(x.double() if x.is_floating_point() else x for x in xs))


def _op_kwargs(gm):
    (n,) = fused_nodes(gm)
    return n.kwargs


@pytest.mark.parametrize("module,dialect", [(m, d) for m in (BloomStyle, MptStyle) for d in ("dynamo", "aten")]
                         + [(DirectProduct, "dynamo")])
def test_alibi_becomes_structure(module, dialect):
    mod = module()
    q, k, v = _qkv()
    gm, inputs = capture(mod, (q, k, v), dialect)
    res = attnfuse.rewrite(gm, list(inputs), strict=True)
    assert res.fused == 1
    kw = _op_kwargs(res.graph_module)
    assert kw.get("bias") is None, "an ALiBi bias tensor reached the op"
    assert kw.get("alibi_slopes") is not None and kw.get("causal") == "top_left"
    (f,) = res.report.fusions
    assert f.alibi and "alibi_slopes" in f.structure
    out = res.graph_module(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out.double(), _eager64(mod, q, k, v), atol=2e-6, rtol=2e-6)


def test_symbolic_trace_and_dynamic_shapes_stay_exact():
    """symbolic_trace (sizes read at run time) and dynamo with dynamic shapes: the index
    and position proofs need static sizes, so the term stays a bias (documented), exact.
    (BloomStyle is not fused under symbolic_trace: fx does not read a method ``baddbmm``
    whose alpha is a run-time size as a product. Under dynamic shapes it is matched on its
    split (B, H) axes, its ALiBi a (B, H, 1, Lk) bias: the padded form is tested below.)"""
    mod = MptStyle()
    q, k, v = _qkv()
    for dialect in ("fx", "dynamo_dynamic"):
        gm, inputs = capture(mod, (q, k, v), dialect)
        res = attnfuse.rewrite(gm, list(inputs), strict=True)
        assert res.fused == 1, dialect
        out = res.graph_module(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        torch.testing.assert_close(out.double(), _eager64(mod, q, k, v), atol=2e-6, rtol=2e-6)


def test_alibi_training_gradients_through_the_backend():
    """Train mode through torch.compile (aot_eager): eager's gradients for q, k, v; a
    slope buffer changed after the compile is read at run time (no value was baked in)."""
    mod = BloomStyle()
    q, k, v = _qkv(grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(mod, backend="attnfuse", options={"inner": "aot_eager", "strict": True})
    out = compiled(q, k, v)
    (f,) = attnfuse.last_report().fusions
    assert f.alibi and f.bias == "none"
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _eager64(BloomStyle(), q64, k64, v64)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
    g = torch.randn_like(out)
    for a, w in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q64, k64, v64), g.double())):
        torch.testing.assert_close(a.double(), w, atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        mod.slopes.mul_(3.0)
    other = BloomStyle()
    other.slopes.mul_(3.0)
    torch.testing.assert_close(compiled(q, k, v).double(), _eager64(other, q, k, v), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("module,note", [
    (NotCausal, "do not show every visible key"),
    (SquaredPositions, None),
    (InputPositions, "come from a graph input"),
])
def test_unproven_alibi_stays_a_bias(module, note):
    mod = module()
    q, k, v = _qkv()
    extra = (torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]),) if module is InputPositions else ()
    gm, inputs = capture(mod, (q, k, v) + extra, "dynamo")
    res = attnfuse.rewrite(gm, list(inputs), strict=True)
    assert res.fused == 1
    kw = _op_kwargs(res.graph_module)
    assert kw.get("alibi_slopes") is None and kw.get("bias") is not None
    (f,) = res.report.fusions
    if note:
        assert any(note in m for m in f.masks), f.masks
    out = res.graph_module(*inputs)[0]
    torch.testing.assert_close(out.double(), _eager64(mod, q, k, v, *extra), atol=2e-6, rtol=2e-6)


N = 12   # a length no other size equals: the (Lq, Lk) tensors are the ones with two axes of N
_PAD = torch.tensor([[0, 0] + [1] * (N - 2), [1] * N])   # item 0 left-padded: its rows 0, 1 see no key


def _qkv_n(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def _hf_float_mask(mask, dtype):
    """Hugging Face's eager mask: causal & padding[b, kv] as ``where(keep, 0, finfo.min)``, (B, 1, L, L)."""
    n = mask.shape[-1]
    keep = _causal(n, mask.device)[None, None] & mask.bool()[:, None, None, :]
    return torch.where(keep, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


class FalconStyle(nn.Module):
    """Falcon's ALiBi: ``bfloat16(slopes) * positions`` (from the padding mask's cumsum), over
    which the mask is filled, ``masked_fill(alibi / sqrt(d), hf_mask < -1, finfo.min)``: one
    (B, H, L, L) float term added to the scores."""

    def forward(self, q, k, v, mask):
        b, h, n, d = q.shape
        slopes = torch.pow(torch.full((), 0.25), torch.arange(1, h + 1, dtype=torch.int32))
        pos = ((mask.cumsum(-1) - 1) * mask)[:, None, :]
        alibi = (slopes[..., None].bfloat16() * pos).reshape(b * h, 1, n).to(q.dtype).reshape(b, h, 1, n)
        bias = torch.masked_fill(alibi / d ** 0.5, _hf_float_mask(mask, q.dtype) < -1, torch.finfo(q.dtype).min)
        return torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5 + bias, dim=-1) @ v


class FillOverInput(nn.Module):
    """The same fill over a float *input* term: its values are unknown (it may be -inf where
    the fill is not), so nothing proves that the fill is the only mask: it stays one bias."""

    def forward(self, q, k, v, mask, x):
        bias = torch.masked_fill(x, _hf_float_mask(mask, q.dtype) < -1, torch.finfo(q.dtype).min)
        return torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v


class MptPadded(MptStyle):
    """MPT with a padding mask: the scores filled where ``hf_mask.to(bool)`` (HF's float mask
    read back as a bool: True where masked)."""

    def forward(self, q, k, v, mask):
        n = q.shape[2]
        pos = torch.arange(1 - n, 1, dtype=torch.int32).view(1, 1, 1, n)
        slopes = 1.0 / torch.pow(2, torch.arange(1, H + 1).float())
        s = q @ k.transpose(-1, -2) * D ** -0.5 + (pos * slopes.view(1, H, 1, 1)).squeeze(0)
        s = s.masked_fill(_hf_float_mask(mask, q.dtype).to(torch.bool), torch.finfo(q.dtype).min)
        return torch.softmax(s, dim=-1) @ v


class BloomPadded(nn.Module):
    """BLOOM with a padding mask: ALiBi ``slopes × ((mask.cumsum(-1) - 1) * mask)`` as (B·H, 1, L),
    ``baddbmm`` on the merged (B·H) axis, scores viewed (B, H, L, L) and Hugging Face's float
    mask added, softmax in (at least) float32, P·V with ``bmm`` on B·H, heads merged back."""

    def forward(self, q, k, v, mask):
        b, h, n, d = q.shape
        slopes = torch.pow(torch.full((), 0.25), torch.arange(1, h + 1, dtype=torch.int32))
        pos = ((mask.cumsum(-1) - 1) * mask)[:, None, :]
        alibi = (slopes[..., None] * pos).reshape(b * h, 1, n).to(q.dtype)
        s = alibi.baddbmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(-1, -2), beta=1.0,
                          alpha=d ** -0.5)
        s = s.view(b, h, n, n) + _hf_float_mask(mask, q.dtype)
        up = torch.promote_types(q.dtype, torch.float32)   # float32 (float64 for the reference: its fill)
        p = torch.softmax(s, dim=-1, dtype=up).to(q.dtype).view(b * h, n, n)
        out = torch.bmm(p, v.reshape(b * h, n, d)).view(b, h, n, d)
        return out.permute(0, 2, 1, 3).reshape(b, n, h * d)


def _run_recording_bias(gm, inputs):
    """(the graph's output, (shape, stride) of the bias its fused call reads, or None)."""
    seen = []

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if "attnfuse.flash_attention" in str(target):
                b = kwargs.get("bias", args[3] if len(args) > 3 else None)
                seen.append(None if b is None else (tuple(b.shape), b.stride()))
            return super().call_function(target, args, kwargs)

    out = Recorder(gm).run(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert len(seen) == 1
    return out, seen[0]


@pytest.mark.parametrize("module,dialect", [(FalconStyle, "aten"), (MptPadded, "aten"), (BloomPadded, "aten")])
def test_padded_alibi_fuses_with_no_square_tensor(module, dialect):   # dynamo: test_real_models
    """Falcon: the bounded ALiBi term it fills over is the op's (B, H, 1, Lk) bias (a query
    broadcast, O(L)), the fill causal + key_mask with the empty-row fix-up; MPT: alibi_slopes,
    causal + key_mask; BLOOM: matched on (B, H) though its products run on B·H, its ALiBi
    (B·H, 1, Lk) reshaped to the (B, H, 1, Lk) bias beside the finite-fill mask (causal +
    key_mask + fix-up). The rewritten graph holds no (Lq, Lk) tensor; outputs (the padded
    rows' uniform average included) equal eager's in float64."""
    mod = module()
    q, k, v = _qkv_n()
    gm, inputs = capture(mod, (q, k, v, _PAD), dialect)
    res = attnfuse.rewrite(gm, list(inputs), strict=True)
    assert res.fused == 1
    kw = _op_kwargs(res.graph_module)
    (f,) = res.report.fusions
    assert f.causal == "top_left" and f.key_mask and f.empty_row_fixup, f.masks
    out, bias = _run_recording_bias(res.graph_module, inputs)
    if module in (FalconStyle, BloomPadded):   # stride 0 along the queries: O(B·H·Lk) values
        assert bias[0] == (B, H, 1, N) and kw.get("alibi_slopes") is None, bias
    else:
        assert bias is None and kw.get("alibi_slopes") is not None
    shapes = [n.meta.get("val", n.meta.get("example_value")) for n in res.graph_module.graph.nodes]
    assert not [s.shape for s in shapes if isinstance(s, torch.Tensor) and list(s.shape).count(N) >= 2]
    torch.testing.assert_close(out.double(), _eager64(mod, q, k, v, _PAD), atol=2e-6, rtol=2e-6)


def test_fill_over_an_unbounded_term_stays_a_bias():
    """x = -inf at item 1's only visible key of row 0: eager averages that row over its
    filled keys, which no structure reproduces; the fused op gets the whole term as its bias."""
    q, k, v = _qkv_n()
    x = torch.randn(B, H, 1, N)
    x[1, :, 0, 0] = float("-inf")
    mod = FillOverInput()
    gm, inputs = capture(mod, (q, k, v, _PAD, x), "dynamo")
    res = attnfuse.rewrite(gm, list(inputs), strict=True)
    assert res.fused == 1
    out, bias = _run_recording_bias(res.graph_module, inputs)
    assert bias[0] == (B, H, N, N), bias
    torch.testing.assert_close(out.double(), _eager64(mod, q, k, v, _PAD, x.double()), atol=2e-6, rtol=2e-6)


class BloomMergedInputs(BloomPadded):
    """BLOOM's scores from q, k, v given already merged, (B·H, L, D): no (B, H) tensor for the
    op to read, so the attention stays on the merged axis with its mask as one bias."""

    def forward(self, q, k, v, mask):
        b, n = mask.shape
        s = torch.bmm(q, k.transpose(-1, -2)).view(b, -1, n, n) + _hf_float_mask(mask, q.dtype)
        p = torch.softmax(s, dim=-1).view(-1, n, n)
        return torch.bmm(p, v)


def test_split_batch_axis_without_a_merge_to_read_stays_merged():
    q, k, v = (x.reshape(B * H, N, D) for x in _qkv_n())
    mod = BloomMergedInputs()
    gm, inputs = capture(mod, (q, k, v, _PAD), "aten")
    res = attnfuse.rewrite(gm, list(inputs), strict=True)
    assert res.fused == 1
    (f,) = res.report.fusions
    assert any("kept merged" in m and "not a reshape that merged" in m for m in f.masks), f.masks
    out, bias = _run_recording_bias(res.graph_module, inputs)
    assert bias[0] == (1, B * H, N, N), bias
    torch.testing.assert_close(out.double(), _eager64(mod, q, k, v, _PAD), atol=2e-6, rtol=2e-6)


# ---------------------------------------------------------------------------
# the split batch axis with symbolic sizes, and symbolic_trace (issue 22, part 2)
# ---------------------------------------------------------------------------

class BloomPaddedConfigHeads(BloomPadded):
    """:class:`BloomPadded` with the head count and head dim from the config (python ints), as
    Hugging Face's BLOOM builds its slopes (``build_alibi_tensor(mask, num_heads, dtype)``)
    and reshapes its heads; batch and length come from the mask."""

    def forward(self, q, k, v, mask):
        b, n = mask.shape
        slopes = torch.pow(torch.full((), 0.25), torch.arange(1, H + 1, dtype=torch.int32))
        pos = ((mask.cumsum(-1) - 1) * mask)[:, None, :]
        alibi = (slopes[..., None] * pos).reshape(b * H, 1, n).to(q.dtype)
        s = alibi.baddbmm(q.reshape(b * H, n, D), k.reshape(b * H, n, D).transpose(-1, -2), beta=1.0,
                          alpha=D ** -0.5)
        s = s.view(b, H, n, n) + _hf_float_mask(mask, q.dtype)
        up = torch.promote_types(q.dtype, torch.float32)
        p = torch.softmax(s, dim=-1, dtype=up).to(q.dtype).view(b * H, n, n)
        out = torch.bmm(p, v.reshape(b * H, n, D)).view(b, H, n, D)
        return out.permute(0, 2, 1, 3).reshape(b, n, H * D)


def _compiled_like_eager64(compiled, mod, pads) -> list:
    """Run ``compiled`` (train mode) once per padding mask in ``pads`` (B, L each) on random
    q, k, v; out and the q/k/v gradients must equal ``mod``'s in float64. Returns the
    attnfuse reports of the graphs compiled meanwhile."""
    with attnfuse.backend.collect_reports() as reports:
        for seed, pad in enumerate(pads):
            b, n = pad.shape
            g = torch.Generator().manual_seed(seed)
            q, k, v = (torch.randn(b, H, n, D, generator=g).requires_grad_() for _ in range(3))
            out = compiled(q, k, v, pad)
            leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref = _eager64(mod, *leaves, pad)
            torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
            dout = torch.randn(out.shape, generator=g)
            got = torch.autograd.grad(out, (q, k, v), dout)
            for a, w in zip(got, torch.autograd.grad(ref, leaves, dout.double())):
                torch.testing.assert_close(a.double(), w, atol=2e-5, rtol=2e-5)
    return reports


def test_padded_bloom_with_dynamic_shapes_fuses_on_split_axes():
    """torch.compile(dynamic=True), train mode: B and L symbolic, the merged axis b*H a SymInt
    product. q, k, v are proven row-major merges of (B, H) and the ALiBi term's (B·H, 1, Lk)
    is split by a reshape whose sizes are read at run time (batchaxes.split_term): one graph
    serves two batch sizes and lengths, the op reading the (B, H, 1, Lk) bias and the mask as
    causal + key_mask + fix-up; outputs and gradients equal eager's in float64."""
    torch._dynamo.reset()
    mod = BloomPaddedConfigHeads()
    compiled = torch.compile(mod, backend="attnfuse", dynamic=True, options={"inner": "eager", "strict": True})
    pads = [_PAD, torch.tensor([[0, 0, 0] + [1] * 7, [1] * 10, [0] + [1] * 9])]
    reports = _compiled_like_eager64(compiled, mod, pads)
    assert len(reports) == 1, "one graph for both sizes"
    (f,) = reports[0].fusions
    assert f.causal == "top_left" and f.key_mask and f.empty_row_fixup and f.bias == "float:alibi", f.masks
    assert not f.alibi   # positions from the mask's cumsum: a bias, not alibi_slopes


# ---------------------------------------------------------------------------
# batch size 1: the view (1·H, Lq, Lk) -> (1, H, Lq, Lk) puts a unit batch axis in front
# ---------------------------------------------------------------------------

def _square_free(gm):
    """Shapes of the nodes of ``gm`` with two axes of size N (an (Lq, Lk) tensor): none expected."""
    vals = [n.meta.get("val", n.meta.get("example_value")) for n in gm.graph.nodes]
    return [tuple(x.shape) for x in vals if isinstance(x, torch.Tensor) and list(x.shape).count(N) >= 2]


@pytest.mark.parametrize("dialect", ["aten", "dynamo"])
def test_padded_bloom_at_batch_one_fuses_on_the_split_axes(dialect):
    """Batch 1 (``generate()`` passes an attention_mask at batch 1 too), item 0 left-padded:
    the view of the B·H = H scores to (1, H, Lq, Lk) only puts a unit axis in front, a split
    with a unit batch part (batchaxes.unit_batch). Matched there as at B = 2: the mask as
    causal + key_mask + the empty-row fix-up, the ALiBi (H, 1, Lk) read as the (1, H, 1, Lk)
    bias (one row per head, broadcast along the queries), no node with two axes of N. Output and the gradients
    of q, k, v (through the op's backward) equal eager's in float64."""
    mod = BloomPadded()
    q, k, v = (x[:1].clone().requires_grad_() for x in _qkv_n(seed=3))
    pad = _PAD[:1].clone()
    gm, inputs = capture(mod, (q, k, v, pad), dialect)
    res = attnfuse.rewrite(gm, list(inputs), strict=True)
    assert res.fused == 1
    (f,) = res.report.fusions
    assert f.causal == "top_left" and f.key_mask and f.empty_row_fixup and f.bias.startswith("float:"), f.masks
    assert _op_kwargs(res.graph_module).get("alibi_slopes") is None
    out, bias = _run_recording_bias(res.graph_module, inputs)
    assert bias is not None and bias[0] == (1, H, 1, N), bias   # O(H·Lk) values
    assert not _square_free(res.graph_module)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _eager64(mod, *leaves, pad)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    for a, w in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, leaves, dout.double())):
        torch.testing.assert_close(a.double(), w, atol=2e-5, rtol=2e-5)


def test_padded_bloom_at_batch_one_with_dynamic_lengths():
    """torch.compile(dynamic=True), train mode, batch 1 (specialised: dynamo never makes a
    size-1 axis symbolic, and a symbolic B keeps a split of B·H, exact for every B) and a
    symbolic length: one graph for two lengths, fused on the unit-batch frame with the same
    structure; outputs and gradients equal eager's in float64."""
    torch._dynamo.reset()
    mod = BloomPaddedConfigHeads()
    compiled = torch.compile(mod, backend="attnfuse", dynamic=True, options={"inner": "eager", "strict": True})
    reports = _compiled_like_eager64(compiled, mod, [_PAD[:1].clone(), torch.tensor([[0, 0, 0] + [1] * 7])])
    assert len(reports) == 1, "one graph for both lengths"
    (f,) = reports[0].fusions
    assert f.causal == "top_left" and f.key_mask and f.empty_row_fixup and f.bias == "float:alibi", f.masks


class BloomRowFill(BloomPadded):
    """:class:`BloomPadded` whose padded query rows of P are filled with 0 after the softmax."""

    def forward(self, q, k, v, mask):
        b, h, n, d = q.shape
        slopes = torch.pow(torch.full((), 0.25), torch.arange(1, h + 1, dtype=torch.int32))
        alibi = (slopes[..., None] * ((mask.cumsum(-1) - 1) * mask)[:, None, :]).reshape(b * h, 1, n).to(q.dtype)
        s = alibi.baddbmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(-1, -2), alpha=d ** -0.5)
        p = torch.softmax(s.view(b, h, n, n) + _hf_float_mask(mask, q.dtype), dim=-1)
        p = p.masked_fill(~mask.bool()[:, None, :, None], 0.0).view(b * h, n, n)
        return torch.bmm(p, v.reshape(b * h, n, d)).view(b, h, n, d)


def test_batch_one_frame_declined_says_why():
    """At batch 1 a row fill of P is not taken on the unit-batch frame (as on any split
    frame): the merged match stands with one bias, and its note says that the scores were
    viewed with a unit batch axis and why the frame was declined. Exact against eager."""
    mod = BloomRowFill()
    q, k, v = (x[:1] for x in _qkv_n())
    gm, inputs = capture(mod, (q, k, v, _PAD[:1]), "aten")
    res = attnfuse.rewrite(gm, list(inputs), strict=True)
    assert res.fused == 1
    (f,) = res.report.fusions
    assert any("a unit batch axis put in front of their batch axis ((1, 4, 12, 12)): kept merged, sinks or row "
               "fills" in m for m in f.masks), f.masks
    out, bias = _run_recording_bias(res.graph_module, inputs)
    assert bias[0] == (1, H, N, N), bias
    torch.testing.assert_close(out.double(), _eager64(mod, q, k, v, _PAD[:1]), atol=2e-6, rtol=2e-6)


class BloomPaddedFx(BloomPadded):
    """Padded BLOOM written so that ``torch.fx.symbolic_trace`` traces it (sizes read from the
    mask, float32's finfo.min, the causal mask from an arange comparison)."""

    def forward(self, q, k, v, mask):
        b, n = mask.shape
        slopes = torch.pow(torch.full((), 0.25), torch.arange(1, H + 1, dtype=torch.int32))
        pos = ((mask.cumsum(-1) - 1) * mask)[:, None, :]
        alibi = (slopes[..., None] * pos).reshape(b * H, 1, n).to(q.dtype)
        s = alibi.baddbmm(q.reshape(b * H, n, D), k.reshape(b * H, n, D).transpose(-1, -2), beta=1.0,
                          alpha=D ** -0.5)
        i = torch.arange(n)
        keep = (i[None, :] <= i[:, None])[None, None] & mask.bool()[:, None, None, :]
        s = s.view(b, H, n, n) + torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        p = torch.softmax(s, dim=-1).view(b * H, n, n)
        return torch.bmm(p, v.reshape(b * H, n, D)).view(b, H, n, D)


def test_padded_bloom_symbolic_trace_keeps_one_bias_with_the_reason():
    """symbolic_trace evaluates the slopes while tracing: they reach the graph as a tensor
    constant (module state, whose values a rewrite never reads), so the ALiBi term is not
    proven bounded and the finite-fill mask beside it stays in one (B, H, Lq, Lk) bias, fused
    on the split axes; the note names the term and why. Exact against eager."""
    mod = BloomPaddedFx()
    q, k, v = _qkv_n()
    gm, inputs = capture(mod, (q, k, v, _PAD), "fx")
    res = attnfuse.rewrite(gm, list(inputs), strict=True)
    assert res.fused == 1
    (f,) = res.report.fusions
    assert any("not proven finite and bounded" in m and "module state (_tensor_constant0)" in m for m in f.masks), \
        f.masks
    out, bias = _run_recording_bias(res.graph_module, inputs)
    assert bias[0] == (B, H, N, N), bias
    torch.testing.assert_close(out.double(), _eager64(mod, q, k, v, _PAD), atol=2e-6, rtol=2e-6)


class FalconDropout(FalconStyle):
    """:class:`FalconStyle` in training, dropout on the probabilities."""

    def forward(self, q, k, v, mask):
        b, h, n, d = q.shape
        slopes = torch.pow(torch.full((), 0.25), torch.arange(1, h + 1, dtype=torch.int32))
        pos = ((mask.cumsum(-1) - 1) * mask)[:, None, :]
        alibi = (slopes[..., None].bfloat16() * pos).reshape(b * h, 1, n).to(q.dtype).reshape(b, h, 1, n)
        bias = torch.masked_fill(alibi / d ** 0.5, _hf_float_mask(mask, q.dtype) < -1, torch.finfo(q.dtype).min)
        p = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5 + bias, dim=-1)
        return nn.functional.dropout(p, 0.1, training=True) @ v


def test_falcon_padded_with_dropout_stays_a_bias_with_the_reason():
    """A left-padded row sees no key: eager gives it a uniform softmax over every key and
    then drops that row out key by key; the empty-row fix-up computes the uniform average
    outside the op, without the op's dropout mask. So the fill stays in the bias, and the
    note says why."""
    q, k, v = _qkv_n()
    gm, inputs = capture(FalconDropout(), (q, k, v, _PAD), "dynamo")
    res = attnfuse.rewrite(gm, list(inputs), strict=True)
    (f,) = res.report.fusions
    assert f.bias != "none" and f.causal == "none" and not f.empty_row_fixup
    assert any("and dropout" in m and "without the op's dropout mask" in m for m in f.masks), f.masks
