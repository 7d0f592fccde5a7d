"""Blocked path of the CPU implementation (chosen by :mod:`attnfuse.kernels.torch_impl`):
it runs everything the other paths do not (softcap, dropout, bottom-right causal with a
bias, float64, a bias of another dtype, huge-lse backwards, ...).

A loop over blocks of query rows (and of batch items where one row of the whole batch
is already large). Each block computes its (rows x keys) scores only: at most
``base.BLOCK_Q`` rows and at most ``base.BLOCK_ELEMS`` score elements over
its batch items and heads (unless a single row of one batch item is larger), slicing
the bias per block (broadcast, never expanded), masking causally by an index
comparison (and skipping the keys a causal/window block cannot see), then softcap,
softmax, dropout and ``@ v``. A block holds whole rows, so its softmax is exact in one
pass (no running rescale across key blocks is needed).

The backward loops over the same blocks and recomputes P from the block's scores (not
from lse: that stays exact for rows of huge finite logits), accumulating dk, dv and
the reduced dbias across blocks. With attention sinks (one extra logit per query head,
no value row), the recomputed P is rescaled by each row's share outside the sink.
GQA/MQA views q as (B, Hkv, G*rows, D) per block and
never repeats K/V. Half types are computed in float32.

The row blocks and the block masking are :mod:`.torch_base`'s. Imports only
:mod:`.base`, :mod:`.torch_base` and :mod:`.torch_dropout`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import base
from . import torch_base as TS
from .torch_dropout import block_keep

__all__ = ["blocked_forward", "blocked_backward"]


def _block_probs(q5, kc, bias5, key_mask, *, i0, i1, kmin, kmax, scale, softcap, causal,
                 window, lq, lk, want_softcap_grad=False, alibi=None):
    """Softmax probabilities (pre-dropout) of rows [i0, i1) over keys [kmin, kmax).

    Returns (p (B, Hkv, G*n, kw), lse (B, Hkv, G, n), softcap_grad or None), where
    kw = kmax - kmin."""
    b, hkv, g, _, d = q5.shape
    n = i1 - i0
    kw = kmax - kmin
    cdt = kc.dtype
    qb = q5[:, :, :, i0:i1].to(cdt).reshape(b, hkv, g * n, d)
    # the scale (and 1/softcap) is applied to the (rows x D) queries, not the scores
    qb = qb * (scale / softcap if softcap > 0 else scale)
    s = torch.matmul(qb, kc[:, :, kmin:kmax].transpose(-1, -2))  # (B, Hkv, G*n, kw)
    s5 = s.view(b, hkv, g, n, kw)
    dcap = None
    if softcap > 0:
        s.tanh_()
        if want_softcap_grad:
            dcap = 1.0 - s * s  # d softcap(x) / dx = 1 - tanh(x / c)^2
        s.mul_(softcap)
    TS.mask_block_scores(s5, bias5, key_mask, i0=i0, i1=i1, kmin=kmin, kmax=kmax, causal=causal,
                      window=window, lq=lq, lk=lk, alibi=alibi)
    m, arg = s.max(-1, keepdim=True)
    p = torch.softmax(s, dim=-1)
    del s, s5
    # lse = m + log(sum exp(s - m)) = m - log(p[argmax]); p[argmax] >= 1/kw, so the
    # log is well conditioned, and rows of huge finite logits stay exact in p
    lse = m - torch.log(p.gather(-1, arg))
    dead = m == base.NEG_INF  # rows masked entirely: softmax gives NaN there
    if bool(dead.any()):
        p.masked_fill_(dead, 0.0)
        lse.masked_fill_(dead, base.NEG_INF)
    return p, lse.view(b, hkv, g, n), dcap


def blocked_forward(q, k, v, bias, *, scale, causal, dropout_p, softcap, seed, window=0,
                     key_mask=None, alibi=None):
    """(out, lse) by row blocks; ``alibi`` None or (1|B, Hq) slopes (the ALiBi term is
    built per block, :func:`base.alibi_block`)."""
    b, hq, lq, _ = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    cdt = base.compute_dtype(q.dtype)
    causal = base.effective_causal(causal, lq, lk, window)
    out = torch.empty((b, hq, lq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
    out5, lse5 = out.unflatten(1, (hkv, g)), lse.unflatten(1, (hkv, g))
    q5 = q.unflatten(1, (hkv, g))
    kc = k.to(cdt).contiguous()
    vc = v.to(cdt).contiguous()
    bias5 = TS.grouped_bias(base.compact(bias) if bias is not None else None, hkv, g)
    drop_scale = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)
    for b0, b1, i0, i1, kmin, kmax in TS.blocks(b, hq, lq, lk, causal, window):
        n, nb = i1 - i0, b1 - b0
        if kmax == kmin:  # every row of the block is fully masked
            out5[b0:b1, :, :, i0:i1] = 0
            lse5[b0:b1, :, :, i0:i1] = base.NEG_INF
            continue
        p, lse_b, _ = _block_probs(q5[b0:b1], kc[b0:b1], TS.bslice(bias5, b0, b1),
                                   TS.bslice(key_mask, b0, b1), i0=i0, i1=i1, kmin=kmin,
                                   kmax=kmax, scale=scale, softcap=softcap, causal=causal,
                                   window=window, lq=lq, lk=lk, alibi=TS.bslice(alibi, b0, b1))
        if dropout_p > 0:
            keep = block_keep(seed, dropout_p, b0, b1, hq, lq, lk, i0, i1, kmin, kmax, hkv, g)
            p.view(nb, hkv, g, n, kmax - kmin).mul_(keep).mul_(drop_scale)
        o = torch.matmul(p, vc[b0:b1, :, kmin:kmax])  # (nb, Hkv, G*n, Dv)
        out5[b0:b1, :, :, i0:i1] = o.view(nb, hkv, g, n, dv)
        lse5[b0:b1, :, :, i0:i1] = lse_b
    return out, lse


def blocked_backward(dout, q, k, v, bias, out, *, scale, causal, dropout_p, softcap, seed,
                      need_dbias, window=0, key_mask=None, sinks=None, alibi=None):
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    cdt = base.compute_dtype(q.dtype)
    causal = base.effective_causal(causal, lq, lk, window)
    q5 = q.unflatten(1, (hkv, g))
    do5 = dout.unflatten(1, (hkv, g))
    # delta = rowsum(P * dP) = rowsum(dout * out): O(L * Dv) from a full-precision out;
    # a half-precision out would round it, so then it is taken from the block
    delta_all = None
    if out is not None and out.dtype in (torch.float32, torch.float64):
        delta_all = (dout.to(cdt) * out.to(cdt)).sum(-1).unflatten(1, (hkv, g))
    kc = k.to(cdt).contiguous()
    vc = v.to(cdt).contiguous()
    grad_bias = need_dbias and bias is not None and bias.dtype != torch.bool
    # with a bias gradient, keep the bias's own shape (a stride-0 expanded dim of size
    # > 1 is a full dim for autograd); otherwise its compact view is enough
    bias_used = bias if (bias is None or grad_bias) else base.compact(bias)
    bias5 = TS.grouped_bias(bias_used, hkv, g)
    dq = torch.empty((b, hq, lq, d), dtype=q.dtype, device=q.device)
    dq5 = dq.unflatten(1, (hkv, g))
    dk = torch.zeros((b, hkv, lk, d), dtype=cdt, device=q.device)
    dvv = torch.zeros((b, hkv, lk, dv), dtype=cdt, device=q.device)
    dbias = torch.zeros(bias.shape, dtype=cdt, device=q.device) if grad_bias else None
    drop_scale = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)
    sink5 = (base.sinks_rows(sinks).to(cdt).view(1, hkv, g, 1, 1) if sinks is not None
             else None)
    for b0, b1, i0, i1, kmin, kmax in TS.blocks(b, hq, lq, lk, causal, window):
        n, nb = i1 - i0, b1 - b0
        kw = kmax - kmin
        if kw == 0:
            dq5[b0:b1, :, :, i0:i1] = 0
            continue
        p, lse_b, dcap = _block_probs(q5[b0:b1], kc[b0:b1], TS.bslice(bias5, b0, b1),
                                  TS.bslice(key_mask, b0, b1), i0=i0, i1=i1, kmin=kmin,
                                  kmax=kmax, scale=scale, softcap=softcap, causal=causal,
                                  window=window, lq=lq, lk=lk, want_softcap_grad=True,
                                  alibi=TS.bslice(alibi, b0, b1))
        if sink5 is not None:
            # the sink takes its share of each row: P = P_keys * exp(lse_keys - lse_all),
            # exp(lse_keys - logaddexp(lse_keys, sink)) = sigmoid(lse_keys - sink)
            # (0 on rows that see no key: lse_keys = -inf)
            share = torch.sigmoid(lse_b.unsqueeze(-1).to(cdt) - sink5)  # (nb, Hkv, G, n, 1)
            share.nan_to_num_(nan=1.0)  # a -inf sink on a row that sees no key: P is 0 there
            p.view(nb, hkv, g, n, kw).mul_(share)
        kb, vb = kc[b0:b1, :, kmin:kmax], vc[b0:b1, :, kmin:kmax]
        dob = do5[b0:b1, :, :, i0:i1].to(cdt).reshape(nb, hkv, g * n, dv)
        dp = torch.matmul(dob, vb.transpose(-1, -2))  # (nb, Hkv, G*n, kw)
        if dropout_p > 0:
            keep = block_keep(seed, dropout_p, b0, b1, hq, lq, lk, i0, i1, kmin, kmax, hkv, g)
            mk = keep.to(cdt).mul_(drop_scale).view(nb, hkv, g * n, kw)
            dp.mul_(mk)
            pd = p * mk
        else:
            pd = p
        dvv[b0:b1, :, kmin:kmax] += torch.matmul(pd.transpose(-1, -2), dob)
        del pd
        if delta_all is not None:
            delta = delta_all[b0:b1, :, :, i0:i1].reshape(nb, hkv, g * n, 1)
        else:
            delta = (p * dp).sum(-1, keepdim=True)
        ds = dp.sub_(delta).mul_(p)  # d loss / d final logits
        if grad_bias:
            TS.accumulate_dbias(dbias, ds.view(nb, hq, n, kw), b0, b1, i0, i1, kmin, kmax)
        if dcap is not None:
            ds.mul_(dcap)
        qb = q5[b0:b1, :, :, i0:i1].to(cdt).reshape(nb, hkv, g * n, d)
        dqb = torch.matmul(ds, kb).mul_(scale)
        dq5[b0:b1, :, :, i0:i1] = dqb.view(nb, hkv, g, n, d)
        dk[b0:b1, :, kmin:kmax] += torch.matmul(ds.transpose(-1, -2), qb).mul_(scale)
    dbias_out = dbias.to(bias.dtype) if grad_bias else None
    return dq, dk.to(k.dtype), dvv.to(v.dtype), dbias_out
