"""Banded fused path of the CPU implementation: sliding windows and bottom-right causal
masks through PyTorch's fused CPU flash attention, one block of query rows at a time.

PyTorch's fused CPU kernel (see :mod:`attnfuse.kernels.torch_base`) only knows
top-left ``is_causal``.  A window or a bottom-right diagonal with Lq != Lk is expressed
per block of ``BLOCK_Q`` query rows instead: the block calls the kernel on the keys
[kmin, kmax) its rows can see (the causal/window band) with a small additive
(rows, kmax - kmin) mask of the band's edges, plus the key_mask's slice.  Each row's
visible keys all lie inside its block's key range, so every block's softmax, output
and lse are exact; work is O(Lq * (rows + window)), and no (Lq, Lk) mask exists.
The backward walks the same blocks through the kernel's backward, adding each block's
dK/dV into the key range it read.

Used for: window > 0 or an effective bottom-right diagonal, with no bias, softcap or
dropout (those take the blocked loop).  GQA repeats K/V per block (an O(keys * D) copy).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import base
from . import torch_base as TS

__all__ = ["banded_applicable", "banded_forward", "banded_backward"]


def banded_applicable(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, causal: str,
                      window: int, dropout_p: float, softcap: float) -> bool:
    """Whether the banded fused path computes exactly the op's semantics here."""
    if not (TS.fused_kernel_available()) or bias is not None or softcap or dropout_p:
        return False
    if q.dtype not in TS.FUSED_DTYPES or q.device.type != "cpu" or q.shape[-1] != v.shape[-1]:
        return False
    eff = base.effective_causal(causal, q.shape[2], k.shape[2], window)
    return bool(window) or eff == "bottom_right"


def _block_mask(causal: str, window: int, key_mask: Optional[Tensor], i0: int, i1: int,
                kmin: int, kmax: int, lq: int, lk: int, dtype) -> tuple[Tensor, Tensor]:
    """(additive mask (Bk|1, 1, rows, kw) in ``dtype``, dead rows (Bk|1, rows) bool)."""
    off = base.causal_offset(causal, lq, lk)
    i = torch.arange(i0, i1).view(-1, 1) + off
    j = torch.arange(kmin, kmax).view(1, -1)
    keep = j <= i
    if window:
        keep = keep & (j > i - window)
    keep = keep[None]  # (1, rows, kw)
    if key_mask is not None:
        keep = keep & key_mask[:, None, kmin:kmax]
    mask = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, base.NEG_INF)
    return mask[:, None], ~keep.any(-1)


def _repeat(x: Tensor, g: int) -> Tensor:
    return x if g == 1 else x.repeat_interleave(g, 1)


def _blocks(causal, window, lq, lk):
    rows = max(1, int(base.BLOCK_Q))
    for i0 in range(0, lq, rows):
        i1 = min(lq, i0 + rows)
        kmin = base.band_kmin(causal, window, i0, lq, lk)
        yield i0, i1, kmin, max(kmin, base.band_kmax(causal, i1, lq, lk))


def banded_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: str, window: int,
                   key_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(out, lse) as :func:`attnfuse.kernels.torch_impl.forward`."""
    b, hq, lq, _ = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    causal = base.effective_causal(causal, lq, lk, window)
    out = torch.zeros((b, hq, lq, dv), dtype=q.dtype)
    lse = torch.full((b, hq, lq), base.NEG_INF, dtype=torch.float32)
    qq, kk, vv = TS.lastdim_contig(q), TS.lastdim_contig(k), TS.lastdim_contig(v)
    for i0, i1, kmin, kmax in _blocks(causal, window, lq, lk):
        if kmax == kmin:
            continue  # no row of the block sees a key: out 0, lse -inf
        mask, dead = _block_mask(causal, window, key_mask, i0, i1, kmin, kmax, lq, lk, q.dtype)
        o, l = TS.aten._scaled_dot_product_flash_attention_for_cpu(
            qq[:, :, i0:i1], _repeat(kk[:, :, kmin:kmax], g), _repeat(vv[:, :, kmin:kmax], g),
            0.0, False, attn_mask=mask, scale=scale)
        l = l.float()
        if bool(dead.any()):  # the kernel gives lse 0 (and out 0) for rows that see no key
            l = l.masked_fill(dead[:, None], base.NEG_INF)
            o = o.masked_fill(dead[:, None, :, None], 0.0)
        out[:, :, i0:i1] = o
        lse[:, :, i0:i1] = l
    return out, lse


def banded_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                    scale: float, causal: str, window: int,
                    key_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for :func:`banded_forward`'s out and lse."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    causal = base.effective_causal(causal, lq, lk, window)
    cdt = base.compute_dtype(q.dtype)
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros((b, hkv, lk, d), dtype=cdt)
    dv = torch.zeros((b, hkv, lk, v.shape[-1]), dtype=cdt)
    qq, kk, vv = TS.lastdim_contig(q), TS.lastdim_contig(k), TS.lastdim_contig(v)
    dd = TS.lastdim_contig(dout.to(q.dtype))
    oo = TS.lastdim_contig(out.to(q.dtype))
    # the kernel's own convention for rows that see no key is lse = 0 (P = exp(-inf) = 0)
    lse0 = lse.masked_fill(lse == base.NEG_INF, 0.0).float()
    for i0, i1, kmin, kmax in _blocks(causal, window, lq, lk):
        if kmax == kmin:
            continue
        mask, _ = _block_mask(causal, window, key_mask, i0, i1, kmin, kmax, lq, lk, q.dtype)
        gq, gk, gv = TS.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dd[:, :, i0:i1], qq[:, :, i0:i1], _repeat(kk[:, :, kmin:kmax], g),
            _repeat(vv[:, :, kmin:kmax], g), oo[:, :, i0:i1], lse0[:, :, i0:i1].contiguous(),
            0.0, False, attn_mask=mask, scale=scale)
        dq[:, :, i0:i1] = gq
        # each kv head's gradient is the sum over its query group
        dk[:, :, kmin:kmax] += gk.to(cdt).unflatten(1, (hkv, g)).sum(2)
        dv[:, :, kmin:kmax] += gv.to(cdt).unflatten(1, (hkv, g)).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
