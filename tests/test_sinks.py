"""Attention sinks (issue 22 part 1): the op's ``sinks`` argument on every CPU path and in
the Triton kernels (forward, backward, decode; interpreter), against a float64 eager
reference written as gpt-oss writes it (a sink column concatenated to the scores,
softmax, the column sliced off), with gradients for q, k, v, the bias and the sinks,
and rows that see no key (they attend only to their sink: output 0).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernel modules are imported

import math

import pytest
import torch

from attnfuse import flash_attention
from attnfuse.kernels import torch_impl as T
from tests.reference import assert_close_rel, dense_logit_bias, visible_keys

TOL = {torch.float32: (2e-5, 5e-5), torch.float16: (1e-2, 2e-2),
       torch.bfloat16: (3e-2, 5e-2)}


def sink_reference(q, k, v, sinks, bias=None, *, causal="none", window=0, key_mask=None,
                   softcap=0.0):
    """(out, lse) in float64: gpt-oss's eager attention (``cat`` of the scores and the
    per-head sink column, softmax, slice the column off, ``@ v``)."""
    q, k, v, sinks = q.double(), k.double(), v.double(), sinks.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    b, h, lq, lk = s.shape
    keep = visible_keys(1 if key_mask is None else key_mask.shape[0], lq, lk, causal, window,
                        key_mask)
    s = s + dense_logit_bias(bias, keep, s.shape)
    combined = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(b, -1, lq, 1)], dim=-1)
    probs = torch.softmax(combined, dim=-1)[..., :-1]
    return probs @ v, torch.logsumexp(combined, dim=-1)


def _inputs(b, hq, hkv, lq, lk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    return mk(b, hq, lq, d), mk(b, hkv, lk, d), mk(b, hkv, lk, d), mk(hq)


def _check(q, k, v, sinks, bias=None, impl="torch", **kw):
    """Forward (out and lse) and every gradient against :func:`sink_reference`."""
    tol_f, tol_b = TOL[q.dtype]
    scale = 1.0 / math.sqrt(q.shape[-1])
    causal = kw.get("causal", "none")
    out, lse = torch.ops.attnfuse.flash_attention(
        q, k, v, bias, scale, causal, 0.0, kw.get("softcap", 0.0), None, impl,
        kw.get("window", 0), kw.get("key_mask"), sinks)
    ref, ref_lse = sink_reference(q, k, v, sinks, bias, **kw)
    assert_close_rel(out, ref, tol_f, "out")
    assert_close_rel(lse, ref_lse, max(tol_f, 1e-5), "lse")
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [t for t in (q, k, v, bias, sinks) if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    want = torch.autograd.grad(ref, leaves, dout)
    for name, a, e in zip("q k v bias sinks".split(), got, want):
        assert_close_rel(a, e, tol_b, f"d{name}")
    assert got[-1].dtype == sinks.dtype and got[-1].shape == sinks.shape
    return out


# ----------------------------------------------------------------------------- CPU paths
CPU_CASES = {
    # name: (path the dispatcher takes, shape (b, hq, hkv, lq, lk, d), dtype, op kwargs)
    "fused": ("fused", (2, 4, 2, 19, 23, 16), torch.float32, {}),
    "fused_causal_gqa": ("fused", (2, 4, 1, 21, 21, 8), torch.float32, {"causal": "top_left"}),
    "blocked_softcap": ("blocked", (2, 2, 2, 17, 13, 8), torch.float32, {"softcap": 5.0}),
    "blocked_f16": ("blocked", (1, 2, 1, 9, 12, 8), torch.float16,
                    {"causal": "bottom_right", "softcap": 3.0}),
    "banded_window": ("banded", (1, 4, 2, 33, 33, 8), torch.float32,
                      {"causal": "top_left", "window": 5}),
    "lowp_bf16": ("lowp", (2, 2, 2, 16, 24, 16), torch.bfloat16, {}),
}


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_cpu_paths_match_the_gpt_oss_reference(name):
    path, shape, dtype, kw = CPU_CASES[name]
    q, k, v, sinks = _inputs(*shape, dtype)
    assert T.forward_path(q, k, v, None, causal=kw.get("causal", "none"), dropout_p=0.0,
                          softcap=kw.get("softcap", 0.0), window=kw.get("window", 0)) == path
    _check(q, k, v, sinks, **kw)


def test_cpu_rows_that_see_no_key_attend_to_their_sink_only():
    """A batch item whose key_mask hides every key (and a float bias with a -inf row):
    out 0, lse = sink; those rows add nothing to dq, and their sink share is 1 (with
    out = 0, delta = 0: no sink gradient from them). Eager's cat/softmax/slice gives
    exactly that (no NaN: the sink column is finite)."""
    q, k, v, sinks = _inputs(2, 2, 2, 12, 20, 8, torch.float32)
    key_mask = torch.rand(2, 20, generator=torch.Generator().manual_seed(3)) > 0.4
    key_mask[1] = False
    bias = torch.randn(1, 2, 12, 20, dtype=torch.float32)
    bias[..., 4, :] = float("-inf")
    bias.requires_grad_()
    out = _check(q, k, v, sinks, bias, key_mask=key_mask)
    assert out[1].abs().max() == 0 and out[0, :, 4].abs().max() == 0
    _, lse = torch.ops.attnfuse.flash_attention(q, k, v, None, 0.3, "none", 0.0, 0.0, None,
                                                "torch", 0, key_mask, sinks)
    assert torch.equal(lse[1], sinks.detach().float()[:, None].expand(2, 12))


def test_cpu_backward_of_the_lowp_path_takes_the_blocked_path_with_sinks():
    q, k, v, sinks = _inputs(1, 2, 2, 8, 8, 16, torch.bfloat16)
    lse = torch.zeros(1, 2, 8)
    kw = dict(causal="none", dropout_p=0.0, softcap=0.0, need_dbias=False)
    assert T.backward_path(q, k, v, None, lse, **kw) == "lowp"
    assert T.backward_path(q, k, v, None, lse, sinks=sinks, **kw) == "blocked"


def test_no_keys_at_all_gives_the_sink_lse_and_zero_gradients():
    q, k, v, sinks = _inputs(1, 2, 2, 3, 0, 8, torch.float32)
    out, lse = torch.ops.attnfuse.flash_attention(q, k, v, None, 1.0, "none", 0.0, 0.0, None,
                                                  "torch", 0, None, sinks)
    assert out.abs().max() == 0
    assert torch.equal(lse, sinks.detach()[None, :, None].expand(1, 2, 3))
    dq, dsinks = torch.autograd.grad(out.sum(), (q, sinks))
    assert dq.abs().max() == 0 and dsinks.abs().max() == 0


def test_sinks_are_validated_with_errors_naming_the_argument():
    q, k, v, sinks = _inputs(1, 4, 2, 3, 5, 8, torch.float32)
    with pytest.raises(ValueError, match=r"sinks must have shape \(Hq,\) = \(4,\)"):
        flash_attention(q, k, v, sinks=sinks[:2])
    with pytest.raises(ValueError, match=r"sinks must have shape"):
        flash_attention(q, k, v, sinks=sinks.detach().reshape(1, 4))
    with pytest.raises(TypeError, match="sinks must be a float tensor"):
        flash_attention(q, k, v, sinks=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="sinks must be a torch.Tensor"):
        flash_attention(q, k, v, sinks=[0.0] * 4)
    with pytest.raises(ValueError, match="sinks is on meta"):
        flash_attention(q, k, v, sinks=torch.zeros(4, device="meta"))


def test_op_registration_with_sinks_passes_opcheck():
    """Schema, fake kernel and autograd registration agree with the real kernel (the
    backward op returns dsinks as its fifth tensor)."""
    q, k, v, sinks = _inputs(1, 2, 1, 5, 6, 8, torch.float32)
    args = (q, k, v, None, 0.35, "top_left", 0.0, 0.0, None, "torch", 0, None, sinks)
    torch.library.opcheck(torch.ops.attnfuse.flash_attention.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_sinks_need_no_gradient():
    q, k, v, _ = _inputs(1, 2, 2, 4, 6, 8, torch.float32)
    sinks = torch.randn(2)
    out = flash_attention(q, k, v, sinks=sinks, impl="torch")
    dq, = torch.autograd.grad(out.sum(), (q,))
    ref, _ = sink_reference(q, k, v, sinks)
    assert_close_rel(dq, torch.autograd.grad(ref.sum(), (q,))[0], 5e-5, "dq")


# ------------------------------------------------------------------- Triton (interpreter)
def test_triton_forward_backward_with_sinks_and_rows_that_see_no_key():
    """The main forward kernel (several key blocks: the interpreter's tiles are 16x16),
    the backward kernels and the sink gradient: GQA, bottom-right causal with Lq > Lk (the
    first Lq - Lk rows see no key), a key_mask, fp32."""
    q, k, v, sinks = _inputs(1, 2, 1, 24, 20, 16, torch.float32)
    key_mask = torch.rand(1, 20, generator=torch.Generator().manual_seed(5)) > 0.3
    out = _check(q, k, v, sinks, impl="triton", causal="bottom_right", key_mask=key_mask)
    assert out[:, :, :4].abs().max() == 0


def test_triton_decode_path_with_sinks():
    """Lq <= 16 against >= 256 keys runs the split-KV kernels: the combine kernel merges
    the sink (fp16, GQA packing, a key_mask hiding one batch item)."""
    from attnfuse.kernels import triton_decode

    q, k, v, sinks = _inputs(2, 2, 1, 2, 256, 16, torch.float16)
    assert triton_decode.decode_applicable(q, k, v, dropout_p=0.0)
    key_mask = torch.ones(2, 256, dtype=torch.bool)
    key_mask[1] = False
    with torch.no_grad():
        out, lse = torch.ops.attnfuse.flash_attention(q, k, v, None, 0.25, "none", 0.0, 0.0,
                                                      None, "triton", 0, key_mask, sinks)
    ref, ref_lse = sink_reference(q, k, v, sinks, key_mask=key_mask)
    assert_close_rel(out, ref, TOL[torch.float16][0], "out")
    assert_close_rel(lse, ref_lse, 1e-5, "lse")
    assert out[1].abs().max() == 0


def test_triton_huge_negative_rows_rebuild_their_statistics_with_the_sink():
    """Rows whose every logit is finfo.min (a Hugging Face mask) next to a sink of
    -5000: the sink takes the whole row (out 0, lse = -5000), and the lse is below the
    backward preprocess's recompute threshold, so that rare path must merge the sink
    too (without it P would be rebuilt as the uniform average: wrong dq, dk, dv)."""
    q, k, v, _ = _inputs(1, 2, 1, 9, 17, 16, torch.float32)
    sinks = torch.tensor([-5000.0, 0.5], requires_grad=True)
    bias = torch.zeros(1, 2, 9, 17)
    bias[:, 0] = torch.finfo(torch.float32).min
    out = _check(q, k, v, sinks, bias, impl="triton")
    assert out[0, 0].abs().max() == 0


# --------------------------------------------------------- inlined and exported lowering
def test_inline_attention_with_sinks_matches_the_reference():
    """The aten form the backend hands Inductor for small CPU calls (and export lowers
    to): the sink column concatenated and sliced off, with autograd's gradients."""
    from attnfuse.kernels.torch_inline import inline_attention

    q, k, v, sinks = _inputs(2, 4, 2, 7, 9, 8, torch.float32)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1] = False
    out, lse = inline_attention(q, k, v, None, 8 ** -0.5, "top_left", 0.0, 0.0, None, "torch",
                                0, key_mask, sinks)
    ref, ref_lse = sink_reference(q, k, v, sinks, causal="top_left", key_mask=key_mask)
    assert_close_rel(out, ref, 2e-5, "out")
    assert_close_rel(lse, ref_lse, 2e-5, "lse")
    got = torch.autograd.grad(out.sum(), (q, k, v, sinks))
    want = torch.autograd.grad(ref.sum(), (q, k, v, sinks))
    for name, a, e in zip("q k v sinks".split(), got, want):
        assert_close_rel(a, e, 5e-5, f"d{name}")


class _SinkCall(torch.nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(heads))

    def forward(self, q, k, v):
        return flash_attention(q, k, v, causal=True, sinks=self.sinks)


def test_export_lowering_keeps_the_sinks():
    import attnfuse.export as afx

    model = _SinkCall(4).eval()
    q, k, v, _ = _inputs(1, 4, 2, 6, 6, 8, torch.float32)
    inputs = tuple(t.detach() for t in (q, k, v))
    lowered = afx.lower_to_aten(torch.export.export(model, inputs))
    assert not afx.fused_calls(lowered)
    ref, _ = sink_reference(*inputs, model.sinks.detach(), causal="top_left")
    assert_close_rel(lowered.module()(*inputs), ref, 2e-5, "lowered out")
