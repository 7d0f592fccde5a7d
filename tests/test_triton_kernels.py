"""The Triton kernels (forward + backward) run in the interpreter on CPU tensors and
compared against the eager float64 reference (``tests/reference.py``).

Calls ``attnfuse.kernels.triton_flash.forward/backward`` directly (no op layer).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before the kernel modules are imported

import itertools
import math

import pytest
import torch

from attnfuse.kernels import triton_flash as tf
from tests.reference import (assert_close_rel, attention_reference, causal_keep, dense_logit_bias,
                             visible_keys)

# relative (to the max magnitude of the reference) tolerances: (forward, gradients)
TOL = {torch.float32: (2e-4, 5e-4), torch.float16: (1e-2, 2e-2), torch.bfloat16: (3e-2, 5e-2)}


def _make_bias(kind, shape, full, dtype, g, dead_rows=False, finfo_rows=False):
    """Bias of `shape` (each dim 1 or full).  kind: 'float' or 'bool'.

    dead_rows: some query rows masked entirely (-inf / False).
    finfo_rows: some query rows set entirely to finfo(float32).min (finite!).
    """
    if kind == "float":
        b = torch.randn(shape, generator=g).to(dtype)
        b[..., :, 1::5] = float("-inf")                          # scattered -inf
        if dead_rows:
            b[..., 2, :] = float("-inf")
        if finfo_rows:
            b[..., 3, :] = torch.finfo(torch.float32).min
            b[..., 4, :3] = torch.finfo(dtype).min
        return b
    b = torch.rand(shape, generator=g) > 0.3
    b[..., 0] = True                                              # keep most rows alive
    if dead_rows:
        b[..., 2, :] = False
    return b


def _ref_lse(q, k, scale, softcap, fb):
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    return torch.logsumexp(s + fb, dim=-1)


def _check(q, k, v, bias=None, *, causal="none", softcap=0.0, need_dbias=False, seed=0):
    dtype = q.dtype
    tol_f, tol_b = TOL[dtype]
    B, H, M, _ = q.shape
    N = k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = tf.forward(q, k, v, bias, scale=scale, causal=causal, dropout_p=0.0,
                          softcap=softcap, seed=seed)
    assert out.shape == (B, H, M, v.shape[-1]) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, H, M) and lse.dtype == torch.float32

    with torch.no_grad():
        ref = attention_reference(q, k, v, bias, scale=scale, causal=causal, softcap=softcap)
    dead = torch.isnan(ref).any(-1)                    # rows fully masked with -inf
    live = ~dead
    # eager gives NaN there; the kernels give out = 0, lse = -inf
    assert (out[dead] == 0).all() and (lse[dead] == float("-inf")).all()
    assert_close_rel(out[live], ref[live], tol_f, "out")
    fb = dense_logit_bias(bias, visible_keys(1, M, N, causal), (B, H, M, N))
    lse_ref = _ref_lse(q, k, scale, softcap, fb)
    # rows whose max logit is below -2.35e38 (finfo.min bias) are clamped there in
    # the kernel's log2 domain (documented): lse is only known to be that low
    clamped = live & (lse_ref < -2.3e38)
    assert (lse[clamped] <= -2.3e38).all()
    assert_close_rel(lse[live & ~clamped], lse_ref[live & ~clamped], tol_f, "lse")

    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    dq, dk, dv, dbias = tf.backward(dout, q, k, v, bias, out, lse, scale=scale,
                                    causal=causal, dropout_p=0.0, softcap=softcap,
                                    seed=seed, need_dbias=need_dbias)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype

    # Reference gradients.  Fully masked rows give NaN in eager; the kernels give them
    # zero gradients, i.e. the gradient of the other rows only.  Reproduce that with an
    # additive mask whose dead rows are repaired to 0 and a dout that is 0 there.
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    dref = dout.double().masked_fill(dead[..., None], 0.0)
    if dead.any():
        fb_r = fb.masked_fill(dead[..., None], 0.0).requires_grad_()
        ref2 = attention_reference(qr, kr, vr, fb_r, scale=scale, softcap=softcap)
        bias_leaf = fb_r
    else:
        bias_leaf = None
        if bias is not None and bias.dtype != torch.bool:
            bias_leaf = bias.detach().double().requires_grad_()
        ref2 = attention_reference(qr, kr, vr, bias_leaf if bias_leaf is not None else bias,
                                   scale=scale, causal=causal, softcap=softcap)
    leaves = [qr, kr, vr] + ([bias_leaf] if bias_leaf is not None else [])
    grads = torch.autograd.grad(ref2, leaves, dref)
    assert_close_rel(dq, grads[0], tol_b, "dq")
    assert_close_rel(dk, grads[1], tol_b, "dk")
    assert_close_rel(dv, grads[2], tol_b, "dv")
    if dead.any():
        assert (dq.masked_select(dead[..., None]) == 0).all(), "dead rows must get dq = 0"
    if need_dbias:
        assert dbias is not None and dbias.shape == bias.shape and dbias.dtype == bias.dtype
        gb = grads[3]
        dims = [i for i in range(4) if bias.shape[i] == 1 and gb.shape[i] != 1]
        if dims:
            gb = gb.sum(dim=dims, keepdim=True)
        assert_close_rel(dbias, gb.reshape(bias.shape), tol_b, "dbias")
    else:
        assert dbias is None
    return out, lse, (dq, dk, dv, dbias)


def _qkv(B, Hq, Hkv, M, N, D, Dv, dtype, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    if layout == "blhd":   # (B, L, H, D) storage viewed as (B, H, L, D): non-contiguous
        q = torch.randn(B, M, Hq, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, N, Hkv, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, N, Hkv, Dv, generator=g).to(dtype).transpose(1, 2)
        assert not q.is_contiguous()
        return q, k, v
    if layout == "dlast":  # feature dim not innermost
        q = torch.randn(B, Hq, D, M, generator=g).to(dtype).transpose(2, 3)
        k = torch.randn(B, Hkv, D, N, generator=g).to(dtype).transpose(2, 3)
        v = torch.randn(B, Hkv, Dv, N, generator=g).to(dtype).transpose(2, 3)
        return q, k, v
    q = torch.randn(B, Hq, M, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, Dv, generator=g).to(dtype)
    return q, k, v


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (dtype, B, Hq, Hkv, Lq, Lk, D, Dv, causal, bias (kind, shape-spec, extras) or None,
#  softcap, layout, need_dbias).  shape-spec letters: B/H/M/N = full size, 1 = broadcast.
CASES = [
    (F32, 1, 2, 2, 37, 45, 40, 40, "none", None, 0.0, "contiguous", False),
    (F32, 2, 4, 2, 50, 33, 64, 32, "top_left", None, 0.0, "contiguous", False),       # GQA, Lq>Lk
    (F32, 1, 4, 1, 20, 70, 16, 16, "bottom_right", ("float", "111N", ""), 0.0, "contiguous", True),  # MQA
    (F32, 1, 2, 2, 45, 30, 80, 80, "bottom_right", None, 0.0, "contiguous", False),  # dead rows (Lq>Lk)
    (F32, 1, 2, 2, 30, 45, 80, 48, "top_left", None, 0.0, "contiguous", False),     # Lq<Lk
    (F32, 2, 2, 2, 33, 33, 128, 64, "top_left", ("float", "B1MN", ""), 5.0, "contiguous", True),
    (F32, 1, 3, 3, 19, 41, 40, 24, "none", ("bool", "1HMN", "dead"), 0.0, "contiguous", False),
    (F32, 2, 2, 1, 24, 24, 64, 64, "none", ("float", "BHMN", "dead,finfo"), 0.0, "contiguous", True),
    (F32, 2, 4, 2, 17, 29, 48, 40, "bottom_right", ("float", "1HMN", "finfo"), 3.0, "blhd", True),
    (F32, 1, 2, 2, 21, 18, 1, 256, "none", ("float", "1H1N", ""), 0.0, "dlast", True),  # D=1, Dv=256
    (F32, 1, 1, 1, 1, 1, 16, 16, "top_left", None, 0.0, "contiguous", False),          # L = 1
    (F32, 1, 2, 1, 1, 70, 64, 64, "bottom_right", ("bool", "111N", ""), 0.0, "contiguous", False),  # decode
    (F32, 1, 1, 1, 18, 20, 256, 3, "top_left", None, 2.0, "contiguous", False),        # D=256, Dv=3
    (F16, 2, 2, 2, 40, 56, 64, 64, "top_left", ("bool", "111N", ""), 0.0, "contiguous", False),
    (F16, 1, 4, 2, 33, 47, 128, 128, "bottom_right", ("float", "BHMN", "dead"), 10.0, "contiguous", True),
    (F16, 2, 4, 2, 26, 26, 40, 40, "none", None, 0.0, "blhd", False),
    (BF16, 1, 2, 2, 35, 29, 64, 80, "none", ("float", "B1MN", ""), 0.0, "contiguous", True),
    (BF16, 2, 2, 1, 30, 30, 16, 16, "top_left", None, 4.0, "contiguous", False),
    (BF16, 1, 4, 4, 25, 37, 80, 80, "bottom_right", ("bool", "B1MN", "dead"), 0.0, "dlast", False),
]


def _case_id(c):
    dt = {F32: "f32", F16: "f16", BF16: "bf16"}[c[0]]
    bias = "nobias" if c[9] is None else f"{c[9][0]}{c[9][1]}{'-' + c[9][2] if c[9][2] else ''}"
    return (f"{dt}-B{c[1]}H{c[2]}kv{c[3]}-{c[4]}x{c[5]}-d{c[6]}v{c[7]}-{c[8]}-{bias}"
            f"-cap{c[10]:g}-{c[11]}{'-dbias' if c[12] else ''}")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_backward_vs_reference(case):
    dtype, B, Hq, Hkv, M, N, D, Dv, causal, bias_spec, softcap, layout, need_dbias = case
    q, k, v = _qkv(B, Hq, Hkv, M, N, D, Dv, dtype, seed=len(_case_id(case)), layout=layout)
    bias = None
    if bias_spec is not None:
        kind, spec, extras = bias_spec
        full = dict(B=B, H=Hq, M=M, N=N)
        shape = tuple(1 if ch == "1" else full[ch] for ch in spec)
        g = torch.Generator().manual_seed(7)
        bdtype = dtype if kind == "float" else torch.bool
        bias = _make_bias(kind, shape, full, bdtype, g, dead_rows="dead" in extras,
                          finfo_rows="finfo" in extras)
    _check(q, k, v, bias, causal=causal, softcap=softcap, need_dbias=need_dbias)


def test_stride0_expanded_bias_view():
    """A bias that is already an expanded (stride-0) view: its gradient comes back at the
    expanded shape."""
    q, k, v = _qkv(2, 2, 2, 23, 31, 32, 32, F32, seed=3)
    small = torch.randn(1, 1, 23, 31)
    bias = small.expand(2, 2, 23, 31)
    assert bias.stride()[:2] == (0, 0)
    out, lse, grads = _check(q, k, v, bias, causal="top_left", need_dbias=True)
    assert grads[3].shape == (2, 2, 23, 31)


# One config per kernel, with every mask feature on (causal, window, key_mask, float bias,
# softcap, dropout, dS output: benchmarks/kernel_resources.py's worst case), for sm_90.
_NO_ATOMICS_SCRIPT = """
import json, re, sys
sys.path.insert(0, "benchmarks")
import kernel_resources as KR
from attnfuse.kernels import triton_decode as td
found = {}
for kname in KR.KERNELS:
    bm = td.decode_block_ms(64, KR.DTYPES["fp16"])[0] if kname == "attn_decode_split" else None
    ir = KR.kernel_ttgir(kname, 64, "fp16", kname not in KR.SINGLE_LIST, 0, bm, 90)
    found[kname] = {"atomics": sorted(set(re.findall(r"[\\w.]*atomic\\w*", ir))),
                    "stores": len(re.findall(r"\\btt\\.store\\b", ir))}
print(json.dumps(found))
"""


def test_kernels_have_no_atomics():
    """Determinism is a property of the kernels' code: no atomic read-modify-write in
    the TTGIR of any kernel (every output element written by one program, reductions in
    a fixed order), so two runs on a GPU give the same bits. Checked statically by the
    offline compile (``benchmarks/kernel_resources.py``, in a subprocess without
    TRITON_INTERPRET), since the interpreter runs programs one after another and could
    not show a race. The scan can fail: each TTGIR must show the kernel's stores."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _NO_ATOMICS_SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(found) == set(tf.KERNEL_CONFIGS) | {"attn_decode_split", "attn_decode_combine"}
    for kname, f in found.items():
        assert f["stores"] > 0, f"{kname}: no tt.store in its TTGIR (the scan sees nothing)"
        assert not f["atomics"], f"{kname}: atomic ops in its TTGIR: {f['atomics']}"


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rows_all_finfo_min_give_uniform_average(dtype):
    """HF-style masks: a row biased by finfo.min everywhere is the uniform average of v
    (what eager softmax gives), not 0; other rows are unaffected; gradients match."""
    q, k, v = _qkv(1, 2, 2, 20, 27, 16, 16, dtype, seed=5)
    bias = torch.zeros(1, 1, 20, 27, dtype=dtype)
    bias[..., :, 20:] = torch.finfo(dtype).min           # key padding
    bias[..., 5, :] = torch.finfo(dtype).min             # a fully padded query row
    bias[..., 6, :] = -1e38                              # another huge finite value
    out, lse, _ = _check(q, k, v, bias, need_dbias=True)
    # eager, in the input dtype's precision path (fp32 softmax)
    s = (q.float() @ k.float().transpose(-1, -2)) / 4.0 + bias.float()
    eager = torch.softmax(s, -1) @ v.float()
    uniform = v.float().mean(dim=2)                      # (1, 2, Dv)
    tol = TOL[dtype][0]
    for row in (5, 6):
        assert_close_rel(out[:, :, row], uniform, tol, f"row {row} (uniform)")
        assert_close_rel(out[:, :, row], eager[:, :, row], tol, f"row {row} (eager)")
        assert torch.isfinite(lse[:, :, row]).all()


def test_fully_masked_rows_give_zero_output_and_gradients():
    q, k, v = _qkv(1, 2, 2, 12, 20, 16, 16, F32, seed=9)
    bias = torch.ones(1, 1, 12, 20, dtype=torch.bool)
    bias[..., 4, :] = False
    out, lse = tf.forward(q, k, v, bias, scale=0.25, causal="none", dropout_p=0.0,
                          softcap=0.0, seed=0)
    assert (out[:, :, 4] == 0).all() and (lse[:, :, 4] == float("-inf")).all()
    assert torch.isfinite(out).all()
    dout = torch.zeros_like(out)
    dout[:, :, 4] = 1.0                       # gradient only through the dead row
    dq, dk, dv, _ = tf.backward(dout, q, k, v, bias, out, lse, scale=0.25, causal="none",
                                dropout_p=0.0, softcap=0.0, seed=0, need_dbias=False)
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


# ----------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------

def _identity_v(B, H, N, Dv, dtype=F32):
    # v = identity: out = (P ∘ M / (1 - p)) reveals the dropout mask (needs N <= Dv)
    eye = torch.zeros(N, Dv, dtype=dtype)
    eye[:, :N] = torch.eye(N, dtype=dtype)
    return eye.expand(B, H, N, Dv)          # stride-0 broadcast view as well


def test_dropout_keep_rate_and_unbiased_mean():
    p = 0.3
    B, H, M, N = 2, 2, 48, 64
    q = torch.zeros(B, H, M, 16)             # uniform attention: P = 1/N
    k = torch.randn(B, H, N, 16)
    v = _identity_v(B, H, N, 64)
    out, _ = tf.forward(q, k, v, None, scale=1.0, causal="none", dropout_p=p,
                        softcap=0.0, seed=1234)
    scaled = out[..., :N] * N                # = M / (1 - p): 0 or 1/(1-p)
    kept = scaled != 0
    assert torch.allclose(scaled[kept], torch.full_like(scaled[kept], 1 / (1 - p)), rtol=1e-5)
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 0.02, rate
    assert abs(scaled.double().mean().item() - 1.0) < 0.03   # E[M/(1-p)] = 1: unbiased
    # the mask differs between heads, batches and rows (offsets do not collide)
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])
    assert not torch.equal(kept[0, 0, 0], kept[0, 0, 1])


def test_dropout_seed_reproducible():
    q, k, v = _qkv(1, 2, 2, 20, 24, 16, 16, F32, seed=2)
    kw = dict(scale=0.25, causal="none", dropout_p=0.5, softcap=0.0)
    o1, _ = tf.forward(q, k, v, None, seed=7, **kw)
    o2, _ = tf.forward(q, k, v, None, seed=7, **kw)
    o3, _ = tf.forward(q, k, v, None, seed=8, **kw)
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, o3)


@pytest.mark.parametrize("causal,Hkv,bias_shape", [("none", 2, None),
                                                    ("top_left", 1, (1, 1, 1, 40))])
def test_dropout_backward_uses_forward_mask(causal, Hkv, bias_shape):
    """The backward regenerates the forward's mask: read the mask off the forward with
    v = identity, build the reference gradient from it, compare."""
    p = 0.25
    B, H, M, N, D, Dv = 1, 2, 29, 40, 32, 40
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, H, M, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = _identity_v(B, Hkv, N, Dv)
    bias = torch.randn(bias_shape, generator=g) if bias_shape else None
    scale, seed = 1 / math.sqrt(D), 4321
    out, lse = tf.forward(q, k, v, bias, scale=scale, causal=causal, dropout_p=p,
                          softcap=0.0, seed=seed)
    mask = out[..., :N] != 0                 # P > 0 wherever not causally masked
    if causal != "none":
        mask = mask | ~causal_keep(M, N, causal)   # P = 0 there: the mask is irrelevant
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    leaves = [qr, kr, vr]
    br = None
    if bias is not None:
        br = bias.double().requires_grad_()
        leaves.append(br)
    ref = attention_reference(qr, kr, vr, br, scale=scale, causal=causal,
                              dropout_mask=mask, dropout_p=p)
    assert_close_rel(out, ref, 2e-4, "out (dropout)")
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(ref, leaves, dout)
    dq, dk, dv, dbias = tf.backward(dout, q, k, v, bias, out, lse, scale=scale,
                                    causal=causal, dropout_p=p, softcap=0.0, seed=seed,
                                    need_dbias=bias is not None)
    assert_close_rel(dq, grads[0], 5e-4, "dq (dropout)")
    assert_close_rel(dk, grads[1], 5e-4, "dk (dropout)")
    assert_close_rel(dv, grads[2], 5e-4, "dv (dropout)")
    if bias is not None:
        assert_close_rel(dbias, grads[3], 5e-4, "dbias (dropout)")


# ----------------------------------------------------------------------------------
# Launch code
# ----------------------------------------------------------------------------------

def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(tf, "_interpreted", lambda: False)
    q, k, v = _qkv(1, 1, 1, 4, 4, 16, 16, F32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tf.forward(q, k, v, None, scale=1.0, causal="none", dropout_p=0.0, softcap=0.0,
                   seed=0)


def test_config_lists_cover_every_head_dim_and_dtype():
    for name, (fn, configs) in tf.KERNEL_CONFIGS.items():
        for hd in (1, 16, 40, 64, 80, 128, 200, 256):
            for dtype, heavy in itertools.product((F32, F16, BF16), (False, True)):
                cfgs = configs(hd, dtype, heavy)
                assert cfgs, (name, hd, dtype, heavy)
                for c in cfgs:
                    assert set(c.kwargs) == {"BLOCK_M", "BLOCK_N"}
                    assert c.kwargs["BLOCK_M"] >= 16 and c.kwargs["BLOCK_N"] >= 16
