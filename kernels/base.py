"""The facts every implementation of ``attnfuse::flash_attention`` shares.

Owns the op's semantics helpers that the CPU paths (``torch_*``) and the Triton
launcher (``triton_*``) both rely on, and nothing else: the -inf of masked logits
(:data:`NEG_INF`), the folding of no-op causal alignments (:func:`effective_causal`),
the causal diagonal's offset (:func:`causal_offset`), the key band a block of rows can
see (:func:`band_kmin` / :func:`band_kmax`), the per-batch key bounds of a key_mask
(:func:`key_bounds`), the compute dtype of the CPU paths, the compact view of an
expanded bias, the CPU row-block sizes (:data:`BLOCK_Q`, :data:`BLOCK_ELEMS`), and the
algebra of attention sinks (:func:`add_sinks`: a result without sinks corrected from its
own lse; :func:`sinks_grad`: the sinks' gradient from the lse and rowsum(dO·O)), the
ALiBi term of one block of scores (:func:`alibi_block`), and the per-batch-item causal
diagonals of ``causal_offsets`` (:func:`offsets_keep`, :func:`with_causal_offsets`,
:func:`clamped_offsets`).

It imports no sibling module: every other module in ``kernels/`` may import it, and it
is the bottom of the house (``tests/test_kernels_layout.py`` checks that).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NEG_INF", "BLOCK_Q", "BLOCK_ELEMS", "compute_dtype", "compact", "effective_causal",
           "causal_offset", "band_kmin", "band_kmax", "key_bounds", "sinks_rows", "add_sinks",
           "sinks_grad", "alibi_block", "NATIVE_BF16_GEMM", "offsets_keep", "with_causal_offsets",
           "clamped_offsets"]

#: The logit of a masked (row, key) pair.
NEG_INF = float("-inf")
#: Most query rows per block of the CPU row-block loops (blocked, banded, lowp paths).
BLOCK_Q: int = 256


def _native_bf16_gemm() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


#: Whether this CPU has native bfloat16 matrix products (oneDNN's bf16 support:
#: AVX512-BF16 or AMX). Without it (an AVX2-only CPU) a bf16 ``bmm`` is emulated: on this
#: project's AVX2 machine, (8, 512, 64) x (8, 64, 512) took 277 ms in bf16 against 4.6 ms
#: in fp32, and a (1, 4, 512, 64) attention 96 ms on the bf16 GEMM path against 4.9 ms in
#: PyTorch's fused kernel. So the bf16 GEMM paths (``torch_lowp``, the bf16 bounds of
#: ``torch_inline``) are chosen only where it is True.
NATIVE_BF16_GEMM: bool = _native_bf16_gemm()
#: Most score elements (batch * heads * rows * keys) per CPU block; rows shrink to fit
#: (down to one row) when the key length is long.
BLOCK_ELEMS: int = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU paths compute in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compact(bias: Tensor) -> Tensor:
    """``bias`` with every stride-0 (expanded) dim narrowed to size 1 (a view)."""
    for d in range(bias.dim()):
        if bias.shape[d] > 1 and bias.stride(d) == 0:
            bias = bias.narrow(d, 0, 1)
    return bias


def effective_causal(causal: str, lq: int, lk: int, window: int = 0) -> str:
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


def causal_offset(causal: str, lq: int, lk: int) -> int:
    """Row i sees keys j <= i + offset."""
    return (lk - lq) if causal == "bottom_right" else 0


def band_kmin(causal: str, window: int, i0: int, lq: int, lk: int) -> int:
    """Keys below kmin lie outside the window of every row >= i0."""
    if not window:
        return 0
    return max(0, min(lk, i0 + causal_offset(causal, lq, lk) - window + 1))


def band_kmax(causal: str, i1: int, lq: int, lk: int) -> int:
    """Keys [0, kmax) are the only ones rows < i1 can see."""
    if causal == "none":
        return lk
    return max(0, min(lk, i1 + causal_offset(causal, lq, lk)))


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


# ------------------------------------------------------------------------ causal offsets
# ``causal_offsets`` (int, (B,)): a causal diagonal per batch item, row i of item b sees
# keys j <= i + causal_offsets[b] (a run-time value: the band a mask given as a graph
# input was found to lie in, passes/inputmask.py).  The Triton kernels load the item's
# offset as their causal shift; the CPU paths fold the band into the bias.


def clamped_offsets(causal_offsets: Tensor, lq: int, lk: int) -> Tensor:
    """The offsets as contiguous int32, clamped to [-lq, lk]: the same band for every row
    (an offset >= lk hides no key, one <= -lq every key), and safe int32 arithmetic."""
    return causal_offsets.clamp(-lq, lk).to(torch.int32).contiguous()


def offsets_keep(causal_offsets: Tensor, lq: int, lk: int) -> Tensor:
    """(B, 1, lq, lk) bool: True where key j lies on or below row i's diagonal
    ``i + causal_offsets[b]``."""
    off = causal_offsets.to(torch.int64).reshape(-1, 1, 1, 1)
    i = torch.arange(lq, device=causal_offsets.device).reshape(lq, 1)
    j = torch.arange(lk, device=causal_offsets.device)
    return j <= i + off


def with_causal_offsets(bias, causal_offsets: Tensor, lq: int, lk: int) -> Tensor:
    """``bias`` (None, bool or float, 4-D) with the band of ``causal_offsets`` folded in:
    a bool keep-mask (None, bool) or the float bias with ``-inf`` above each item's
    diagonal, broadcast over the batch (the CPU paths' form of the argument)."""
    keep = offsets_keep(causal_offsets, lq, lk)
    if bias is None:
        return keep
    if bias.dtype == torch.bool:
        return bias & keep
    return bias.masked_fill(~keep, NEG_INF)


# ------------------------------------------------------------------------ attention sinks
# A sink (gpt-oss, x-transformers' learned sink) is one extra logit per query head that
# joins every row's softmax denominator and has no value row: out_i = Σ_j p_ij v_j with
# p_ij = exp(s_ij - lse_i) and lse_i = log(exp(sink_h) + Σ_j exp(s_ij)).  The kernels
# take ``sinks`` as a (Hq,) float tensor.


def sinks_rows(sinks: Tensor) -> Tensor:
    """``sinks`` (Hq,) as a float32 (1, Hq, 1) view-shaped tensor, to broadcast against
    per-row (B, Hq, Lq) statistics."""
    return sinks.detach().to(torch.float32).reshape(1, -1, 1)


def add_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention WITH the sinks, from the (out, lse) of the same call
    without them: the sink only enlarges each row's denominator, so
    ``lse' = logaddexp(lse, sink)`` and ``out' = out * exp(lse - lse')``.  A row that
    sees no key (lse = -inf, out = 0) attends only to its sink: out' = 0, lse' = sink.
    Exact (one rounding of out to its dtype), including dropout, which scales each
    probability by its own keep factor."""
    sink = sinks_rows(sinks).to(lse.device)
    new_lse = torch.logaddexp(lse.float(), sink)
    ratio = torch.exp(lse.float() - new_lse)      # 0 where lse = -inf (and the sink is finite)
    ratio = torch.nan_to_num(ratio, nan=0.0)      # sink = -inf and lse = -inf: no key, no sink
    cdt = compute_dtype(out.dtype)
    scaled = (out.to(cdt) * ratio.to(cdt).unsqueeze(-1)).to(out.dtype)
    return scaled, new_lse


def sinks_grad(sinks: Tensor, lse: Tensor, delta: Tensor) -> Tensor:
    """d loss / d sinks, shape and dtype of ``sinks``: with ``delta`` = rowsum(dO · O)
    (B, Hq, Lq) and P_sink = exp(sink - lse) (lse including the sink), the sink's logit
    gradient is P_sink · (0 - delta) per row (it has no value row), summed over the
    batch and the rows that share it.  A plain reduction: deterministic, no atomics."""
    sink = sinks_rows(sinks).to(lse.device)
    p_sink = torch.exp(sink - lse.float())
    p_sink = torch.nan_to_num(p_sink, nan=0.0)     # sink = lse = -inf: no sink mass
    return (-(p_sink * delta.float()).sum(dim=(0, 2))).to(sinks.dtype)


def alibi_block(slopes: Tensor, i0: int, i1: int, kmin: int, kmax: int, lq: int, lk: int,
                dtype: torch.dtype) -> Tensor:
    """The ALiBi logits of rows [i0, i1) over keys [kmin, kmax), FlashAttention-2's
    convention: ``-slope * |i + lk - lq - j|``, as a (B|1, Hq, rows, keys) tensor of
    ``dtype`` from ``slopes`` (Hq,) or (B, Hq). Only one block is ever built (never
    the whole (Lq, Lk) term); the distance is computed in float64 (exact integers)."""
    i = torch.arange(i0 + lk - lq, i1 + lk - lq, device=slopes.device, dtype=torch.float64)
    j = torch.arange(kmin, kmax, device=slopes.device, dtype=torch.float64)
    dist = (i[:, None] - j[None, :]).abs_().to(dtype)
    s = slopes.to(dtype)
    s = s[None] if s.dim() == 1 else s
    return -(s[:, :, None, None] * dist)
