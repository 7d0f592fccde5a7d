"""Masks built from index comparisons reach the fused op as structure (causal alignment, sliding
window, key_mask (B, Lk)), never as an (Lq, Lk) tensor, and only when that is provably exact.

Each positive case checks the fused call (structure, no bias) and compares outputs with the eager
module (and, for some, gradients), including rows that see no key under a finite fill
(``finfo.min``, as Hugging Face builds masks), which eager averages uniformly. Negative cases must
stay a bias (or a residual mask) and stay exact.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnfuse
from attnfuse import backend as BK
from attnfuse.passes import structure as S

FMIN = torch.finfo(torch.float32).min


# ---------------------------------------------------------------------------
# the band classifier, against brute force
# ---------------------------------------------------------------------------

def _brute_band(lq, lk, off, w):
    i = torch.arange(lq)[:, None] + off
    j = torch.arange(lk)[None, :]
    keep = j <= i
    return keep & (j > i - w) if w else keep


@pytest.mark.parametrize("align,w", [("top_left", 0), ("bottom_right", 0), ("top_left", 3), ("bottom_right", 2),
                                     ("top_left", 1)])
def test_classify_band_recovers_alignment_and_window(align, w):
    sizes = [(1, 1), (3, 3), (4, 7), (7, 4), (5, 9), (9, 9)]
    samples = [(_brute_band(lq, lk, 0 if align == "top_left" else lk - lq, w)[None, None], lq, lk)
               for lq, lk in sizes]
    got = S.classify_band(iter(samples), -2, -1)
    want_empty = any(not bool(m.any(-1).all()) for m, _, _ in samples)
    assert got == (align, w, want_empty)


def test_classify_band_rejects_what_is_not_one_band():
    lq = lk = 6
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    shifted = j <= i + 1                                     # a band that is not causal (j <= i + 1)
    holes = (j <= i) & ((i - j) % 3 != 2)                    # causal with holes: not one run per row
    per_batch = torch.stack([j <= i, j <= i - 1])[:, None]  # differs across the batch
    for m in (shifted, holes, per_batch):
        assert S.classify_band(iter([(m, lq, lk)]), -2, -1) is None
    assert S.classify_band(iter([(torch.ones(1, lk, dtype=torch.bool), lq, lk)]), -2, -1) == ("none", 0, False)


def test_classify_band_exhaustive_small():
    """Every (alignment, window) at every small size is recognised as itself or as an equal band."""
    for lq, lk, w in itertools.product(range(1, 5), range(1, 5), range(0, 5)):
        for off in (0, lk - lq):
            m = _brute_band(lq, lk, off, w)
            got = S.classify_band(iter([(m, lq, lk)]), -2, -1)
            assert got is not None, (lq, lk, off, w)
            name, gw, _ = got
            if name == "none":
                assert bool(m.all())
            else:
                assert torch.equal(_brute_band(lq, lk, 0 if name == "top_left" else lk - lq, gw), m)


# ---------------------------------------------------------------------------
# hand-written masks through torch.compile(backend="attnfuse")
# ---------------------------------------------------------------------------

def qkv(b=2, hq=2, hkv=None, lq=6, lk=6, d=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or hq
    t = [torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
         torch.randn(b, hkv, lk, d, generator=g)]
    return [x.requires_grad_(grad) for x in t]


def left_pad(b, lk, pads=(0, 3)):
    m = torch.ones(b, lk, dtype=torch.long)
    for i, p in enumerate(pads[:b]):
        m[i, :p] = 0
    return m


def right_pad(b, lk, pads=(0, 2)):
    m = torch.ones(b, lk, dtype=torch.long)
    for i, p in enumerate(pads[:b]):
        if p:
            m[i, lk - p:] = 0
    return m


class HFMask(nn.Module):
    """Hugging Face 5.x's eager mask, reduced: index aranges compared (causal, sliding window),
    the padding mask gathered at [batch_idx, kv_idx], ANDed, expanded, then
    ``where(mask, 0, fill)`` added to the scores; GQA by ``repeat_kv``."""

    def __init__(self, causal=True, window=0, softcap=0.0, query_pad=False):
        super().__init__()
        self.causal, self.window, self.softcap, self.query_pad = causal, window, softcap, query_pad

    def forward(self, q, k, v, pad):
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        bi = torch.arange(b)[:, None, None, None]
        qi = (torch.arange(lq) + (lk - lq))[None, None, :, None]   # queries are the last lq positions
        kj = torch.arange(lk)[None, None, None, :]
        m = qi.new_ones((), dtype=torch.bool)
        if self.causal:
            m = m & (kj <= qi)
        if self.window:
            m = m & (kj > qi - self.window)
        padb = pad.to(dtype=torch.bool)
        m = m & (padb[bi, qi - (lk - lq)] if self.query_pad else padb[bi, kj])
        m = m.expand(b, -1, lq, lk)
        bias = torch.where(m, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
        if hq != hkv:  # repeat_kv
            k = k[:, :, None].expand(b, hkv, hq // hkv, lk, d).reshape(b, hq, lk, d)
            v = v[:, :, None].expand(b, hkv, hq // hkv, lk, d).reshape(b, hq, lk, d)
        s = torch.matmul(q, k.transpose(2, 3)) * d ** -0.5
        if self.softcap:
            s = torch.tanh(s / self.softcap) * self.softcap
        p = F.softmax(s + bias, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


def compiled(mod, inner="eager"):
    torch._dynamo.reset()
    return torch.compile(mod, backend="attnfuse", options={"inner": inner, "strict": True})


def fusion_of(n=1):
    fus = BK.last_report().fusions
    assert len(fus) == n, BK.last_report().to_text()
    return fus[0]


def check_grads(mod, args, out_args=None, atol=2e-5):
    """Outputs and gradients of q, k, v through the fused graph (aot_eager) equal eager's."""
    q, k, v, *rest = args
    ref_in = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    ref = mod(*ref_in, *rest)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))
    (ref * w).sum().backward()
    got_in = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    got = compiled(mod, "aot_eager")(*got_in, *rest)
    (got * w).sum().backward()
    torch.testing.assert_close(got, ref, atol=atol, rtol=1e-5)
    for name, a, b in zip("qkv", got_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("pad", ["left", "right"])
def test_hf_causal_with_padding_is_causal_plus_key_mask(pad):
    """Left padding: pad query rows see no key (causal ∩ padding); eager (finfo.min) averages V
    over all keys there: the empty-row fix-up reproduces it."""
    mod = HFMask()
    q, k, v = qkv()
    mask = left_pad(2, 6) if pad == "left" else right_pad(2, 6)
    out = compiled(mod)(q, k, v, mask)
    f = fusion_of()
    assert (f.causal, f.window, f.bias) == ("top_left", 0, "none") and f.key_mask, f
    assert f.empty_row_fixup
    torch.testing.assert_close(out, mod(q, k, v, mask), atol=2e-5, rtol=1e-5)


def test_hf_left_padding_gradients_match_eager_including_empty_rows():
    """Eager's autograd differentiates the uniform softmax of an empty row (to q and k): so does
    the fix-up, so training through left-padded batches gives eager's gradients."""
    check_grads(HFMask(), (*qkv(seed=3), left_pad(2, 6)))
    assert fusion_of().empty_row_fixup


class FillMask(nn.Module):
    """A padding mask written with ``masked_fill(~keep, finfo.min)`` / ``where(keep, s, finfo.min)``:
    the fill replaces the scores, so eager gives rows that see no key no gradient to q or k."""

    def __init__(self, how="masked_fill", causal=False):
        super().__init__()
        self.how, self.causal = how, causal

    def forward(self, q, k, v, pad):
        s = q @ k.transpose(-1, -2) * 0.5
        keep = pad.bool()[:, None, None, :]
        if self.causal:
            keep = keep & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        fill = torch.finfo(s.dtype).min
        s = s.masked_fill(~keep, fill) if self.how == "masked_fill" else torch.where(keep, s, fill)
        return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("how", ["masked_fill", "where"])
@pytest.mark.parametrize("causal", [False, True])
def test_replacing_fill_gives_empty_rows_no_score_gradient(how, causal):
    """A fill that replaces the scores (not added to them) stops eager's gradient to q and k
    on rows that see no key; the fix-up must not add the uniform-softmax Jacobian there."""
    pad = left_pad(2, 6, (0, 3)) if causal else torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    check_grads(FillMask(how, causal), (*qkv(seed=4), pad))
    f = fusion_of()
    assert f.empty_row_fixup and f.key_mask, f


def test_hf_sliding_window_gqa_left_padded():
    mod = HFMask(window=3)
    q, k, v = qkv(hq=4, hkv=2, lq=7, lk=7, seed=1)
    mask = left_pad(2, 7, (0, 2))
    out = compiled(mod)(q, k, v, mask)
    f = fusion_of()
    assert (f.causal, f.window, f.bias) == ("top_left", 3, "none") and f.key_mask, f
    torch.testing.assert_close(out, mod(q, k, v, mask), atol=2e-5, rtol=1e-5)
    check_grads(mod, (q, k, v, mask))


def test_bottom_right_with_more_queries_than_keys_fixes_empty_rows():
    """Lq > Lk bottom-right: the first Lq - Lk rows see no key; finite fill: uniform rows."""
    mod = HFMask()
    q, k, v = qkv(lq=7, lk=4, seed=2)
    mask = torch.ones(2, 4, dtype=torch.long)
    out = compiled(mod)(q, k, v, mask)
    f = fusion_of()
    assert (f.causal, f.bias) == ("bottom_right", "none") and f.empty_row_fixup, f
    torch.testing.assert_close(out, mod(q, k, v, mask), atol=2e-5, rtol=1e-5)


def test_encoder_padding_only_is_a_key_mask():
    mod = HFMask(causal=False)
    q, k, v = qkv(seed=4)
    mask = right_pad(2, 6, (1, 3))
    out = compiled(mod)(q, k, v, mask)
    f = fusion_of()
    assert (f.causal, f.bias) == ("none", "none") and f.key_mask, f
    torch.testing.assert_close(out, mod(q, k, v, mask), atol=2e-5, rtol=1e-5)


class WindowTril(nn.Module):
    """A hand-written sliding window: arange comparisons, -inf fill."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, q, k, v):
        i = torch.arange(q.size(-2))[:, None]
        j = torch.arange(k.size(-2))[None, :]
        keep = torch.tril(torch.ones(q.size(-2), k.size(-2), dtype=torch.bool)) & (j > i - self.w)
        att = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
        return F.softmax(att.masked_fill(~keep, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("dynamic", [False, True])
def test_hand_written_tril_window(dynamic):
    mod = WindowTril(3)
    torch._dynamo.reset()
    f = torch.compile(mod, backend="attnfuse", dynamic=dynamic, options={"inner": "eager", "strict": True})
    q, k, v = qkv(lq=8, lk=8, seed=5)
    torch.testing.assert_close(f(q, k, v), mod(q, k, v))
    fu = fusion_of()
    assert (fu.causal, fu.window, fu.bias, fu.key_mask) == ("top_left", 3, "none", ""), fu
    assert not fu.empty_row_fixup  # -inf fill: nothing to fix
    q, k, v = qkv(lq=11, lk=11, seed=6)
    torch.testing.assert_close(f(q, k, v), mod(q, k, v))


class KeyPadMaskedFill(nn.Module):
    def forward(self, q, k, v, mask):
        att = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
        att = att.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


def test_key_padding_masked_fill_neg_inf_is_a_key_mask():
    mod = KeyPadMaskedFill()
    q, k, v = qkv(seed=7)
    mask = right_pad(2, 6, (2, 1))
    out = compiled(mod)(q, k, v, mask)
    f = fusion_of()
    assert (f.causal, f.bias) == ("none", "none") and f.key_mask.startswith("~"), f
    torch.testing.assert_close(out, mod(q, k, v, mask))
    check_grads(mod, (q, k, v, mask))


# ---------------------------------------------------------------------------
# negative cases: must stay a bias / residual mask, and stay exact
# ---------------------------------------------------------------------------

class NotABand(nn.Module):
    """Causal with holes (every third diagonal dropped): no window describes it."""

    def forward(self, q, k, v):
        i = torch.arange(q.size(-2))[:, None]
        j = torch.arange(k.size(-2))[None, :]
        keep = (j <= i) & ((i - j) % 3 != 2)
        att = q @ k.transpose(-2, -1)
        return F.softmax(att.masked_fill(~keep, float("-inf")), dim=-1) @ v


def test_a_window_that_is_not_a_band_stays_a_mask():
    mod = NotABand()
    q, k, v = qkv(seed=8)
    out = compiled(mod)(q, k, v)
    f = fusion_of()
    assert (f.causal, f.window) == ("none", 0) and f.bias != "none", f
    torch.testing.assert_close(out, mod(q, k, v))


def test_a_padding_vector_indexed_by_query_is_not_a_key_mask():
    """padding[batch_idx, q_idx]: varies along the query axis: with a finite fill the whole mask
    stays a bias (a residual beside structure is not exact then)."""
    mod = HFMask(query_pad=True)
    q, k, v = qkv(seed=9)
    mask = left_pad(2, 6)
    out = compiled(mod)(q, k, v, mask)
    f = fusion_of()
    assert (f.causal, f.key_mask) == ("none", "") and f.bias != "none", f
    assert any("kept as a tensor" in n for n in f.masks), f.masks
    torch.testing.assert_close(out, mod(q, k, v, mask), atol=2e-5, rtol=1e-5)


class QueryTensorMask(nn.Module):
    """Causal AND a mask that depends on the query through a tensor, -inf fill: the causal part
    becomes structure; the query-dependent part stays a (residual) bool mask."""

    def forward(self, q, k, v, qmask):
        i = torch.arange(q.size(-2))[:, None]
        j = torch.arange(k.size(-2))[None, :]
        keep = (j <= i) & (qmask[:, None, :, None] != 0)
        att = q @ k.transpose(-2, -1)
        return F.softmax(att.masked_fill(~keep, float("-inf")), dim=-1) @ v


def test_a_mask_depending_on_the_query_through_a_tensor_stays_residual():
    mod = QueryTensorMask()
    q, k, v = qkv(seed=10)
    qmask = torch.ones(2, 6, dtype=torch.long)
    qmask[1, 4] = 0  # a row masked entirely: -inf, eager NaN, the op 0 (documented); others exact
    out = compiled(mod)(q, k, v, qmask)
    f = fusion_of()
    assert f.causal == "top_left" and f.key_mask == "" and f.bias != "none", f
    ref = mod(q, k, v, qmask)
    ok = ~torch.isnan(ref)
    torch.testing.assert_close(out[ok], ref[ok])
    assert bool((out[1, :, 4] == 0).all())


def test_finite_fill_with_softcap_and_padding_keeps_the_bias():
    """Rows that see no key need the fix-up, whose gradient does not model a softcap: bias kept."""
    mod = HFMask(softcap=5.0)
    q, k, v = qkv(seed=11)
    mask = left_pad(2, 6)
    out = compiled(mod)(q, k, v, mask)
    f = fusion_of()
    assert f.bias != "none" and f.key_mask == "" and f.causal == "none", f
    assert any("softcap" in n for n in f.masks), f.masks
    torch.testing.assert_close(out, mod(q, k, v, mask), atol=2e-5, rtol=1e-5)


class CausalOnlyHF(nn.Module):
    """HF's mask without a padding part (no attention_mask given), finite fill, with softcap."""

    def forward(self, q, k, v):
        lq, lk = q.shape[2], k.shape[2]
        qi = torch.arange(lq)[None, None, :, None]
        kj = torch.arange(lk)[None, None, None, :]
        m = (kj <= qi).expand(q.shape[0], -1, lq, lk)
        bias = torch.where(m, torch.zeros(()), FMIN)
        s = torch.tanh((q @ k.transpose(2, 3)) / 5.0) * 5.0
        return F.softmax(s + bias, dim=-1) @ v


def test_finite_fill_plain_causal_is_structure_with_softcap():
    mod = CausalOnlyHF()
    q, k, v = qkv(seed=13)
    out = compiled(mod)(q, k, v)
    f = fusion_of()
    assert (f.causal, f.bias, f.softcap, f.empty_row_fixup) == ("top_left", "none", 5.0, False), f
    torch.testing.assert_close(out, mod(q, k, v), atol=2e-5, rtol=1e-5)


def test_report_says_which_structure_each_fusion_uses():
    mod = HFMask(window=3)
    q, k, v = qkv(seed=14)
    compiled(mod)(q, k, v, left_pad(2, 6))
    rep = BK.last_report()
    d = rep.to_dict() if hasattr(rep, "to_dict") else None
    text = rep.to_text()
    assert "window=3" in text and "key_mask=" in text, text
    if d is not None:
        f = d["fusions"][0]
        assert f["window"] == 3 and f["key_mask"] and f["structure"].startswith("causal=top_left")
        assert f["empty_row_fixup"] is True and f["masks"]
