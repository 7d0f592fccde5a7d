"""Structural masks (``window``, ``key_mask``) in the main Triton kernels (forward,
dK/dV, dQ, preprocess), run in Triton's interpreter on CPU tensors with 16 x 16 blocks,
against the eager float64 reference of ``tests/reference.py`` (dense boolean masks
built from the definition).

Covers both causal alignments, Lq != Lk, GQA, windows of 1, 5, 17, 31 and >= Lk, key masks
per batch item and broadcast (B = 1), left and right padding, key blocks that are
entirely masked, rows that see no key, combinations with a float / bool bias (and its
gradient), softcap and dropout, fp32 and fp16; that key blocks outside the band are
never read (NaN there cannot reach the result); padding: the forward and dQ key loops
are clipped to each batch item's key bounds (NaN in the padding blocks changes no bit
of any result; a load probe shows no key after the last visible one is read; dropout
draws the same mask); the decode path wired into ``triton_flash.forward``; and an
end-to-end call through ``attnfuse.flash_attention``.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before the kernel modules are imported

import math

import numpy as np
import pytest
import torch

import attnfuse
from attnfuse.kernels import triton_decode as td
from attnfuse.kernels import triton_flash as tf
from attnfuse.kernels import triton_launch as tl
from tests.interp_probe import (addresses, assert_poisoned_keys_unread,  # noqa: F401
                                loaded_addresses, padding_keys)
from tests.reference import assert_close_rel, attention_reference, visible_keys

F32, F16 = torch.float32, torch.float16
# relative (to the max magnitude of the reference) tolerances: (forward, gradients)
TOL = {F32: (2e-4, 5e-4), F16: (1e-2, 2e-2)}




def _qkv(B, Hq, Hkv, M, N, D, Dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, M, D, generator=g).to(dtype),
            torch.randn(B, Hkv, N, D, generator=g).to(dtype),
            torch.randn(B, Hkv, N, Dv, generator=g).to(dtype))


def _key_mask(spec, B, N, seed):
    """spec: 'right' / 'left' padding (batch item r keeps a prefix / suffix), 'holes'
    (random, plus whole 16-key blocks masked), '+dead' (the last batch item sees no key),
    '1:' prefix: one (1, N) mask broadcast over the batch."""
    rows = 1 if spec.startswith("1:") else B
    g = torch.Generator().manual_seed(seed)
    km = torch.zeros(rows, N, dtype=torch.bool)
    for r in range(rows):
        n = max(1, N - 7 * (r + 1))
        if "right" in spec:
            km[r, :n] = True
        elif "left" in spec:
            km[r, N - n:] = True
        else:
            km[r] = torch.rand(N, generator=g) > 0.3
            km[r, 16:32] = False                 # a whole interpreter block
    if "dead" in spec:
        km[-1] = False
    return km



def _ref_lse(q, k, bias, keep, scale, softcap):
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.double()
    return torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=-1)


def _check(q, k, v, bias=None, *, causal, window=0, key_mask=None, softcap=0.0,
           need_dbias=False, seed=0):
    """Forward (out, lse) and all gradients against the float64 reference; rows that
    see no key give out = 0, lse = -inf and zero gradients.  Returns
    ``out, lse, dead, dout, (dq, dk, dv, dbias)``."""
    dtype = q.dtype
    tol_f, tol_b = TOL[dtype]
    B, H, M, _ = q.shape
    N = k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    kw = dict(scale=scale, causal=causal, dropout_p=0.0, softcap=softcap, seed=seed,
              window=window, key_mask=key_mask)
    out, lse = tf.forward(q, k, v, bias, decode=False, **kw)
    assert out.shape == (B, H, M, v.shape[-1]) and out.dtype == dtype
    assert lse.shape == (B, H, M) and lse.dtype == torch.float32

    ref_kw = dict(scale=scale, causal=causal, softcap=softcap, window=window,
                  key_mask=key_mask)
    with torch.no_grad():
        dead = torch.isnan(attention_reference(q, k, v, bias, **ref_kw)).any(-1)
    assert (out[dead] == 0).all() and (lse[dead] == float("-inf")).all()
    live = ~dead
    keep = visible_keys(B, M, N, causal, window, key_mask)
    lse_ref = _ref_lse(q, k, bias, keep, scale, softcap)
    # rows whose logits are all below -2.35e38 (finfo.min bias) have their lse clamped
    # there (documented in triton_fwd): it is only known to be that low
    clamped = live & (lse_ref < -2.3e38)
    assert (lse[clamped] <= -2.3e38).all()
    assert_close_rel(lse[live & ~clamped], lse_ref[live & ~clamped], tol_f, "lse")

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rb = bias
    if need_dbias:
        rb = bias.detach().double().requires_grad_()
        leaves.append(rb)
    ref = attention_reference(*leaves[:3], rb, dead_rows="zero", **ref_kw)
    assert_close_rel(out, ref, tol_f, "out")
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(ref, leaves, dout.double())
    dq, dk, dv, dbias = tf.backward(dout, q, k, v, bias, out, lse, need_dbias=need_dbias,
                                    **kw)
    for name, a, e in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        assert a.shape == e.shape and a.dtype == dtype, name
        assert_close_rel(a, e, tol_b, name)
    assert (dq.masked_select(dead[..., None]) == 0).all(), "rows that see no key: dq = 0"
    if need_dbias:
        assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
        assert_close_rel(dbias, grads[3], tol_b, "dbias")
    else:
        assert dbias is None
    return out, lse, dead, dout, (dq, dk, dv, dbias)


# (dtype, B, Hq, Hkv, Lq, Lk, D, causal, window, key_mask spec or None,
#  bias (kind, shape spec) or None, softcap, need_dbias)
CASES = [
    (F32, 2, 2, 2, 40, 40, 16, "top_left", 1, None, None, 0.0, False),
    (F32, 2, 4, 2, 37, 53, 16, "bottom_right", 5, "right", None, 0.0, False),        # GQA
    (F32, 2, 2, 1, 50, 33, 32, "bottom_right", 17, "1:left", None, 0.0, False),      # Lq > Lk
    (F32, 1, 2, 2, 33, 47, 16, "top_left", 47, None, None, 0.0, False),              # w >= Lk
    # window 31 = 2 blocks - 1: the window edge of a block's last row falls exactly on
    # the first key of an otherwise interior tile (the edge test's equality case)
    (F32, 1, 2, 2, 64, 64, 16, "top_left", 31, None, None, 0.0, False),
    (F32, 1, 2, 2, 20, 70, 24, "top_left", 17, "1:holes", None, 0.0, False),         # Lq < Lk
    (F32, 2, 2, 2, 35, 35, 16, "bottom_right", 400, "holes+dead", None, 0.0, False),
    (F32, 3, 2, 2, 29, 45, 16, "none", 0, "left+dead", ("float", "B1MN"), 0.0, True),
    (F32, 2, 4, 2, 45, 45, 32, "top_left", 17, "right", ("float", "1HMN"), 5.0, True),
    (F32, 2, 2, 2, 38, 41, 16, "bottom_right", 5, "holes", ("bool", "B1MN"), 0.0, False),
    (F32, 1, 4, 1, 48, 48, 16, "top_left", 16, "1:right", ("float", "111N"), 2.0, True),  # MQA
    (F16, 2, 4, 2, 45, 45, 64, "bottom_right", 5, "right", ("float", "111N"), 0.0, True),
    (F16, 2, 2, 2, 40, 56, 32, "none", 0, "holes", None, 0.0, False),
    (F16, 1, 2, 1, 33, 33, 16, "top_left", 17, "1:left", None, 10.0, False),
]


def _case_id(c):
    dt = {F32: "f32", F16: "f16"}[c[0]]
    bias = "nobias" if c[10] is None else f"{c[10][0]}{c[10][1]}"
    return (f"{dt}-B{c[1]}H{c[2]}kv{c[3]}-{c[4]}x{c[5]}-d{c[6]}-{c[7]}-w{c[8]}-km{c[9]}"
            f"-{bias}-cap{c[11]:g}{'-dbias' if c[12] else ''}")


def _bias(kind, spec, B, H, M, N, dtype, seed):
    full = dict(B=B, H=H, M=M, N=N)
    shape = tuple(1 if ch == "1" else full[ch] for ch in spec)
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        b = torch.rand(shape, generator=g) > 0.2
        b[..., 3, :] = False                    # a row masked by the bias alone
        return b
    b = torch.randn(shape, generator=g).to(dtype)
    b[..., 2::9] = float("-inf")                # scattered -inf keys
    return b


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_structural_masks_vs_reference(case):
    dtype, B, Hq, Hkv, M, N, D, causal, window, km_spec, bias_spec, softcap, dbias = case
    q, k, v = _qkv(B, Hq, Hkv, M, N, D, D, dtype, seed=len(_case_id(case)))
    key_mask = None if km_spec is None else _key_mask(km_spec, B, N, seed=3)
    bias = None if bias_spec is None else _bias(*bias_spec, B, Hq, M, N, dtype, seed=4)
    dead = _check(q, k, v, bias, causal=causal, window=window, key_mask=key_mask,
                  softcap=softcap, need_dbias=dbias)[2]
    if km_spec and "dead" in km_spec:
        assert dead[-1].all()                   # that batch item sees no key at all


def test_finfo_min_rows_with_structure():
    """Rows biased by finfo.min on every key (Hugging Face masks) average uniformly over
    the keys the structure leaves visible; their backward statistics are recomputed
    exactly by the preprocess kernel's rare path, which applies window and key_mask."""
    q, k, v = _qkv(2, 2, 2, 40, 45, 16, 16, F32, seed=12)
    bias = torch.randn(2, 1, 40, 45)
    bias[:, :, 7, :] = torch.finfo(torch.float32).min
    bias[1, :, 30, :] = -1e38
    key_mask = _key_mask("right", 2, 45, seed=1)
    out, _, dead, _, _ = _check(q, k, v, bias, causal="bottom_right", window=17,
                                key_mask=key_mask, need_dbias=True)
    keep = visible_keys(2, 40, 45, "bottom_right", 17, key_mask)[:, 0, 7]     # (B, N)
    uniform = (v.double() * keep[:, None, :, None]).sum(2) / keep.sum(-1)[:, None, None]
    assert_close_rel(out[:, :, 7], uniform, 2e-4, "finfo.min row")
    assert not dead.any()


def test_window_one_sees_only_the_diagonal():
    """window = 1: each row sees exactly its diagonal key, so out[i] = v[i + off]."""
    q, k, v = _qkv(1, 2, 2, 21, 37, 16, 16, F32, seed=5)
    out, lse = tf.forward(q, k, v, None, scale=0.25, causal="bottom_right", dropout_p=0.0,
                          softcap=0.0, seed=0, window=1)
    assert torch.equal(out, v[:, :, 16:])
    s = (q * k[:, :, 16:]).sum(-1) * 0.25       # lse of a single logit is the logit
    assert_close_rel(lse, s, 1e-5, "lse")


def test_blocks_outside_the_band_are_never_read():
    """Key blocks outside the causal/window band of every query block are skipped by
    the loop bounds of the forward, dK/dV and dQ kernels: NaN there cannot reach any
    result (a kernel that loaded and used them would compute 0·NaN = NaN)."""
    B, H, M, N, D = 1, 2, 20, 80, 16
    q, k, v = _qkv(B, H, H, M, N, D, D, F32, seed=6)
    # bottom_right, window 10: row i sees keys (50 + i, 60 + i]: keys 0..50 by nobody
    kw = dict(scale=0.25, causal="bottom_right", dropout_p=0.0, softcap=0.0, seed=0,
              window=10)
    unread = torch.zeros(B, N, dtype=torch.bool)
    unread[:, :48] = True                       # three whole blocks below every band
    assert_poisoned_keys_unread(q, k, v, unread, **kw)


def test_fully_masked_key_block_skipped_in_dkdv():
    """A key block whose key_mask is all False visits no query block in the dK/dV
    kernel: NaN in its K/V leaves its dK, dV exactly 0 (a kernel that computed
    dP = dO·Vᵀ there would give 0·NaN = NaN)."""
    q, k, v = _qkv(2, 2, 2, 24, 48, 16, 16, F32, seed=7)
    km = torch.ones(1, 48, dtype=torch.bool)
    km[:, 16:32] = False
    kw = dict(scale=0.25, causal="none", dropout_p=0.0, softcap=0.0, seed=0, key_mask=km)
    out, lse = tf.forward(q, k, v, None, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 16:32] = float("nan")
    v2[:, :, 16:32] = float("nan")
    dout = torch.randn_like(out)
    _, dk, dv, _ = tf.backward(dout, q, k2, v2, None, out, lse, need_dbias=False, **kw)
    assert (dk[:, :, 16:32] == 0).all() and (dv[:, :, 16:32] == 0).all()
    _, dk1, dv1, _ = tf.backward(dout, q, k, v, None, out, lse, need_dbias=False, **kw)
    assert torch.equal(dk, dk1) and torch.equal(dv, dv1)


# --------------------------------------------------------------------------------------
# Padding: the forward and dQ key loops are clipped to each batch item's key bounds
# [first visible key, last visible key]; key blocks outside them are never loaded
# --------------------------------------------------------------------------------------

def _padding_mask(spec, B, N):
    """(B|1, N) bool key_mask with real padding: item z pads (45, 10, 25)[z % 3] % of
    its N keys, at the end ('right'), the start ('left') or both ends ('both');
    '+hole' also masks one whole interpreter block in the middle of the visible keys
    (visible keys on both sides of it); '+dead': the last item sees no key; a '1:'
    prefix gives one row, broadcast over the batch."""
    rows = 1 if spec.startswith("1:") else B
    bn = tf.INTERPRETER_CONFIG["BLOCK_N"]
    km = torch.zeros(rows, N, dtype=torch.bool)
    for z in range(rows):
        pad = round(N * (0.45, 0.10, 0.25)[z % 3])
        first = 0 if "right" in spec else pad if "left" in spec else pad // 2
        last = first + N - pad                        # one past the last visible key
        km[z, first:last] = True
        if "hole" in spec:
            h0 = ((first + last) // 2 // bn) * bn
            assert first < h0 and h0 + bn < last, "the hole must lie between visible keys"
            km[z, h0:h0 + bn] = False
    if "dead" in spec:
        km[-1] = False
    return km


def _nan_at(t, pad, key_dim):
    """``t`` (K, V: keys on dim 2; a bias: dim 3) with NaN at the keys ``pad`` (B, N)
    marks; a tensor that broadcasts over the batch gets NaN where every item pads."""
    m = pad if t.size(0) == pad.size(0) else pad.all(0, keepdim=True)
    shape = [m.size(0)] + [1] * (t.dim() - 1)
    shape[key_dim] = m.size(1)
    return t.masked_fill(m.view(shape), float("nan"))




# (dtype, B, Hq, Hkv, Lq, Lk, D, causal, window, padding spec, bias or None, softcap,
#  need_dbias)
PAD_CASES = [
    (F32, 3, 2, 2, 40, 70, 16, "none", 0, "right+dead", None, 0.0, False),
    (F32, 2, 4, 2, 37, 64, 16, "top_left", 0, "left", ("float", "B1MN"), 0.0, True),     # GQA
    (F32, 2, 2, 2, 30, 75, 16, "bottom_right", 20, "both+hole", ("bool", "B1MN"), 0.0, False),
    (F32, 2, 2, 1, 33, 60, 32, "bottom_right", 0, "1:right+hole", ("float", "111N"), 5.0, True),
    (F16, 2, 4, 1, 40, 64, 32, "top_left", 17, "left+hole", ("float", "BHMN"), 0.0, True),
    (F16, 3, 2, 2, 24, 80, 16, "none", 0, "1:left", None, 0.0, False),
    (F16, 3, 2, 2, 35, 50, 16, "bottom_right", 9, "right+dead", ("float", "B1MN"), 2.0, False),
]


@pytest.mark.parametrize("case", PAD_CASES, ids=[_case_id(c) for c in PAD_CASES])
def test_padding_blocks_are_never_read(case):
    """Right / left / two-sided padding, broadcast masks, holes, items that see no key,
    with causal, window, GQA/MQA, bias, softcap, fp32/fp16: results match the float64
    reference, and with NaN in K, V and the bias of every key block that is padding
    (:func:`padding_keys`) out, lse and all gradients are finite and bit-identical
    (the forward and dQ loops never reach those blocks; a kernel that loaded one would
    compute 0·NaN = NaN in P·V or dO·Vᵀ).  Holes hold finite values: masked, not
    skipped."""
    dtype, B, Hq, Hkv, M, N, D, causal, window, km_spec, bias_spec, softcap, dbias = case
    q, k, v = _qkv(B, Hq, Hkv, M, N, D, D, dtype, seed=len(_case_id(case)))
    key_mask = _padding_mask(km_spec, B, N)
    bias = None if bias_spec is None else _bias(*bias_spec, B, Hq, M, N, dtype, seed=4)
    out, lse, dead, dout, grads = _check(q, k, v, bias, causal=causal, window=window,
                                         key_mask=key_mask, softcap=softcap,
                                         need_dbias=dbias)
    if "dead" in km_spec:
        assert dead[-1].all()
    pad = padding_keys(key_mask, B, N)
    assert pad.any()
    k2, v2 = _nan_at(k, pad, 2), _nan_at(v, pad, 2)
    b2 = bias if bias is None or bias.dtype == torch.bool else _nan_at(bias, pad, 3)
    kw = dict(scale=1.0 / math.sqrt(D), causal=causal, dropout_p=0.0, softcap=softcap,
              seed=0, window=window, key_mask=key_mask)
    out2, lse2 = tf.forward(q, k2, v2, b2, decode=False, **kw)
    assert torch.equal(out2, out), "out"          # NaN != NaN: also proves finiteness
    assert torch.equal(lse2, lse), "lse"
    grads2 = tf.backward(dout, q, k2, v2, b2, out2, lse2, need_dbias=dbias, **kw)
    for name, a, e in zip(("dq", "dk", "dv", "dbias"), grads2, grads):
        assert (a is None) == (e is None), name
        if e is not None:
            assert torch.equal(a, e), name


def test_keys_after_the_last_visible_one_are_never_loaded(loaded_addresses):
    """Key-exact at the tail: the forward and dQ loops treat the keys from the batch
    item's last visible key on as past the end, so ``_attn_fwd`` and ``_attn_bwd_dq``
    load no element of K, V or the bias of any of them (not even in the last, partly
    visible tile), nor of the whole blocks before the first visible key; they do load
    every visible key's K, V and bias."""
    B, H, M, N, D = 2, 2, 40, 70, 16
    q, k, v = _qkv(B, H, H, M, N, D, D, F32, seed=21)
    bias = torch.randn(B, 1, M, N)
    key_mask = torch.zeros(B, N, dtype=torch.bool)
    key_mask[0, :41] = True                 # tail 41..69: 7 keys share a tile with 32..40
    key_mask[1, 21:61] = True               # head block 0..15, tail 61..69
    _check(q, k, v, bias, causal="none", key_mask=key_mask, need_dbias=True)
    last = torch.tensor([40, 60])
    never = (torch.arange(N) > last[:, None]) | padding_keys(key_mask, B, N)
    assert never.sum().item() == 29 + 9 + 16
    for kernel in ("_attn_fwd", "_attn_bwd_dq"):
        loaded = np.concatenate(loaded_addresses[kernel])
        for name, t, keys in (("k", k, never[:, None, :, None]), ("v", v, never[:, None, :, None]),
                              ("bias", bias, never[:, None, None, :])):
            hit = np.isin(addresses(t, keys.expand(t.shape)), loaded)
            assert not hit.any(), f"{kernel} loaded {hit.sum()} padding elements of {name}"
        seen = key_mask[:, None, :, None].expand(k.shape)
        for t in (k, v):
            assert np.isin(addresses(t, seen), loaded).all()


def test_key_bounds_of_the_launcher():
    """triton_launch._key_bounds: [first visible key, last visible key + 1] per row,
    empty (hi <= lo) for a row that sees no key, int32, on the mask's device."""
    km = torch.zeros(4, 10, dtype=torch.bool)
    km[0, 2:7] = True
    km[1, [0, 9]] = True
    km[2, 5] = True
    kb = tl._key_bounds(km)
    assert kb.dtype == torch.int32 and kb.shape == (4, 2)
    assert kb[:3].tolist() == [[2, 7], [0, 10], [5, 6]]
    assert kb[3, 1] <= kb[3, 0]


def _identity_v(B, H, N, Dv):
    # v = identity: out = (P ∘ M) / (1 - p) reveals the dropout keep-mask M (N <= Dv)
    eye = torch.zeros(N, Dv)
    eye[:, :N] = torch.eye(N)
    return eye.expand(B, H, N, Dv)


def _check_dropout(q, k, v, bias, kw, g):
    """Dropout forward with v = identity: read the keep-mask off the output, build the
    float64 reference from it, compare out and the gradients (dbias when there is a
    bias).  Returns ``out, lse, dout, (dq, dk, dv, dbias)``."""
    B, M, N = q.shape[0], q.shape[2], k.shape[2]
    out, lse = tf.forward(q, k, v, bias, **kw)
    keep = visible_keys(B, M, N, kw["causal"], kw["window"], kw["key_mask"])
    mask = (out != 0) | ~keep                   # P = 0 where hidden: the mask is moot there
    assert not mask.all()                       # some probabilities were dropped
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rb = None
    if bias is not None:
        rb = bias.double().requires_grad_()
        leaves.append(rb)
    ref = attention_reference(*leaves[:3], rb, scale=kw["scale"], causal=kw["causal"],
                              window=kw["window"], key_mask=kw["key_mask"],
                              dropout_mask=mask, dropout_p=kw["dropout_p"],
                              dead_rows="zero")
    assert_close_rel(out, ref, 2e-4, "out (dropout)")
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(ref, leaves, dout.double())
    got = tf.backward(dout, q, k, v, bias, out, lse, need_dbias=bias is not None, **kw)
    for name, a, e in zip(("dq", "dk", "dv", "dbias"), got, grads):
        assert_close_rel(a, e, 5e-4, f"{name} (dropout)")
    return out, lse, dout, got


@pytest.mark.parametrize("causal,window,km_spec,bias_shape", [
    ("bottom_right", 5, "right", None),
    ("top_left", 17, "1:holes", (1, 1, 1, 40)),
])
def test_dropout_with_structure_uses_the_kernels_own_mask(causal, window, km_spec, bias_shape):
    """Dropout with window/key_mask: read the keep-mask off the forward (v = identity),
    build the reference from it, compare the output and the gradients."""
    B, H, M, N, D = 2, 2, 29, 40, 16
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, H, M, D, generator=g)
    k = torch.randn(B, H, N, D, generator=g)
    v = _identity_v(B, H, N, N)
    key_mask = _key_mask(km_spec, B, N, seed=2)
    bias = torch.randn(bias_shape, generator=g) if bias_shape else None
    kw = dict(scale=0.25, causal=causal, dropout_p=0.25, softcap=0.0, seed=4321,
              window=window, key_mask=key_mask)
    _check_dropout(q, k, v, bias, kw, g)


@pytest.mark.parametrize("M,causal,window,km_spec", [
    (29, "none", 0, "right+dead"),
    (29, "bottom_right", 30, "left+hole"),
    (40, "top_left", 0, "1:left"),
])
def test_dropout_with_padding_keeps_the_mask_and_skips_blocks(M, causal, window, km_spec):
    """Dropout with padding: on every key it sees, the clipped loop draws the same
    keep-mask as a run without key mask (counters keyed on absolute key indices, loops
    starting block-aligned), out and gradients match the reference built from it, and
    NaN in K, V and bias of the padding blocks changes no bit of out, lse, gradients."""
    B, H, N, D = 3, 2, 64, 16
    g = torch.Generator().manual_seed(13)
    q = torch.randn(B, H, M, D, generator=g)
    k = torch.randn(B, H, N, D, generator=g)
    v = _identity_v(B, H, N, N)
    bias = torch.randn(B, 1, M, N, generator=g)
    key_mask = _padding_mask(km_spec, B, N)
    kw = dict(scale=0.25, causal=causal, dropout_p=0.25, softcap=0.0, seed=4321,
              window=window, key_mask=key_mask)
    out, lse, dout, grads = _check_dropout(q, k, v, bias, kw, g)

    out_all, _ = tf.forward(q, k, v, bias, **{**kw, "key_mask": None})
    seen = visible_keys(B, M, N, causal, window, key_mask).expand(B, H, M, N)
    kept = (out != 0)[seen]                      # v = identity: out[i, j] = P·M/(1-p)
    assert not kept.all()
    assert torch.equal(kept, (out_all != 0)[seen]), "dropout mask moved with the key bounds"

    pad = padding_keys(key_mask, B, N)
    assert pad.any()
    k2, v2, b2 = _nan_at(k, pad, 2), _nan_at(v, pad, 2), _nan_at(bias, pad, 3)
    out2, lse2 = tf.forward(q, k2, v2, b2, **kw)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    grads2 = tf.backward(dout, q, k2, v2, b2, out2, lse2, need_dbias=True, **kw)
    for name, a, e in zip(("dq", "dk", "dv", "dbias"), grads2, grads):
        assert torch.equal(a, e), name


def test_decode_path_wired_into_forward(monkeypatch):
    """Lq <= 16 against Lk >= 256 without dropout runs the flash-decoding kernels from
    triton_flash.forward (same result as the main kernel, window and key_mask passed
    on); with dropout, or decode=False, the main kernel runs."""
    calls = []
    real = td.decode_forward
    monkeypatch.setattr(td, "decode_forward", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = _qkv(2, 4, 2, 3, 260, 16, 16, F32, seed=8)
    key_mask = _key_mask("right", 2, 260, seed=1)
    kw = dict(scale=0.25, causal="bottom_right", dropout_p=0.0, softcap=0.0, seed=0,
              window=70, key_mask=key_mask)
    out, lse = tf.forward(q, k, v, None, **kw)
    assert len(calls) == 1 and calls[0]["window"] == 70 and calls[0]["key_mask"] is key_mask
    tf.forward(q, k, v, None, decode=False, **kw)
    assert len(calls) == 1
    # against the float64 reference (not the main kernel, which shares the score code)
    keep = visible_keys(2, 3, 260, "bottom_right", 70, key_mask)
    ref = attention_reference(q, k, v, scale=0.25, causal="bottom_right", window=70,
                              key_mask=key_mask)
    assert_close_rel(out, ref, 1e-5, "decode out")
    assert_close_rel(lse, _ref_lse(q, k, None, keep, 0.25, 0.0), 1e-5, "decode lse")
    tf.forward(q, k, v, None, **{**kw, "dropout_p": 0.1})
    assert len(calls) == 1


def test_op_end_to_end_with_triton_impl():
    """attnfuse.flash_attention(..., impl="triton", window=, key_mask=) on CPU tensors
    (interpreter): output and gradients against the reference."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 33, 41, 16, 16, F32, seed=9))
    key_mask = _key_mask("left", 2, 41, seed=1)
    out = attnfuse.flash_attention(q, k, v, causal="bottom_right", window=9,
                                   key_mask=key_mask, impl="triton")
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, causal="bottom_right", window=9, key_mask=key_mask,
                              dead_rows="zero")
    assert_close_rel(out.detach(), ref.detach(), 2e-4, "op out")
    dout = torch.randn_like(out)
    out.backward(dout)
    grads = torch.autograd.grad(ref, leaves, dout.double())
    for name, t, e in zip(("dq", "dk", "dv"), (q, k, v), grads):
        assert_close_rel(t.grad, e, 5e-4, f"op {name}")


def test_bad_structure_arguments_name_the_argument():
    q, k, v = _qkv(2, 2, 1, 4, 20, 16, 16, F32, seed=1)
    kw = dict(scale=0.25, dropout_p=0.0, softcap=0.0, seed=0)
    with pytest.raises(ValueError, match="window"):
        tf.forward(q, k, v, None, causal="none", window=3, **kw)
    with pytest.raises(ValueError, match="window"):
        tf.forward(q, k, v, None, causal="top_left", window=-1, **kw)
    with pytest.raises(TypeError, match="key_mask"):
        tf.forward(q, k, v, None, causal="none", key_mask=torch.ones(2, 20), **kw)
    with pytest.raises(ValueError, match="key_mask"):
        tf.forward(q, k, v, None, causal="none", key_mask=torch.ones(2, 19, dtype=torch.bool),
                   **kw)
    with pytest.raises(ValueError, match="key_mask"):
        tf.backward(torch.zeros(2, 2, 4, 16), q, k, v, None, torch.zeros(2, 2, 4, 16),
                    torch.zeros(2, 2, 4), causal="none", need_dbias=False,
                    key_mask=torch.ones(3, 20, dtype=torch.bool), **kw)
