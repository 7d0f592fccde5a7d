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

This module is the dispatcher: :func:`forward_plan` / :func:`backward_plan` return the
chosen path as a value (:class:`CpuPlan`: which path and why), and :func:`forward` /
:func:`backward` call it. Each path is a module of its own that owns its applicability
test and its forward/backward (:mod:`~attnfuse.kernels.torch_fused`,
:mod:`~attnfuse.kernels.torch_blocked`, :mod:`~attnfuse.kernels.torch_banded`,
:mod:`~attnfuse.kernels.torch_runs`, :mod:`~attnfuse.kernels.torch_lowp`) and imports
only the shared base (:mod:`~attnfuse.kernels.base`: semantics helpers and the block
sizes ``BLOCK_Q`` / ``BLOCK_ELEMS``; :mod:`~attnfuse.kernels.torch_base`: the fused
kernel's facts and call, the row blocks; :mod:`~attnfuse.kernels.torch_dropout`).
:data:`PATHS` lists the paths in the order they are asked, with when each is chosen and
what it skips (the README's table is checked against it). The paths:

1. **Fused**: PyTorch's fused CPU flash attention
   (``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``),
   used only where it computes exactly these semantics (see
   :func:`~attnfuse.kernels.torch_base.fused_sdpa_plan`; the kernel's facts, checked
   for torch 2.13 and 2.14.1, are listed in :mod:`~attnfuse.kernels.torch_base`). The
   backward falls back to the blocked path for a bias gradient or a huge lse.

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
   ``torch_runs.RUNS_MIN_SCORES`` scores and enough parallel tasks per row for the torch threads,
   runs the fused kernel per batch row on that run's keys only, with no mask; smaller
   calls, or masks with holes, fold the key_mask into a (B, 1, 1, Lk) broadcast mask of
   the fused path.

5. **Lowp**: non-causal bf16 attention over at most ``torch_lowp.LOWP_MAX_KEYS`` keys runs the
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

from . import torch_banded as TBD
from . import torch_blocked as TBK
from . import torch_fused as TF
from . import torch_lowp as TL
from . import torch_runs as TR
from .base import NEG_INF, add_sinks, key_bounds, with_causal_offsets
from .torch_base import fused_sdpa_plan, lse_well_conditioned
from .torch_dropout import dropout_keep_mask

__all__ = [
    "forward",
    "backward",
    "CpuPlan",
    "PathRule",
    "PATHS",
    "forward_plan",
    "backward_plan",
    "forward_path",
    "backward_path",
    "uses_fused_sdpa",
    "uses_fused_sdpa_backward",
    "fused_sdpa_plan",
    "key_bounds",
    "dropout_keep_mask",
]


class PathRule(NamedTuple):
    """One CPU path as the README's table shows it: its name, when the dispatcher
    chooses it, and the work it skips."""

    path: str
    when: str
    skips: str


#: The CPU paths in the order :func:`forward_plan` asks them (the first that applies
#: runs). README.md's table of ``impl="torch"`` paths is checked against this
#: (tests/test_kernels_layout.py).
PATHS: tuple[PathRule, ...] = (
    PathRule("lowp", "bf16, no causal band, window or softcap, at most "
             "`torch_lowp.LOWP_MAX_KEYS` (1,536) keys, a bias (if any) in bf16 or bool, on a CPU with native bf16 matrix products (`base.NATIVE_BF16_GEMM`)",
             "PyTorch's fused kernel, slower there than the unfused graph's bf16 GEMMs, "
             "which run per block of query rows"),
    PathRule("runs", "a key_mask alone (no bias, window, softcap, dropout; no causal mask or "
             "a top-left one) whose visible keys are one run per batch row, on rows of at "
             "least `torch_runs.RUNS_MIN_SCORES` scores (4 heads x 256² in fp32, 4 x 512² in "
             "bf16/fp16) whose call gives every torch thread a task",
             "every padded key (one fused call per batch row on its run, no mask)"),
    PathRule("banded", "a window or a bottom-right diagonal (Lq != Lk) in fp32/fp16/bf16 "
             "with D == Dv, no bias, softcap or dropout (a key_mask sliced per block)", "every key outside a row block's causal/window band"),
    PathRule("fused", "fp32/fp16/bf16 with D == Dv, no softcap, dropout, window or "
             "bottom-right diagonal, a bias of q's dtype or bool (a key_mask alone folded "
             "into one, or into a bias constant along the queries; causal GQA repeats K/V)", "nothing: one call of PyTorch's fused CPU kernel"),
    PathRule("blocked", "everything else (softcap, dropout, float64, bottom-right with a "
             "bias, ALiBi slopes, ...); also the backward where the fused one has no bias gradient or "
             "the lse is too large", "keys outside the causal/window band"),
)
_RULES = {rule.path: rule for rule in PATHS}


_ALIBI_WHY = ("ALiBi slopes: the blocked path builds the ALiBi term per row block "
              "(PyTorch's fused kernel would need it as a materialised (Lq, Lk) bias)")


class CpuPlan(NamedTuple):
    """The CPU path chosen for one call: ``path`` (a :data:`PATHS` name) and ``why``."""

    path: str
    why: str


def _chosen(path: str, why: Optional[str] = None) -> CpuPlan:
    return CpuPlan(path, why or _RULES[path].when)


def uses_fused_sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *,
                    causal: str, dropout_p: float, softcap: float) -> bool:
    """Whether one fused-kernel call computes exactly the op's forward for these inputs
    (no key_mask or window: see :func:`forward_plan` for the whole choice)."""
    return TF.applicable(q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap)


def uses_fused_sdpa_backward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                             lse: Tensor, *, causal: str, dropout_p: float, softcap: float,
                             need_dbias: bool) -> bool:
    """Whether the fused kernel's backward computes exactly the op's gradients here."""
    return TF.backward_applicable(q, k, v, bias, lse, causal=causal, dropout_p=dropout_p,
                                  softcap=softcap, need_dbias=need_dbias)


def forward_plan(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, causal: str,
                 dropout_p: float, softcap: float, window: int = 0,
                 key_mask: Optional[Tensor] = None,
                 alibi_slopes: Optional[Tensor] = None) -> CpuPlan:
    """The path :func:`forward` takes for these inputs: the first of :data:`PATHS`
    whose applicability test passes. ALiBi slopes: where :func:`alibi_key_bias` applies,
    the path of its (B|1, Hq, 1, Lk) key bias; else the blocked path, which builds the
    ALiBi term per row block (the fused kernel would need it materialised)."""
    if alibi_slopes is not None:
        kb = alibi_key_bias(q, k, bias, alibi_slopes, causal=causal)
        if kb is None:
            return _chosen("blocked", _ALIBI_WHY)
        bias = kb[0]
    if TL.lowp_applicable(q, k, v, bias, causal=causal, window=window, softcap=softcap):
        return _chosen("lowp")
    if TR.runs_applicable(q, k, v, bias, causal=causal, window=window,
                          dropout_p=dropout_p, softcap=softcap, key_mask=key_mask):
        return _chosen("runs")
    if TBD.banded_applicable(q, k, v, bias, causal=causal, window=window,
                             dropout_p=dropout_p, softcap=softcap):
        return _chosen("banded")  # it takes the key_mask as it is
    bias, key_mask = TF.fold_key_mask(bias, key_mask, window)
    if key_mask is None and not window and TF.applicable(
            q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap):
        return _chosen("fused")
    return _chosen("blocked")


def backward_plan(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], lse: Tensor, *,
                  causal: str, dropout_p: float, softcap: float, need_dbias: bool,
                  window: int = 0, key_mask: Optional[Tensor] = None,
                  sinks: Optional[Tensor] = None,
                  alibi_slopes: Optional[Tensor] = None) -> CpuPlan:
    """The path :func:`backward` takes: the forward's, except that the fused kernel's
    backward gives no bias gradient and needs a well-conditioned lse (then "blocked"),
    that the key-run backward has fewer parallel tasks than its forward (then one
    fused call with the folded mask), and that with ``sinks`` the lowp backward (which
    rebuilds P from the scores, without the sink) becomes the blocked one (which takes
    the sinks)."""
    if alibi_slopes is not None:
        # with sinks: the blocked path, whose per-block lse (without the ALiBi row shift)
        # is the one the sink's share of each row needs
        kb = alibi_key_bias(q, k, bias, alibi_slopes, causal=causal) if sinks is None else None
        if kb is None:
            return _chosen("blocked", _ALIBI_WHY)
        bias, need_dbias = kb[0], False
    plan = forward_plan(q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap,
                        window=window, key_mask=key_mask)
    path = plan.path
    if path == "lowp" and sinks is not None:
        return _chosen("blocked", "sinks: the lowp backward rebuilds P without them; the "
                       "blocked one rescales P by each row's sink share")
    if path == "runs":
        if not lse_well_conditioned(lse):
            return _chosen("blocked", "the lse is too large for the fused kernel's backward")
        if TR.runs_applicable(q, k, v, bias, causal=causal, window=window,
                              dropout_p=dropout_p, softcap=softcap, key_mask=key_mask,
                              backward=True):
            return plan
        path = "fused"  # too few tasks per row for the threads: one call, folded mask
    if path != "fused":
        return plan
    folded, unfolded = TF.fold_key_mask(bias, key_mask, window, bias_needs_grad=need_dbias)
    if unfolded is not None:  # the forward folded it into the bias, which needs its gradient here
        return _chosen("blocked", "a key_mask beside a bias that needs its gradient")
    if folded is not bias:  # the key_mask became (or joined) a bias that needs no gradient
        bias, need_dbias = folded, False
    if not TF.backward_applicable(q, k, v, bias, lse, causal=causal, dropout_p=dropout_p,
                                  softcap=softcap, need_dbias=need_dbias):
        return _chosen("blocked", "the fused kernel's backward gives no bias gradient, or "
                       "the lse is too large for it")
    if plan.path == "runs":
        return _chosen("fused", "a key-run forward, but too few parallel tasks per batch "
                       "row for the backward: one call with the folded mask")
    return plan


def forward_path(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, causal: str,
                 dropout_p: float, softcap: float, window: int = 0,
                 key_mask: Optional[Tensor] = None) -> str:
    """``forward_plan(...).path``."""
    return forward_plan(q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap,
                        window=window, key_mask=key_mask).path


def backward_path(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], lse: Tensor, *,
                  causal: str, dropout_p: float, softcap: float, need_dbias: bool,
                  window: int = 0, key_mask: Optional[Tensor] = None,
                  sinks: Optional[Tensor] = None) -> str:
    """``backward_plan(...).path``."""
    return backward_plan(q, k, v, bias, lse, causal=causal, dropout_p=dropout_p,
                         softcap=softcap, need_dbias=need_dbias, window=window,
                         key_mask=key_mask, sinks=sinks).path


def forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, scale: float,
            causal: str, dropout_p: float, softcap: float, seed: int, window: int = 0,
            key_mask: Optional[Tensor] = None,
            sinks: Optional[Tensor] = None,
            alibi_slopes: Optional[Tensor] = None,
            causal_offsets: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(out, lse): out (B, Hq, Lq, Dv) in q's dtype; lse (B, Hq, Lq) float32, the
    natural log-sum-exp of the final logits (-inf for rows masked entirely).

    ``causal_offsets`` (int (B,)): each item's diagonal is folded into the bias
    (:func:`~attnfuse.kernels.base.with_causal_offsets`), which the paths below take.

    ``sinks`` (Hq,) float: one more logit per query head in every row's denominator,
    with no value row.  Every path runs without it and the result is corrected exactly
    from that path's own lse (:func:`~attnfuse.kernels.base.add_sinks`): the lse gains
    the sink (logaddexp), out shrinks by exp(lse_without - lse_with); a row that sees
    no key gives out 0 and lse = sink."""
    if causal_offsets is not None:
        bias = with_causal_offsets(bias, causal_offsets, q.shape[2], k.shape[2])
    if sinks is not None:
        out, lse = forward(q, k, v, bias, scale=scale, causal=causal, dropout_p=dropout_p,
                           softcap=softcap, seed=seed, window=window, key_mask=key_mask,
                           alibi_slopes=alibi_slopes)
        return add_sinks(out, lse, sinks)
    b, hq, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    if min(b, hq, lq, lk) == 0:
        out = torch.zeros((b, hq, lq, dv), dtype=q.dtype, device=q.device)
        lse = torch.full((b, hq, lq), NEG_INF, dtype=torch.float32, device=q.device)
        return out, lse
    scale, window, dropout_p = float(scale), int(window), float(dropout_p)
    if alibi_slopes is not None:
        kb = alibi_key_bias(q, k, bias, alibi_slopes, causal=causal)
        if kb is not None:  # ALiBi as a broadcast key bias, the lse shifted back per row
            out, lse = forward(q, k, v, kb[0], scale=scale, causal=causal, dropout_p=dropout_p,
                               softcap=softcap, seed=seed, window=window, key_mask=key_mask)
            return out, lse - kb[1]
        return TBK.blocked_forward(q, k, v, bias, scale=scale, causal=causal,
                                   dropout_p=dropout_p, softcap=float(softcap), seed=int(seed),
                                   window=window, key_mask=key_mask,
                                   alibi=_slopes_2d(alibi_slopes))
    path = forward_plan(q, k, v, bias, causal=causal, dropout_p=dropout_p, softcap=softcap,
                        window=window, key_mask=key_mask).path
    if path == "lowp":
        return TL.lowp_forward(q, k, v, bias, scale=scale, dropout_p=dropout_p,
                               seed=int(seed), key_mask=key_mask)
    if path == "runs":
        return TR.runs_forward(q, k, v, scale=scale, causal=causal, key_mask=key_mask)
    if path == "banded":
        return TBD.banded_forward(q, k, v, scale=scale, causal=causal, window=window,
                                  key_mask=key_mask)
    bias, key_mask = TF.fold_key_mask(bias, key_mask, window)
    if path == "fused":
        return TF.fused_forward(q, k, v, bias, scale=scale, causal=causal)
    return TBK.blocked_forward(q, k, v, bias, scale=scale, causal=causal,
                               dropout_p=dropout_p, softcap=float(softcap),
                               seed=int(seed), window=window, key_mask=key_mask)


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
             out: Tensor, lse: Tensor, *, scale: float, causal: str, dropout_p: float,
             softcap: float, seed: int, need_dbias: bool, window: int = 0,
             key_mask: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
             alibi_slopes: Optional[Tensor] = None, causal_offsets: Optional[Tensor] = None):
    """(dq, dk, dv, dbias): shapes and dtypes of q, k, v; dbias has the 4-D shape and
    dtype of ``bias`` (summed over its size-1 dims), None unless ``need_dbias`` (and
    None for a bool bias, which has no gradient).

    ``causal_offsets``: folded into the bias as in :func:`forward`; the gradient of a
    float bias is that of the folded one summed back to the bias's shape.

    With ``sinks``, ``out`` and ``lse`` are the forward's (the sink included): the
    paths that rebuild P from the lse and take delta = rowsum(dO·O) from ``out``
    (fused, runs, banded) are then exact as they are; the blocked path rescales its
    recomputed P by each row's share outside the sink; the lowp one is not used
    (:func:`backward_plan`).  The sinks' own gradient is the op layer's
    (:func:`~attnfuse.kernels.base.sinks_grad`)."""
    if causal_offsets is not None:
        folded = with_causal_offsets(bias, causal_offsets, q.shape[2], k.shape[2])
        grads = backward(dout, q, k, v, folded, out, lse, scale=scale, causal=causal,
                         dropout_p=dropout_p, softcap=softcap, seed=seed, need_dbias=need_dbias,
                         window=window, key_mask=key_mask, sinks=sinks, alibi_slopes=alibi_slopes)
        dbias = grads[3]
        if dbias is not None:  # summed over the dims the band broadcast the bias along
            dims = [d for d in range(4) if bias.size(d) == 1 and dbias.size(d) != 1]
            dbias = dbias.sum(dims, keepdim=True) if dims else dbias
        return grads[:3] + (dbias,)
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    grad_bias = need_dbias and bias is not None and bias.dtype != torch.bool
    if min(b, hq, lq, lk) == 0:
        dbias = torch.zeros_like(bias, memory_format=torch.contiguous_format) if grad_bias else None
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias)
    scale, window, dropout_p = float(scale), int(window), float(dropout_p)
    if alibi_slopes is not None:
        kb = alibi_key_bias(q, k, bias, alibi_slopes, causal=causal) if sinks is None else None
        if kb is not None:
            dq, dk, dv, _ = backward(dout, q, k, v, kb[0], out, lse + kb[1], scale=scale,
                                     causal=causal, dropout_p=dropout_p, softcap=softcap,
                                     seed=seed, need_dbias=False, window=window,
                                     key_mask=key_mask)
            return dq, dk, dv, None
        return TBK.blocked_backward(dout, q, k, v, bias, out, scale=scale, causal=causal,
                                    dropout_p=dropout_p, softcap=float(softcap),
                                    seed=int(seed), need_dbias=need_dbias, window=window,
                                    key_mask=key_mask, sinks=sinks,
                                    alibi=_slopes_2d(alibi_slopes))
    path = backward_plan(q, k, v, bias, lse, causal=causal, dropout_p=dropout_p,
                         softcap=softcap, need_dbias=need_dbias, window=window,
                         key_mask=key_mask, sinks=sinks).path
    if path == "lowp":
        return TL.lowp_backward(dout, q, k, v, bias, lse, scale=scale, dropout_p=dropout_p,
                                seed=int(seed), need_dbias=need_dbias, key_mask=key_mask)
    if path == "runs":
        dq, dk, dv = TR.runs_backward(dout, q, k, v, out, lse, scale=scale, causal=causal,
                                      key_mask=key_mask)
        return dq, dk, dv, None
    if path == "banded":
        dq, dk, dv = TBD.banded_backward(dout, q, k, v, out, lse, scale=scale, causal=causal,
                                         window=window, key_mask=key_mask)
        return dq, dk, dv, None
    folded, key_mask = TF.fold_key_mask(bias, key_mask, window, bias_needs_grad=need_dbias)
    if folded is not bias:  # the key_mask became (or joined) a bias that needs no gradient
        bias, need_dbias = folded, False
    if path == "fused":
        dq, dk, dv = TF.fused_backward(dout, q, k, v, bias, out, lse, scale=scale,
                                       causal=causal)
        return dq, dk, dv, None
    return TBK.blocked_backward(dout, q, k, v, bias, out, scale=scale, causal=causal,
                                dropout_p=dropout_p, softcap=float(softcap), seed=int(seed),
                                need_dbias=need_dbias, window=window, key_mask=key_mask,
                                sinks=sinks)


def _slopes_2d(slopes: Tensor) -> Tensor:
    """ALiBi slopes as (1|B, Hq), the layout the row blocks slice per batch."""
    return slopes[None] if slopes.dim() == 1 else slopes


def alibi_key_bias(q: Tensor, k: Tensor, bias: Optional[Tensor], alibi_slopes: Tensor, *,
                   causal: str) -> Optional[tuple[Tensor, Tensor]]:
    """``(key bias (B|1, Hq, 1, Lk), row shift (B|1, Hq, Lq))``, both float32, where the
    op's ALiBi ``-slope * |i + Lk - Lq - j|`` equals ``slope * j - slope * (i + Lk - Lq)``
    on every visible key: a causal mask that hides every key ``j > i + Lk - Lq``
    (``"bottom_right"``, or ``"top_left"`` with ``Lk >= Lq``). The key bias is a broadcast
    view of O(Hq * Lk) values that PyTorch's fused kernel (and every other path) takes;
    the lse of those logits minus the row shift is the op's lse. Only for float32 q (a
    half-precision bias would round ``slope * j``) and no other bias; else None (the
    blocked path builds the term per row block)."""
    lq, lk = q.shape[2], k.shape[2]
    if q.dtype != torch.float32 or bias is not None:
        return None
    if not (causal == "bottom_right" or (causal == "top_left" and lk >= lq)):
        return None
    s = _slopes_2d(alibi_slopes).to(torch.float32)
    j = torch.arange(lk, device=q.device, dtype=torch.float32)
    i = torch.arange(lk - lq, lk, device=q.device, dtype=torch.float32)
    return s[:, :, None, None] * j, s[:, :, None] * i
