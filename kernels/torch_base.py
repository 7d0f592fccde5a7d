"""The building blocks the CPU paths (``impl="torch"``) share, on top of :mod:`.base`.

Owns two things, each used by more than one path module:

1. **PyTorch's fused CPU flash attention** (``aten._scaled_dot_product_flash_attention_for_cpu``
   and its ``_backward``): whether it computes exactly the op's semantics for some
   inputs (:func:`fused_sdpa_plan`) and one call of it forward and backward
   (:func:`sdpa_forward` / :func:`sdpa_backward`), used by the fused path
   (:mod:`.torch_fused`) and the key-run path (:mod:`.torch_runs`); the banded path
   calls the kernel on blocks of its own. Facts checked for torch 2.13 and 2.14.1 (same
   schema in both)::

     op(q, k, v, dropout_p=0., is_causal=False, *, attn_mask=None, scale=None) -> (out, lse)
     op_backward(dout, q, k, v, out, lse, dropout_p, is_causal, *, attn_mask=None, scale=None)
         -> (dq, dk, dv)

   - ``is_causal`` is top-left aligned; lse is float32 natural log-sum-exp for
     fp32/fp16/bf16 inputs (layout (B, L, H) transposed; any layout is accepted back).
   - ``attn_mask`` must have the query's dtype (a bool mask is rejected), may be any
     broadcastable shape with any strides (stride 0 included) and is *added*.
   - q, k, v must share the head size (no Dv != D) and the head count (no GQA).
   - Inputs whose last dimension is not unit-stride give WRONG results silently
     (both versions), so such inputs are made contiguous first (an O(L*D) copy).
   - Rows masked entirely with -inf give out = 0 and lse = 0 (fixed up to -inf here).
   - The backward recomputes P = exp(s - lse); when |lse| is huge (rows masked with
     finite ``finfo.min`` values) the fp32 lse has lost log(Lk) and the gradients are
     wrong: :func:`lse_well_conditioned` tells the dispatcher to take the blocked path
     when any finite |lse| > :data:`FUSED_BWD_MAX_ABS_LSE`.

2. **The row blocks** of the blocked and bf16 GEMM paths (:func:`blocks`,
   :func:`chunking`): at most ``base.BLOCK_Q`` rows and ``base.BLOCK_ELEMS`` score
   elements per block, the bias viewed per GQA group (:func:`grouped_bias`), a block's
   scores masked in place (:func:`mask_block_scores`) and a block's bias gradient
   reduced into place (:func:`accumulate_dbias`).

Imports only :mod:`.base` (and PyTorch).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import base

__all__ = ["USE_FUSED_SDPA", "FUSED_BWD_MAX_ABS_LSE", "HAS_FUSED", "FUSED_DTYPES", "aten",
           "FusedPlan", "fused_sdpa_plan", "fused_kernel_available", "lse_well_conditioned",
           "lastdim_contig", "sdpa_forward", "sdpa_backward", "grouped_bias", "chunking",
           "blocks", "bslice", "mask_block_scores", "accumulate_dbias"]

#: Master switch for every path that calls the fused kernel (benchmarks/tests turn it off).
USE_FUSED_SDPA: bool = True
#: The fused backward recomputes P from the fp32 lse; above this magnitude the lse
#: has lost too much precision (rows of finfo.min logits), so the blocked path runs.
FUSED_BWD_MAX_ABS_LSE: float = 1024.0

aten = torch.ops.aten
HAS_FUSED = hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
    aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
)
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_kernel_available() -> bool:
    """Whether the fused kernel exists in this torch and is switched on."""
    return USE_FUSED_SDPA and HAS_FUSED


def lastdim_contig(x: Tensor) -> Tensor:
    """``x``, made contiguous where its last dim is not unit-stride (the fused CPU
    kernel silently mis-reads such inputs)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


# ------------------------------------------------------------------------ fused kernel
class FusedPlan(NamedTuple):
    """How the fused SDPA call is made: ``is_causal``; whether GQA query groups are
    merged into the row axis ((B, Hkv, G*Lq, D) views, non-causal only); whether K and V
    are repeated to the query heads instead (causal GQA: an O(Lk * D) copy per head,
    small next to the attention itself; dK/dV are summed back over each group)."""

    is_causal: bool
    merge_groups: bool
    repeat_kv: bool = False


def _merged_view(x: Tensor, hkv: int, g: int) -> Optional[Tensor]:
    """(B, Hq, L, X) -> (B, Hkv, G*L, X) as a view, or None if that needs a copy."""
    b, _, l, last = x.shape
    try:
        return x.unflatten(1, (hkv, g)).view(b, hkv, g * l, last)
    except RuntimeError:
        return None


def _merged_bias(bias: Tensor, hkv: int, g: int, lq: int) -> Optional[Tensor]:
    """A compact 4-D bias mapped onto the merged (B, Hkv, G*Lq, Lk) rows, or None."""
    bb, hb, lqb, lkb = bias.shape
    if hb == 1 and lqb == 1:
        return bias  # broadcasts over the merged rows as it is
    if hb == 1 and lq > 1:
        return None  # would have to repeat the rows for each group
    if lqb == 1 and lq > 1:
        return None  # would have to repeat each head's row Lq times
    # hb == Hq and lqb == Lq: merged row g*Lq + i of kv head h reads bias[:, h*G + g, i]
    return _merged_view(bias, hkv, g)


def fused_sdpa_plan(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *,
                    causal: str, dropout_p: float, softcap: float) -> Optional[FusedPlan]:
    """The plan for one call of PyTorch's fused CPU flash attention, or None where it
    would not compute exactly our semantics."""
    if not fused_kernel_available():
        return None
    if softcap or dropout_p:
        return None  # no softcap; our dropout mask must be reproducible
    if q.dtype not in FUSED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    if any(t.device.type != "cpu" for t in (q, k, v)):
        return None
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if d != dv or min(b, hq, lq, lk, d) == 0:
        return None
    if bias is not None:
        if bias.device.type != "cpu" or bias.dim() != 4:
            return None
        if bias.dtype != torch.bool and bias.dtype != q.dtype:
            return None  # the kernel needs mask.dtype == q.dtype; a cast would round
    eff = base.effective_causal(causal, lq, lk)
    if eff == "bottom_right":
        return None  # not expressible without materialising a (Lq, Lk) mask
    is_causal = eff == "top_left"
    if hq == hkv:
        return FusedPlan(is_causal, False)
    # GQA / MQA: fold each kv head's query group into the row axis, without copies.
    if is_causal:  # folding would break the row index = query position; repeat K/V
        return FusedPlan(True, False, True)
    g = hq // hkv
    if _merged_view(q, hkv, g) is None:
        return None
    if bias is not None:
        cb = base.compact(bias)
        if cb.dtype == torch.bool:  # converted to a contiguous float mask later
            cb = torch.empty(cb.shape, dtype=q.dtype, device="meta")
        if _merged_bias(cb, hkv, g, lq) is None:
            return None
    return FusedPlan(False, True)


def lse_well_conditioned(lse: Tensor) -> bool:
    """Whether the fused backward can recompute P from this fp32 lse (see
    :data:`FUSED_BWD_MAX_ABS_LSE`)."""
    finite = lse.masked_fill(torch.isinf(lse), 0.0)
    return finite.numel() == 0 or bool(finite.abs().max() <= FUSED_BWD_MAX_ABS_LSE)


def _fused_mask(bias: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if bias is None:
        return None
    cb = base.compact(bias)
    if cb.dtype == torch.bool:
        return torch.zeros(cb.shape, dtype=dtype).masked_fill_(cb.logical_not(), base.NEG_INF)
    return cb


def _fix_fully_masked_lse(lse: Tensor, bias: Tensor, causal: bool) -> Tensor:
    """The fused kernel gives lse = 0 (and out = 0) for rows masked entirely; set -inf.

    Only rows with lse == 0 are candidates; for those the bias row (with the causal
    mask) is checked, a bounded number of rows at a time."""
    cand = (lse == 0).nonzero()
    if cand.numel() == 0:
        return lse
    b, hq, lq = lse.shape
    cb = base.compact(bias)
    lk = cb.shape[-1]  # 1 for a bias broadcast over keys: that value is the whole row
    bias_e = cb.expand(b, hq, lq, lk)
    lse = lse.clone()
    chunk = max(1, base.BLOCK_ELEMS // max(lk, 1))
    for c0 in range(0, cand.shape[0], chunk):
        c = cand[c0:c0 + chunk]
        rows = bias_e[c[:, 0], c[:, 1], c[:, 2]]  # (n, lk) gather of the candidate rows
        keep = rows if rows.dtype == torch.bool else rows > base.NEG_INF
        if causal:  # is_causal is top-left: row i sees keys j <= i
            j = torch.arange(keep.shape[-1])
            keep = keep & (j[None, :] <= c[:, 2:3])
        dead = ~keep.any(-1)
        if dead.any():
            d = c[dead]
            lse[d[:, 0], d[:, 1], d[:, 2]] = base.NEG_INF
    return lse


def sdpa_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], plan: FusedPlan,
                 scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) of one fused-kernel call made as ``plan`` says (lse float32, -inf on
    rows masked entirely)."""
    b, hq, lq, _ = q.shape
    hkv = k.shape[1]
    mask = _fused_mask(bias, q.dtype)
    qq, kk, vv = lastdim_contig(q), lastdim_contig(k), lastdim_contig(v)
    if plan.merge_groups:
        g = hq // hkv
        qq = _merged_view(qq, hkv, g)
        if mask is not None:
            mask = _merged_bias(mask, hkv, g, lq)
    if plan.repeat_kv:
        kk, vv = kk.repeat_interleave(hq // hkv, 1), vv.repeat_interleave(hq // hkv, 1)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        qq, kk, vv, 0.0, plan.is_causal, attn_mask=mask, scale=scale)
    if plan.merge_groups:
        out = out.reshape(b, hq, lq, out.shape[-1])
        lse = lse.reshape(b, hq, lq)
    lse = lse.float()
    if bias is not None:
        lse = _fix_fully_masked_lse(lse, bias, plan.is_causal)
    return out, lse


def sdpa_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                  out: Tensor, lse: Tensor, plan: FusedPlan,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one fused-kernel backward call for :func:`sdpa_forward`'s out/lse."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    mask = _fused_mask(bias, q.dtype)
    # The kernel's own convention for fully masked rows is lse = 0 (P = exp(-inf) = 0).
    lse = lse.masked_fill(lse == base.NEG_INF, 0.0).float()
    qq, kk, vv = lastdim_contig(q), lastdim_contig(k), lastdim_contig(v)
    dd = lastdim_contig(dout.to(q.dtype))
    oo = lastdim_contig(out.to(q.dtype))
    if plan.merge_groups:
        g = hq // hkv
        qq = _merged_view(qq, hkv, g)
        dd = dd.reshape(b, hkv, g * lq, d)
        oo = oo.reshape(b, hkv, g * lq, d)
        lse = lse.reshape(b, hkv, g * lq)
        if mask is not None:
            mask = _merged_bias(mask, hkv, g, lq)
    if plan.repeat_kv:
        kk, vv = kk.repeat_interleave(hq // hkv, 1), vv.repeat_interleave(hq // hkv, 1)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dd, qq, kk, vv, oo, lse, 0.0, plan.is_causal, attn_mask=mask, scale=scale)
    if plan.merge_groups:
        dq = dq.reshape(b, hq, lq, d)
    if plan.repeat_kv:  # each kv head's gradient is the sum over its query group
        dk = dk.unflatten(1, (hkv, hq // hkv)).sum(2)
        dv = dv.unflatten(1, (hkv, hq // hkv)).sum(2)
    return dq, dk, dv


# -------------------------------------------------------------------------- row blocks
def grouped_bias(bias: Optional[Tensor], hkv: int, g: int) -> Optional[Tensor]:
    """4-D bias as a (Bb, Hkv|1, G|1, Lqb, Lkb) view matching the grouped layout."""
    if bias is None:
        return None
    if bias.shape[1] == 1:
        return bias.unsqueeze(2)
    return bias.unflatten(1, (hkv, g))


def chunking(b: int, hq: int, lk: int) -> tuple[int, int]:
    """(batch items, query rows) per block: at most ``base.BLOCK_ELEMS`` score elements
    (unless one row of one batch item is already larger) and at most ``base.BLOCK_Q`` rows."""
    per_row = hq * max(lk, 1)  # score elements of one query row of one batch item
    bc = max(1, min(b, int(base.BLOCK_ELEMS) // per_row))
    rows = max(1, min(int(base.BLOCK_Q), int(base.BLOCK_ELEMS) // (bc * per_row)))
    return bc, rows


def blocks(b: int, hq: int, lq: int, lk: int, causal: str, window: int):
    """Yields (b0, b1, i0, i1, kmin, kmax): batch items [b0, b1), rows [i0, i1) and
    the keys [kmin, kmax) that any of those rows can see (causal and window band)."""
    bc, rows = chunking(b, hq, lk)
    for b0 in range(0, b, bc):
        for i0 in range(0, lq, rows):
            i1 = min(lq, i0 + rows)
            kmin = base.band_kmin(causal, window, i0, lq, lk)
            yield b0, min(b, b0 + bc), i0, i1, kmin, max(kmin, base.band_kmax(causal, i1, lq, lk))


def bslice(t: Optional[Tensor], b0: int, b1: int) -> Optional[Tensor]:
    """Batch items [b0, b1) of t, or t itself where its batch dim broadcasts."""
    return t if t is None or t.shape[0] == 1 else t[b0:b1]


def mask_block_scores(s5: Tensor, bias5: Optional[Tensor], key_mask: Optional[Tensor], *,
                      i0: int, i1: int, kmin: int, kmax: int, causal: str, window: int,
                      lq: int, lk: int, alibi: Optional[Tensor] = None) -> None:
    """Add the bias to, and mask in place, the scores (B, Hkv, G, rows, keys) of rows
    [i0, i1) over keys [kmin, kmax): bias (a :func:`grouped_bias` view, sliced here; bool:
    False -> -inf), the ALiBi term of ``alibi`` (slopes (Hq,) or (B, Hq), batch-sliced
    by the caller; :func:`base.alibi_block`, built for this block only), key_mask, and
    the causal/window band (only on blocks it crosses)."""
    if alibi is not None:
        ab = base.alibi_block(alibi, i0, i1, kmin, kmax, lq, lk, s5.dtype)
        s5.add_(ab.view(ab.shape[0], s5.shape[1], s5.shape[2], i1 - i0, kmax - kmin))
    if bias5 is not None:
        bs = bias5
        if bs.shape[3] > 1:
            bs = bs[:, :, :, i0:i1]
        if bs.shape[4] > 1:
            bs = bs[..., kmin:kmax]
        if bs.dtype == torch.bool:
            s5.masked_fill_(bs.logical_not(), base.NEG_INF)
        else:
            s5.add_(bs)
    if key_mask is not None:  # (B|1, Lk) key padding, broadcast over heads and rows
        s5.masked_fill_(key_mask[:, None, None, None, kmin:kmax].logical_not(), base.NEG_INF)
    if causal != "none":
        off = base.causal_offset(causal, lq, lk)
        i = torch.arange(i0, i1).view(-1, 1)
        j = torch.arange(kmin, kmax).view(1, -1)
        if kmax > i0 + off + 1:  # some (row, key) in the block is above the diagonal
            s5.masked_fill_(j > i + off, base.NEG_INF)
        if window and i1 - 1 + off - window >= kmin:  # some key is left of a row's window
            s5.masked_fill_(j <= i + off - window, base.NEG_INF)


def accumulate_dbias(dbias: Tensor, ds: Tensor, b0: int, b1: int, i0: int, i1: int,
                     kmin: int, kmax: int) -> None:
    """Add a block's logit gradient (nb, Hq, n, kmax - kmin) into dbias, reduced to its shape."""
    dims = [i for i in range(4) if dbias.shape[i] == 1 and ds.shape[i] != 1]
    red = ds.sum(dims, keepdim=True) if dims else ds
    tgt = bslice(dbias, b0, b1)
    if dbias.shape[2] > 1:
        tgt = tgt[:, :, i0:i1]
    if dbias.shape[3] > 1:
        tgt = tgt[..., kmin:kmax]
    tgt += red
