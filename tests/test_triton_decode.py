"""The flash-decoding kernels (``kernels/triton_decode.py``) in Triton's interpreter on
CPU tensors, against the eager float64 reference (``tests/reference.py``).

Covers Lq in {1, 3, 16}, Lk up to ~300 with several key splits and a ragged last split,
GQA/MQA packing, fp32 and fp16, both causal alignments, bias broadcast shapes, softcap,
window, key_mask (incl. padding), rows that see no key, block skipping, splits in the
padding that load nothing (the key bounds clip), and the main backward kernels fed
with the decode path's out/lse.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before the kernel modules are imported

import math

import numpy as np
import pytest
import torch

from attnfuse.kernels import triton_decode as td
from attnfuse.kernels import triton_flash as tf
from tests.reference import (assert_close_rel, attention_reference, dense_logit_bias,
                             visible_keys)
# the load probe (a fixture) and the padding definition, shared with the main kernels' tests
from tests.interp_probe import addresses, loaded_addresses, padding_keys  # noqa: F401

F32, F16 = torch.float32, torch.float16
# relative (to the max magnitude of the reference) tolerances: (forward, gradients)
TOL = {F32: (2e-4, 5e-4), F16: (1e-2, 2e-2)}






def _qkv(B, Hq, Hkv, M, N, D, Dv, dtype, seed, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    if layout == "blhd":   # (B, L, H, D) storage viewed as (B, H, L, D)
        q = torch.randn(B, M, Hq, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, N, Hkv, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, N, Hkv, Dv, generator=g).to(dtype).transpose(1, 2)
        return q, k, v
    return (torch.randn(B, Hq, M, D, generator=g).to(dtype),
            torch.randn(B, Hkv, N, D, generator=g).to(dtype),
            torch.randn(B, Hkv, N, Dv, generator=g).to(dtype))


def _make_bias(kind, shape, dtype, g, dead_row=None):
    if kind == "float":
        b = torch.randn(shape, generator=g).to(dtype)
        b[..., 1::7] = float("-inf")
        if dead_row is not None:
            b[..., dead_row, :] = float("-inf")
        return b
    b = torch.rand(shape, generator=g) > 0.3
    b[..., -1] = True
    if dead_row is not None:
        b[..., dead_row, :] = False
    return b


def _make_key_mask(spec, B, N, g):
    """spec: 'B' per batch / '1' broadcast; '+dead' one batch sees nothing;
    '+blocks' long all-False runs (whole key blocks to skip); '+pad' padding: row 0
    right-padded by half the keys, row 1 left-padded by a third (key bounds clip)."""
    rows = B if spec[0] == "B" else 1
    km = torch.rand(rows, N, generator=g) > 0.25
    if "blocks" in spec:
        km[:, 32:96] = False
        km[:, N - 40:N - 5] = False
    if "pad" in spec:
        km[0, N // 2:] = False
        km[1:2, :N // 3] = False
    if "dead" in spec and rows > 1:
        km[1] = False
    return km


def _run(q, k, v, bias, *, causal, softcap, window, key_mask, splits=None):
    B, H, M, _ = q.shape
    N = k.shape[2]
    dtype = q.dtype
    tol_f = TOL[dtype][0]
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = td.decode_forward(q, k, v, bias, scale=scale, causal=causal, softcap=softcap,
                                 window=window, key_mask=key_mask, splits=splits)
    assert out.shape == (B, H, M, v.shape[-1]) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, H, M) and lse.dtype == torch.float32

    keep = visible_keys(B, M, N, causal, window, key_mask)
    fb = dense_logit_bias(bias, keep, (B, H, M, N))
    with torch.no_grad():
        ref = attention_reference(q, k, v, fb, scale=scale, softcap=softcap)
    dead = torch.isnan(ref).any(-1)
    live = ~dead
    assert (out[dead] == 0).all() and (lse[dead] == float("-inf")).all()
    assert_close_rel(out[live], ref[live], tol_f, "out")
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    lse_ref = torch.logsumexp(s + fb, dim=-1)
    assert_close_rel(lse[live], lse_ref[live], tol_f, "lse")
    return out, lse, fb, dead


F = "float"
# (dtype, B, Hq, Hkv, Lq, Lk, D, Dv, causal, bias (kind, shape-spec, dead row) or None,
#  softcap, window, key_mask spec or None, splits (None: heuristic), layout)
CASES = [
    (F32, 1, 1, 1, 1, 300, 32, 32, "none", None, 0.0, 0, None, None, "contiguous"),
    (F32, 2, 4, 1, 1, 257, 64, 64, "bottom_right", None, 0.0, 0, None, None, "contiguous"),   # MQA
    (F32, 1, 4, 4, 3, 200, 40, 24, "top_left", None, 0.0, 0, None, 3, "contiguous"),
    (F32, 2, 4, 2, 16, 150, 32, 48, "bottom_right", None, 5.0, 0, None, None, "blhd"),     # GQA
    (F32, 1, 4, 1, 16, 120, 16, 16, "top_left", None, 0.0, 0, None, 2, "contiguous"),      # 64 rows
    (F32, 2, 4, 2, 3, 300, 32, 32, "bottom_right", (F, "B1MN", None), 0.0, 0, None, None, "contiguous"),
    (F32, 1, 4, 2, 3, 180, 32, 32, "none", (F, "1HMN", 1), 0.0, 0, None, None, "contiguous"),
    (F32, 2, 4, 1, 1, 220, 64, 64, "none", ("bool", "B11N", None), 0.0, 0, "B", None, "contiguous"),
    (F32, 1, 4, 4, 3, 140, 32, 32, "top_left", ("bool", "1HMN", 2), 2.0, 0, None, None, "contiguous"),
    (F32, 2, 4, 2, 3, 300, 32, 32, "bottom_right", None, 0.0, 50, None, None, "contiguous"),
    (F32, 1, 4, 1, 16, 160, 32, 32, "top_left", None, 0.0, 5, None, 4, "contiguous"),
    (F32, 2, 1, 1, 3, 250, 32, 32, "bottom_right", None, 0.0, 0, "B+blocks", None, "contiguous"),
    (F32, 3, 4, 2, 1, 200, 32, 32, "none", None, 0.0, 0, "B+dead", None, "contiguous"),
    (F32, 1, 4, 2, 16, 130, 32, 32, "top_left", None, 0.0, 0, "1", 3, "contiguous"),
    (F32, 2, 4, 4, 3, 300, 32, 32, "bottom_right", (F, "BHMN", 0), 3.0, 70, "B+blocks", None, "blhd"),
    (F16, 2, 4, 1, 1, 300, 64, 64, "bottom_right", None, 0.0, 0, None, None, "contiguous"),
    (F16, 1, 4, 4, 16, 200, 32, 32, "top_left", (F, "111N", None), 0.0, 0, None, None, "contiguous"),
    (F16, 2, 4, 2, 3, 280, 128, 64, "bottom_right", None, 10.0, 40, "B+blocks", None, "contiguous"),
    (F16, 1, 4, 1, 3, 90, 24, 40, "none", ("bool", "1H1N", None), 0.0, 0, "1", 1, "blhd"),
    (F16, 2, 8, 2, 16, 130, 32, 32, "bottom_right", (F, "1HMN", None), 0.0, 0, None, None,
     "contiguous"),                                           # 64 packed rows, one tile
    (F32, 2, 4, 2, 3, 300, 32, 32, "bottom_right", (F, "B1MN", None), 0.0, 200, "B+pad", None,
     "contiguous"),
    (F32, 3, 4, 1, 5, 270, 32, 32, "none", None, 2.0, 0, "B+pad+dead", 4, "contiguous"),
    (F16, 2, 8, 2, 5, 270, 64, 64, "none", None, 0.0, 0, "1+pad", None, "blhd"),
]


def _case_id(c):
    dt = {F32: "f32", F16: "f16"}[c[0]]
    bias = "nobias" if c[9] is None else f"{c[9][0]}{c[9][1]}{'-dead' if c[9][2] is not None else ''}"
    return (f"{dt}-B{c[1]}H{c[2]}kv{c[3]}-{c[4]}x{c[5]}-d{c[6]}v{c[7]}-{c[8]}-{bias}"
            f"-cap{c[10]:g}-w{c[11]}-km{c[12]}-s{c[13]}-{c[14]}")


def _build(case):
    dtype, B, Hq, Hkv, M, N, D, Dv, causal, bias_spec, softcap, window, km_spec, splits, layout = case
    q, k, v = _qkv(B, Hq, Hkv, M, N, D, Dv, dtype, seed=len(_case_id(case)), layout=layout)
    g = torch.Generator().manual_seed(11)
    bias = None
    if bias_spec is not None:
        kind, spec, dead_row = bias_spec
        full = dict(B=B, H=Hq, M=M, N=N)
        shape = tuple(1 if ch == "1" else full[ch] for ch in spec)
        bias = _make_bias(kind, shape, dtype if kind == F else torch.bool, g, dead_row)
    key_mask = None if km_spec is None else _make_key_mask(km_spec, B, N, g)
    return q, k, v, bias, dict(causal=causal, softcap=softcap, window=window,
                               key_mask=key_mask, splits=splits)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_decode_forward_vs_reference(case):
    q, k, v, bias, kw = _build(case)
    _run(q, k, v, bias, **kw)


def _as_bias(bias, keep, B, H, M, N):
    """Window/key_mask folded into the bias, for the main backward kernels (which read
    masks only through bias and causal)."""
    if bias is not None and bias.dtype == torch.bool:
        return bias & keep
    if bias is None:
        return keep.expand(B, 1, M, N)
    return bias.masked_fill(~keep, float("-inf"))


GRAD_CASES = [CASES[i] for i in (3, 6, 9, 12, 14, 17)]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[_case_id(c) for c in GRAD_CASES])
def test_main_backward_with_decode_lse(case):
    """The main backward kernels, given the decode path's out and lse, produce the
    reference gradients: the lse is exact enough to rebuild P."""
    q, k, v, bias, kw = _build(case)
    dtype = q.dtype
    B, H, M, _ = q.shape
    N = k.shape[2]
    out, lse, fb, dead = _run(q, k, v, bias, **kw)
    scale = 1.0 / math.sqrt(q.shape[-1])
    keep = visible_keys(B, M, N, kw["causal"], kw["window"], kw["key_mask"])
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    dq, dk, dv, _ = tf.backward(dout, q, k, v, _as_bias(bias, keep, B, H, M, N), out, lse,
                                scale=scale, causal=kw["causal"], dropout_p=0.0,
                                softcap=kw["softcap"], seed=0, need_dbias=False)
    # reference: dead rows have zero gradient (their mask repaired to 0, dout 0 there)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qr, kr, vr, fb.masked_fill(dead[..., None], 0.0),
                              scale=scale, softcap=kw["softcap"])
    grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double().masked_fill(dead[..., None], 0))
    tol_b = TOL[dtype][1]
    for name, a, e in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        assert_close_rel(a, e, tol_b, name)
    assert (dq.masked_select(dead[..., None]) == 0).all()


@pytest.mark.parametrize("splits", [1, 2, 5, 19])
def test_split_count_does_not_change_result(splits):
    """Any number of splits (incl. one key block per split) gives the float64
    reference's out and lse (``_run`` checks both)."""
    q, k, v = _qkv(1, 4, 2, 3, 300, 32, 32, F32, seed=2)
    _run(q, k, v, None, causal="bottom_right", softcap=0.0, window=0, key_mask=None,
         splits=splits)


def test_skipped_key_blocks_are_never_read():
    """Key blocks outside the window band and blocks whose key_mask is all False are
    skipped before K/V are loaded: NaNs placed there cannot reach the output (a kernel
    that loaded them would compute 0·NaN = NaN in P·V)."""
    B, H, M, N, D = 2, 2, 2, 256, 32
    q, k, v = _qkv(B, H, H, M, N, D, D, F32, seed=4)
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[:, 160:208] = False            # three whole interpreter blocks (16 keys)
    window = 40                             # bottom_right: sees keys 214..255 at most
    k2, v2 = k.clone(), v.clone()
    for t in (k2, v2):
        t[:, :, :215] = float("nan")        # outside the window band (208..214: inside
                                            # the first aligned block, skipped per row)
        t[:, :, 160:208] = float("nan")     # fully masked blocks (also outside the band)
    out, lse = td.decode_forward(q, k2, v2, None, scale=0.2, causal="bottom_right",
                                 softcap=0.0, window=window, key_mask=key_mask, splits=3)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref, _ = td.decode_forward(q, k, v, None, scale=0.2, causal="bottom_right", softcap=0.0,
                               window=window, key_mask=key_mask, splits=3)
    assert torch.equal(out, ref)
    # key_mask alone (no causal): masked blocks inside the band are skipped too
    k3, v3 = k.clone(), v.clone()
    k3[:, :, 160:208] = float("nan")
    v3[:, :, 160:208] = float("nan")
    out3, _ = td.decode_forward(q, k3, v3, None, scale=0.2, causal="none", softcap=0.0,
                                key_mask=key_mask, splits=2)
    assert torch.isfinite(out3).all()


@pytest.mark.parametrize("broadcast", [False, True])
def test_splits_in_the_padding_do_no_work(loaded_addresses, broadcast):
    """Per batch item, the split kernel's key loop is clipped to the key bounds of its
    key_mask (per item, or one (1, Lk) row broadcast): no byte of the key mask, K or V
    of a key block that lies wholly in the padding (before the first / after the last
    visible key) is ever loaded, even where whole splits lie there; a batch item that
    sees no key reads none of them; and the combine stays exact (out, lse against the
    reference)."""
    B, Hq, Hkv, M, N, D = 3, 4, 2, 3, 300, 32
    q, k, v = _qkv(B, Hq, Hkv, M, N, D, D, F32, seed=9)
    key_mask = torch.zeros(B, N, dtype=torch.bool)
    key_mask[0, :70] = True               # right padding: 3 of 5 splits in the padding
    key_mask[1, 230:] = True              # left padding
    key_mask[1, 256:272] = False          # a whole-block hole: masked, not padding
    # item 2 sees no key
    if broadcast:
        key_mask = key_mask[:1]
    out, lse, _, dead = _run(q, k, v, None, causal="none", softcap=0.0, window=0,
                             key_mask=key_mask, splits=5)
    dead_items = [False, False, not broadcast]          # item 2's own mask: no key
    assert dead.flatten(1).all(1).tolist() == dead_items == dead.flatten(1).any(1).tolist()
    loaded = np.concatenate(loaded_addresses["_attn_decode_split"])
    padding = padding_keys(key_mask, B, N, td.INTERPRETER_PLAN["BLOCK_N"])
    assert padding[0, 80:].all() and not padding[0, :64].any()
    if not broadcast:
        assert padding[1, :224].all() and padding[2].all() and not padding[1, 256:272].any()
    pad_kv = padding[:, None, :, None]        # K and V: every head and feature
    for name, t, where in (("key_mask", key_mask, padding[:key_mask.size(0)]),
                           ("k", k, pad_kv.expand(k.shape)),
                           ("v", v, pad_kv.expand(v.shape))):
        hit = np.isin(addresses(t, where), loaded)
        assert not hit.any(), f"{hit.sum()} padding elements of {name} were loaded"
    # the probe sees loads: the visible keys' key mask and K were read
    assert np.isin(addresses(key_mask, key_mask), loaded).all()
    assert np.isin(addresses(k, key_mask[:, None, :, None].expand(k.shape)), loaded).all()


def test_finfo_min_rows_split_weights_exact():
    """A row biased by finfo.min everywhere is the uniform average of v even when its
    keys are spread over splits of different lengths (weights exp2(m_s - m)·l_s)."""
    q, k, v = _qkv(1, 2, 2, 3, 150, 16, 16, F32, seed=6)
    bias = torch.zeros(1, 1, 3, 150)
    bias[..., 1, :] = torch.finfo(torch.float32).min
    out, _ = td.decode_forward(q, k, v, bias, scale=0.25, causal="none", softcap=0.0, splits=4)
    assert_close_rel(out[:, :, 1], v.double().mean(2), 1e-5, "uniform row")


def test_all_rows_outside_band_and_empty_inputs():
    q, k, v = _qkv(1, 2, 1, 3, 40, 16, 16, F32, seed=1)
    # every key masked: out 0, lse -inf
    km = torch.zeros(1, 40, dtype=torch.bool)
    out, lse = td.decode_forward(q, k, v, None, scale=0.2, causal="none", softcap=0.0,
                                 key_mask=km)
    assert (out == 0).all() and (lse == float("-inf")).all()
    # Lk = 0
    out, lse = td.decode_forward(q, k[:, :, :0], v[:, :, :0], None, scale=0.2, causal="none",
                                 softcap=0.0)
    assert (out == 0).all() and (lse == float("-inf")).all() and out.shape == (1, 2, 3, 16)


def test_bad_arguments_name_the_argument():
    q, k, v = _qkv(2, 2, 1, 1, 40, 16, 16, F32, seed=1)
    kw = dict(scale=0.2, softcap=0.0)
    with pytest.raises(TypeError, match="key_mask"):
        td.decode_forward(q, k, v, None, causal="none", key_mask=torch.ones(2, 40), **kw)
    with pytest.raises(ValueError, match="key_mask"):
        td.decode_forward(q, k, v, None, causal="none",
                          key_mask=torch.ones(2, 39, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="key_mask"):
        td.decode_forward(q, k, v, None, causal="none",
                          key_mask=torch.ones(3, 40, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="window"):
        td.decode_forward(q, k, v, None, causal="none", window=4, **kw)
    with pytest.raises(ValueError, match="window"):
        td.decode_forward(q, k, v, None, causal="top_left", window=-1, **kw)
    with pytest.raises(ValueError, match="causal"):
        td.decode_forward(q, k, v, None, causal="diagonal", **kw)
    with pytest.raises(ValueError, match="heads"):
        td.decode_forward(q, k.expand(2, 3, 40, 16), v.expand(2, 3, 40, 16), None,
                          causal="none", **kw)


def test_decode_applicable():
    q1 = torch.empty(1, 8, 1, 64)
    q16, q17 = torch.empty(1, 8, 16, 64), torch.empty(1, 8, 17, 64)
    kv = torch.empty(1, 2, 4096, 64)
    short = torch.empty(1, 2, td.DECODE_MIN_LK - 1, 64)
    assert td.decode_applicable(q1, kv, kv, dropout_p=0.0)
    assert td.decode_applicable(q16, kv, kv, dropout_p=0.0)
    assert not td.decode_applicable(q17, kv, kv, dropout_p=0.0)
    assert not td.decode_applicable(q1, kv, kv, dropout_p=0.1)
    assert not td.decode_applicable(q1, short, short, dropout_p=0.0)


def test_decode_block_m():
    """G·Lq packed rows round up to a power of two >= 16, capped per (head dim, dtype)
    at the largest tile with spill-free configs."""
    assert td.decode_block_m(1, 64, F16) == 16
    assert td.decode_block_m(12, 64, F16) == 16
    assert td.decode_block_m(33, 64, F16) == 64
    assert td.decode_block_m(256, 64, F16) == td.decode_block_ms(64, F16)[-1] == 64
    assert td.decode_block_m(64, 64, F32) == td.decode_block_ms(64, F32)[-1]
    for hd in (16, 64, 128, 256):
        for dt in (F16, torch.bfloat16, F32):
            for bm in td.decode_block_ms(hd, dt):
                assert td.decode_split_configs(hd, dt, block_m=bm)


@pytest.mark.parametrize("n_keys,programs,rows", [
    (1, 1, 1), (4096, 2, 1), (4096, 32, 8), (131072, 8, 64), (100_000, 264, 1), (300, 1, 1)])
def test_num_splits_heuristic(n_keys, programs, rows):
    splits, split_len = td.num_splits(n_keys, programs, packed_rows=rows)
    assert split_len % td.SPLIT_ALIGN == 0
    assert (splits - 1) * split_len < n_keys <= splits * split_len   # no empty split
    assert 1 <= splits <= td.MAX_SPLITS
    if splits > 1:
        # never shorter than the minimum split length, nor more programs than needed
        assert split_len >= max(td.MIN_SPLIT_KEYS, 16 * rows)
        assert (splits - 1) * programs < td.TARGET_PROGRAMS
