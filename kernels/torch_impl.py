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

Five paths, chosen by :func:`forward_path` / :func:`backward_path` (the first here, the
others in :mod:`~attnfuse.kernels.torch_blocked`, :mod:`~attnfuse.kernels.torch_banded`,
:mod:`~attnfuse.kernels.torch_runs` and :mod:`~attnfuse.kernels.torch_lowp`;
``BLOCK_Q`` / ``BLOCK_ELEMS`` here size the row blocks of the blocked, banded and lowp
paths):

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

2. **Blocked**: a loop over blocks of query rows that never holds more than one block's
   scores (:mod:`attnfuse.kernels.torch_blocked`); it runs everything the others do
   not (softcap, dropout, bottom-right causal with a bias, float64, ...).

3. **Banded** (structural masks): a ``window`` or an effective bottom-right diagonal
   (no bias, softcap or dropout; a key_mask is sliced per block) runs the fused kernel
   per block of query rows over the keys [kmin, kmax) of the block's causal/window
   band. Otherwise the blocked path runs, masking keys per block and visiting only the
   keys inside the band (O(Lq * (rows + window)) work for a window, not O(Lq * Lk)).

4. **Runs** (padding): a ``key_mask`` alone (no causal mask or a top-left one) whose
   visible keys are one contiguous run per batch row, on batch rows of at least
   ``RUNS_MIN_SCORES`` scores and enough parallel tasks per row for the torch threads,
   runs the fused kernel per batch row on that run's keys only, with no mask; smaller
   calls, or masks with holes, fold the key_mask into a (B, 1, 1, Lk) broadcast mask of
   the fused path.

5. **Lowp**: non-causal bf16 attention over at most ``LOWP_MAX_KEYS`` keys runs the
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

from .torch_dropout import dropout_keep_mask

__all__ = [
    "forward",
    "backward",
    "forward_path",
    "backward_path",
    "uses_fused_sdpa",
    "uses_fused_sdpa_backward",
    "fused_sdpa_plan",
    "key_bounds",
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


def key_bounds(key_mask: Tensor) -> Tensor:
    """(B|1, 2) int32 from a bool (B|1, Lk) key_mask: per batch item ``[lo, hi)`` =
    [first visible key, last visible key + 1]. An item that sees no key gets
    ``(Lk, 0)``: an empty range. Computed on the mask's device without a host sync
    (the Triton launcher clips its key loops to these bounds; the CPU key-run path
    compares their width with the visible count to find contiguous runs)."""
    rows, n = key_mask.shape
    if n == 0:
        return torch.zeros((rows, 2), device=key_mask.device, dtype=torch.int32)
    j = torch.arange(n, device=key_mask.device, dtype=torch.int32)
    lo = torch.where(key_mask, j, n).amin(1)          # first visible key; n if none
    hi = torch.where(key_mask, j + 1, 0).amax(1)      # last visible key + 1; 0 if none
    return torch.stack((lo, hi), 1).to(torch.int32)


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
    return _lse_well_conditioned(lse)


def _lse_well_conditioned(lse: Tensor) -> bool:
    """Whether the fused backward can recompute P from this fp32 lse (see
    :data:`FUSED_BWD_MAX_ABS_LSE`)."""
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
    """Which path :func:`forward` takes: "lowp", "runs", "fused", "banded" or "blocked"."""
    # they import this module: loaded on first use
    from . import torch_banded, torch_lowp, torch_runs

    if torch_lowp.lowp_applicable(q, k, v, bias, causal=causal, window=window, softcap=softcap):
        return "lowp"
    if torch_runs.runs_applicable(q, k, v, bias, causal=causal, window=window,
                                  dropout_p=dropout_p, softcap=softcap, key_mask=key_mask):
        return "runs"
    if torch_banded.banded_applicable(q, k, v, bias, causal=causal, window=window,
                                      dropout_p=dropout_p, softcap=softcap):
        return "banded"  # it takes the key_mask as it is
    bias, key_mask = _fold_key_mask(bias, key_mask, window)
    if key_mask is None and not window and uses_fused_sdpa(
            q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap):
        return "fused"
    return "blocked"


def backward_path(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], lse: Tensor, *,
                  causal: str, dropout_p: float, softcap: float, need_dbias: bool,
                  window: int = 0, key_mask: Optional[Tensor] = None) -> str:
    """Which path :func:`backward` takes (the forward's, except that the fused backward
    gives no bias gradient and needs a well-conditioned lse: then "blocked")."""
    from . import torch_runs

    path = forward_path(q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap,
                        window=window, key_mask=key_mask)
    if path == "runs":
        if not _lse_well_conditioned(lse):
            return "blocked"
        if torch_runs.runs_applicable(q, k, v, bias, causal=causal, window=window,
                                      dropout_p=dropout_p, softcap=softcap, key_mask=key_mask,
                                      backward=True):
            return "runs"
        path = "fused"  # too few tasks per row for the threads: one call, folded mask
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
    from . import torch_banded, torch_blocked, torch_lowp, torch_runs

    scale, window, dropout_p = float(scale), int(window), float(dropout_p)
    path = forward_path(q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap,
                        window=window, key_mask=key_mask)
    if path == "lowp":
        return torch_lowp.lowp_forward(q, k, v, bias, scale=scale, dropout_p=dropout_p,
                                       seed=int(seed), key_mask=key_mask)
    if path == "runs":
        return torch_runs.runs_forward(q, k, v, scale=scale, causal=causal, key_mask=key_mask)
    if path == "banded":
        return torch_banded.banded_forward(q, k, v, scale=scale, causal=causal,
                                           window=window, key_mask=key_mask)
    bias, key_mask = _fold_key_mask(bias, key_mask, window)
    if path == "fused":
        plan = fused_sdpa_plan(q, k, v, bias, causal=causal, dropout_p=dropout_p,
                               softcap=softcap)
        return _fused_forward(q, k, v, bias, plan, scale)
    return torch_blocked.blocked_forward(q, k, v, bias, scale=scale, causal=causal,
                                         dropout_p=dropout_p, softcap=float(softcap),
                                         seed=int(seed), window=window, key_mask=key_mask)


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
    from . import torch_banded, torch_blocked, torch_lowp, torch_runs

    scale, window, dropout_p = float(scale), int(window), float(dropout_p)
    path = backward_path(q, k, v, bias, lse, causal=causal, dropout_p=dropout_p,
                         softcap=softcap, need_dbias=need_dbias, window=window,
                         key_mask=key_mask)
    if path == "lowp":
        return torch_lowp.lowp_backward(dout, q, k, v, bias, lse, scale=scale,
                                        dropout_p=dropout_p, seed=int(seed),
                                        need_dbias=need_dbias, key_mask=key_mask)
    if path == "runs":
        dq, dk, dv = torch_runs.runs_backward(dout, q, k, v, out, lse, scale=scale,
                                              causal=causal, key_mask=key_mask)
        return dq, dk, dv, None
    if path == "banded":
        dq, dk, dv = torch_banded.banded_backward(
            dout, q, k, v, out, lse, scale=scale, causal=causal, window=window,
            key_mask=key_mask)
        return dq, dk, dv, None
    folded, key_mask = _fold_key_mask(bias, key_mask, window)
    if folded is not bias:  # the key_mask became a bool bias, which has no gradient
        bias, need_dbias = folded, False
    if path == "fused":
        plan = fused_sdpa_plan(q, k, v, bias, causal=causal, dropout_p=dropout_p,
                               softcap=softcap)
        dq, dk, dv = _fused_backward(dout, q, k, v, bias, out, lse, plan, scale)
        return dq, dk, dv, None
    return torch_blocked.blocked_backward(dout, q, k, v, bias, out, scale=scale,
                                          causal=causal, dropout_p=dropout_p,
                                          softcap=float(softcap), seed=int(seed),
                                          need_dbias=need_dbias, window=window,
                                          key_mask=key_mask)
