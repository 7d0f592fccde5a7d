"""bf16 GEMM path of the CPU implementation, for non-causal bf16 attention over at
most :data:`LOWP_MAX_KEYS` keys (encoders: BERT, ViT, cross-attention).

There, PyTorch's fused CPU flash kernel (the fused path of
:mod:`attnfuse.kernels.torch_fused`, which Inductor's own SDPA rewrite also calls) is
slower than plain bf16 GEMMs on an AVX512-BF16 CPU, above all in the backward
(``benchmarks/lowp_crossover.py``, recorded in benchmarks/README.md: fused / this path
1.04-1.32x on minima for training at 256-1536 keys, 0.87-1.14x forward).  This path
runs the unfused graph's own recipe,
one block of query rows at a time (the blocks of the blocked loop: at most
``BLOCK_Q`` rows and ``BLOCK_ELEMS`` score elements)::

    s   = scale * q_blk @ k^T           one bf16 GEMM (fp32 accumulation, the scale
                                         folded into it: baddbmm alpha)
    s   = mask(s + bias)                 in bf16, as the unfused graph does
    p   = softmax(s)                     fp32 math, rounded to bf16, as eager rounds it
    out = dropout(p) @ v                 one bf16 GEMM

so its rounding is the unfused graph's (scores rounded to bf16 once) and no (Lq, Lk)
tensor exists (memory stays linear in the length).  lse is the log-sum-exp of those
rounded logits, taken as ``max s - log(max p)`` (within eps/2 of bf16).  The backward
recomputes each block's ``p`` with the same ops and applies eager's softmax backward
(``_softmax_backward_data``: ``p * (dp - rowsum(p * dp))``); dK/dV (and a bias
gradient) accumulate across blocks in float32.

Not used for: fp16 (CPU fp16 GEMMs ran 10x slower than the fused kernel), causal or
windowed attention (the fused/banded kernels skip the masked half and were faster
forward), softcap, a bias of another dtype than the inputs' (the unfused graph would
promote the scores).

Edge rows follow the op's contract: rows that see no key give out = 0, lse = -inf
and zero gradients; rows of large finite negative logits give eager's uniform average.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import base
from . import torch_base as TS
from .torch_dropout import block_keep

__all__ = ["LOWP_MAX_KEYS", "USE_LOWP", "lowp_applicable", "lowp_forward", "lowp_backward"]

#: Most keys this path takes (crossover with the fused kernel, measured with
#: ``benchmarks/lowp_crossover.py``, see benchmarks/README.md).
LOWP_MAX_KEYS: int = 1536
#: Master switch (benchmarks and tests turn it off to compare paths).
USE_LOWP: bool = True


def lowp_applicable(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, causal: str,
                    window: int, softcap: float) -> bool:
    """Whether this path runs for these inputs: bf16 on CPU, no causal band (after
    folding no-op alignments), no window or softcap, at most ``LOWP_MAX_KEYS`` keys,
    a bias (if any) in bf16 or bool; only on a CPU with native bf16 matrix products
    (:data:`base.NATIVE_BF16_GEMM`: elsewhere its bf16 GEMMs are emulated, many times
    slower than the fused kernel)."""
    if not USE_LOWP or not base.NATIVE_BF16_GEMM or softcap or window:
        return False
    if q.dtype != torch.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if any(t.device.type != "cpu" for t in (q, k, v)):
        return False
    if bias is not None and (bias.device.type != "cpu"
                             or bias.dtype not in (torch.bool, q.dtype)):
        return False  # a float32 bias would promote the scores: not the unfused recipe
    lq, lk = q.shape[2], k.shape[2]
    return base.effective_causal(causal, lq, lk) == "none" and lk <= LOWP_MAX_KEYS


def _gemm(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """alpha * a @ b for (N, m, k) @ (N, k, n) in one GEMM (the scale folded into it:
    one rounding to the input dtype, not two)."""
    out = a.new_empty(()).expand(a.shape[0], a.shape[1], b.shape[2])  # beta = 0: never read
    return torch.baddbmm(out, a, b, beta=0.0, alpha=alpha)


def _flat(x: Tensor) -> Tensor:
    """(nb, Hkv, G, rows, X) or (nb, Hkv, rows, X) -> (nb * Hkv, G * rows, X)."""
    return x.reshape(x.shape[0] * x.shape[1], -1, x.shape[-1])


def lowp_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, scale: float,
                 dropout_p: float, seed: int,
                 key_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(out, lse) as :func:`attnfuse.kernels.torch_impl.forward`."""
    b, hq, lq, _ = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    out = torch.empty((b, hq, lq, dv), dtype=q.dtype)
    lse = torch.empty((b, hq, lq), dtype=torch.float32)
    out5, lse5 = out.unflatten(1, (hkv, g)), lse.unflatten(1, (hkv, g))
    q5 = q.unflatten(1, (hkv, g))
    kc, vc = k.contiguous(), v.contiguous()  # per-block (N, keys, D) views without copies
    bias5 = TS.grouped_bias(base.compact(bias) if bias is not None else None, hkv, g)
    drop_scale = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)
    for b0, b1, i0, i1, kmin, kmax in TS.blocks(b, hq, lq, lk, "none", 0):
        n, nb, kw = i1 - i0, b1 - b0, kmax - kmin  # no causal band: every block sees all keys
        s = _gemm(_flat(q5[b0:b1, :, :, i0:i1]), _flat(kc[b0:b1, :, kmin:kmax]).transpose(1, 2),
                  scale)
        TS.mask_block_scores(s.view(nb, hkv, g, n, kw), TS.bslice(bias5, b0, b1),
                             TS.bslice(key_mask, b0, b1), i0=i0, i1=i1, kmin=kmin, kmax=kmax,
                             causal="none", window=0, lq=lq, lk=lk)
        m = s.amax(-1, keepdim=True)
        p = torch.softmax(s, -1)  # fp32 math, rounded to the input dtype (as eager does)
        del s
        # lse = m + log(sum exp(s - m)) = m - log(max p): the softmax is monotone, so the
        # largest p sits at the largest logit, and max p >= 1 / keys is well conditioned
        # (its rounding to the input dtype moves lse by at most eps / 2)
        lse_b = m.float() - torch.log(p.amax(-1, keepdim=True).float())
        dead = m == base.NEG_INF  # rows that see no key: softmax gives NaN there
        if bool(dead.any()):
            p.masked_fill_(dead, 0.0)
            lse_b.masked_fill_(dead, base.NEG_INF)
        if dropout_p > 0:
            keep = block_keep(seed, dropout_p, b0, b1, hq, lq, lk, i0, i1, kmin, kmax, hkv, g)
            p.view(nb, hkv, g, n, kw).mul_(keep).mul_(drop_scale)
        o = torch.bmm(p, _flat(vc[b0:b1, :, kmin:kmax]))
        out5[b0:b1, :, :, i0:i1] = o.view(nb, hkv, g, n, dv)
        lse5[b0:b1, :, :, i0:i1] = lse_b.view(nb, hkv, g, n)
    return out, lse


def lowp_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                  lse: Tensor, *, scale: float, dropout_p: float, seed: int, need_dbias: bool,
                  key_mask: Optional[Tensor] = None):
    """(dq, dk, dv, dbias) for :func:`lowp_forward` (its lse marks rows that saw no key)."""
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    q5, do5 = q.unflatten(1, (hkv, g)), dout.to(q.dtype).unflatten(1, (hkv, g))
    lse5 = lse.unflatten(1, (hkv, g))
    kc, vc = k.contiguous(), v.contiguous()
    grad_bias = need_dbias and bias is not None and bias.dtype != torch.bool
    bias5 = TS.grouped_bias(bias if grad_bias or bias is None else base.compact(bias), hkv, g)
    dq = torch.empty((b, hq, lq, d), dtype=q.dtype)
    dq5 = dq.unflatten(1, (hkv, g))
    dk = torch.zeros((b, hkv, lk, d), dtype=torch.float32)
    dvv = torch.zeros((b, hkv, lk, dv), dtype=torch.float32)
    dbias = torch.zeros(bias.shape, dtype=torch.float32) if grad_bias else None
    drop_scale = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)
    for b0, b1, i0, i1, kmin, kmax in TS.blocks(b, hq, lq, lk, "none", 0):
        n, nb, kw = i1 - i0, b1 - b0, kmax - kmin
        qb, kb, vb = (_flat(q5[b0:b1, :, :, i0:i1]), _flat(kc[b0:b1, :, kmin:kmax]),
                      _flat(vc[b0:b1, :, kmin:kmax]))
        dob = _flat(do5[b0:b1, :, :, i0:i1])
        s = _gemm(qb, kb.transpose(1, 2), scale)  # the forward's p, recomputed the same way
        TS.mask_block_scores(s.view(nb, hkv, g, n, kw), TS.bslice(bias5, b0, b1),
                             TS.bslice(key_mask, b0, b1), i0=i0, i1=i1, kmin=kmin, kmax=kmax,
                             causal="none", window=0, lq=lq, lk=lk)
        p = torch.softmax(s, -1)
        del s
        dead = lse5[b0:b1, :, :, i0:i1].reshape(nb * hkv, g * n, 1) == base.NEG_INF
        if bool(dead.any()):
            p.masked_fill_(dead, 0.0)  # NaN from the softmax of rows that see no key
        dp = torch.bmm(dob, vb.transpose(1, 2))
        if dropout_p > 0:
            keep = block_keep(seed, dropout_p, b0, b1, hq, lq, lk, i0, i1, kmin, kmax, hkv, g)
            mk = keep.to(q.dtype).mul_(drop_scale).view(nb * hkv, g * n, kw)
            dp.mul_(mk)
            pd = p * mk
        else:
            pd = p
        dvv[b0:b1, :, kmin:kmax] += torch.bmm(pd.transpose(1, 2), dob).view(nb, hkv, kw, dv)
        del pd
        ds = torch._softmax_backward_data(dp, p, -1, q.dtype)  # p * (dp - rowsum(p * dp))
        del dp, p
        if grad_bias:
            TS.accumulate_dbias(dbias, ds.view(nb, hq, n, kw).float(), b0, b1, i0, i1,
                                kmin, kmax)
        dq5[b0:b1, :, :, i0:i1] = _gemm(ds, kb, scale).view(nb, hkv, g, n, d)
        dk[b0:b1, :, kmin:kmax] += _gemm(ds.transpose(1, 2), qb, scale).view(nb, hkv, kw, d)
    dbias_out = dbias.to(bias.dtype) if grad_bias else None
    return dq, dk.to(k.dtype), dvv.to(v.dtype), dbias_out
