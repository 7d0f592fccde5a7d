"""CPU implementation (``impl="torch"``) of ``attnfuse::flash_attention``.

The op layer (``attnfuse/op.py``) validates the inputs, fills in the default scale,
reshapes the bias to 4-D and wires autograd; it then calls :func:`forward` and
:func:`backward` here. Semantics, for q (B, Hq, Lq, D), k (B, Hkv, Lk, D),
v (B, Hkv, Lk, Dv), Hq % Hkv == 0::

    logits = softcap(scale * q @ k^T) + bias        (bool bias: False -> -inf)
    logits = causal_mask(logits)                    ("none" | "top_left" | "bottom_right")
    logits = window_mask(key_mask(logits))          (structure: never an (Lq, Lk) tensor)
    out    = dropout(softmax(logits, -1)) @ v       (keep prob 1 - p, kept scaled 1/(1-p))
    lse    = logsumexp(logits, -1)                  (float32, natural log)

Four paths (the third in :mod:`attnfuse.kernels.torch_banded`, the fourth in
:mod:`attnfuse.kernels.torch_lowp`), chosen by :func:`forward_path` / :func:`backward_path`:

1. **Fused**: PyTorch's fused CPU flash attention
   (``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``),
   used only where it computes exactly these semantics (see :func:`fused_sdpa_plan`).
   Facts checked for torch 2.13 and 2.14.1 (same schema in both)::

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
     wrong, so the backward falls back to the blocked path when any finite
     |lse| > :data:`FUSED_BWD_MAX_ABS_LSE`.

2. **Blocked**: a loop over blocks of query rows (and of batch items where one row of
   the whole batch is already large). Each block computes its (rows x keys) scores
   only: at most ``BLOCK_Q`` rows and at most ``BLOCK_ELEMS`` score elements over its
   batch items and heads (unless a single row of one batch item is larger), slicing
   the bias per block (broadcast, never expanded), masking causally by an index
   comparison (and skipping the keys a causal block cannot see), then softcap,
   softmax, dropout and ``@ v``. A block holds whole rows, so its softmax is exact in
   one pass (no running rescale across key blocks is needed).
   The backward loops over the same blocks and recomputes P from the block's scores
   (not from lse: that stays exact for rows of huge finite logits), accumulating dk,
   dv and the reduced dbias across blocks. GQA/MQA views q as (B, Hkv, G*rows, D) per
   block and never repeats K/V. Half types are computed in float32.

3. **Banded** (structural masks): a ``key_mask`` alone becomes a (B, 1, 1, Lk)
   broadcast mask of the fused path. A ``window`` or an effective bottom-right
   diagonal (no bias, softcap or dropout) runs the fused kernel per block of query
   rows over the keys [kmin, kmax) of the block's causal/window band. Otherwise the
   blocked path runs, masking keys per block and visiting only the keys inside the
   band (O(Lq * (rows + window)) work for a window, not O(Lq * Lk)).

4. **Lowp**: non-causal bf16 attention over at most ``LOWP_MAX_KEYS`` keys runs the
   unfused graph's own bf16 recipe (bf16 GEMMs, scores rounded to bf16 as eager rounds
   them) per block of the blocked loop: there PyTorch's fused kernel is slower than
   bf16 GEMMs on CPU (see that module). It comes first: it takes bias, key_mask and
   dropout.

Conventions: rows whose logits are all -inf give out = 0, lse = -inf and zero
gradients on every path (eager gives NaN there). Rows of large finite negative logits
(``finfo.min`` masks) follow eager exactly (a uniform average).

Dropout keep-masks come from :mod:`attnfuse.kernels.torch_dropout` (a pure function of
(seed, b, h, i, j), so the backward regenerates the forward's mask block by block).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .torch_dropout import block_keep, dropout_keep_mask

__all__ = [
    "forward",
    "backward",
    "forward_path",
    "backward_path",
    "uses_fused_sdpa",
    "uses_fused_sdpa_backward",
    "fused_sdpa_plan",
    "dropout_keep_mask",
    "BLOCK_Q",
    "BLOCK_ELEMS",
    "USE_FUSED_SDPA",
]

#: Most query rows per block of the blocked path.
BLOCK_Q: int = 256
#: Most score elements (batch * heads * rows * keys) per block; rows shrink to fit
#: (down to one row) when the key length is long.
BLOCK_ELEMS: int = 1 << 22
#: Master switch for the fused SDPA path (benchmarks/tests may turn it off).
USE_FUSED_SDPA: bool = True
#: The fused backward recomputes P from the fp32 lse; above this magnitude the lse
#: has lost too much precision (rows of finfo.min logits), so the blocked path runs.
FUSED_BWD_MAX_ABS_LSE: float = 1024.0

_aten = torch.ops.aten
_HAS_FUSED = hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
    _aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
)
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- helpers
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compact(bias: Tensor) -> Tensor:
    """``bias`` with every stride-0 (expanded) dim narrowed to size 1 (a view)."""
    for d in range(bias.dim()):
        if bias.shape[d] > 1 and bias.stride(d) == 0:
            bias = bias.narrow(d, 0, 1)
    return bias


def _effective_causal(causal: str, lq: int, lk: int, window: int = 0) -> str:
    """The causal mode with no-op and equivalent alignments folded away (a window
    keeps its causal mode: it is counted back from the diagonal)."""
    if causal == "bottom_right":
        if lq <= 1 and not window:  # the only row sees keys j <= lk - 1: all of them
            return "none"
        if lq == lk:
            return "top_left"
    if causal == "top_left" and lk <= 1 and not window:  # key 0 is visible to every row
        return "none"
    return causal


def _causal_offset(causal: str, lq: int, lk: int) -> int:
    """Row i sees keys j <= i + offset."""
    return (lk - lq) if causal == "bottom_right" else 0


def _lastdim_contig(x: Tensor) -> Tensor:
    # The fused CPU kernel silently mis-reads inputs whose last dim is not unit-stride.
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


# ------------------------------------------------------------------------ fused path
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
    """The plan for PyTorch's fused CPU flash attention, or None where it would not
    compute exactly our semantics (then the blocked loop runs)."""
    if not (USE_FUSED_SDPA and _HAS_FUSED):
        return None
    if softcap or dropout_p:
        return None  # no softcap; our dropout mask must be reproducible
    if q.dtype not in _FUSED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
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
    eff = _effective_causal(causal, lq, lk)
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
        cb = _compact(bias)
        if cb.dtype == torch.bool:  # converted to a contiguous float mask later
            cb = torch.empty(cb.shape, dtype=q.dtype, device="meta")
        if _merged_bias(cb, hkv, g, lq) is None:
            return None
    return FusedPlan(False, True)


def uses_fused_sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *,
                    causal: str, dropout_p: float, softcap: float) -> bool:
    """Whether :func:`forward` takes the fused SDPA path for these inputs."""
    return fused_sdpa_plan(q, k, v, bias, causal=causal, dropout_p=dropout_p,
                           softcap=softcap) is not None


def uses_fused_sdpa_backward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                             lse: Tensor, *, causal: str, dropout_p: float, softcap: float,
                             need_dbias: bool) -> bool:
    """Whether :func:`backward` takes the fused SDPA backward for these inputs."""
    if need_dbias and bias is not None and bias.dtype != torch.bool:
        return False  # the fused backward gives no gradient for the mask
    if not uses_fused_sdpa(q, k, v, bias, causal=causal, dropout_p=dropout_p,
                           softcap=softcap):
        return False
    finite = lse.masked_fill(torch.isinf(lse), 0.0)
    return finite.numel() == 0 or bool(finite.abs().max() <= FUSED_BWD_MAX_ABS_LSE)


def _fused_mask(bias: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if bias is None:
        return None
    cb = _compact(bias)
    if cb.dtype == torch.bool:
        return torch.zeros(cb.shape, dtype=dtype).masked_fill_(cb.logical_not(), _NEG_INF)
    return cb


def _fix_fully_masked_lse(lse: Tensor, bias: Tensor, causal: bool) -> Tensor:
    """The fused kernel gives lse = 0 (and out = 0) for rows masked entirely; set -inf.

    Only rows with lse == 0 are candidates; for those the bias row (with the causal
    mask) is checked, a bounded number of rows at a time."""
    cand = (lse == 0).nonzero()
    if cand.numel() == 0:
        return lse
    b, hq, lq = lse.shape
    cb = _compact(bias)
    lk = cb.shape[-1]  # 1 for a bias broadcast over keys: that value is the whole row
    bias_e = cb.expand(b, hq, lq, lk)
    lse = lse.clone()
    chunk = max(1, BLOCK_ELEMS // max(lk, 1))
    for c0 in range(0, cand.shape[0], chunk):
        c = cand[c0:c0 + chunk]
        rows = bias_e[c[:, 0], c[:, 1], c[:, 2]]  # (n, lk) gather of the candidate rows
        keep = rows if rows.dtype == torch.bool else rows > _NEG_INF
        if causal:  # is_causal is top-left: row i sees keys j <= i
            j = torch.arange(keep.shape[-1])
            keep = keep & (j[None, :] <= c[:, 2:3])
        dead = ~keep.any(-1)
        if dead.any():
            d = c[dead]
            lse[d[:, 0], d[:, 1], d[:, 2]] = _NEG_INF
    return lse


def _fused_forward(q, k, v, bias, plan: FusedPlan, scale: float):
    b, hq, lq, _ = q.shape
    hkv = k.shape[1]
    mask = _fused_mask(bias, q.dtype)
    qq, kk, vv = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    if plan.merge_groups:
        g = hq // hkv
        qq = _merged_view(qq, hkv, g)
        if mask is not None:
            mask = _merged_bias(mask, hkv, g, lq)
    if plan.repeat_kv:
        kk, vv = kk.repeat_interleave(hq // hkv, 1), vv.repeat_interleave(hq // hkv, 1)
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
        qq, kk, vv, 0.0, plan.is_causal, attn_mask=mask, scale=scale)
    if plan.merge_groups:
        out = out.reshape(b, hq, lq, out.shape[-1])
        lse = lse.reshape(b, hq, lq)
    lse = lse.float()
    if bias is not None:
        lse = _fix_fully_masked_lse(lse, bias, plan.is_causal)
    return out, lse


def _fused_backward(dout, q, k, v, bias, out, lse, plan: FusedPlan, scale: float):
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    mask = _fused_mask(bias, q.dtype)
    # The kernel's own convention for fully masked rows is lse = 0 (P = exp(-inf) = 0).
    lse = lse.masked_fill(lse == _NEG_INF, 0.0).float()
    qq, kk, vv = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    dd = _lastdim_contig(dout.to(q.dtype))
    oo = _lastdim_contig(out.to(q.dtype))
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
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dd, qq, kk, vv, oo, lse, 0.0, plan.is_causal, attn_mask=mask, scale=scale)
    if plan.merge_groups:
        dq = dq.reshape(b, hq, lq, d)
    if plan.repeat_kv:  # each kv head's gradient is the sum over its query group
        dk = dk.unflatten(1, (hkv, hq // hkv)).sum(2)
        dv = dv.unflatten(1, (hkv, hq // hkv)).sum(2)
    return dq, dk, dv


# ---------------------------------------------------------------------- blocked path
def _bias5(bias: Optional[Tensor], hkv: int, g: int) -> Optional[Tensor]:
    """4-D bias as a (Bb, Hkv|1, G|1, Lqb, Lkb) view matching the grouped layout."""
    if bias is None:
        return None
    if bias.shape[1] == 1:
        return bias.unsqueeze(2)
    return bias.unflatten(1, (hkv, g))


def _chunking(b: int, hq: int, lk: int) -> tuple[int, int]:
    """(batch items, query rows) per block: at most BLOCK_ELEMS score elements (unless
    one row of one batch item is already larger) and at most BLOCK_Q rows."""
    per_row = hq * max(lk, 1)  # score elements of one query row of one batch item
    bc = max(1, min(b, int(BLOCK_ELEMS) // per_row))
    rows = max(1, min(int(BLOCK_Q), int(BLOCK_ELEMS) // (bc * per_row)))
    return bc, rows


def _blocks(b: int, hq: int, lq: int, lk: int, causal: str, window: int):
    """Yields (b0, b1, i0, i1, kmin, kmax): batch items [b0, b1), rows [i0, i1) and
    the keys [kmin, kmax) that any of those rows can see (causal and window band)."""
    bc, rows = _chunking(b, hq, lk)
    for b0 in range(0, b, bc):
        for i0 in range(0, lq, rows):
            i1 = min(lq, i0 + rows)
            kmin = _kmin(causal, window, i0, lq, lk)
            yield b0, min(b, b0 + bc), i0, i1, kmin, max(kmin, _kmax(causal, i1, lq, lk))


def _bslice(t: Optional[Tensor], b0: int, b1: int) -> Optional[Tensor]:
    """Batch items [b0, b1) of t, or t itself where its batch dim broadcasts."""
    return t if t is None or t.shape[0] == 1 else t[b0:b1]


def _kmin(causal: str, window: int, i0: int, lq: int, lk: int) -> int:
    """Keys below kmin lie outside the window of every row >= i0."""
    if not window:
        return 0
    return max(0, min(lk, i0 + _causal_offset(causal, lq, lk) - window + 1))


def _kmax(causal: str, i1: int, lq: int, lk: int) -> int:
    """Keys [0, kmax) are the only ones rows < i1 can see."""
    if causal == "none":
        return lk
    return max(0, min(lk, i1 + _causal_offset(causal, lq, lk)))


def mask_block_scores(s5: Tensor, bias5: Optional[Tensor], key_mask: Optional[Tensor], *,
                      i0: int, i1: int, kmin: int, kmax: int, causal: str, window: int,
                      lq: int, lk: int) -> None:
    """Add the bias to, and mask in place, the scores (B, Hkv, G, rows, keys) of rows
    [i0, i1) over keys [kmin, kmax): bias (a :func:`_bias5` view, sliced here; bool:
    False -> -inf), key_mask, and the causal/window band (only on blocks it crosses)."""
    if bias5 is not None:
        bs = bias5
        if bs.shape[3] > 1:
            bs = bs[:, :, :, i0:i1]
        if bs.shape[4] > 1:
            bs = bs[..., kmin:kmax]
        if bs.dtype == torch.bool:
            s5.masked_fill_(bs.logical_not(), _NEG_INF)
        else:
            s5.add_(bs)
    if key_mask is not None:  # (B|1, Lk) key padding, broadcast over heads and rows
        s5.masked_fill_(key_mask[:, None, None, None, kmin:kmax].logical_not(), _NEG_INF)
    if causal != "none":
        off = _causal_offset(causal, lq, lk)
        i = torch.arange(i0, i1).view(-1, 1)
        j = torch.arange(kmin, kmax).view(1, -1)
        if kmax > i0 + off + 1:  # some (row, key) in the block is above the diagonal
            s5.masked_fill_(j > i + off, _NEG_INF)
        if window and i1 - 1 + off - window >= kmin:  # some key is left of a row's window
            s5.masked_fill_(j <= i + off - window, _NEG_INF)


def _block_probs(q5, kc, bias5, key_mask, *, i0, i1, kmin, kmax, scale, softcap, causal,
                 window, lq, lk, want_softcap_grad=False):
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
    mask_block_scores(s5, bias5, key_mask, i0=i0, i1=i1, kmin=kmin, kmax=kmax, causal=causal,
                      window=window, lq=lq, lk=lk)
    m, arg = s.max(-1, keepdim=True)
    p = torch.softmax(s, dim=-1)
    del s, s5
    # lse = m + log(sum exp(s - m)) = m - log(p[argmax]); p[argmax] >= 1/kw, so the
    # log is well conditioned, and rows of huge finite logits stay exact in p
    lse = m - torch.log(p.gather(-1, arg))
    dead = m == _NEG_INF  # rows masked entirely: softmax gives NaN there
    if bool(dead.any()):
        p.masked_fill_(dead, 0.0)
        lse.masked_fill_(dead, _NEG_INF)
    return p, lse.view(b, hkv, g, n), dcap


def _blocked_forward(q, k, v, bias, *, scale, causal, dropout_p, softcap, seed, window=0,
                     key_mask=None):
    b, hq, lq, _ = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    causal = _effective_causal(causal, lq, lk, window)
    out = torch.empty((b, hq, lq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
    out5, lse5 = out.unflatten(1, (hkv, g)), lse.unflatten(1, (hkv, g))
    q5 = q.unflatten(1, (hkv, g))
    kc = k.to(cdt).contiguous()
    vc = v.to(cdt).contiguous()
    bias5 = _bias5(_compact(bias) if bias is not None else None, hkv, g)
    drop_scale = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)
    for b0, b1, i0, i1, kmin, kmax in _blocks(b, hq, lq, lk, causal, window):
        n, nb = i1 - i0, b1 - b0
        if kmax == kmin:  # every row of the block is fully masked
            out5[b0:b1, :, :, i0:i1] = 0
            lse5[b0:b1, :, :, i0:i1] = _NEG_INF
            continue
        p, lse_b, _ = _block_probs(q5[b0:b1], kc[b0:b1], _bslice(bias5, b0, b1),
                                   _bslice(key_mask, b0, b1), i0=i0, i1=i1, kmin=kmin,
                                   kmax=kmax, scale=scale, softcap=softcap, causal=causal,
                                   window=window, lq=lq, lk=lk)
        if dropout_p > 0:
            keep = block_keep(seed, dropout_p, b0, b1, hq, lq, lk, i0, i1, kmin, kmax, hkv, g)
            p.view(nb, hkv, g, n, kmax - kmin).mul_(keep).mul_(drop_scale)
        o = torch.matmul(p, vc[b0:b1, :, kmin:kmax])  # (nb, Hkv, G*n, Dv)
        out5[b0:b1, :, :, i0:i1] = o.view(nb, hkv, g, n, dv)
        lse5[b0:b1, :, :, i0:i1] = lse_b
    return out, lse


def _blocked_backward(dout, q, k, v, bias, out, *, scale, causal, dropout_p, softcap, seed,
                      need_dbias, window=0, key_mask=None):
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    causal = _effective_causal(causal, lq, lk, window)
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
    bias_used = bias if (bias is None or grad_bias) else _compact(bias)
    bias5 = _bias5(bias_used, hkv, g)
    dq = torch.empty((b, hq, lq, d), dtype=q.dtype, device=q.device)
    dq5 = dq.unflatten(1, (hkv, g))
    dk = torch.zeros((b, hkv, lk, d), dtype=cdt, device=q.device)
    dvv = torch.zeros((b, hkv, lk, dv), dtype=cdt, device=q.device)
    dbias = torch.zeros(bias.shape, dtype=cdt, device=q.device) if grad_bias else None
    drop_scale = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)
    for b0, b1, i0, i1, kmin, kmax in _blocks(b, hq, lq, lk, causal, window):
        n, nb = i1 - i0, b1 - b0
        kw = kmax - kmin
        if kw == 0:
            dq5[b0:b1, :, :, i0:i1] = 0
            continue
        p, _, dcap = _block_probs(q5[b0:b1], kc[b0:b1], _bslice(bias5, b0, b1),
                                  _bslice(key_mask, b0, b1), i0=i0, i1=i1, kmin=kmin,
                                  kmax=kmax, scale=scale, softcap=softcap, causal=causal,
                                  window=window, lq=lq, lk=lk, want_softcap_grad=True)
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
            _accumulate_dbias(dbias, ds.view(nb, hq, n, kw), b0, b1, i0, i1, kmin, kmax)
        if dcap is not None:
            ds.mul_(dcap)
        qb = q5[b0:b1, :, :, i0:i1].to(cdt).reshape(nb, hkv, g * n, d)
        dqb = torch.matmul(ds, kb).mul_(scale)
        dq5[b0:b1, :, :, i0:i1] = dqb.view(nb, hkv, g, n, d)
        dk[b0:b1, :, kmin:kmax] += torch.matmul(ds.transpose(-1, -2), qb).mul_(scale)
    dbias_out = dbias.to(bias.dtype) if grad_bias else None
    return dq, dk.to(k.dtype), dvv.to(v.dtype), dbias_out


def _accumulate_dbias(dbias: Tensor, ds: Tensor, b0: int, b1: int, i0: int, i1: int,
                      kmin: int, kmax: int) -> None:
    """Add a block's logit gradient (nb, Hq, n, kmax - kmin) into dbias, reduced to its shape."""
    dims = [i for i in range(4) if dbias.shape[i] == 1 and ds.shape[i] != 1]
    red = ds.sum(dims, keepdim=True) if dims else ds
    tgt = _bslice(dbias, b0, b1)
    if dbias.shape[2] > 1:
        tgt = tgt[:, :, i0:i1]
    if dbias.shape[3] > 1:
        tgt = tgt[..., kmin:kmax]
    tgt += red


# --------------------------------------------------------------------------- entries
def _fold_key_mask(bias: Optional[Tensor], key_mask: Optional[Tensor],
                   window: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(bias, key_mask): a key_mask alone (no bias, no window) becomes a (B|1, 1, 1, Lk)
    bool bias view, which the fused SDPA path takes as a broadcast (B, 1, 1, Lk) mask."""
    if key_mask is not None and bias is None and not window:
        return key_mask[:, None, None, :], None
    return bias, key_mask


def forward_path(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, causal: str,
                 dropout_p: float, softcap: float, window: int = 0,
                 key_mask: Optional[Tensor] = None) -> str:
    """Which path :func:`forward` takes: "lowp", "fused", "banded" or "blocked"."""
    from . import torch_banded, torch_lowp  # both import this module: loaded on first use

    if torch_lowp.lowp_applicable(q, k, v, bias, causal=causal, window=window, softcap=softcap):
        return "lowp"
    bias, key_mask = _fold_key_mask(bias, key_mask, window)
    if key_mask is None and not window and uses_fused_sdpa(
            q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap):
        return "fused"
    if torch_banded.banded_applicable(q, k, v, bias, causal=causal, window=window,
                                      dropout_p=dropout_p, softcap=softcap):
        return "banded"
    return "blocked"


def backward_path(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], lse: Tensor, *,
                  causal: str, dropout_p: float, softcap: float, need_dbias: bool,
                  window: int = 0, key_mask: Optional[Tensor] = None) -> str:
    """Which path :func:`backward` takes (the forward's, except that the fused backward
    gives no bias gradient and needs a well-conditioned lse: then "blocked")."""
    path = forward_path(q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap,
                        window=window, key_mask=key_mask)
    if path != "fused":
        return path
    folded, _ = _fold_key_mask(bias, key_mask, window)
    if folded is not bias:  # the key_mask became a bool bias, which has no gradient
        bias, need_dbias = folded, False
    return "fused" if uses_fused_sdpa_backward(
        q, k, v, bias, lse, causal=causal, dropout_p=dropout_p, softcap=softcap,
        need_dbias=need_dbias) else "blocked"


def forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, scale: float,
            causal: str, dropout_p: float, softcap: float, seed: int, window: int = 0,
            key_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(out, lse): out (B, Hq, Lq, Dv) in q's dtype; lse (B, Hq, Lq) float32, the
    natural log-sum-exp of the final logits (-inf for rows masked entirely)."""
    b, hq, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    if min(b, hq, lq, lk) == 0:
        out = torch.zeros((b, hq, lq, dv), dtype=q.dtype, device=q.device)
        lse = torch.full((b, hq, lq), _NEG_INF, dtype=torch.float32, device=q.device)
        return out, lse
    from . import torch_banded, torch_lowp

    scale, window, dropout_p = float(scale), int(window), float(dropout_p)
    path = forward_path(q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap,
                        window=window, key_mask=key_mask)
    if path == "lowp":
        return torch_lowp.lowp_forward(q, k, v, bias, scale=scale, dropout_p=dropout_p,
                                       seed=int(seed), key_mask=key_mask)
    bias, key_mask = _fold_key_mask(bias, key_mask, window)
    if path == "fused":
        plan = fused_sdpa_plan(q, k, v, bias, causal=causal, dropout_p=dropout_p,
                               softcap=softcap)
        return _fused_forward(q, k, v, bias, plan, scale)
    if path == "banded":
        return torch_banded.banded_forward(q, k, v, scale=scale, causal=causal,
                                           window=window, key_mask=key_mask)
    return _blocked_forward(q, k, v, bias, scale=scale, causal=causal, dropout_p=dropout_p,
                            softcap=float(softcap), seed=int(seed), window=window,
                            key_mask=key_mask)


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
             out: Tensor, lse: Tensor, *, scale: float, causal: str, dropout_p: float,
             softcap: float, seed: int, need_dbias: bool, window: int = 0,
             key_mask: Optional[Tensor] = None):
    """(dq, dk, dv, dbias): shapes and dtypes of q, k, v; dbias has the 4-D shape and
    dtype of ``bias`` (summed over its size-1 dims), None unless ``need_dbias`` (and
    None for a bool bias, which has no gradient)."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    grad_bias = need_dbias and bias is not None and bias.dtype != torch.bool
    if min(b, hq, lq, lk) == 0:
        dbias = torch.zeros_like(bias, memory_format=torch.contiguous_format) if grad_bias else None
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias)
    from . import torch_banded, torch_lowp

    scale, window, dropout_p = float(scale), int(window), float(dropout_p)
    path = backward_path(q, k, v, bias, lse, causal=causal, dropout_p=dropout_p,
                         softcap=softcap, need_dbias=need_dbias, window=window,
                         key_mask=key_mask)
    if path == "lowp":
        return torch_lowp.lowp_backward(dout, q, k, v, bias, lse, scale=scale,
                                        dropout_p=dropout_p, seed=int(seed),
                                        need_dbias=need_dbias, key_mask=key_mask)
    folded, key_mask = _fold_key_mask(bias, key_mask, window)
    if folded is not bias:  # the key_mask became a bool bias, which has no gradient
        bias, need_dbias = folded, False
    if path == "fused":
        plan = fused_sdpa_plan(q, k, v, bias, causal=causal, dropout_p=dropout_p,
                               softcap=softcap)
        dq, dk, dv = _fused_backward(dout, q, k, v, bias, out, lse, plan, scale)
        return dq, dk, dv, None
    if path == "banded":
        dq, dk, dv = torch_banded.banded_backward(
            dout, q, k, v, out, lse, scale=scale, causal=causal, window=window,
            key_mask=key_mask)
        return dq, dk, dv, None
    return _blocked_backward(dout, q, k, v, bias, out, scale=scale, causal=causal,
                             dropout_p=dropout_p, softcap=float(softcap), seed=int(seed),
                             need_dbias=need_dbias, window=window, key_mask=key_mask)
