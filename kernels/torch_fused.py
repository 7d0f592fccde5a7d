"""Fused path of the CPU implementation: one call of PyTorch's fused CPU flash attention
(:mod:`.torch_base` owns the kernel's facts and the call itself).

Used where that kernel computes exactly the op's semantics: fp32/fp16/bf16 on CPU, no
softcap or dropout, D == Dv, no window, no effective bottom-right diagonal, a bias (if
any) of the query's dtype or bool. A key_mask alone (no bias, no window) is folded into
a broadcast (B|1, 1, 1, Lk) bool bias first (:func:`fold_key_mask`); GQA merges each
kv head's query group into the row axis (a view) or, causal, repeats K/V.

The backward is the kernel's own, except where it would be wrong or incomplete
(:func:`backward_applicable`): it gives no bias gradient, and it needs an lse that is
not huge (:func:`.torch_base.lse_well_conditioned`); then the blocked path runs.

Imports only :mod:`.base` and :mod:`.torch_base`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import torch_base as TS
from .base import NEG_INF, compact

__all__ = ["fold_key_mask", "applicable", "backward_applicable", "fused_forward",
           "fused_backward"]


def fold_key_mask(bias: Optional[Tensor], key_mask: Optional[Tensor], window: int, *,
                  bias_needs_grad: bool = False) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(bias, key_mask): a key_mask alone (no bias, no window) becomes a (B|1, 1, 1, Lk)
    bool bias view, which the fused kernel takes as a broadcast (B, 1, 1, Lk) mask.

    Beside a bias that is constant along the queries ((B|1, H|1, 1, Lk) once its expanded
    dims are compacted: a key-only term such as Falcon's or padded BLOOM's ALiBi), the
    key_mask is folded into that bias: ``-inf`` at the hidden keys (a bool bias: False), an
    O(B·H·Lk) copy, so the fused kernel takes the call instead of the blocked loop. Not into
    a float bias that needs its own gradient (``bias_needs_grad``): the folded tensor is a
    new one (the key_mask is then returned, unfolded)."""
    if key_mask is None or window:
        return bias, key_mask
    if bias is None:
        return key_mask[:, None, None, :], None
    cb = compact(bias)
    if cb.size(2) == 1 and not (bias_needs_grad and cb.dtype != torch.bool):
        keep = key_mask[:, None, None, :]
        return (cb & keep if cb.dtype == torch.bool else cb.masked_fill(~keep, NEG_INF)), None
    return bias, key_mask


def applicable(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, causal: str,
               dropout_p: float, softcap: float) -> bool:
    """Whether one fused-kernel call computes exactly the op's forward here (``bias``
    already folded by :func:`fold_key_mask`; no key_mask or window left)."""
    return TS.fused_sdpa_plan(q, k, v, bias, causal=causal, dropout_p=dropout_p,
                              softcap=softcap) is not None


def backward_applicable(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], lse: Tensor, *,
                        causal: str, dropout_p: float, softcap: float, need_dbias: bool) -> bool:
    """Whether the fused kernel's backward computes exactly the op's gradients here."""
    if need_dbias and bias is not None and bias.dtype != torch.bool:
        return False  # the fused backward gives no gradient for the mask
    if not applicable(q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap):
        return False
    return TS.lse_well_conditioned(lse)


def fused_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, scale: float,
                  causal: str) -> tuple[Tensor, Tensor]:
    """(out, lse) of the fused path (``bias`` already folded)."""
    plan = TS.fused_sdpa_plan(q, k, v, bias, causal=causal, dropout_p=0.0, softcap=0.0)
    return TS.sdpa_forward(q, k, v, bias, plan, scale)


def fused_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                   out: Tensor, lse: Tensor, *, scale: float,
                   causal: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the fused path (``bias`` already folded; it gets no gradient)."""
    plan = TS.fused_sdpa_plan(q, k, v, bias, causal=causal, dropout_p=0.0, softcap=0.0)
    return TS.sdpa_backward(dout, q, k, v, bias, out, lse, plan, scale)
