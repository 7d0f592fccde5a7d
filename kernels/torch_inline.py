"""The attention op written as plain aten ops, for Inductor to compile on CPU.

On CPU, PyTorch's fused flash kernel (the runtime path of
:mod:`attnfuse.kernels.torch_impl`) is slower than Inductor's own C++ kernels for the
unfused graph at short lengths, above all in training (``benchmarks/inline_crossover.py``,
recorded in benchmarks/README.md). So the ``attnfuse`` backend, when its inner compiler
is Inductor, replaces each fused-op call on CPU whose score count ``B * Hq * Lq * Lk``
is at most :func:`max_scores` (one bound with a backward to follow, one without) by
:func:`inline_attention`: the op's semantics as aten ops, which Inductor traces,
differentiates and fuses into its own kernels::

    s   = q @ k^T                             one GEMM in the input dtype
    t   = mask(softcap(scale * s) + bias)     float32  } one Inductor kernel
    p   = softmax(t).to(dtype)                         }
    out = p @ v                               one GEMM
    lse = logsumexp(t)                        only computed where the graph reads it

The backward is autograd's: the GEMMs' own and the softmax's from the saved p
(:class:`_Probs`), four GEMMs and one fused kernel as Inductor runs for the unfused
graph, nothing recomputed. So an inlined call keeps one (Lq, Lk) tensor for its
backward, p in the input dtype: what Inductor keeps for the unfused graph, less its
mask, and never more than :func:`max_scores` elements; past the bound the runtime op
keeps nothing quadratic. Causal, window and key_mask are index comparisons inside the
softmax kernel (no (Lq, Lk) mask is read).

Rows that see no key give out = 0, lse = -inf and zero gradients (the op's contract).
Attention sinks are written as gpt-oss writes them: the per-head sink column is
concatenated to ``t`` before the softmax and sliced off after it (autograd gives the
sinks their gradient; a row that sees no key attends only to its sink: out = 0).
Not inlined (the runtime op runs): dropout (its keep-mask comes from a seed read at
run time), fp16 and float64, and anything over :func:`max_scores`. Under dynamic shapes
the bound becomes a guard (see :func:`inline_applicable`).

A call that the CPU dispatcher sends to PyTorch's fused kernel as one plain call
(its "fused" path with no bias, key_mask or GQA: BERT's and ViT's attention) is replaced
by :func:`fused_attention` instead: past the bound, and by default at every size when it
has no causal band either, as is such a call on the dispatcher's bf16 GEMM path
(Inductor alone fuses such attention into that call, so inlining it would add C++
kernels to a cold compile: 2-3 for a 2-layer BERT, for no run-time gain in float32 and
against the compile-cost target in bf16; the backend option ``cpu_inline``,
benchmarks/results/compile_overhead_policy.txt).
That is one ``aten._scaled_dot_product_flash_attention_for_cpu`` call itself, which is
what Inductor emits for the attention it fuses on its own. So the
compiled graph calls the kernel without the custom op's Python dispatch, and with the
kernel's own output layout ((B, Lq, Hq, Dv) in memory, which makes the usual
``transpose(1, 2).reshape(B, Lq, Hq * Dv)`` after attention a view) instead of a copy to
the op's contiguous layout; AOTAutograd differentiates it with the kernel's own backward,
which the op's fused path calls too (benchmarks/results/e2e_parity.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import base

__all__ = ["INLINE_MAX_SCORES", "USE_INLINE", "USE_FUSED_LOWERING", "max_scores",
           "inline_applicable", "inline_forward", "inline_attention", "fused_attention"]

#: Largest ``B * Hq * Lq * Lk`` inlined, per kind of call and dtype: "eval" (no backward
#: follows), "train" (the inputs require grad under grad mode) with every key visible to
#: every row, "train_banded" (training with a causal or window band). Chosen from
#: ``benchmarks/inline_crossover.py`` (attention alone, 4 heads; see benchmarks/README.md):
#: in training the inlined call beat both the op's runtime kernels and Inductor up to
#: 1,024 tokens with a causal band in bf16 and lost from 1,280 on, where the runtime's
#: fused kernel skips the masked half; without a band it still won at 2,048 in bf16 (the
#: bound stops at 1,536 to cap the probabilities kept for the backward at 18 MiB per
#: call); fp32 won up to 512 tokens and lost from 768. Without gradient it won only up to
#: 512 in bf16 and 256 in fp32.
INLINE_MAX_SCORES: dict = {
    "eval": {torch.float32: 4 * 256 * 256, torch.bfloat16: 4 * 512 * 512},
    "train": {torch.float32: 4 * 512 * 512, torch.bfloat16: 4 * 1536 * 1536},
    "train_banded": {torch.float32: 4 * 512 * 512, torch.bfloat16: 4 * 1024 * 1024},
}
#: Master switch (the backend option ``cpu_inline`` and the benchmarks turn it off).
USE_INLINE: bool = True
#: Switch of :func:`fused_attention` alone (``benchmarks/e2e.py --no-fused-lowering``).
USE_FUSED_LOWERING: bool = True


def max_scores(dtype: torch.dtype, training: bool, banded: bool = False) -> int:
    """The largest score count inlined for ``dtype`` (0: never), with or without a
    backward to follow (``training``) and a causal or window band (``banded``). bf16:
    0 on a CPU without native bf16 matrix products (:data:`base.NATIVE_BF16_GEMM`), where
    the inlined GEMMs would be emulated."""
    if dtype == torch.bfloat16 and not base.NATIVE_BF16_GEMM:
        return 0
    if not USE_INLINE:
        return 0
    kind = ("train_banded" if banded else "train") if training else "eval"
    return INLINE_MAX_SCORES[kind].get(dtype, 0)


def inline_applicable(q_shape, k_shape, dtype: torch.dtype, device: torch.device, *,
                      dropout_p, scale, softcap, window, causal, training: bool) -> bool:
    """Whether a call with these shapes and arguments is inlined (``training``: its
    inputs require grad, so a backward follows).

    Under dynamic shapes the sizes are SymInts: the comparison with :func:`max_scores`
    then installs a guard on the graph, so a call on the other side of the bound
    recompiles it once (each compiled graph serves one side of the bound)."""
    if device.type != "cpu" or causal not in ("none", "top_left", "bottom_right"):
        return False
    if not all(type(x) in (int, float) for x in (dropout_p, scale, softcap, window)):
        return False  # a run-time value (a graph node or a SymFloat)
    b, hq, lq, _ = q_shape
    lk = k_shape[2]
    banded = bool(window) or base.effective_causal(causal, lq, lk, window) != "none"
    bound = max_scores(dtype, training, banded)
    if dropout_p != 0 or bound == 0:
        return False
    return bool(b * hq * lq * lk <= bound)


# --------------------------------------------------------------------------- math
def _heads(x: Tensor, g: int) -> Tensor:
    """(B, Hkv, L, X) -> (B, Hkv * g, L, X): each kv head read by its query group."""
    if g == 1:
        return x
    b, hkv, l, last = x.shape
    return x[:, :, None].expand(b, hkv, g, l, last).reshape(b, hkv * g, l, last)


def _keep(lq: int, lk: int, causal: str, window: int, key_mask: Optional[Tensor],
          device: torch.device) -> Optional[Tensor]:
    """The structural masks as a broadcast bool (B|1, 1, Lq|1, Lk) built from index
    comparisons (Inductor folds it into the softmax kernel), or None."""
    keep = None
    if causal != "none":
        off = base.causal_offset(causal, lq, lk)
        # int32 indices: Inductor compares them 16 to a vector (int64: 8)
        i = torch.arange(lq, dtype=torch.int32, device=device).view(-1, 1)
        j = torch.arange(lk, dtype=torch.int32, device=device).view(1, -1)
        keep = j <= i + off
        if window:
            keep = keep & (j > i + off - window)
    if key_mask is not None:
        km = key_mask[:, None, None, :]
        keep = km if keep is None else keep & km
    return keep


def _logits(s: Tensor, bias: Optional[Tensor], *, scale: float, softcap: float) -> Tensor:
    """float32 logits from the raw scores ``s`` (B, Hq, Lq, Lk), before any mask (a bool
    bias is a mask: see :func:`_masked_out`)."""
    t = s.float() * scale
    if softcap:
        t = torch.tanh(t / softcap) * softcap
    if bias is not None and bias.dtype != torch.bool:
        t = t + bias.float()
    return t


def _masked_out(bias: Optional[Tensor], keep: Optional[Tensor]) -> Optional[Tensor]:
    """The (broadcast) bool of the logits set to -inf: a bool bias's False entries and
    those outside the structural masks; None when nothing is masked."""
    out = None
    if bias is not None and bias.dtype == torch.bool:
        out = bias.logical_not()
    if keep is not None:
        out = keep.logical_not() if out is None else out | keep.logical_not()
    return out


def _sees_every_row(lq: int, lk: int, causal: str, window: int, bias: Optional[Tensor],
                    key_mask: Optional[Tensor]) -> bool:
    """Whether every query row sees at least one key whatever the inputs' values: no
    bias or key_mask (either may mask a whole row) and a causal/window band that leaves
    each row a key (``causal`` already folded by ``base.effective_causal``)."""
    if bias is not None or key_mask is not None or lk == 0:
        return False
    if causal == "none":
        return True
    off = base.causal_offset(causal, lq, lk)  # row i sees keys (i + off - window, i + off]
    return off >= 0 and (not window or lq + off - window <= lk - 1)


class _Probs(torch.autograd.Function):
    """p = softmax(t masked by ``masked_out``) over keys, rounded to ``dtype``, 0 on rows
    that see no key (all -inf, where softmax gives NaN); only p is saved for the backward.

    The forward is ``torch.softmax``, which Inductor lowers as its own softmax kernel. The
    backward is the softmax's own, ``dt = p * (dp - rowsum(p * dp))`` in float32, read
    from the saved p in the input dtype, as eager's bf16 softmax does: autograd through
    the float32 softmax would keep the float32 probabilities, or the scores and row
    statistics to rebuild them (more bytes per score than Inductor saves). The mask is
    applied in here so that its backward is free: dt is already 0 wherever p is (masked
    entries, rows that see no key), so the mask is not rebuilt in the backward."""

    @staticmethod
    def forward(ctx, t: Tensor, masked_out: Optional[Tensor], dtype: torch.dtype,
                may_see_nothing: bool) -> Tensor:
        if masked_out is not None:
            t = t.masked_fill(masked_out, base.NEG_INF)
        p = torch.softmax(t, -1)
        if may_see_nothing:  # one more max pass: left out where no row can be empty
            p = torch.where(t.amax(-1, keepdim=True) == base.NEG_INF, 0.0, p)
        p = p.to(dtype)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, dp: Tensor):
        p, = ctx.saved_tensors
        p, dp = p.float(), dp.float()
        return p * (dp - (p * dp).sum(-1, keepdim=True)), None, None, None


def inline_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, scale: float,
                   causal: str, softcap: float, window: int,
                   key_mask: Optional[Tensor],
                   sinks: Optional[Tensor] = None,
                   alibi_slopes: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(out, lse) as :func:`attnfuse.kernels.torch_impl.forward` (no dropout); ALiBi
    slopes add :func:`base.alibi_block` (index arithmetic Inductor fuses into the
    logits kernel)."""
    lq, lk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    causal = base.effective_causal(causal, lq, lk, window)
    keep = _keep(lq, lk, causal, window, key_mask, q.device)
    t = _logits(torch.matmul(q, _heads(k, g).transpose(-1, -2)), bias, scale=scale,
                softcap=softcap)
    if alibi_slopes is not None:
        t = t + base.alibi_block(alibi_slopes, 0, lq, 0, lk, lq, lk, torch.float32)
    masked_out = _masked_out(bias, keep)
    may_see_nothing = not _sees_every_row(lq, lk, causal, window, bias, key_mask)
    if sinks is not None:
        # the sink column joins the softmax and is sliced off after it (gpt-oss's form)
        if masked_out is not None:
            t = t.masked_fill(masked_out, base.NEG_INF)
        b, hq = t.shape[0], t.shape[1]
        col = sinks.to(t.dtype).reshape(1, -1, 1, 1).expand(b, hq, lq, 1)
        t = torch.cat([t, col], dim=-1)
        p = _Probs.apply(t, None, q.dtype, may_see_nothing)[..., :lk]
        return torch.matmul(p, _heads(v, g)), torch.logsumexp(t, -1)
    p = _Probs.apply(t, masked_out, q.dtype, may_see_nothing)
    out = torch.matmul(p, _heads(v, g))
    # -inf on rows that see no key; Inductor drops it when the graph does not read it
    # (the rewrite reads only out, and the backward does not need it)
    lse = torch.logsumexp(t if masked_out is None else t.masked_fill(masked_out, base.NEG_INF), -1)
    return out, lse


def inline_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
                     scale: float = 1.0, causal: str = "none", dropout_p: float = 0.0,
                     softcap: float = 0.0, seed: Optional[Tensor] = None, impl: str = "auto",
                     window: int = 0, key_mask: Optional[Tensor] = None,
                     sinks: Optional[Tensor] = None,
                     alibi_slopes: Optional[Tensor] = None,
                     causal_offsets: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Drop-in for a ``torch.ops.attnfuse.flash_attention`` call (same arguments, same
    (out, lse) result) computed by :func:`inline_forward`, differentiable by autograd;
    ``dropout_p`` must be 0 (``seed`` and ``impl`` are ignored). ``causal_offsets`` are
    folded into the bias (:func:`base.with_causal_offsets`)."""
    if dropout_p:
        raise ValueError("inline_attention has no dropout: the backend inlines only calls "
                         "with dropout_p == 0")
    if bias is not None and bias.dim() < 4:
        bias = bias[(None,) * (4 - bias.dim())]
    if causal_offsets is not None:
        bias = base.with_causal_offsets(bias, causal_offsets, q.shape[2], k.shape[2])
    return inline_forward(q, k, v, bias, scale=float(scale), causal=causal,
                          softcap=float(softcap), window=int(window), key_mask=key_mask,
                          sinks=sinks, alibi_slopes=alibi_slopes)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
                    scale: float = 1.0, causal: str = "none", dropout_p: float = 0.0,
                    softcap: float = 0.0, seed: Optional[Tensor] = None, impl: str = "auto",
                    window: int = 0, key_mask: Optional[Tensor] = None,
                    sinks: Optional[Tensor] = None,
                    alibi_slopes: Optional[Tensor] = None,
                    causal_offsets: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Drop-in for a ``torch.ops.attnfuse.flash_attention`` call on CPU that the CPU
    dispatcher sends to its fused path as one plain kernel call, or a plain call without a
    causal band on its bf16 GEMM path (the backend asks ``torch_impl.forward_plan`` first): ``aten._scaled_dot_product_flash_attention_for_cpu``
    itself, (out, lse) with lse float32, for Inductor to call directly.

    Only for calls without bias, key_mask, dropout, softcap, window, sinks, ALiBi, causal
    offsets or GQA
    and with D == Dv (raises otherwise): there every row sees a key (top-left causal keeps
    key 0 for each row), so the op's lse fix-up for rows masked entirely has nothing to fix.
    The backward is the kernel's own, as on the op's fused path; the op's check that the
    lse is small enough for it (``torch_base.lse_well_conditioned``) exists for rows of
    ``finfo.min`` masks, which need a bias: without one, |lse| <= max |logit| + log(Lk),
    and the rounding of ``exp(s - lse)`` in float32 is that of eager's own softmax of
    those logits."""
    lq, lk = q.shape[2], k.shape[2]
    eff = base.effective_causal(causal, lq, lk, window)
    if (bias is not None or key_mask is not None or dropout_p or softcap or window
            or sinks is not None or alibi_slopes is not None or causal_offsets is not None
            or q.shape[1] != k.shape[1] or q.shape[-1] != v.shape[-1] or eff == "bottom_right"):
        raise ValueError("fused_attention takes only calls without bias, key_mask, dropout, "
                         "softcap, window, sinks, ALiBi, causal offsets, GQA or a bottom-right diagonal, "
                         "with D == Dv")
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, eff == "top_left", scale=float(scale))
