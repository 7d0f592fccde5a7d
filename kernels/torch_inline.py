"""The attention op written as plain aten ops, for Inductor to compile on CPU.

On CPU, PyTorch's fused flash kernel (the runtime path of
:mod:`attnfuse.kernels.torch_impl`) recomputes what Inductor's own C++ kernels do
faster at short lengths: for a few hundred to a thousand keys, Inductor's code for the
unfused graph (two GEMMs around one fused mask + softmax kernel) beats it, above all
in bf16 (``benchmarks/inline_crossover.py``, recorded in benchmarks/README.md). So the
``attnfuse`` backend, when its inner compiler is Inductor, replaces each fused-op call
on CPU whose score count ``B * Hq * Lq * Lk`` is at most :func:`max_scores` by :func:`inline_attention`: the same semantics and the same flash
autograd formula, written as aten ops that Inductor traces and fuses into its own
kernels::

    forward:   s   = q @ k^T                     one GEMM, rounded to the input dtype
               t   = mask(softcap(scale * s) + bias)   float32, fused by Inductor
               lse = logsumexp(t);  p = exp(t - lse)
               out = p.to(dtype) @ v             one GEMM
    backward:  the flash backward, recomputing p from (q, k): s^T = k @ q^T (so
               Inductor's CSE cannot merge it with the forward's s and save that),
               then p = softmax(t) as the forward (not exp(t - lse): the float32 lse
               of a row of finfo.min logits has lost log(Lk)),
               dv = p^T @ do, dp = do @ v^T, ds = p * (dp - rowsum(do * out)),
               dq = scale * ds @ k, dk = scale * ds^T @ q

Only (out, lse) and the inputs are kept between forward and backward, as with the
fused op: the (Lq, Lk) scores exist only inside one forward or one backward, so memory
stays linear in the length beyond :func:`max_scores`. Causal, window and key_mask are
index comparisons inside Inductor's softmax kernel (no (Lq, Lk) mask is read).

Rows that see no key give out = 0, lse = -inf and zero gradients (the op's contract).
Not inlined (the runtime op runs): dropout (its keep-mask comes from a seed read at
run time), fp16 and float64, and anything over :func:`max_scores`. Under dynamic shapes
the bound becomes a guard (see :func:`inline_applicable`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import torch_impl as T

__all__ = ["INLINE_MAX_SCORES", "USE_INLINE", "max_scores", "inline_applicable",
           "inline_forward", "inline_backward", "inline_attention"]

#: Largest ``B * Hq * Lq * Lk`` inlined, per dtype: 4 heads of 512 tokens in bf16, of 256 in
#: fp32. Chosen from whole models (``benchmarks/e2e.py --no-inline`` A/B at 512 and 1,024
#: tokens, with ``benchmarks/inline_crossover.py`` for 256; see benchmarks/README.md):
#: inlined, bf16 causal models at 512 tokens ran 1.2-1.4x faster, but every training row
#: at 1,024 tokens slower (the recompute's extra GEMM and float32 (L, L) buffers), and
#: fp32 at 512 no faster.
INLINE_MAX_SCORES: dict = {torch.float32: 4 * 256 * 256, torch.bfloat16: 4 * 512 * 512}
#: Master switch (the backend option ``cpu_inline`` and the benchmarks turn it off).
USE_INLINE: bool = True


def max_scores(dtype: torch.dtype) -> int:
    """The largest score count inlined for ``dtype`` (0: never)."""
    return INLINE_MAX_SCORES.get(dtype, 0) if USE_INLINE else 0


def inline_applicable(q_shape, k_shape, dtype: torch.dtype, device: torch.device, *,
                      dropout_p, scale, softcap, window, causal) -> bool:
    """Whether a call with these shapes and arguments is inlined.

    Under dynamic shapes the sizes are SymInts: the comparison with :func:`max_scores`
    then installs a guard on the graph, so a call on the other side of the bound
    recompiles it once (each compiled graph serves one side of the bound)."""
    if device.type != "cpu" or causal not in ("none", "top_left", "bottom_right"):
        return False
    if not all(type(x) in (int, float) for x in (dropout_p, scale, softcap, window)):
        return False  # a run-time value (a graph node or a SymFloat)
    if dropout_p != 0 or max_scores(dtype) == 0:
        return False
    b, hq, lq, _ = q_shape
    return bool(b * hq * lq * k_shape[2] <= max_scores(dtype))


# --------------------------------------------------------------------------- math
def _heads(x: Tensor, g: int) -> Tensor:
    """(B, Hkv, L, X) -> (B, Hkv * g, L, X): each kv head read by its query group."""
    if g == 1:
        return x
    b, hkv, l, last = x.shape
    return x[:, :, None].expand(b, hkv, g, l, last).reshape(b, hkv * g, l, last)


def _group_sum(x: Tensor, g: int) -> Tensor:
    """(B, Hkv * g, L, X) -> (B, Hkv, L, X): the gradient of :func:`_heads`."""
    return x if g == 1 else x.unflatten(1, (-1, g)).sum(2)


def _keep(lq: int, lk: int, causal: str, window: int, key_mask: Optional[Tensor],
          device: torch.device) -> Optional[Tensor]:
    """The structural masks as a broadcast bool (B|1, 1, Lq|1, Lk) built from index
    comparisons (Inductor folds it into the softmax kernel), or None."""
    keep = None
    if causal != "none":
        off = T._causal_offset(causal, lq, lk)
        i = torch.arange(lq, device=device).view(-1, 1)
        j = torch.arange(lk, device=device).view(1, -1)
        keep = j <= i + off
        if window:
            keep = keep & (j > i + off - window)
    if key_mask is not None:
        km = key_mask[:, None, None, :]
        keep = km if keep is None else keep & km
    return keep


def _logits(s: Tensor, bias: Optional[Tensor], keep: Optional[Tensor], *, scale: float,
            softcap: float) -> tuple[Tensor, Optional[Tensor]]:
    """float32 logits from the raw scores ``s`` (B, Hq, Lq, Lk), and tanh of the softcap
    (for its gradient; None without softcap)."""
    t = s.float() * scale
    th = None
    if softcap:
        th = torch.tanh(t / softcap)
        t = th * softcap
    if bias is not None:
        t = t.masked_fill(bias.logical_not(), T._NEG_INF) if bias.dtype == torch.bool \
            else t + bias.float()
    if keep is not None:
        t = t.masked_fill(keep.logical_not(), T._NEG_INF)
    return t, th


def _softmax(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(p, row max, row sum of exp(t - max)) of float32 logits; p = 0 on rows that see
    no key (all -inf)."""
    m = t.amax(-1, keepdim=True)
    m = torch.where(m == T._NEG_INF, 0.0, m)  # rows that see no key: exp(-inf - 0) = 0
    e = torch.exp(t - m)
    den = e.sum(-1, keepdim=True)
    return e / torch.where(den == 0, 1.0, den), m, den  # 0 / 1 = 0 on rows that see no key


def inline_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], *, scale: float,
                   causal: str, softcap: float, window: int,
                   key_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(out, lse) as :func:`attnfuse.kernels.torch_impl.forward` (no dropout)."""
    lq, lk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    causal = T._effective_causal(causal, lq, lk, window)
    keep = _keep(lq, lk, causal, window, key_mask, q.device)
    t, _ = _logits(torch.matmul(q, _heads(k, g).transpose(-1, -2)), bias, keep,
                   scale=scale, softcap=softcap)
    p, m, den = _softmax(t)
    out = torch.matmul(p.to(q.dtype), _heads(v, g))
    lse = (m + torch.log(den)).squeeze(-1)  # log(0) = -inf on rows that see no key
    return out, lse


def inline_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                    out: Tensor, lse: Tensor, *, scale: float, causal: str, softcap: float,
                    window: int, key_mask: Optional[Tensor], need_dbias: bool):
    """(dq, dk, dv, dbias) for :func:`inline_forward`; dbias has bias's shape and dtype
    (None unless ``need_dbias`` and the bias is float)."""
    lq, lk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    causal = T._effective_causal(causal, lq, lk, window)
    keep = _keep(lq, lk, causal, window, key_mask, q.device)
    kh, vh = _heads(k, g), _heads(v, g)
    do = dout.to(q.dtype)
    # s^T = k @ q^T, read back transposed: not the forward's GEMM, so never merged with it
    t, th = _logits(torch.matmul(kh, q.transpose(-1, -2)).transpose(-1, -2), bias, keep,
                    scale=scale, softcap=softcap)
    # p as the forward computed it, not exp(t - lse): on rows of finfo.min logits
    # (Hugging Face padding) the float32 lse has lost log(Lk) entirely
    p, _, _ = _softmax(t)
    dv = torch.matmul(p.to(q.dtype).transpose(-1, -2), do)
    dp = torch.matmul(do, vh.transpose(-1, -2)).float()
    delta = (do.float() * out.float()).sum(-1, keepdim=True)  # rowsum(p * dp)
    ds = p * (dp - delta)  # the gradient of the logits (after bias and masks)
    dbias = None
    if need_dbias and bias is not None and bias.dtype != torch.bool:
        dims = [d for d in range(4) if bias.shape[d] == 1 and ds.shape[d] != 1]
        dbias = (ds.sum(dims, keepdim=True) if dims else ds).to(bias.dtype)
    if th is not None:
        ds = ds * (1.0 - th * th)  # d tanh(x / c) * c / dx
    ds = (ds * scale).to(q.dtype)
    dq = torch.matmul(ds, kh)
    dk = _group_sum(torch.matmul(ds.transpose(-1, -2), q), g)
    return dq, dk.to(k.dtype), _group_sum(dv, g).to(v.dtype), dbias


class InlineAttention(torch.autograd.Function):
    """:func:`inline_forward` with :func:`inline_backward` as its gradient: only the
    inputs, out and lse are saved."""

    @staticmethod
    def forward(ctx, q, k, v, bias, key_mask, scale, causal, softcap, window):
        out, lse = inline_forward(q, k, v, bias, scale=scale, causal=causal, softcap=softcap,
                                  window=window, key_mask=key_mask)
        ctx.save_for_backward(q, k, v, bias, key_mask, out, lse)
        ctx.args = (scale, causal, softcap, window)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, bias, key_mask, out, lse = ctx.saved_tensors
        scale, causal, softcap, window = ctx.args
        dq, dk, dv, dbias = inline_backward(
            dout, q, k, v, bias, out, lse, scale=scale, causal=causal, softcap=softcap,
            window=window, key_mask=key_mask, need_dbias=ctx.needs_input_grad[3])
        return dq, dk, dv, dbias, None, None, None, None, None


def inline_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
                     scale: float = 1.0, causal: str = "none", dropout_p: float = 0.0,
                     softcap: float = 0.0, seed: Optional[Tensor] = None, impl: str = "auto",
                     window: int = 0, key_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Drop-in for a ``torch.ops.attnfuse.flash_attention`` call (same arguments, same
    (out, lse) result) computed by :class:`InlineAttention`; ``dropout_p`` must be 0
    (``seed`` and ``impl`` are ignored)."""
    if dropout_p:
        raise ValueError("inline_attention has no dropout: the backend inlines only calls "
                         "with dropout_p == 0")
    if bias is not None and bias.dim() < 4:
        bias = bias[(None,) * (4 - bias.dim())]
    return InlineAttention.apply(q, k, v, bias, key_mask, float(scale), causal,
                                 float(softcap), int(window))
